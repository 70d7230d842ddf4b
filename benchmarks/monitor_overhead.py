"""Cost of the server's bookkeeping per finished generation and per request: this tree's
`ServerMetrics` against the version of lmforge/serve/metrics.py at --old-commit (before the
monitoring additions), alternating rounds, medians. Prints one JSON line.

    python benchmarks/monitor_overhead.py [--old-commit 6fdf238~1] [--rounds 5] [--calls 2000]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from lmforge.infer.request import DecodeState
from lmforge.infer.sampling import SamplingParams
from lmforge.infer.scheduler import RequestHandle, SchedulerStats
from lmforge.monitor.activity import Price
from lmforge.serve.metrics import ServerMetrics

ANSWER = "Your order left our warehouse yesterday and should arrive within three business days."


class IdleScheduler:
    stats = SchedulerStats()


def old_metrics(commit: str):
    source = subprocess.run(["git", "show", f"{commit}:lmforge/serve/metrics.py"], capture_output=True, text=True,
                            check=True).stdout
    path = Path(tempfile.mkdtemp()) / "old_metrics.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("lmforge.serve.old_metrics", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module.ServerMetrics


def finished_handles(n: int) -> list[RequestHandle]:
    handles = []
    for i in range(n):
        handle = RequestHandle(i, list(range(40)), None, stream=False)
        state = DecodeState(handle.prompt_ids, SamplingParams(), 64, None, [2], "cpu", 1000)
        state.generated, state.text, state.finish_reason = list(range(18)), ANSWER, "stop"
        handle.state = state
        handle.first_token_at, handle.finished_at = handle.submitted_at + 0.05, handle.submitted_at + 0.8
        handles.append(handle)
    return handles


def time_one(metrics, calls: int) -> tuple[float, float]:
    handles = finished_handles(calls)
    started = time.perf_counter()
    for h in handles:
        metrics.observe_generation(h)
    per_generation = (time.perf_counter() - started) / calls
    started = time.perf_counter()
    for _ in range(calls):
        metrics.observe_request("/v1/chat/completions", 200, 0.8)
    return per_generation, (time.perf_counter() - started) / calls


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--old-commit", default="6fdf238~1")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--calls", type=int, default=2000)
    args = p.parse_args()
    Old = old_metrics(args.old_commit)
    results = {"old": [], "new": []}
    for _ in range(args.rounds):
        results["old"].append(time_one(Old(IdleScheduler(), model_name="m"), args.calls))
        results["new"].append(time_one(ServerMetrics(IdleScheduler(), model_name="m", prices={"m": Price(0.5, 1.5)}),
                                       args.calls))
    med = {k: (statistics.median(g for g, _ in v) * 1e6, statistics.median(r for _, r in v) * 1e6)
           for k, v in results.items()}
    print(f"per generation: {med['old'][0]:.1f} us before, {med['new'][0]:.1f} us now "
          f"({med['new'][0] / med['old'][0]:.2f}x); per request: {med['old'][1]:.1f} us before, "
          f"{med['new'][1]:.1f} us now ({med['new'][1] / med['old'][1]:.2f}x)")
    print(json.dumps({"benchmark": "monitor_overhead", "rounds": args.rounds, "calls": args.calls,
                      "generation_us": {"old": round(med["old"][0], 2), "new": round(med["new"][0], 2)},
                      "request_us": {"old": round(med["old"][1], 2), "new": round(med["new"][1], 2)},
                      "generation_ratio": round(med["new"][0] / med["old"][0], 3),
                      "request_ratio": round(med["new"][1] / med["old"][1], 3)}))


if __name__ == "__main__":
    main()
