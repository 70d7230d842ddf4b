"""Speculative decoding on the default model: identical greedy text, acceptance rate and speed-up.

    python benchmarks/speculative.py                      # 20 prompts, k in 2,4,6, every drafter
    python benchmarks/speculative.py --prompts 4 --ks 4    # a quick look

Twenty chat prompts: rewriting, summarising and extraction requests (the answer copies
from the prompt, where prompt lookup shines) and open questions. For every prompt, plain
greedy decoding and each speculative setting run one after the other (so load changes
hit all settings alike); the figures are sums over the prompts: decode tokens/s (from
the first token to the last, prefill excluded), the speed-up over plain decoding in the
same run, the acceptance rate (accepted guesses / proposed guesses), tokens per target
forward, and whether every text was token-identical to plain decoding. The draft-model
drafter runs when --draft-model (default: runs/distill-smollm2/model, the student that
`lmforge distill` makes) exists. One JSON line per setting, then a summary JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import time

PASSAGES = [
    "The city council met on Tuesday to discuss the new bicycle lanes on Harbor Street. Residents said the lanes "
    "made the street safer for children, but shop owners worried about losing parking spaces. The council agreed "
    "to count cyclists and cars for three months before making a final decision.",
    "Honeybees communicate the location of flowers through a waggle dance. The angle of the dance relative to the "
    "vertical tells other bees the direction of the food compared with the sun, and the length of the waggle run "
    "tells them the distance. A colony can redirect its foragers within hours when a better patch appears.",
    "Our support team will be unavailable on Friday because of the office move. Urgent tickets can still be sent "
    "by email and will be answered on Monday morning. The new office is on the third floor of the Lantern "
    "Building, next to the train station, and has more meeting rooms than the old one.",
    "The recipe needs two cups of flour, one cup of milk, two eggs, a pinch of salt and a spoon of butter. Mix the "
    "flour and salt, whisk in the eggs and milk until smooth, and let the batter rest for ten minutes. Cook thin "
    "pancakes in the buttered pan for about a minute on each side.",
]

QUESTIONS = [
    "What is the capital of France, and what is it famous for?",
    "Explain in two sentences why the sky is blue.",
    "Give me three tips for sleeping better.",
    "What is the difference between a list and a tuple in Python?",
    "Write a short poem about the sea.",
    "How do plants make their food?",
    "What should I pack for a weekend hiking trip?",
    "Why do we have seasons on Earth?",
]


def prompt_set(n: int) -> list[tuple[str, str]]:
    """(kind, user message) pairs: copy-heavy requests first, then open questions."""
    from lmforge.tune.datasets import format_following, json_extraction

    rng = random.Random(0)
    copying = []
    for passage in PASSAGES:
        copying.append(("rewrite", f"Rewrite the following text in the past tense, keeping everything else the "
                                   f"same:\n\n{passage}"))
        copying.append(("summarise", f"Summarise the following text in two sentences:\n\n{passage}"))
    copying += [("extract", json_extraction(rng)[0]) for _ in range(2)]
    copying += [("format", format_following(random.Random(seed))[0]) for seed in (1, 2)]
    chat = [("chat", q) for q in QUESTIONS]
    # Alternate the two kinds while both last, so that a short run still has both.
    mixed = [item for pair in zip(copying, chat) for item in pair] + copying[len(chat):]
    return mixed[:n]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=20)
    ap.add_argument("--ks", default="2,4,6", help="guesses per step to try")
    ap.add_argument("--methods", default="ngram,layers,draft")
    ap.add_argument("--draft-model", default="runs/distill-smollm2/model")
    ap.add_argument("--draft-layers", type=int, default=0, help="layers of the self-speculative draft (0: a quarter)")
    ap.add_argument("--min-ngram", default="1", help="shortest prompt-lookup matches to try, e.g. 1,2")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    # NumPy's BLAS (single-row products, see lmforge/infer/layout.py) gets the same thread
    # budget as PyTorch: its default, every core, spins against other jobs on shared cores.
    for name in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS"):
        os.environ.setdefault(name, str(args.threads))
    import torch

    torch.set_num_threads(args.threads)

    import lmforge
    from lmforge.infer.engine import Generator
    from lmforge.infer.sampling import SamplingParams
    from lmforge.infer.speculative import make_speculator

    lm = lmforge.load()
    prompts = prompt_set(args.prompts)
    ids = [lm.chat_prompt(text) for _, text in prompts]
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0)
    methods = [m for m in args.methods.split(",") if m]
    if "draft" in methods and not os.path.isdir(args.draft_model):
        print(json.dumps({"skipped": "draft", "reason": f"no draft model at {args.draft_model}"}), flush=True)
        methods.remove("draft")
    settings = {"plain": Generator(lm.model, lm.tokenizer)}
    for method in methods:
        for k in (int(x) for x in args.ks.split(",")):
            for shortest in [int(x) for x in args.min_ngram.split(",")] if method == "ngram" else [1]:
                speculator = make_speculator(method, lm.model, lm.tokenizer, num_draft_tokens=k,
                                             draft_model=args.draft_model if method == "draft" else None,
                                             draft_layers=args.draft_layers, min_ngram=shortest)
                name = f"{method}-k{k}" if shortest == 1 else f"{method}-min{shortest}-k{k}"
                settings[name] = Generator(lm.model, lm.tokenizer, speculator=speculator)
    settings["plain"].generate([ids[0]], SamplingParams(max_tokens=4, temperature=0))  # warm-up
    totals = {name: {"tokens": 0, "decode_s": 0.0, "identical": 0, "by_kind": {}} for name in settings}
    names = list(settings)
    per_prompt: list[dict[str, float]] = []  # setting -> decode tokens/s, one dict per prompt
    started = time.perf_counter()
    for i, ((kind, _), prompt) in enumerate(zip(prompts, ids)):
        # Plain first (its tokens are the reference), the others in an order that rotates
        # per prompt, so a load spike does not always hit the same setting.
        turn = names[1:][i % max(1, len(names) - 1):] + names[1:][:i % max(1, len(names) - 1)]
        done_by = {}
        for name in ["plain", *turn]:
            done_by[name] = settings[name].generate([prompt], params)[0]
        rates = {}
        for name, done in done_by.items():
            row = totals[name]
            row["tokens"] += done.completion_tokens - 1  # the first token belongs to the prefill
            row["decode_s"] += done.decode_seconds
            row["identical"] += done.token_ids == done_by["plain"].token_ids
            by_kind = row["by_kind"].setdefault(kind, [0, 0.0])
            by_kind[0] += done.completion_tokens - 1
            by_kind[1] += done.decode_seconds
            rates[name] = (done.completion_tokens - 1) / done.decode_seconds if done.decode_seconds > 0 else None
        per_prompt.append(rates)
        print(json.dumps({"prompt": i, "kind": kind, "tokens": done_by["plain"].completion_tokens,
                          "elapsed_s": round(time.perf_counter() - started, 1),
                          "tok_s": {n: round(r, 2) for n, r in rates.items() if r},
                          "identical": [n for n, d in done_by.items() if d.token_ids == done_by["plain"].token_ids]}),
              flush=True)
        summary = summarise(totals, settings, i + 1, per_prompt)
        print(json.dumps({"after_prompts": i + 1, "median_speedup": {n: r["median_speedup"] for n, r in summary.items()}}),
              flush=True)
    for result in summary.values():
        print(json.dumps(result), flush=True)
    print(json.dumps({"benchmark": "speculative", "model": lm.name, "prompts": len(prompts),
                      "max_tokens": args.max_tokens, "threads": args.threads, "load_avg": os.getloadavg()[0],
                      "results": {n: {k: v for k, v in r.items() if k != "setting"} for n, r in summary.items()}}))


def summarise(totals: dict, settings: dict, prompts: int, per_prompt: list[dict]) -> dict[str, dict]:
    """Per setting: decode tokens/s, speed-up over plain (overall and by prompt kind), acceptance.

    `speedup` divides summed tokens by summed seconds; `median_speedup` is the median of
    the per-prompt ratios, which a load spike during one prompt cannot dominate.
    """
    plain = totals["plain"]
    plain_rate = plain["tokens"] / plain["decode_s"]
    summary = {}
    for name, row in totals.items():
        rate = row["tokens"] / row["decode_s"]
        stats = settings[name].speculator.stats if settings[name].speculator else None
        result = {
            "setting": name, "decode_tok_s": round(rate, 2), "speedup": round(rate / plain_rate, 3),
            "median_speedup": round(statistics.median(r[name] / r["plain"] for r in per_prompt
                                                      if r.get(name) and r.get("plain")), 3),
            "identical": f"{row['identical']}/{prompts}",
            "speedup_by_kind": {kind: round((t / s) / (plain["by_kind"][kind][0] / plain["by_kind"][kind][1]), 3)
                                for kind, (t, s) in row["by_kind"].items()},
        }
        if stats is not None:
            result.update(acceptance=round(stats.acceptance_rate, 3), tokens_per_step=round(stats.tokens_per_step, 3),
                          steps=stats.steps)
        summary[name] = result
    return summary

if __name__ == "__main__":
    main()
