"""Operational metrics (O1) in Prometheus' text format, one registry per server.

Counters and histograms are updated by the HTTP layer (requests, latency) and when a
generation ends (time to first token, tokens); gauges read the scheduler's live state
(queue depth, running batch) at scrape time, so they are never stale.
"""

from __future__ import annotations

import time
from collections import deque

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 128)
KNOWN_ENDPOINTS = frozenset({"/", "/health", "/metrics", "/v1/models", "/v1/chat/completions", "/v1/completions"})
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16)


class ServerMetrics:
    def __init__(self, scheduler, window_seconds: float = 10.0) -> None:
        self.registry = CollectorRegistry()
        self.scheduler = scheduler
        self.window = window_seconds
        self._recent: deque[tuple[float, int]] = deque()  # (time, tokens) of finished generations
        r = self.registry
        self.requests = Counter("lmforge_requests", "HTTP requests by endpoint and status", ["endpoint", "status"], registry=r)
        self.latency = Histogram("lmforge_request_latency_seconds", "HTTP request latency", ["endpoint"],
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("lmforge_time_to_first_token_seconds", "Time from submission to the first token",
                              buckets=TTFT_BUCKETS, registry=r)
        self.generation_latency = Histogram("lmforge_generation_latency_seconds", "Time from submission to the end",
                                            buckets=LATENCY_BUCKETS, registry=r)
        self.tokens = Counter("lmforge_generated_tokens", "Tokens generated", registry=r)
        self.prompt_tokens = Counter("lmforge_prompt_tokens", "Prompt tokens processed", registry=r)
        self.cached_prompt_tokens = Counter("lmforge_prompt_tokens_cached",
                                            "Prompt tokens whose keys/values came from the prefix cache", registry=r)
        # A rising share of refusals says the questions drifted away from what the index holds.
        self.answers = Counter("lmforge_rag_answers", "Answers from the knowledge base by how they were made "
                               "(generated, extractive, refused)", ["mode"], registry=r)
        Gauge("lmforge_queue_depth", "Requests waiting for a batch slot", registry=r).set_function(
            lambda: scheduler.stats.waiting)
        Gauge("lmforge_running_batch_size", "Requests in the running batch", registry=r).set_function(
            lambda: scheduler.stats.running)
        Gauge("lmforge_tokens_per_second", f"Generated tokens per second over the last {window_seconds:g}s",
              registry=r).set_function(self.tokens_per_second)

    def observe_request(self, endpoint: str, status: int, seconds: float) -> None:
        known = endpoint if endpoint in KNOWN_ENDPOINTS else "other"  # bounded label values
        self.requests.labels(known, str(status)).inc()
        self.latency.labels(known).observe(seconds)

    def observe_generation(self, handle) -> None:
        if getattr(handle, "_observed", False) or handle.state is None:
            return
        handle._observed = True
        n = len(handle.state.generated)
        self.tokens.inc(n)
        self.prompt_tokens.inc(len(handle.prompt_ids))
        self.cached_prompt_tokens.inc(handle.cached)
        if handle.first_token_at is not None:
            self.ttft.observe(handle.first_token_at - handle.submitted_at)
        end = handle.finished_at or time.perf_counter()
        self.generation_latency.observe(end - handle.submitted_at)
        self._recent.append((time.monotonic(), n))

    def observe_answer(self, mode: str) -> None:
        self.answers.labels(mode).inc()

    def tokens_per_second(self) -> float:
        now = time.monotonic()
        while self._recent and now - self._recent[0][0] > self.window:
            self._recent.popleft()
        return sum(n for _, n in self._recent) / self.window

    def render(self) -> bytes:
        return generate_latest(self.registry)
