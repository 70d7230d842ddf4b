"""Chunked prefill: running streams keep their pace while a long prompt arrives (M9, I2).

Four streams decode on the default model (greedy, fixed length). After a few steps a
long prompt (--long-tokens, handbook text) is submitted. Without chunking its prefill is
one forward, and every running stream waits for it; with `prefill_chunk` C it is
prefilled C tokens per step between the streams' decode steps. For each setting the
same run is also made without the long prompt (the baseline). Reported per setting: the
inter-token latency (ITL) of the running streams, p50 / p95 / max over every token, and
p95 / max over the tokens that arrived while the long prompt was being prefilled
(from its submission to its first token), with the ratio of the overall p95 to the
baseline's; and the long prompt's time to first token.

The steps are driven by hand on this thread (no server), with a timestamp per step, so
the figures are the engine's own. Settings run in alternating rounds.

    python benchmarks/chunked_prefill.py                       # chunk 0 (off), 64, 128, 256; mixed and separate
    python benchmarks/chunked_prefill.py --chunks 0 128 --rounds 1 --long-tokens 2000

Prints a table on stderr and one JSON line per setting, then a summary line, on stdout.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_common import cpu_model  # noqa: E402

STREAM_PROMPTS = [
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "Explain how a bicycle stays upright, step by step.",
    "Describe a busy market in a city you would like to visit.",
    "Write a letter to a friend about learning to cook.",
]


def long_prompt_ids(tokenizer, n: int) -> list[int]:
    root = Path(__file__).resolve().parents[1] / "docs" / "handbook"
    ids: list[int] = []
    for page in sorted(root.glob("*.md")):
        ids += tokenizer.encode(page.read_text(encoding="utf-8"))
        if len(ids) >= n:
            break
    return ids[:n]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))] if ordered else float("nan")


def run(lm, chunk: int, long_ids: list[int] | None, new_tokens: int, arrive_after: int, mixed: bool = True) -> dict:
    from lmforge.infer.sampling import SamplingParams
    from lmforge.infer.scheduler import Scheduler

    scheduler = Scheduler(lm.model, lm.tokenizer, max_batch=len(STREAM_PROMPTS) + 1,
                          max_seq_len=(len(long_ids) if long_ids else 0) + 512, prefix_cache_bytes=0,
                          prefill_chunk=chunk, mixed_chunks=mixed)
    params = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)
    streams = [scheduler.submit(lm.tokenizer.encode(p), params) for p in STREAM_PROMPTS]
    arrivals: dict[int, list[float]] = {h.id: [] for h in streams}
    long_handle, submitted_at, first_at, steps = None, None, None, 0
    while scheduler.step():
        now = time.perf_counter()
        steps += 1
        for handle in streams:
            for event in handle.poll():
                arrivals[handle.id] += [now] * len(event.token_ids)
        if long_handle is not None and first_at is None and any(e.token_ids for e in long_handle.poll()):
            first_at = now
        if long_ids and long_handle is None and steps == arrive_after:
            long_handle = scheduler.submit(long_ids, SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
            submitted_at = time.perf_counter()
    gaps, window = [], []
    for times in arrivals.values():
        for before, after in zip(times, times[1:]):
            if after == before:
                continue  # tokens of one step (the first token comes with the prefill)
            gaps.append(after - before)
            if submitted_at is not None and first_at is not None and after > submitted_at and before < first_at:
                window.append(after - before)
    return {"itl_p50_ms": 1e3 * statistics.median(gaps), "itl_p95_ms": 1e3 * percentile(gaps, 0.95),
            "itl_max_ms": 1e3 * max(gaps), "window_p95_ms": 1e3 * percentile(window, 0.95) if window else None,
            "window_max_ms": 1e3 * max(window) if window else None, "window_tokens": len(window),
            "long_ttft_s": (first_at - submitted_at) if first_at is not None else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--chunks", type=int, nargs="+", default=[0, 64, 128, 256])
    parser.add_argument("--long-tokens", type=int, default=4000)
    parser.add_argument("--new-tokens", type=int, default=96)
    parser.add_argument("--arrive-after", type=int, default=8, help="decode steps before the long prompt arrives")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--modes", nargs="+", choices=["mixed", "separate"], default=["mixed", "separate"],
                        help="chunks in the running rows' decode forward (mixed) or in a forward of their own")
    args = parser.parse_args()

    import torch

    import lmforge

    lm = lmforge.load(dtype="float32", device="cpu")
    long_ids = long_prompt_ids(lm.tokenizer, args.long_tokens)
    settings = [(chunk, mode) for chunk in args.chunks for mode in (args.modes if chunk else ["-"])]
    results: dict[tuple[int, str, bool], list[dict]] = {}
    with torch.inference_mode():
        run(lm, 0, None, 8, args.arrive_after)  # warm-up
        for _ in range(args.rounds):
            for chunk, mode in settings:
                for with_long in (False, True):
                    results.setdefault((chunk, mode, with_long), []).append(
                        run(lm, chunk, long_ids if with_long else None, args.new_tokens, args.arrive_after,
                            mixed=mode != "separate"))

    def med(rows, key):
        values = [r[key] for r in rows if r[key] is not None]
        return round(statistics.median(values), 2) if values else None

    summary = []
    print(f"{'chunk':>6} {'mode':>9} {'ITL p50':>8} {'p95':>8} {'max':>8} {'base p95':>9} {'p95/base':>9} "
          f"{'window p95':>11} {'window max':>11} {'long TTFT s':>12}", file=sys.stderr)
    for chunk, mode in settings:
        rows, base = results[(chunk, mode, True)], results[(chunk, mode, False)]
        line = {"chunk": chunk, "mode": mode, "long_tokens": len(long_ids), "streams": len(STREAM_PROMPTS),
                "new_tokens": args.new_tokens, "rounds": args.rounds,
                **{k: med(rows, k) for k in rows[0]}, "baseline_itl_p95_ms": med(base, "itl_p95_ms")}
        line["p95_vs_baseline"] = round(line["itl_p95_ms"] / line["baseline_itl_p95_ms"], 2)
        line["window_p95_vs_baseline"] = (round(line["window_p95_ms"] / line["baseline_itl_p95_ms"], 2)
                                          if line["window_p95_ms"] else None)
        summary.append(line)
        print(json.dumps(line))
        print(f"{chunk:>6} {mode:>9} {line['itl_p50_ms']:>8} {line['itl_p95_ms']:>8} {line['itl_max_ms']:>8} "
              f"{line['baseline_itl_p95_ms']:>9} {line['p95_vs_baseline']:>9} {line['window_p95_ms']!s:>11} "
              f"{line['window_max_ms']!s:>11} {line['long_ttft_s']!s:>12}", file=sys.stderr)
    print(json.dumps({"benchmark": "chunked_prefill", "cpu": cpu_model(), "threads": torch.get_num_threads(),
                      "settings": summary}))


if __name__ == "__main__":
    main()
