"""Paged against contiguous KV cache: requests held at one memory budget, and the price of the gather (M9, I2).

1. Capacity. A stream of requests with a mix of prompt and answer lengths (uniform in
   --prompt-range and --answer-range, fixed seed, greedy, every answer run to its
   length) goes through the scheduler with a KV budget of --budget-mb, once per cache
   kind. The contiguous cache reserves --max-seq-len positions per row, so the budget
   gives it budget / (max_seq_len x bytes per position) rows; the paged cache gets the
   budget's blocks of --block-size positions, shared by up to --max-batch rows. Reported:
   the most requests running at once, the mean over decode steps, decode steps, tokens/s
   and preemptions. Admission depends on the KV geometry only, so this part runs a
   random model with the default model's (30 layers, 3 KV heads of 64) and small
   everything else (--capacity-model default: the real one, much slower).
2. Gather cost. On the default model, one decode forward over B rows at a context of C
   tokens, with each cache kind holding the same keys and values: the median step time
   over alternating rounds, and the cache's own part (30 layers of update + read).
3. Scheduler decode at equal concurrency: --streams requests of the default model
   decoding together, once per kind in alternating rounds: decode tokens/s.
4. Shared prefix (--prefix, only that part): --prefix-requests chat requests of the
   default model with one system prompt of about --system-tokens tokens, through a paged
   cache whose prefix cache shares the pool's blocks by reference, and one whose prefix
   cache copies them (`prefix_sharing=False`, its own --prefix-cache-mb outside the
   pool), for each budget of --prefix-budgets-mb (0: no bound, every request at once).
   Reported: blocks in use at the peak (the copying cache's store converted to blocks
   beside them), requests running at once, and the time prefills spent loading and
   storing prefixes (`_load_prefix` + `_store_prefix`) against the time of the prefills.

    python benchmarks/paged_kv.py                      # parts 1-3
    python benchmarks/paged_kv.py --skip-speed         # capacity only (about a minute)
    python benchmarks/paged_kv.py --prefix             # part 4 only

A table goes to stderr, one JSON line per part and a summary line to stdout.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_common import cpu_model  # noqa: E402


def geometry_model(max_len: int):
    """A random model with the default model's KV geometry (what admission depends on), cheap to run."""
    import torch

    from lmforge.model.config import ModelConfig
    from lmforge.model.transformer import Transformer

    torch.manual_seed(0)
    config = ModelConfig(n_layer=30, n_embd=192, n_head=3, n_kv_head=3, head_dim=64, intermediate_size=256,
                         vocab_size=512, max_position_embeddings=max_len)
    return Transformer(config).eval()


def workload(n: int, prompt_range: tuple[int, int], answer_range: tuple[int, int], vocab: int, seed: int = 0):
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        prompt = [rng.randrange(3, vocab) for _ in range(rng.randint(*prompt_range))]
        out.append((prompt, rng.randint(*answer_range)))
    return out


def capacity(model, kind: str, requests, args) -> dict:
    from lmforge.infer.sampling import SamplingParams
    from lmforge.infer.scheduler import Scheduler

    scheduler = Scheduler(model, None, max_batch=args.max_batch, max_seq_len=args.max_seq_len, prefix_cache_bytes=0,
                          max_waiting=len(requests), kv_cache=kind, kv_block_size=args.block_size,
                          kv_memory_bytes=int(args.budget_mb * 2**20))
    for prompt, answer in requests:
        scheduler.submit(prompt, SamplingParams(max_tokens=answer, temperature=0, ignore_eos=True))
    running, started = [], time.perf_counter()
    while scheduler.step():
        running.append(scheduler.stats.running)
    seconds = time.perf_counter() - started
    cache = scheduler.cache
    return {"kind": kind, "rows": scheduler.max_batch, "cache_mib": round(cache.nbytes / 2**20, 1),
            "peak_running": max(running), "mean_running": round(statistics.mean(running), 2),
            "steps": scheduler.stats.steps, "generated": scheduler.stats.generated_tokens,
            "tokens_per_s": round(scheduler.stats.generated_tokens / seconds, 1),
            "preempted": scheduler.stats.preempted, "seconds": round(seconds, 1)}


def filled_caches(model, batch: int, context: int, block_size: int):
    """A contiguous and a paged cache holding the same random keys/values for `batch` rows of `context` positions."""
    import torch

    from lmforge.model.kv_cache import KVCache
    from lmforge.model.paged_kv import PagedKVCache, blocks_for

    config, max_len = model.config, context + 8
    flat = KVCache.for_model(config, batch, max_len, torch.float32, "cpu")
    flat.k.normal_()
    flat.v.normal_()
    paged = PagedKVCache.for_model(config, batch * blocks_for(max_len, block_size), block_size, batch, max_len,
                                   torch.float32, "cpu")
    order = list(range(batch))
    random.Random(1).shuffle(order)  # rows claim blocks interleaved, as a server's rows do
    for length in range(block_size, max_len + block_size, block_size):
        for row in order:
            paged.ensure(row, length)
    for row in range(batch):
        paged.write_row(row, flat.k[:, row], flat.v[:, row])
    return flat, paged


def gather_cost(model, batch: int, context: int, block_size: int, rounds: int, steps: int) -> dict:
    import torch

    flat, paged = filled_caches(model, batch, context, block_size)
    config = model.config
    positions = torch.tensor([context - i for i in range(batch)])
    tokens = torch.randint(3, config.vocab_size, (batch, 1))
    kv = torch.randn(batch, config.n_kv_head, 1, config.head_dim)
    times: dict[str, list[float]] = {"contiguous": [], "paged": [], "contiguous_cache": [], "paged_cache": []}
    for _ in range(rounds):
        for name, cache in (("contiguous", flat), ("paged", paged)):
            for _ in range(steps):
                started = time.perf_counter()
                model(tokens, cache=cache.rows(0, batch), start=positions, last_only=True)
                times[name].append(time.perf_counter() - started)
                view = cache.rows(0, batch)
                started = time.perf_counter()
                for layer in range(config.n_layer):
                    view.update(layer, kv, kv, positions, context + 1)
                times[name + "_cache"].append(time.perf_counter() - started)
    med = {name: statistics.median(values) * 1e3 for name, values in times.items()}
    return {"batch": batch, "context": context, "step_ms_contiguous": round(med["contiguous"], 2),
            "step_ms_paged": round(med["paged"], 2), "step_ratio": round(med["paged"] / med["contiguous"], 3),
            "cache_ms_contiguous": round(med["contiguous_cache"], 2), "cache_ms_paged": round(med["paged_cache"], 2)}


def scheduler_speed(lm, kind: str, prompts: list[list[int]], new_tokens: int, block_size: int) -> float:
    from lmforge.infer.sampling import SamplingParams
    from lmforge.infer.scheduler import Scheduler

    scheduler = Scheduler(lm.model, lm.tokenizer, max_batch=len(prompts), max_seq_len=512, prefix_cache_bytes=0,
                          kv_cache=kind, kv_block_size=block_size)
    params = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)
    for prompt in prompts:
        scheduler.submit(prompt, params)
    scheduler.step()  # admission and prefill: not what is compared
    started = time.perf_counter()
    before = scheduler.stats.generated_tokens
    while scheduler.step():
        pass
    decode = time.perf_counter() - started
    return (scheduler.stats.generated_tokens - before) / decode


def shared_prefix_run(lm, prompts: list[list[int]], sharing: bool, budget_mb: float, args) -> dict:
    """One pass of the shared-prefix workload; the first request runs alone first, so the rest find it cached."""
    from lmforge.infer.sampling import SamplingParams
    from lmforge.infer.scheduler import Scheduler
    from lmforge.model.paged_kv import PagedKVCache

    scheduler = Scheduler(lm.model, lm.tokenizer, max_batch=len(prompts), max_waiting=len(prompts),
                          max_seq_len=args.prefix_max_seq_len, kv_cache="paged", kv_block_size=args.block_size,
                          kv_memory_bytes=int(budget_mb * 2**20), prefix_cache_bytes=int(args.prefix_cache_mb * 2**20),
                          prefix_sharing=sharing)
    timers = {"_load_prefix": 0.0, "_store_prefix": 0.0, "_prefill": 0.0}
    for name in timers:  # instrument the scheduler's own methods on this instance
        method = getattr(scheduler, name)

        def timed(*a, _method=method, _name=name):
            started = time.perf_counter()
            try:
                return _method(*a)
            finally:
                timers[_name] += time.perf_counter() - started
        setattr(scheduler, name, timed)
    params = SamplingParams(max_tokens=args.prefix_answer, temperature=0, ignore_eos=True)
    cache = scheduler.cache
    scheduler.submit(prompts[0], params)
    while scheduler.step():
        pass
    for name in timers:  # the later requests' prefills only, which find the prefix cached
        timers[name] = 0.0
    for prompt in prompts[1:]:
        scheduler.submit(prompt, params)
    running, in_use, started = [], [], time.perf_counter()
    while scheduler.step():
        running.append(scheduler.stats.running)
        in_use.append(cache.total_blocks - cache.unreferenced_blocks)
    seconds = time.perf_counter() - started
    block_bytes = PagedKVCache.block_bytes(lm.model.config, args.block_size, lm.model.embed.weight.dtype)
    store_blocks = 0 if sharing else round(scheduler.prefix_cache.bytes / block_bytes, 1)
    peak = max(running)
    return {"sharing": sharing, "budget_mb": budget_mb, "pool_blocks": cache.total_blocks,
            "peak_running": peak, "mean_running": round(statistics.mean(running), 2),
            "peak_blocks_in_use": max(in_use), "copied_store_blocks": store_blocks,
            "blocks_per_request_at_peak": round(max(b for b, r in zip(in_use, running) if r == peak) / peak, 2),
            "steps": scheduler.stats.steps, "preempted": scheduler.stats.preempted,
            "cached_prompt_tokens": scheduler.stats.cached_prompt_tokens,
            "prompt_tokens": scheduler.stats.prompt_tokens,
            "prefill_ms": round(timers["_prefill"] * 1e3, 1),  # the requests after the first
            "prefix_copy_ms": round((timers["_load_prefix"] + timers["_store_prefix"]) * 1e3, 2),
            "seconds": round(seconds, 1)}


def shared_prefix(lm, args) -> list[dict]:
    system = ("You are the help desk of a public library. Answer in two or three short sentences, politely, "
              "and only about the library: opening hours, borrowing, renewals, fines, reading rooms, printing, "
              "the children's corner and events. ") * 8
    ids = lm.tokenizer.apply_chat_template([{"role": "system", "content": system}], tokenize=True)
    system_ids = ids[:args.system_tokens]
    questions = ["How long can I keep a book?", "Can I print in colour?", "When does the reading room open?",
                 "Is there a fine for late returns?", "Do you have events for children?", "Can I renew online?"]
    prompts = [system_ids + lm.tokenizer.encode(f" Q{i}: {questions[i % len(questions)]}")
               for i in range(args.prefix_requests)]
    for sharing in (True, False):  # warm-up: first calls of every kernel and code path
        shared_prefix_run(lm, prompts[:3], sharing, 0.0, args)
    rows = []
    for budget in args.prefix_budgets_mb:
        for sharing in (True, False):
            row = shared_prefix_run(lm, prompts, sharing, budget, args)
            print(f"shared prefix, budget {budget or 'none'} MiB, {'sharing' if sharing else 'copying'}: "
                  f"{row['pool_blocks']} blocks, peak {row['peak_running']} running (mean {row['mean_running']}), "
                  f"peak {row['peak_blocks_in_use']} blocks in use (+{row['copied_store_blocks']} copied), "
                  f"{row['blocks_per_request_at_peak']} per request, prefill {row['prefill_ms']} ms of which "
                  f"{row['prefix_copy_ms']} ms loading/storing prefixes, {row['preempted']} preempted, "
                  f"{row['seconds']} s", file=sys.stderr)
            print(json.dumps({"part": "shared_prefix", "system_tokens": len(system_ids),
                              "requests": len(prompts), **row}))
            rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget-mb", type=float, default=256.0)
    parser.add_argument("--max-seq-len", type=int, default=2048)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--max-batch", type=int, default=64, help="row slots of the paged cache")
    parser.add_argument("--requests", type=int, default=24)
    parser.add_argument("--prompt-range", type=int, nargs=2, default=(32, 768))
    parser.add_argument("--answer-range", type=int, nargs=2, default=(16, 384))
    parser.add_argument("--capacity-model", choices=("geometry", "default"), default="geometry")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--contexts", type=int, nargs="+", default=[64, 2048])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=3, help="decode steps timed per round and setting")
    parser.add_argument("--streams", type=int, default=8, help="scheduler decode streams (0: skip that part)")
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument("--skip-capacity", action="store_true")
    parser.add_argument("--prefix", action="store_true", help="run the shared-prefix part only")
    parser.add_argument("--prefix-requests", type=int, default=24)
    parser.add_argument("--system-tokens", type=int, default=256)
    parser.add_argument("--prefix-answer", type=int, default=32, help="tokens each shared-prefix request decodes")
    parser.add_argument("--prefix-budgets-mb", type=float, nargs="+", default=[0.0, 64.0])
    parser.add_argument("--prefix-max-seq-len", type=int, default=512)
    parser.add_argument("--prefix-cache-mb", type=float, default=128.0,
                        help="the copying prefix cache's store (outside the pool); sharing: only on/off")
    args = parser.parse_args()

    import torch

    import lmforge

    torch.manual_seed(0)
    if args.prefix:
        lm = lmforge.load(dtype="float32", device="cpu")
        with torch.inference_mode():
            rows = shared_prefix(lm, args)
        by = {(r["budget_mb"], r["sharing"]): r for r in rows}
        summary = {"benchmark": "paged_kv_prefix", "cpu": cpu_model(), "threads": torch.get_num_threads(),
                   "block_size": args.block_size}
        for budget in args.prefix_budgets_mb:
            share, copy = by[(budget, True)], by[(budget, False)]
            summary[f"peak_running_ratio_{budget:g}mb"] = round(share["peak_running"] / copy["peak_running"], 2)
            summary[f"peak_blocks_ratio_{budget:g}mb"] = round(
                share["peak_blocks_in_use"] / (copy["peak_blocks_in_use"] + copy["copied_store_blocks"]), 3)
        print(json.dumps(summary))
        return
    lm = None
    if args.capacity_model == "default" and not args.skip_capacity or not args.skip_speed:
        lm = lmforge.load(dtype="float32", device="cpu")
    summary = {"benchmark": "paged_kv", "cpu": cpu_model(), "threads": torch.get_num_threads(),
               "budget_mb": args.budget_mb, "max_seq_len": args.max_seq_len, "block_size": args.block_size}
    if not args.skip_capacity:
        model = lm.model if args.capacity_model == "default" else geometry_model(args.max_seq_len)
        requests = workload(args.requests, tuple(args.prompt_range), tuple(args.answer_range),
                            model.config.vocab_size)
        with torch.inference_mode():
            held = {kind: capacity(model, kind, requests, args) for kind in ("contiguous", "paged")}
        for row in held.values():
            print(f"capacity {row['kind']:>10}: {row['rows']} rows, {row['cache_mib']} MiB, peak "
                  f"{row['peak_running']} running, mean {row['mean_running']}, {row['steps']} steps, "
                  f"{row['tokens_per_s']} tok/s, {row['preempted']} preempted", file=sys.stderr)
            print(json.dumps({"part": "capacity", **row}))
        summary["concurrency_ratio"] = round(held["paged"]["peak_running"] / held["contiguous"]["peak_running"], 2)
        summary["mean_concurrency_ratio"] = round(held["paged"]["mean_running"] / held["contiguous"]["mean_running"],
                                                  2)
    if not args.skip_speed:
        with torch.inference_mode():
            gather_cost(lm.model, 1, 32, args.block_size, 1, 1)  # warm-up
            for batch in args.batches:
                for context in args.contexts:
                    row = gather_cost(lm.model, batch, context, args.block_size, args.rounds, args.steps)
                    print(f"decode step B={batch} C={context}: contiguous {row['step_ms_contiguous']} ms, paged "
                          f"{row['step_ms_paged']} ms (x{row['step_ratio']}); cache part {row['cache_ms_contiguous']}"
                          f" vs {row['cache_ms_paged']} ms", file=sys.stderr)
                    print(json.dumps({"part": "gather", **row}))
                    summary[f"step_ratio_b{batch}_c{context}"] = row["step_ratio"]
            if args.streams:
                prompts = [lm.tokenizer.encode(f"Question {i}: explain, in a few sentences, how a library lends "
                                               "books.") for i in range(args.streams)]
                speeds: dict[str, list[float]] = {"contiguous": [], "paged": []}
                for _ in range(args.rounds):
                    for kind in speeds:
                        speeds[kind].append(scheduler_speed(lm, kind, prompts, args.new_tokens, args.block_size))
                med = {kind: statistics.median(values) for kind, values in speeds.items()}
                print(f"scheduler decode, {args.streams} streams: contiguous {med['contiguous']:.1f} tok/s, paged "
                      f"{med['paged']:.1f} tok/s (x{med['paged'] / med['contiguous']:.3f})", file=sys.stderr)
                print(json.dumps({"part": "scheduler_decode", "streams": args.streams,
                                  "tokens_per_s_contiguous": round(med["contiguous"], 1),
                                  "tokens_per_s_paged": round(med["paged"], 1)}))
                summary["decode_speed_ratio"] = round(med["paged"] / med["contiguous"], 3)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
