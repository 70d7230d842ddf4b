"""Pruning the default model: perplexity against sparsity, and the speed of the structured cuts (I5).

Every setting starts from the same fp32 SmolLM2-135M-Instruct. Calibration (Wanda's
activation norms) reads --calib-tokens tokens of the offline Wikipedia excerpt's
training side; perplexity is measured on --eval-tokens tokens of its held-out side
(`split_of(text, 0.1, salt="prune")`, the split `lmforge prune` also keeps out of its
calibration), in non-overlapping windows of 512 tokens. The x axis is the share of the decoder blocks'
linear weights removed (zeroed, or cut out for the structured kinds).

The structured models (fewer MLP channels, fewer KV head groups) are then timed against
the dense model through lmforge's engine in alternating rounds: batch-1 greedy decode
tokens/s and the prefill of one 512-token prompt.

    python benchmarks/prune.py                        # the whole curve, then the timing
    python benchmarks/prune.py --quick                # fewer settings and tokens

Prints one JSON line per setting and a summary line; writes a plot with --plot PATH.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_common import cpu_model, heldout_texts, wiki_texts  # noqa: E402


def block_weights(model) -> int:
    from lmforge.infer.prune import prunable_linears

    return sum(layer.weight.numel() for layer in prunable_linears(model).values())


def removed_share(model, dense_weights: int) -> float:
    from lmforge.infer.prune import prunable_linears

    kept = sum(int((layer.weight != 0).sum()) for layer in prunable_linears(model).values())
    return 1 - kept / dense_weights


def timing(directories: dict[str, str], rounds: int, new_tokens: int) -> dict[str, dict]:
    import torch

    import lmforge
    from lmforge.infer.engine import Generator
    from lmforge.infer.sampling import SamplingParams

    loaded = {name: lmforge.load(path, dtype="float32", device="cpu") for name, path in directories.items()}
    prompt = loaded["dense"].tokenizer.encode("The history of the printing press begins")
    long_prompt = (prompt * 200)[:512]
    params = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)
    decode: dict[str, list[float]] = {n: [] for n in loaded}
    prefill: dict[str, list[float]] = {n: [] for n in loaded}
    with torch.inference_mode():
        for lm in loaded.values():
            Generator(lm.model, lm.tokenizer).generate([prompt], SamplingParams(max_tokens=4, temperature=0))
        for _ in range(rounds):
            for name, lm in loaded.items():
                generator = Generator(lm.model, lm.tokenizer)
                start = time.perf_counter()
                generator.generate([prompt], params)
                decode[name].append(new_tokens / (time.perf_counter() - start))
                start = time.perf_counter()
                lm.model(torch.tensor([long_prompt]), last_only=True)
                prefill[name].append(512 / (time.perf_counter() - start))
    dense_decode, dense_prefill = statistics.median(decode["dense"]), statistics.median(prefill["dense"])
    return {name: {"decode_tok_s": round(statistics.median(decode[name]), 1),
                   "decode_vs_dense": round(statistics.median(decode[name]) / dense_decode, 3),
                   "prefill_tok_s": round(statistics.median(prefill[name]), 1),
                   "prefill_vs_dense": round(statistics.median(prefill[name]) / dense_prefill, 3),
                   "parameters": loaded[name].model.num_parameters()} for name in loaded}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--eval-tokens", type=int, default=16384)
    parser.add_argument("--calib-tokens", type=int, default=4096)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--timing-only", action="store_true",
                        help="only cut the structured models and time them (no perplexity curve)")
    parser.add_argument("--plot", default=None, help="write the perplexity-vs-sparsity plot here (PNG)")
    args = parser.parse_args()

    import itertools

    import torch

    from lmforge.eval.perplexity import perplexity
    from lmforge.infer.prune import PruneOptions, calibration_batches, prune
    from lmforge.model.checkpoint import save_hf_model
    from lmforge.model.loading import load_model, load_tokenizer
    from lmforge.model.registry import resolve

    if args.quick:
        args.eval_tokens, args.calib_tokens, args.rounds = min(args.eval_tokens, 4096), 1024, 1
    spec = resolve(None)
    dense, tokenizer = load_model(spec, dtype=torch.float32), load_tokenizer(spec)
    heldout, total = heldout_texts(tokenizer, args.eval_tokens)
    calibration = calibration_batches(tokenizer, itertools.islice(wiki_texts("train"), 10_000), args.calib_tokens)
    dense_weights = block_weights(dense)

    settings = [("dense", PruneOptions(method="magnitude", sparsity=0.0))]
    levels = [0.2, 0.4, 0.5, 0.6] if args.quick else [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7]
    settings += [(f"{m} {s:.0%}", PruneOptions(method=m, sparsity=s)) for m in ("magnitude", "wanda") for s in levels]
    settings += [("wanda 2:4", PruneOptions(method="nm", n=2, m=4)), ("magnitude 2:4", None)]
    settings += [(f"channels {s:.0%}", PruneOptions(method="channels", sparsity=s))
                 for s in ([0.25, 0.5] if args.quick else [0.1, 0.25, 0.5])]
    settings += [("heads 1/3", PruneOptions(method="heads", sparsity=1 / 3))]
    if args.timing_only:
        settings = [(n, o) for n, o in settings if n in ("channels 25%", "channels 50%", "heads 1/3")]
    results, saved = [], {}
    workdir = Path(tempfile.mkdtemp(prefix="lmforge-prune-"))
    for name, options in settings:
        start = time.perf_counter()
        model = copy.deepcopy(dense)
        with torch.inference_mode():
            if options is None:  # n:m by magnitude alone, for comparison with Wanda's score
                from lmforge.infer.prune import apply_masks, nm_masks
                apply_masks(model, nm_masks(model, 2, 4))
            else:
                model = prune(model, options, calibration)
            ppl = (float("nan") if args.timing_only else
                   perplexity(model, heldout, tokenizer=tokenizer, window=512, stride=512).ppl)
        structured = options is not None and options.method in ("channels", "heads")
        share = 1 - block_weights(model) / dense_weights if structured else removed_share(model, dense_weights)
        row = {"setting": name, "removed_share": round(share, 4), "perplexity": round(ppl, 3),
               "parameters": model.num_parameters(), "seconds": round(time.perf_counter() - start, 1)}
        results.append(row)
        print(json.dumps(row), flush=True)
        if structured and name in ("channels 25%", "channels 50%", "heads 1/3"):  # the ones timed
            saved[name] = str(save_hf_model(model, workdir / name.replace(" ", "-").replace("/", "of"),
                                            tokenizer=tokenizer))
        del model
    saved = {"dense": str(save_hf_model(dense, workdir / "dense", tokenizer=tokenizer)), **saved}
    speed = timing(saved, args.rounds, args.new_tokens)
    for name, row in speed.items():
        print(json.dumps({"timing": name, **row}), flush=True)

    if args.plot and not args.timing_only:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4.5))
        base = results[0]["perplexity"]
        for method, style in (("magnitude", "o-"), ("wanda", "s-"), ("channels", "^-")):
            rows = [results[0]] + [r for r in results if r["setting"].startswith(method) and "2:4" not in r["setting"]]
            ax.plot([r["removed_share"] for r in rows], [r["perplexity"] for r in rows], style, label=method)
        for r in results:
            if "2:4" in r["setting"] or r["setting"].startswith("heads"):
                ax.plot(r["removed_share"], r["perplexity"], "D", label=r["setting"])
        ax.axhline(base, color="grey", lw=0.8, ls="--")
        ax.set_yscale("log")
        ax.set_xlabel("share of the decoder blocks' linear weights removed")
        ax.set_ylabel("held-out perplexity (log scale)")
        ax.set_title("Pruning SmolLM2-135M-Instruct (Wikipedia excerpt, held-out side)")
        ax.legend(fontsize=8)
        fig.tight_layout()
        Path(args.plot).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(args.plot, dpi=110)
    print(json.dumps({"benchmark": "prune", "cpu": cpu_model(), "threads": torch.get_num_threads(),
                      "eval_tokens": total, "calib_tokens": args.calib_tokens, "curve": results, "timing": speed}))


if __name__ == "__main__":
    main()
