"""Recent activity in per-minute buckets: the numbers behind the built-in /dashboard page.

Prometheus keeps counters and histograms for the long run and for Grafana; a server
without a Prometheus next to it still wants to answer "how is it doing right now". This
keeps the last hour (by default) of requests and generations in one-minute buckets, each
with its raw latencies (capped), so the page can draw p50/p95 lines, error and refusal
rates, tokens per second and cost without a time-series database.

Also here: the per-model prices that turn tokens into a cost estimate.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

from ..errors import LmforgeError

MAX_SAMPLES_PER_BUCKET = 2000  # latencies kept per bucket for percentiles; counts stay exact beyond


@dataclass(frozen=True)
class Price:
    """US dollars per 1000 tokens."""

    prompt: float = 0.0
    completion: float = 0.0

    def cost(self, prompt_tokens: int, completion_tokens: int) -> float:
        return (prompt_tokens * self.prompt + completion_tokens * self.completion) / 1000.0


def parse_prices(entries: list[str] | None) -> dict[str, Price]:
    """``MODEL=PROMPT[,COMPLETION]`` (dollars per 1k tokens; one number prices both) -> {model: Price}.
    The model `*` prices every model without an entry of its own."""
    prices: dict[str, Price] = {}
    for entry in entries or []:
        name, eq, values = entry.partition("=")
        parts = values.split(",")
        try:
            numbers = [float(v) for v in parts]
        except ValueError:
            numbers = []
        if not eq or not name.strip() or len(numbers) not in (1, 2) or any(not math.isfinite(v) or v < 0
                                                                            for v in numbers):
            raise LmforgeError(f"a price is MODEL=PROMPT[,COMPLETION] in dollars per 1k tokens, not {entry!r}")
        prices[name.strip()] = Price(numbers[0], numbers[-1])
    return prices


def price_of(prices: dict[str, Price], model: str) -> Price | None:
    return prices.get(model) or prices.get("*")


def percentile(values: list[float], q: float) -> float | None:
    """The q-quantile (0..1) by linear interpolation; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    position = q * (len(ordered) - 1)
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


@dataclass
class Bucket:
    start: float
    requests: int = 0
    client_errors: int = 0  # 4xx: refused or malformed requests
    server_errors: int = 0  # 5xx: the server's fault
    latencies: list[float] = field(default_factory=list)
    generations: int = 0
    failed_generations: int = 0
    refusals: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost: float = 0.0
    ttfts: list[float] = field(default_factory=list)


class RecentActivity:
    """Requests and generations of the last `seconds`, in buckets of `bucket_seconds`. Thread-safe:
    requests are recorded on the event loop, generations on the scheduler's thread."""

    def __init__(self, seconds: float = 3600.0, bucket_seconds: float = 60.0,
                 clock: Callable[[], float] = time.time) -> None:
        if bucket_seconds <= 0 or seconds < bucket_seconds:
            raise LmforgeError("the activity history must hold at least one bucket")
        self.seconds, self.bucket_seconds, self.clock = seconds, bucket_seconds, clock
        self._buckets: deque[Bucket] = deque()
        self._lock = threading.Lock()

    def _bucket(self, now: float) -> Bucket:
        start = now - now % self.bucket_seconds
        if not self._buckets or self._buckets[-1].start < start:
            self._buckets.append(Bucket(start))
        while self._buckets and self._buckets[0].start + self.bucket_seconds <= now - self.seconds:
            self._buckets.popleft()
        return self._buckets[-1]

    def record_request(self, status: int, seconds: float) -> None:
        with self._lock:
            b = self._bucket(self.clock())
            b.requests += 1
            b.client_errors += 400 <= status < 500
            b.server_errors += status >= 500
            if len(b.latencies) < MAX_SAMPLES_PER_BUCKET:
                b.latencies.append(seconds)

    def record_generation(self, *, ttft: float | None, prompt_tokens: int, completion_tokens: int, cost: float,
                          refusal: bool, failed: bool) -> None:
        with self._lock:
            b = self._bucket(self.clock())
            b.generations += 1
            b.failed_generations += failed
            b.refusals += refusal
            b.prompt_tokens += prompt_tokens
            b.completion_tokens += completion_tokens
            b.cost += cost
            if ttft is not None and len(b.ttfts) < MAX_SAMPLES_PER_BUCKET:
                b.ttfts.append(ttft)

    def snapshot(self) -> dict[str, Any]:
        """Per-bucket series and totals over the kept history, JSON-ready."""
        with self._lock:
            now = self.clock()
            self._bucket(now)  # drops what is too old
            buckets = list(self._buckets)
        series = []
        for b in buckets:
            series.append({
                "time": b.start, "requests": b.requests, "client_errors": b.client_errors,
                "server_errors": b.server_errors, "latency_p50": percentile(b.latencies, 0.5),
                "latency_p95": percentile(b.latencies, 0.95), "ttft_p50": percentile(b.ttfts, 0.5),
                "ttft_p95": percentile(b.ttfts, 0.95), "generations": b.generations,
                "failed_generations": b.failed_generations, "refusals": b.refusals,
                "prompt_tokens": b.prompt_tokens, "completion_tokens": b.completion_tokens,
                "tokens_per_second": b.completion_tokens / self.bucket_seconds, "cost": round(b.cost, 8)})
        requests = sum(b.requests for b in buckets)
        generations = sum(b.generations for b in buckets)
        latencies = [x for b in buckets for x in b.latencies]
        ttfts = [x for b in buckets for x in b.ttfts]
        cost = sum(b.cost for b in buckets)
        totals = {
            "requests": requests, "generations": generations,
            "error_rate": sum(b.server_errors for b in buckets) / requests if requests else None,
            "client_error_rate": sum(b.client_errors for b in buckets) / requests if requests else None,
            "latency_p50": percentile(latencies, 0.5), "latency_p95": percentile(latencies, 0.95),
            "latency_p99": percentile(latencies, 0.99),
            "ttft_p50": percentile(ttfts, 0.5), "ttft_p95": percentile(ttfts, 0.95),
            "refusal_rate": sum(b.refusals for b in buckets) / generations if generations else None,
            "prompt_tokens": sum(b.prompt_tokens for b in buckets),
            "completion_tokens": sum(b.completion_tokens for b in buckets),
            "cost": round(cost, 8), "cost_per_generation": cost / generations if generations else None,
        }
        return {"now": now, "history_seconds": self.seconds, "bucket_seconds": self.bucket_seconds,
                "series": series, "totals": totals}
