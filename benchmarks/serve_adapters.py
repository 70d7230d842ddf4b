"""Multi-adapter serving throughput: one mixed batch against base-only and adapter-by-adapter batches.

On the default model (SmolLM2-135M-Instruct, fp32 on CPU) with `--adapters` random LoRA
adapters (rank `--rank` on `--targets`), each round generates `--new-tokens` tokens
(greedy, end token ignored) for `--rows` prompts in these ways, alternating so that a
burst of load hits all of them, and reports medians:

- base: all rows on the plain model (no adapter installed);
- base_bank: all rows on the base while adapters are installed (the cost of the hook);
- mixed: one batch whose rows cycle through the adapters (row i: adapter i mod n + 1);
- one_by_one: the same rows, one batch per adapter run after one another (what a server
  that cannot mix adapters in a batch, or swaps merged weights, would do).

Prints a table and one JSON line with tokens per wall second and per CPU second of
the process (the steadier figure on a shared machine) and the ratios mixed/base and
mixed/one_by_one.

    python benchmarks/serve_adapters.py                  # 3 rounds, 8 rows, 3 adapters
    python benchmarks/serve_adapters.py --base-only      # base decode tokens/s only (runs on older trees too)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import lmforge  # noqa: E402
from lmforge.infer import SamplingParams  # noqa: E402
from lmforge.io.progress import Progress  # noqa: E402

PROMPTS = ["The history of the printing press", "A recipe for bread:", "Dear customer, thank you for",
           "In mathematics, a group is", "The weather today", "def fibonacci(n):", "Once upon a time",
           "The three laws of motion"]


def random_adapters(model, count: int, rank: int, targets: str):
    from lmforge.infer.adapters import LoraWeights

    modules = {"attn": ["attn.qkv", "attn.out"], "all": ["attn.qkv", "attn.out", "mlp.fc", "mlp.proj"]}[targets]
    g = torch.Generator().manual_seed(0)
    out = []
    for k in range(count):
        layers = {}
        for i in range(model.config.n_layer):
            for m in modules:
                layer = model.get_submodule(f"layers.{i}.{m}")
                a = torch.randn(rank, layer.in_features, generator=g) / layer.in_features ** 0.5
                b = torch.randn(layer.out_features, rank, generator=g) * 0.01
                layers[f"layers.{i}.{m}"] = (a, b)
        out.append(LoraWeights(f"adapter{k + 1}", 2.0, rank, layers))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--adapters", type=int, default=3)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--targets", choices=["attn", "all"], default="attn")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--base-only", action="store_true", help="time base decoding only (batch 1 and --rows)")
    args = ap.parse_args()

    lm = lmforge.load()
    gen = lm.generator
    prompts = [lm.tokenizer.encode(p) for p in (PROMPTS * args.rows)[: args.rows]]
    params = SamplingParams(max_tokens=args.new_tokens, temperature=0, ignore_eos=True)
    gen.generate(prompts[:2], params)  # warm-up: thread pools, packed weights

    cpu: dict[str, list[float]] = {}

    def timed(fn, tokens: int) -> float:
        """Tokens per wall second; tokens per CPU second of this process go to `cpu` (less
        disturbed by other jobs on a shared machine than wall time)."""
        start, start_cpu = time.perf_counter(), time.process_time()
        fn()
        cpu.setdefault(current[0], []).append(tokens / (time.process_time() - start_cpu))
        return tokens / (time.perf_counter() - start)

    current = [""]

    total = args.rows * args.new_tokens
    ways: dict = {}
    if args.base_only:
        ways["base_batch1"] = lambda: timed(lambda: gen.generate(prompts[:1], params), args.new_tokens)
        ways["base"] = lambda: timed(lambda: gen.generate(prompts, params), total)
    else:
        from lmforge.infer.adapters import AdapterBank
        from lmforge.infer.engine import Generator

        adapters = random_adapters(lm.model, args.adapters, args.rank, args.targets)
        per_row = [i % args.adapters + 1 for i in range(args.rows)]
        state = {"bank": None}

        def install():
            if state["bank"] is None:
                state["bank"] = AdapterBank.install(lm.model, adapters)
            return Generator(lm.model, lm.tokenizer, adapters=state["bank"])

        def uninstall():
            if state["bank"] is not None:
                state["bank"].uninstall(lm.model)
                state["bank"] = None

        def base():
            uninstall()
            return timed(lambda: gen.generate(prompts, params), total)

        def base_bank():
            g = install()
            return timed(lambda: g.generate(prompts, params, adapter=0), total)

        def mixed():
            g = install()
            return timed(lambda: g.generate(prompts, params, adapter=per_row), total)

        def one_by_one():
            g = install()

            def run():
                for a in range(1, args.adapters + 1):
                    rows = [p for p, r in zip(prompts, per_row) if r == a]
                    g.generate(rows, params, adapter=a)
            return timed(run, total)

        ways = {"base": base, "base_bank": base_bank, "mixed": mixed, "one_by_one": one_by_one}
        mixed()  # warm-up of the adapter path

    results: dict[str, list[float]] = {k: [] for k in ways}
    progress = Progress("adapter serving benchmark", args.rounds, unit="rounds", log_every=0.0)
    for r in range(args.rounds):
        order = list(ways) if r % 2 == 0 else list(reversed(ways))
        for k in order:
            current[0] = k
            results[k].append(ways[k]())
            print(f"round {r + 1} {k}: {results[k][-1]:.1f} tokens/s", file=sys.stderr, flush=True)
        progress.update(r + 1)
    progress.close()
    med = {k: statistics.median(v) for k, v in results.items()}
    cpu_med = {k: statistics.median(cpu[k]) for k in results}
    print(f"{'way':<14}{'tok/s (median)':>16}{'tok/CPU-s':>12}   rounds (wall)")
    for k, v in med.items():
        print(f"{k:<14}{v:>16.1f}{cpu_med[k]:>12.1f}   {', '.join(f'{x:.1f}' for x in results[k])}")
    out = {"benchmark": "serve_adapters", "rows": args.rows, "new_tokens": args.new_tokens, "rounds": args.rounds,
           "tokens_per_s": {k: round(v, 2) for k, v in med.items()},
           "tokens_per_cpu_s": {k: round(v, 2) for k, v in cpu_med.items()}, "load": os.getloadavg()[0],
           "torch_threads": torch.get_num_threads(), "machine": platform.processor() or platform.machine()}
    if not args.base_only:
        out.update(adapters=args.adapters, rank=args.rank, targets=args.targets,
                   mixed_over_base=round(med["mixed"] / med["base"], 3),
                   base_bank_over_base=round(med["base_bank"] / med["base"], 3),
                   mixed_over_one_by_one=round(med["mixed"] / med["one_by_one"], 3),
                   cpu_mixed_over_base=round(cpu_med["mixed"] / cpu_med["base"], 3),
                   cpu_base_bank_over_base=round(cpu_med["base_bank"] / cpu_med["base"], 3),
                   cpu_mixed_over_one_by_one=round(cpu_med["mixed"] / cpu_med["one_by_one"], 3))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
