"""Greedy decode tokens/s of the default model from two or more source trees, in alternating processes.

For checking that a change leaves a path as fast as it was: make a tree of the commit
before it (`git worktree add /tmp/before COMMIT`), then

    python benchmarks/decode_trees.py /tmp/before . --rounds 2

Each round starts one process per tree, in turn; a process loads the model with its tree's
code, decodes 48 tokens (`ignore_eos`) for 1 and for 8 prompts, and reports its best run of
each. One JSON line per process, then one with the medians per tree.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

CHILD = r"""
import json, sys, time, torch
sys.path.insert(0, sys.argv[1])
torch.set_num_threads(int(sys.argv[2]))
import lmforge
assert lmforge.__file__.startswith(sys.argv[1]), lmforge.__file__
lm = lmforge.load()
prompts = ["The history of the city", "Water boils at", "A short poem about rain:", "In 1905 Einstein"] * 2
def run(b):
    t = time.perf_counter()
    outs = lm.complete(prompts[:b], max_tokens=48, temperature=0.0, ignore_eos=True)
    return sum(o.completion_tokens for o in outs) / (time.perf_counter() - t)
run(1)
print(json.dumps({"b1_tok_s": max(run(1) for _ in range(3)), "b8_tok_s": max(run(8) for _ in range(2))}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("trees", nargs="+", help="source trees (directories holding lmforge/)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    trees = [os.path.abspath(t) for t in args.trees]
    results: dict[str, list[dict]] = {t: [] for t in trees}
    for _ in range(args.rounds):
        for tree in trees:
            out = subprocess.run([sys.executable, "-c", CHILD, tree, str(args.threads)], capture_output=True,
                                 text=True, check=True).stdout.strip().splitlines()[-1]
            row = json.loads(out)
            results[tree].append(row)
            print(json.dumps({"tree": tree, **row}), flush=True)
    print(json.dumps({"benchmark": "decode-trees", "load_avg": os.getloadavg()[0], "threads": args.threads,
                      "median": {t: {k: statistics.median(r[k] for r in rows) for k in ("b1_tok_s", "b8_tok_s")}
                                 for t, rows in results.items()}}))


if __name__ == "__main__":
    main()
