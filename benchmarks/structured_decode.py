"""Schema-constrained decoding: time per generated token, whole-text re-check vs incremental check (I1/S5).

Decodes greedily on the default model (unless --model), through the one decode path
(`Generator` -> scheduler step -> `constrained_choice`), for a `json_schema` response
and for tool calls under the call schema of lmforge/agent/tool_prompts.py's five
functions. Every case runs with the reference checker that re-validates the whole text
per candidate token (`SchemaPrefix(schema, rescan=True)`), with the incremental one, and
unconstrained for the model's own cost per token; the settings alternate within each
round (order flipped every round) and the figures are medians over rounds. Outputs of
the two checkers must be identical (asserted).

The checker's own share is then isolated: the model's logits for every step of the
decoded output (one forward pass) are replayed through `constrained_choice` with a
greedy draw and each checker, timing only the choice, and counting the candidate
tokens it had to check. Finally the cost of one candidate check alone: at every step
of the output, the `--scan` most likely tokens are each checked from the accepted state
(what `constrained_choice`'s fallback scan does when the model prefers invalid text).

    python benchmarks/structured_decode.py --rounds 3

Prints a table on stderr and one JSON line on stdout.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer"},
        "city": {"type": "string"},
        "member": {"type": "boolean"},
        "interests": {"type": "array", "items": {"type": "string"}, "maxItems": 3},
    },
    "required": ["name", "age", "city", "member", "interests"],
}
PERSON_PROMPT = ("Invent a customer of a bookshop and describe them as a JSON object with the fields name, age, "
                 "city, member (true or false) and interests (a list of up to three strings).")


def cases(lm, which: list[str]) -> list[tuple[str, list[int], dict]]:
    """(name, prompt ids, schema) for each case asked for."""
    from lmforge.agent.calls import CALL_OPEN, FunctionSpec, call_schema, render_prompt
    from lmforge.agent.tool_prompts import TOOLS, tool_prompts

    out = []
    if "schema" in which:
        out.append(("json_schema", lm.chat_prompt(PERSON_PROMPT), PERSON))
    specs = [FunctionSpec(t["function"]["name"], t["function"]["description"], t["function"]["parameters"])
             for t in TOOLS]
    prompts = tool_prompts(5)
    for name in which:
        if name.startswith("tool"):
            prompt = prompts[int(name[4:] or 4)]  # tool4: search_products, the longest call
            text = render_prompt(lm.tokenizer, [{"role": "user", "content": prompt.prompt}], specs)
            ids = lm.tokenizer.encode(text + CALL_OPEN, add_special_tokens=False)
            out.append((f"tool_call:{prompt.name}", ids, call_schema(specs)))
    return out


def run(generator, ids, params, checker) -> tuple[float, list[int], str]:
    import lmforge.infer.request as request

    # The scheduler's requests build their checker from this name; the reference is the
    # same class with the whole-text re-check switched on.
    saved = request.SchemaPrefix
    request.SchemaPrefix = checker
    try:
        start = time.perf_counter()
        done = generator.generate([ids], params)[0]
        return time.perf_counter() - start, done.token_ids, done.text
    finally:
        request.SchemaPrefix = saved


def replay(lm, ids, tokens, schema, checker, eos_ids, rounds: int, scan: int) -> dict:
    """Per-token time of `constrained_choice` alone over the recorded logits, median over rounds."""
    import torch

    from lmforge.infer.structured import constrained_choice

    with torch.no_grad():
        rows = lm.model(torch.tensor([ids + tokens]))[0, len(ids) - 1: len(ids) - 1 + len(tokens)].float()
    checked = 0

    def token_bytes(token: int):
        nonlocal checked
        checked += 1
        return lm.tokenizer.token_bytes(token)

    def draw(row):
        return int(torch.argmax(row))

    times, chosen, scans = [], [], []
    top = torch.topk(rows, min(scan, rows.shape[1]), dim=-1).indices.tolist()
    for _ in range(rounds):
        state, chosen, checked, total = checker(schema), [], 0, 0.0
        scanned = 0.0
        for row, candidates in zip(rows, top):
            start = time.perf_counter()
            for token in candidates:
                data = lm.tokenizer.token_bytes(token)
                if data:
                    state.copy().feed(data)
            scanned += time.perf_counter() - start
            start = time.perf_counter()
            chosen.append(constrained_choice(row, state, token_bytes, eos_ids, draw))
            total += time.perf_counter() - start
        times.append(total / len(rows))
        scans.append(scanned / (len(rows) * len(top[0])))
    return {"ms": 1000 * statistics.median(times), "checked_per_token": checked / len(rows), "tokens": chosen,
            "us_per_candidate": 1e6 * statistics.median(scans)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--cases", default="schema,tool4,tool0", help="schema and/or toolN (N: index of tool_prompts(5))")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=80)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--scan", type=int, default=256, help="candidates checked per step for the per-check cost")
    args = ap.parse_args()

    import torch

    import lmforge
    from lmforge.infer.engine import Generator
    from lmforge.infer.json_schema import SchemaPrefix
    from lmforge.infer.request import end_token_ids
    from lmforge.infer.sampling import SamplingParams

    torch.set_num_threads(args.threads)
    lm = lmforge.load(args.model)
    generator = Generator(lm.model, lm.tokenizer)
    settings = {"rescan": functools.partial(SchemaPrefix, rescan=True), "incremental": SchemaPrefix}
    report = {"benchmark": "structured_decode", "model": args.model or "default", "rounds": args.rounds,
              "threads": args.threads, "load": os.getloadavg()[0], "cases": {}}
    for name, ids, schema in cases(lm, args.cases.split(",")):
        params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, json_schema=schema)
        times: dict[str, list[float]] = {k: [] for k in (*settings, "unconstrained")}
        outputs: dict[str, tuple[list[int], str]] = {}
        run(generator, ids, params, SchemaPrefix)  # warm-up, not timed
        for r in range(args.rounds):
            order = list(settings) if r % 2 == 0 else list(reversed(settings))
            for setting in order:
                seconds, tokens, text = run(generator, ids, params, settings[setting])
                if setting in outputs:
                    assert outputs[setting] == (tokens, text), f"{setting} is not deterministic on {name}"
                outputs[setting] = (tokens, text)
                times[setting].append(seconds / len(tokens))
            # The model alone for as many tokens (end token ignored so the count matches).
            free = SamplingParams(max_tokens=len(outputs["incremental"][0]), temperature=0.0, ignore_eos=True)
            seconds, tokens, _ = run(generator, ids, free, SchemaPrefix)
            times["unconstrained"].append(seconds / len(tokens))
        assert outputs["rescan"] == outputs["incremental"], f"the checkers decoded different outputs on {name}"
        ms = {k: 1000 * statistics.median(v) for k, v in times.items()}
        tokens = outputs["incremental"][0]
        eos_ids = end_token_ids(lm.model.config, lm.tokenizer)
        alone = {k: replay(lm, ids, tokens, schema, settings[k], eos_ids, args.rounds, args.scan) for k in settings}
        assert alone["rescan"]["tokens"] == alone["incremental"]["tokens"], f"the checkers chose differently on {name}"
        row = {"tokens": len(tokens), "text": outputs["incremental"][1],
               "ms_per_token": {k: round(v, 2) for k, v in ms.items()},
               "speedup": round(ms["rescan"] / ms["incremental"], 2),
               "choice_ms_per_token": {k: round(alone[k]["ms"], 3) for k in settings},
               "choice_speedup": round(alone["rescan"]["ms"] / alone["incremental"]["ms"], 1),
               "candidates_per_token": round(alone["incremental"]["checked_per_token"], 1),
               "us_per_candidate_check": {k: round(alone[k]["us_per_candidate"], 1) for k in settings},
               "replay_matches_decode": alone["incremental"]["tokens"] == tokens}
        report["cases"][name] = row
        print(f"{name:32s} {row['tokens']:3d} tok  decode ms/tok: rescan {ms['rescan']:7.1f} incremental "
              f"{ms['incremental']:7.1f} unconstrained {ms['unconstrained']:6.1f} (x{row['speedup']});  choice alone "
              f"ms/tok: rescan {alone['rescan']['ms']:.2f} incremental {alone['incremental']['ms']:.3f} "
              f"(x{row['choice_speedup']}), {row['candidates_per_token']} candidates/tok;  one check: rescan "
              f"{alone['rescan']['us_per_candidate']:.0f} us, incremental {alone['incremental']['us_per_candidate']:.0f} us",
              file=sys.stderr)
    report["load_after"] = os.getloadavg()[0]
    print(json.dumps(report))


if __name__ == "__main__":
    main()
