"""Drift detection on generated customer questions: detection and false-alarm rates of MMD and PSI.

A pool of generated questions from the reference topics and from a new topic
(lmforge/monitor/questions.py) is embedded once. Each trial draws a reference and a
window from disjoint parts of the pool; in a shifted window a share of the questions
comes from the new topic. A trial runs the monitor's own check (lmforge/monitor/drift.py)
and records whether each test says drifting. Prints a table and one JSON line.

    python benchmarks/drift.py [--window 200] [--trials 100] [--shares 0.1,0.3,0.5,1.0]
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import statistics
import time
from collections import deque

import numpy as np

from lmforge.monitor.drift import DriftMonitor, DriftOptions
from lmforge.monitor.questions import questions
from lmforge.rag.embedder import load_embedder


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--window", type=int, default=200)
    p.add_argument("--trials", type=int, default=100, help="same-distribution windows (false alarms)")
    p.add_argument("--shifted-trials", type=int, default=40, help="windows per shift share")
    p.add_argument("--shares", default="0.1,0.3,0.5,1.0")
    p.add_argument("--pool", type=int, default=3000, help="reference-topic questions embedded")
    p.add_argument("--permutations", type=int, default=200)
    p.add_argument("--clusters", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    logging.getLogger("lmforge.monitor").setLevel(logging.ERROR)  # one alert line per trial otherwise
    rng = random.Random(args.seed)
    pool_texts = questions(args.pool, rng)
    new_texts = questions(max(args.window, 600), rng, shift_share=1.0)
    embedder = load_embedder("all-minilm-l6-v2")
    started = time.perf_counter()
    pool = embedder.encode(pool_texts, normalize=True)
    new = embedder.encode(new_texts, normalize=True)
    embed_rate = (len(pool_texts) + len(new_texts)) / (time.perf_counter() - started)

    options = DriftOptions(window=args.window, reference_size=args.window, permutations=args.permutations,
                           clusters=args.clusters, cooldown_seconds=0.0, seed=args.seed)
    draw = np.random.default_rng(args.seed)
    seconds: list[float] = []

    def trial(share: float) -> dict[str, bool]:
        order = draw.permutation(len(pool))
        reference = pool[order[:args.window]]
        shifted = round(args.window * share)
        window = np.concatenate([pool[order[args.window:2 * args.window - shifted]],
                                 new[draw.permutation(len(new))[:shifted]]])
        monitor = DriftMonitor(options, embed=lambda texts: None)
        monitor.set_reference(reference)
        monitor.window = deque(window, maxlen=args.window)
        state = monitor.check()
        seconds.append(state.seconds)
        return dict(state.drifting)

    shares = [0.0] + [float(s) for s in args.shares.split(",")]
    rates = {}
    for share in shares:
        runs = [trial(share) for _ in range(args.trials if share == 0.0 else args.shifted_trials)]
        rates[share] = {test: sum(r[test] for r in runs) / len(runs) for test in DriftMonitor.TESTS}
        rates[share]["windows"] = len(runs)
        label = "same distribution (false alarms)" if share == 0.0 else f"{share:.0%} new topic (detections)"
        print(f"{label:36s} MMD {rates[share]['mmd']:.3f}  PSI {rates[share]['psi']:.3f}  ({len(runs)} windows)")
    check = statistics.median(seconds)
    print(f"window {args.window}, reference {args.window}, {args.permutations} permutations, {args.clusters} clusters: "
          f"{check * 1000:.1f} ms per check (median); embedding {embed_rate:.0f} questions/s")
    print(json.dumps({"benchmark": "drift", "window": args.window, "reference": args.window,
                      "permutations": args.permutations, "clusters": args.clusters,
                      "mmd_alpha": options.mmd_alpha, "psi_threshold": options.psi_threshold,
                      "false_alarm": {t: rates[0.0][t] for t in DriftMonitor.TESTS},
                      "false_alarm_windows": rates[0.0]["windows"],
                      "detection": {f"{s:g}": {t: rates[s][t] for t in DriftMonitor.TESTS} for s in shares[1:]},
                      "detection_windows": args.shifted_trials,
                      "check_seconds_median": round(check, 4), "embed_questions_per_second": round(embed_rate, 1)}))


if __name__ == "__main__":
    main()
