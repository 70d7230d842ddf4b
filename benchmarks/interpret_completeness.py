"""Integrated gradients on the default model: the completeness error by baseline and steps (X2).

For one prompt and its top next token, integrated gradients of that token's logit with
respect to the prompt's embeddings should sum to f(prompt) - f(baseline); the gap left by
the quadrature is the completeness error. It depends on the baseline: zero embeddings or
the end-of-text token's, each with the first token (the attention sink) moved along the
path or kept as it is.

    python benchmarks/interpret_completeness.py                       # 16, 64, 256 steps
    python benchmarks/interpret_completeness.py --steps 8 32 --rule midpoint

Prints one JSON line per (baseline, steps) and a table.
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch

from lmforge.interpret.attribution import baseline_embeddings, integrated_gradients
from lmforge.model.loading import load_model, load_tokenizer
from lmforge.model.registry import resolve


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model (default: the default model)")
    parser.add_argument("--prompt", default="The capital of France is")
    parser.add_argument("--steps", type=int, nargs="+", default=[16, 64, 256])
    parser.add_argument("--rule", default="trapezoid", choices=("trapezoid", "midpoint", "left", "right"))
    args = parser.parse_args()

    spec = resolve(args.model)
    model, tokenizer = load_model(spec).eval(), load_tokenizer(spec)
    ids = torch.tensor([tokenizer.encode(args.prompt)])
    with torch.no_grad():
        target = int(model(ids, last_only=True)[0, 0].argmax())
    pad = tokenizer.pad_id if tokenizer.pad_id is not None else tokenizer.eos_id
    rows = []
    for kind in ("pad", "zero"):
        for keep_first in (True, False):
            base = baseline_embeddings(model, ids, kind, pad, keep_first)
            for steps in args.steps:
                started = time.perf_counter()
                ig = integrated_gradients(model, ids, target, steps, args.rule, base, batch_size=32)
                gap = ig.score - ig.baseline_score
                error = ig.completeness_error
                row = {"baseline": kind, "keep_first": keep_first, "steps": steps, "rule": args.rule,
                       "gap": round(gap, 4), "error": None if math.isnan(error) else round(error, 5),
                       "relative": None if math.isnan(error) else round(error / abs(gap), 5),
                       "scores": [round(float(s), 3) for s in ig.scores],
                       "seconds": round(time.perf_counter() - started, 2)}
                print(json.dumps(row), flush=True)
                rows.append(row)
    print(f"\n{spec.name}, {args.prompt!r} -> {tokenizer.decode([target])!r}, {args.rule} rule")
    print(f"{'baseline':<28}" + "".join(f"{s:>16}" for s in args.steps))
    for kind in ("pad", "zero"):
        for keep_first in (True, False):
            cells = [r for r in rows if r["baseline"] == kind and r["keep_first"] == keep_first]
            name = f"{kind}{', first token kept' if keep_first else ''}"
            print(f"{name:<28}" + "".join(
                f"{'NaN':>16}" if r["error"] is None else f"{r['error']:>9.4f} ({r['relative']:.1%})".rjust(16)
                for r in cells))


if __name__ == "__main__":
    main()
