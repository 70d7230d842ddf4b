"""Catastrophic forgetting and the LoRA-vs-full margin of a classification fine-tune.

Trains the default decoder (SmolLM2-135M-Instruct) as a sentiment classifier twice from
one recipe (lmforge/recipes/classify-sentiment-smollm2.yaml), once with LoRA on the body
and once fully, same steps and data, then puts each fine-tuned body back under the
vocabulary head (`lmforge.tune.heads.language_model_of`) and measures its perplexity on
held-out general text (the last 6 articles of gensim's Wikipedia excerpt, first 3000
words, as the SFT forgetting measurement in docs/benchmarks.md), against the base model.
Prints a Markdown table and one JSON line (also written to --out/forgetting.json).

    nice -n 10 env OMP_NUM_THREADS=1 python benchmarks/classify_forgetting.py \\
        [--steps 60] [--lora-lr 3e-4] [--full-lr 2e-5] [--out runs/classify-forgetting]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def heldout_text(words: int = 3000) -> str:
    from lmforge.data.corpora import load_source

    docs = list(load_source("wiki"))
    return " ".join(" ".join(d.text for d in docs[-6:]).split()[:words])


def perplexity_of(model, tokenizer, text: str, window: int, stride: int) -> dict:
    from lmforge.eval.perplexity import ModelScorer, perplexity

    result = perplexity(ModelScorer(model.eval()), text, tokenizer=tokenizer, window=window, stride=stride)
    return {"ppl": result.ppl, "nll": result.mean_nll, "tokens": result.tokens, "bpb": result.bpb}


def main() -> None:
    import torch

    from lmforge.model.loading import load_model, load_tokenizer
    from lmforge.model.registry import resolve
    from lmforge.tune.classify import classify, load_classify_recipe
    from lmforge.tune.heads import language_model_of, load_classifier

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", default="lmforge/recipes/classify-sentiment-smollm2.yaml")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--lora-lr", type=float, default=3e-4)
    parser.add_argument("--full-lr", type=float, default=2e-5)
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--stride", type=int, default=256)
    parser.add_argument("--out", default="runs/classify-forgetting")
    parser.add_argument("--only", choices=("lora", "full"), help="run one of the two fine-tunes")
    args = parser.parse_args()

    out = Path(args.out)
    text = heldout_text()
    spec = resolve("smollm2-135m-instruct")
    base = load_model(spec, torch.float32, "cpu").float().eval()
    tokenizer = load_tokenizer(spec)
    started = time.perf_counter()
    with torch.no_grad():
        rows = {"base": perplexity_of(base, tokenizer, text, args.window, args.stride)}
    rows["base"]["seconds"] = time.perf_counter() - started
    print(f"base: perplexity {rows['base']['ppl']:.3f} on {rows['base']['tokens']} tokens", flush=True)
    for method in ("lora", "full"):
        if args.only and method != args.only:
            continue
        overrides = {"train.max_steps": args.steps, "train.out": str(out / method),
                     "optim.lr": args.lora_lr if method == "lora" else args.full_lr}
        if method == "full":
            overrides["peft.method"] = "none"
        config = load_classify_recipe(args.recipe, overrides)
        report = classify(config, progress=False)
        classifier = load_classifier(report["output"])
        with torch.no_grad():
            after = perplexity_of(language_model_of(classifier, base), tokenizer, text, args.window, args.stride)
        test = report["test"]
        rows[method] = {**after, "accuracy": test["accuracy"], "macro_f1": test["macro_f1"],
                        "trainable_fraction": report["trainable_fraction"],
                        "trainable_parameters": report["trainable_parameters"], "lr": overrides["optim.lr"],
                        "steps": report["steps"], "train_seconds": report["train_seconds"]}
        print(f"{method}: test accuracy {test['accuracy']:.3f}, macro F1 {test['macro_f1']:.3f}, "
              f"perplexity {after['ppl']:.3f}", flush=True)
    base_ppl = rows["base"]["ppl"]
    lines = ["| model | trainable | test accuracy | test macro F1 | Wikipedia perplexity | change |",
             "|---|---:|---:|---:|---:|---:|",
             f"| base (no fine-tuning) | - | - | - | {base_ppl:.2f} | - |"]
    for method in ("lora", "full"):
        if method in rows:
            r = rows[method]
            lines.append(f"| {method} ({r['steps']} steps, lr {r['lr']:g}) | {100 * r['trainable_fraction']:.2f}% | "
                         f"{r['accuracy']:.3f} | {r['macro_f1']:.3f} | {r['ppl']:.2f} | "
                         f"{100 * (r['ppl'] / base_ppl - 1):+.1f}% |")
    print("\n".join(lines))
    out.mkdir(parents=True, exist_ok=True)
    from lmforge.io.atomic import write_json_atomic

    write_json_atomic(out / "forgetting.json", rows)
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
