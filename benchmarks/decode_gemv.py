"""How close can a float32 batch-1 decode step get to the one-GEMV bandwidth ceiling?

A decode step of the default model is 121 matrix-vector products (per block: fused q/k/v
576 x 960, attention output 576 x 576 (both column-major), fused gate/up 576 x 3072, down 1536 x 576; then the
576 x 49152 vocabulary head) plus the element-wise work between them. This script times the
products alone, through the kernel lmforge uses for one row (NumPy's BLAS, weights laid out
as `lmforge/infer/layout.py` lays them out: wide ones column-major, the down projection
row-major), on random weights of those shapes held in memory as a real model's are (each
matrix its own buffer, 538 MB in all, so nothing stays in cache between steps):

- each shape on its own (many copies, cycled, so every call streams from memory);
- a whole GEMV-only step (all 121 products in model order), the bound for a step with no
  other work at all;

beside the one-GEMV ceiling benchmarks/decode.py reports (one 512 MiB product). BLAS
threads follow OPENBLAS_NUM_THREADS as set when the script starts.

    python benchmarks/decode_gemv.py
    OPENBLAS_NUM_THREADS=1 python benchmarks/decode_gemv.py

Prints a table and one JSON line.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))

from bench_common import cpu_model  # noqa: E402

LAYERS = 30
SHAPES = {"qkv": (576, 960, "col"), "out": (576, 576, "col"), "gate_up": (576, 3072, "col"),
          "down": (1536, 576, "row"), "head": (576, 49152, "col")}


def matrix(k: int, n: int, order: str, rng) -> np.ndarray:
    """The [k, n] operand of x[1, k] @ W: column-major weights are W.T stored contiguous;
    row-major ones are a transposed view of a contiguous [n, k] array."""
    if order == "col":
        return rng.random((k, n), dtype=np.float32)
    return rng.random((n, k), dtype=np.float32).T


def median_time(fn, rounds: int) -> float:
    fn()
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=15, help="timed whole steps (median)")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    xs = {k: rng.random((1, k), dtype=np.float32) for k in (576, 1536)}

    per_shape = {}
    for name, (k, n, order) in SHAPES.items():
        copies = max(2, (96 << 20) // (k * n * 4))  # 96 MiB of copies: three times the L3 of the machines we use
        mats = [matrix(k, n, order, rng) for _ in range(copies)]
        state = {"i": 0}

        def one(mats=mats, x=xs[k], state=state):
            state["i"] = (state["i"] + 1) % len(mats)
            return x @ mats[state["i"]]

        for _ in range(copies):
            one()
        seconds = median_time(one, 200)
        per_shape[name] = {"shape": f"{k}x{n}", "us": round(seconds * 1e6, 1),
                           "gb_s": round(k * n * 4 / seconds / 1e9, 1)}
        del mats

    blocks = [[matrix(k, n, order, rng) for name, (k, n, order) in SHAPES.items() if name != "head"]
              for _ in range(LAYERS)]
    head = matrix(*SHAPES["head"], rng)
    step_bytes = sum(m.nbytes for b in blocks for m in b) + head.nbytes

    def step():
        for block in blocks:
            for m in block:
                xs[m.shape[0]] @ m
        xs[576] @ head

    step_seconds = median_time(step, args.rounds)
    from decode import read_bandwidth_gbs

    ceiling = read_bandwidth_gbs()
    out = {
        "benchmark": "decode-gemv", "cpu": cpu_model(),
        "openblas_threads": os.environ.get("OPENBLAS_NUM_THREADS", "default"),
        "per_shape": per_shape, "gemv_step_ms": round(step_seconds * 1e3, 2),
        "gemv_step_gb_s": round(step_bytes / step_seconds / 1e9, 1), "step_mb": round(step_bytes / 1e6, 1),
        "one_gemv_ceiling_gb_s": round(ceiling["gemv"], 1), "streaming_read_gb_s": round(ceiling["sum"], 1),
    }
    out["gemv_step_share_of_ceiling"] = round(out["gemv_step_gb_s"] / out["one_gemv_ceiling_gb_s"], 3)
    for name, r in per_shape.items():
        print(f"{name:8} {r['shape']:>10} {r['us']:9.1f} us {r['gb_s']:6.1f} GB/s")
    print(f"GEMV-only step: {out['gemv_step_ms']} ms, {out['gemv_step_gb_s']} GB/s = "
          f"{out['gemv_step_share_of_ceiling']:.0%} of the one-GEMV ceiling ({out['one_gemv_ceiling_gb_s']} GB/s)")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
