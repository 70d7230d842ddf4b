"""What masked-LM pretraining buys a classifier: the same encoder fine-tuned from its pretrained
weights and from a random initialization, same data, same recipe, several seeds.

The pretrained encoder is a directory `lmforge pretrain mlm-wiki-bert` wrote (``OUT/model``,
BertForMaskedLM layout). The random one is the same architecture with the initialization the
pretraining run started from (seed 0), saved with the same tokenizer, so the two differ only
in the masked-LM training. Both are fine-tuned with lmforge's task head (lmforge/tune/heads.py,
a [CLS] pooler + linear layer, trained in full by lmforge/tune/classify.py) on the Pang & Lee
polarity sentences (140 / 20 / 40 per split); ``--seeds`` re-draws the split and the head's
initialization. For each initialization the learning rate is chosen among ``--lrs`` by mean
validation accuracy over the seeds; the test figures of that learning rate are reported.

    nice -n 10 python benchmarks/mlm_classify.py --pretrained runs/mlm-wiki-bert/model --out runs/mlm-classify

Prints a table and one JSON line; writes OUT/results.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch


def random_twin(pretrained: Path, out: Path, seed: int = 0) -> Path:
    """The pretrained model's architecture and tokenizer with fresh weights (as at step 0)."""
    from lmforge.model.checkpoint import read_hf_config
    from lmforge.model.loading import load_tokenizer
    from lmforge.model.masked_lm import MaskedLM, save_masked_lm
    from lmforge.model.registry import resolve

    if out.is_dir():
        return out
    torch.manual_seed(seed)
    model = MaskedLM(read_hf_config(pretrained))
    return save_masked_lm(model, out, load_tokenizer(resolve(str(pretrained))))


def corruption_breakdown(model_dir: Path, recipe: str) -> dict:
    """The pretrained model's held-out accuracy split by corruption ([MASK] / kept / random), on
    the held-out masks of ``recipe`` (the pretraining run's own evaluation masks)."""
    import tempfile

    from lmforge.model.masked_lm import load_masked_lm
    from lmforge.train.distributed import init_runtime
    from lmforge.train.mlm import MaskedLMTask, accuracy_by_corruption
    from lmforge.train.recipe import load_recipe

    config = load_recipe(recipe, {"train.out": tempfile.mkdtemp()})
    task = MaskedLMTask(config)

    class Setup:  # what the task's setup reads from a trainer
        log = staticmethod(lambda _m: None)
        runtime = init_runtime("none", "cpu")

    task.setup(Setup())
    return accuracy_by_corruption(load_masked_lm(model_dir), task.val_inputs, task.val_labels, task.mask_id)


def finetune(model_dir: Path, out: Path, seed: int, lr: float, steps: int) -> dict:
    from lmforge.tune.classify import classify, load_classify_recipe

    if (out / "report.json").is_file():
        return json.loads((out / "report.json").read_text())
    config = load_classify_recipe(None, {
        "model.init_from": str(model_dir), "data.dataset": "sentiment", "data.seed": seed, "data.max_len": 64,
        "head.pooling": "cls", "head.dropout": 0.1, "optim.lr": lr, "optim.weight_decay": 0.01,
        "schedule.warmup_steps": max(1, steps // 10), "train.max_steps": steps, "train.batch_size": 16,
        "train.seed": seed, "train.eval_interval": steps, "train.threads": 1, "train.peak_tflops": 1.0,
        "train.plots": False, "train.out": str(out), "eval.test": True})
    return classify(config, progress=False, log=lambda _m: None)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pretrained", required=True, help="a BertForMaskedLM directory from `lmforge pretrain` (mlm)")
    p.add_argument("--out", default="runs/mlm-classify")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--lrs", default="1e-4,3e-4,1e-3")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--recipe", default="lmforge/recipes/mlm-wiki-bert.yaml",
                   help="the pretraining recipe (for its held-out masks in the accuracy breakdown)")
    args = p.parse_args()
    torch.set_num_threads(1)
    out = Path(args.out)
    seeds = [int(s) for s in args.seeds.split(",")]
    lrs = [float(x) for x in args.lrs.split(",")]
    inits = {"pretrained": Path(args.pretrained), "random": random_twin(Path(args.pretrained), out / "random-init")}
    breakdown = {name: corruption_breakdown(d, args.recipe) for name, d in inits.items()}
    for name, b in breakdown.items():
        print(f"{name:10s} held-out masked-token accuracy {b['accuracy']:.3f}: at [MASK] {b['mask_accuracy']:.3f} "
              f"({b['mask_share']:.0%} of targets), kept {b['kept_accuracy']:.3f}, random {b['random_accuracy']:.3f}",
              file=sys.stderr)
    runs: dict[str, dict[float, list[dict]]] = {name: {} for name in inits}
    started = time.perf_counter()
    for name, directory in inits.items():
        for lr in lrs:
            for seed in seeds:
                report = finetune(directory, out / f"{name}-lr{lr:g}-seed{seed}", seed, lr, args.steps)
                val = report["validation"][-1]
                test = report["test"]
                runs[name].setdefault(lr, []).append({"seed": seed, "val_accuracy": val["accuracy"],
                                                      "test_accuracy": test["accuracy"],
                                                      "test_macro_f1": test["macro_f1"]})
                print(f"{name:10s} lr {lr:g} seed {seed}: validation accuracy {val['accuracy']:.3f}, "
                      f"test accuracy {test['accuracy']:.3f}, macro F1 {test['macro_f1']:.3f}", file=sys.stderr)
    summary = {}
    for name, by_lr in runs.items():
        best_lr = max(by_lr, key=lambda lr: (statistics.mean(r["val_accuracy"] for r in by_lr[lr]), -lr))
        chosen = by_lr[best_lr]
        acc = [r["test_accuracy"] for r in chosen]
        f1 = [r["test_macro_f1"] for r in chosen]
        summary[name] = {"lr": best_lr, "test_accuracy_mean": statistics.mean(acc),
                         "test_accuracy_sd": statistics.stdev(acc) if len(acc) > 1 else 0.0,
                         "test_macro_f1_mean": statistics.mean(f1),
                         "test_macro_f1_sd": statistics.stdev(f1) if len(f1) > 1 else 0.0, "runs": chosen,
                         "all_lrs": {str(lr): statistics.mean(r["test_accuracy"] for r in rs) for lr, rs in by_lr.items()}}
    print("| initialization | lr (by validation) | test accuracy | test macro F1 |")
    print("|---|---:|---:|---:|")
    for name, s in summary.items():
        print(f"| {name} | {s['lr']:g} | {s['test_accuracy_mean']:.3f} ± {s['test_accuracy_sd']:.3f} | "
              f"{s['test_macro_f1_mean']:.3f} ± {s['test_macro_f1_sd']:.3f} |")
    result = {"benchmark": "mlm_classify", "seeds": seeds, "steps": args.steps, "summary": summary,
              "mlm_accuracy_by_corruption": breakdown,
              "gain_accuracy": summary["pretrained"]["test_accuracy_mean"] - summary["random"]["test_accuracy_mean"],
              "gain_macro_f1": summary["pretrained"]["test_macro_f1_mean"] - summary["random"]["test_macro_f1_mean"],
              "seconds": time.perf_counter() - started}
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "summary"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
