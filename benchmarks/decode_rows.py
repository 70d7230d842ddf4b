"""Batched decode steps: the compiled call against the model's modules, per number of rows.

A server decoding for several clients runs steps of one new token per running sequence, each
sequence at its own position and cache row. lmforge runs such a step of up to 16 rows as one
compiled call (`Transformer.decode_step`: `lmf_f32_decode_rows_model` with float32 weights,
`lmf_q4_decode_rows_model` with int4 ones). This times, in one process and alternating rounds,
a step of B rows on the default model three ways:

* `compiled`: as lmforge runs it;
* `modules`: the layers module by module, products on lmforge's own kernels where they apply
  (the compiled step switched off; a single row then runs one compiled call per layer);
* `library`: module by module with the library's products (float32: oneDNN's packed product
  for every product of several rows; int4: PyTorch's weight-only kernels for everything), what
  lmforge did before it had kernels for several rows.

Sequences start from prompts of different lengths (so every row sits at its own position) and
every variant steps its own copy of the same cache from the same state. Prints a table and one
JSON line (step ms per variant and B; tokens/s = B / step time).

    python benchmarks/decode_rows.py                      # float32 weights (dtype auto)
    python benchmarks/decode_rows.py --weights q4 --rows 1 2 4 8 16 --rounds 7
    python benchmarks/decode_rows.py --context 1000 --rows 1 16 --variants compiled   # long prompts
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import statistics
import time

import torch

import lmforge
from bench_common import cpu_model
from lmforge.infer import quant_kernels, quant_linear
from lmforge.infer.layout import BlasLinear
from lmforge.model.kv_cache import KVCache


@contextlib.contextmanager
def variant(model, name: str, weights: str):
    """The model set up to run a batched step the `name` way; restored afterwards."""
    step = model.decode_step
    blas = [m for m in model.modules() if isinstance(m, BlasLinear)]
    saved_native = [m.native_max_rows for m in blas]
    saved_kernels = quant_kernels.ENABLED
    try:
        if name != "compiled":
            model.decode_step = None  # the layers one by one (one row: each layer's own compiled call)
        if name == "library":
            for m in blas:
                m.native_max_rows = 1  # products of several rows: oneDNN (or PyTorch's own)
            if weights != "float":
                quant_kernels.ENABLED = False
        yield
    finally:
        model.decode_step = step
        for m, n in zip(blas, saved_native):
            m.native_max_rows = n
        quant_kernels.ENABLED = saved_kernels


def prefilled(model, tokenizer, rows: int, capacity: int, context: int = 0) -> tuple[KVCache, torch.Tensor, torch.Tensor]:
    """A cache of `rows` sequences prefilled with prompts of different lengths (about `context`
    tokens each where given), their next tokens and positions."""
    cache = KVCache.for_model(model.config, rows, capacity, torch.float32, "cpu")
    positions, last = [], []
    for b in range(rows):
        text = "Write a short story about a lighthouse keeper. " * (1 + b % 4) + f"Version {b}."
        ids = tokenizer.encode(text)
        if context:
            ids = (ids * (context // len(ids) + 1))[:context - 29 * (b % 8)]
        ids = torch.tensor([ids])
        logits = model(ids, cache=cache.rows(b, b + 1), start=0, last_only=True)
        positions.append(ids.shape[1])
        last.append(int(logits[0, -1].argmax()))
    return cache, torch.tensor(last).view(rows, 1), torch.tensor(positions)


def time_steps(model, cache: KVCache, ids: torch.Tensor, positions: torch.Tensor, steps: int) -> float:
    """Median seconds of `steps` greedy steps of all rows, on a copy of the cache."""
    work = KVCache.for_model(model.config, cache.k.shape[1], cache.k.shape[3], torch.float32, "cpu")
    work.k.copy_(cache.k)
    work.v.copy_(cache.v)
    times = []
    for i in range(steps):
        t = time.perf_counter()
        logits = model(ids, cache=work, start=positions + i, last_only=True)
        times.append(time.perf_counter() - t)
        ids = logits[:, -1].argmax(-1, keepdim=True)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--weights", choices=("float", "q4"), default="float")
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=8, help="steps timed per round (median)")
    ap.add_argument("--context", type=int, default=0,
                    help="prompts of about this many tokens (rows 29 tokens apart); default: short prompts")
    ap.add_argument("--variants", nargs="+", choices=("compiled", "modules", "library"),
                    default=["compiled", "modules", "library"])
    args = ap.parse_args()

    lm = lmforge.load(weights=args.weights)
    model = lm.model
    names = tuple(args.variants)
    results: dict[int, dict[str, list[float]]] = {}
    with torch.inference_mode():
        for rows in args.rows:
            cache, ids, positions = prefilled(model, lm.tokenizer, rows, max(512, args.context + args.steps + 8),
                                              args.context)
            per = results.setdefault(rows, {n: [] for n in names})
            for _ in range(args.rounds):
                for name in names:
                    with variant(model, name, args.weights):
                        per[name].append(time_steps(model, cache, ids, positions, args.steps))
    table = {rows: {n: statistics.median(v) * 1e3 for n, v in per.items()} for rows, per in results.items()}
    print(f"{'rows':>4} " + " ".join(f"{n + ' ms':>12}" for n in names) + f" {names[0] + ' tok/s':>16} "
          + " ".join(f"{'vs ' + n:>12}" for n in names[1:]))
    for rows, t in table.items():
        print(f"{rows:>4} " + " ".join(f"{t[n]:>12.1f}" for n in names) + f" {rows / t[names[0]] * 1e3:>16.1f} "
              + " ".join(f"{t[n] / t[names[0]]:>11.2f}x" for n in names[1:]))
    print(json.dumps({
        "benchmark": "decode_rows", "cpu": cpu_model(), "machine": f"{platform.machine()} {torch.get_num_threads()} threads",
        "weights": args.weights, "rounds": args.rounds, "steps": args.steps, "int4_kernel_rows": quant_linear.INT4_KERNEL_ROWS,
        "context": args.context,
        "step_ms": {str(r): {n: round(v, 2) for n, v in t.items()} for r, t in table.items()},
    }))


if __name__ == "__main__":
    main()
