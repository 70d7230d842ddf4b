"""Batch-1 decode speed of the default model exported to ONNX (onnxruntime, CPU) vs lmforge's engine.

Both run the same weights in float32 on the CPU: lmforge loads the default model the usual
way (`lmforge.load`, with its CPU decoding layout) and decodes through its scheduler; the
ONNX export of the same model (lmforge/infer/export_onnx.py) decodes in onnxruntime with
the KV cache passed in and out of the graph each step. Rounds alternate between the two
and the medians are reported, so a burst of load on a shared machine hits both.

    python benchmarks/export.py                  # 3 rounds, 64 new tokens after a 16-token prompt
    python benchmarks/export.py --rounds 5 --onnx-dir /tmp/smol-onnx   # reuse an export
    python benchmarks/export.py --threads 1   # one thread each: steadier on a loaded shared machine

Decode tokens/s counts the tokens after the first over the time from the first token to the
last (prefill excluded), the way the engine's `Completion` splits its timings. Prints a
table and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import lmforge  # noqa: E402
from lmforge.infer import SamplingParams  # noqa: E402
from lmforge.infer.export_onnx import OnnxRunner, export_onnx  # noqa: E402
from lmforge.model.loading import load_model  # noqa: E402
from lmforge.model.registry import resolve  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=0,
                    help="threads for both runtimes (torch.set_num_threads, onnxruntime intra-op); 0: their defaults")
    ap.add_argument("--onnx-dir", default=None, help="an existing export of the default model (default: export now)")
    args = ap.parse_args()

    import onnxruntime

    if args.threads:
        torch.set_num_threads(args.threads)
    lm = lmforge.load(dtype="float32", device="cpu")
    onnx_dir = Path(args.onnx_dir) if args.onnx_dir else Path(tempfile.mkdtemp()) / "smol-onnx"
    export_seconds = None
    if not (onnx_dir / "model.onnx").is_file():
        started = time.perf_counter()
        export_onnx(load_model(resolve(None)), onnx_dir)
        export_seconds = time.perf_counter() - started
    runner = OnnxRunner(onnx_dir, threads=args.threads or None)

    prompt = lm.tokenizer.encode("Write a short story about a lighthouse keeper who")[:16]
    n = args.new_tokens
    params = SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)
    ours = lm.generator.generate([prompt], params)[0].token_ids
    theirs = runner.generate(prompt, n)
    same = sum(a == b for a, b in zip(ours, theirs))

    results: dict[str, list[float]] = {"lmforge": [], "onnxruntime": []}
    for r in range(args.rounds):
        done = lm.generator.generate([prompt], params)[0]
        results["lmforge"].append((n - 1) / done.decode_seconds)
        runner.generate(prompt, n)
        results["onnxruntime"].append((n - 1) / runner.decode_seconds)
        print(f"round {r + 1}/{args.rounds}: lmforge {results['lmforge'][-1]:.1f} tok/s, "
              f"onnxruntime {results['onnxruntime'][-1]:.1f} tok/s", file=sys.stderr)
    med = {k: statistics.median(v) for k, v in results.items()}
    print(f"{'runtime':<14}{'decode tok/s (median)':>24}")
    for k, v in med.items():
        print(f"{k:<14}{v:>24.1f}")
    print(f"onnxruntime / lmforge: {med['onnxruntime'] / med['lmforge']:.2f}x; "
          f"same greedy tokens: {same}/{n}")
    record = {
        "benchmark": "export_onnx_decode_b1", "model": lm.name, "new_tokens": n, "prompt_tokens": len(prompt),
        "rounds": args.rounds, "lmforge_tok_s": round(med["lmforge"], 2), "onnxruntime_tok_s": round(med["onnxruntime"], 2),
        "ratio_onnxruntime_over_lmforge": round(med["onnxruntime"] / med["lmforge"], 3),
        "same_greedy_tokens": same, "export_seconds": round(export_seconds, 1) if export_seconds else None,
        "onnxruntime": onnxruntime.__version__, "torch": torch.__version__, "threads": torch.get_num_threads(), "threads_flag": args.threads,
        "machine": platform.processor() or platform.machine(), "load_avg": os.getloadavg(),
    }
    print(json.dumps(record))


if __name__ == "__main__":
    main()
