"""Operational, quality and safety metrics (O1-O3) in Prometheus' text format, one registry per server.

Counters and histograms are updated by the HTTP layer (requests, latency) and when a
generation ends (time to first token, tokens, cost, refusals); gauges read the
scheduler's live state (queue depth, running batch) at scrape time, so they are never
stale. The web chat's ratings are read from its store at scrape time too
(lmforge/monitor/quality.py).

Counters that other components feed (`count_*`: escalations and intents from the
assistant, blocked requests and moderation hits from the guards) take free label values;
each keeps at most `MAX_LABEL_VALUES` distinct ones and counts the rest as "other", so a
bug or an attacker cannot grow the series without bound.

Besides the registry, `activity` keeps the last hour in one-minute buckets for the
built-in /dashboard page (lmforge/monitor/activity.py, lmforge/monitor/dashboard.py).
"""

from __future__ import annotations

import time
from collections import deque

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from ..monitor.activity import Price, RecentActivity, price_of
from ..monitor.quality import FeedbackCollector, answer_groundedness, is_refusal

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 128)
KNOWN_ENDPOINTS = frozenset({"/", "/health", "/metrics", "/v1/models", "/v1/chat/completions", "/v1/completions",
                             "/dashboard", "/dashboard/data"})
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16)
TOKEN_BUCKETS = (1, 4, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)
SHARE_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
MAX_LABEL_VALUES = 50
OTHER = "other"


class ServerMetrics:
    def __init__(self, scheduler, window_seconds: float = 10.0, model_name: str = "base",
                 prices: dict[str, Price] | None = None, activity: RecentActivity | None = None) -> None:
        self.registry = CollectorRegistry()
        self.prices = dict(prices or {})
        self.activity = activity or RecentActivity()
        self.drift = None  # a lmforge.monitor.drift.DriftMonitor, when one watches the questions
        self._label_values: dict[str, set[str]] = {}
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
        # Per generation: the token counts (per-request, for percentiles), the cost estimate, refusals.
        self.generation_tokens = Histogram("lmforge_generation_tokens", "Tokens per generation (prompt or completion)",
                                           ["kind"], buckets=TOKEN_BUCKETS, registry=r)
        self.cost = Counter("lmforge_cost_usd", "Estimated cost of generations in US dollars at the configured "
                            "prices per 1k tokens", ["model"], registry=r)
        self.refusals = Counter("lmforge_refusals", "Generations whose answer opens with a refusal", registry=r)
        self.failed_generations = Counter("lmforge_generations_failed", "Generations that ended in an error",
                                          registry=r)
        self.groundedness = Histogram("lmforge_rag_groundedness", "Share of a generated knowledge-base answer's "
                                      "sentences that its sources support", buckets=SHARE_BUCKETS, registry=r)
        # Fed by other components (the assistant, the guards); label values are bounded (see count_*).
        self.escalations = Counter("lmforge_escalations", "Conversations handed over to a person, by reason",
                                   ["reason"], registry=r)
        self.intents = Counter("lmforge_intents", "Requests by the intent the assistant's router gave them",
                               ["intent"], registry=r)
        self.blocked = Counter("lmforge_blocked_requests", "Requests blocked, by the guard layer that blocked them",
                               ["layer"], registry=r)
        self.moderation = Counter("lmforge_moderation_hits", "Moderation hits, by category", ["category"],
                                  registry=r)
        # With LoRA adapters: generations and tokens per served model (the base or an adapter);
        # the label values are bounded by the adapters given at startup.
        self.adapters = getattr(scheduler, "adapters", None)
        self.model_name = model_name
        self.model_generations = self.model_tokens = None
        if self.adapters is not None:
            self.model_generations = Counter("lmforge_model_generations", "Generations by served model (base or "
                                             "LoRA adapter)", ["model"], registry=r)
            self.model_tokens = Counter("lmforge_model_generated_tokens", "Tokens generated by served model (base "
                                        "or LoRA adapter)", ["model"], registry=r)
        Gauge("lmforge_queue_depth", "Requests waiting for a batch slot", registry=r).set_function(
            lambda: scheduler.stats.waiting)
        Gauge("lmforge_running_batch_size", "Requests in the running batch", registry=r).set_function(
            lambda: scheduler.stats.running)
        Gauge("lmforge_prefilling_requests", "Long prompts being prefilled chunk by chunk", registry=r).set_function(
            lambda: scheduler.stats.prefilling)
        Gauge("lmforge_fed_prompts", "Prompts cached but for a short tail, fed through decode steps instead of a "
              "prefill", registry=r).set_function(lambda: scheduler.stats.fed_prompts)
        Gauge("lmforge_tokens_per_second", f"Generated tokens per second over the last {window_seconds:g}s",
              registry=r).set_function(self.tokens_per_second)
        if getattr(scheduler, "paged", False):  # --kv-cache paged: how full the block pool is
            Gauge("lmforge_kv_blocks_free", "Free blocks of the paged KV cache", registry=r).set_function(
                lambda: scheduler.stats.kv_blocks_free)
            Gauge("lmforge_kv_blocks_total", "Blocks of the paged KV cache", registry=r).set_function(
                lambda: scheduler.stats.kv_blocks_total)
            Gauge("lmforge_preempted_requests", "Requests sent back to the queue when KV blocks ran out (recomputed "
                  "when readmitted)", registry=r).set_function(lambda: scheduler.stats.preempted)
        speculator = getattr(scheduler, "speculator", None)
        if speculator is not None:  # speculative decoding: how many guesses the target accepted
            stats = speculator.stats
            for name, help_, read in (
                    ("steps", "Verification forwards over a draft", lambda: stats.steps),
                    ("proposed", "Draft tokens proposed", lambda: stats.proposed),
                    ("accepted", "Draft tokens the target accepted", lambda: stats.accepted)):
                Gauge(f"lmforge_speculative_{name}", help_, registry=r).set_function(read)
            Gauge("lmforge_speculative_acceptance_rate", "Accepted share of the proposed draft tokens",
                  registry=r).set_function(lambda: stats.acceptance_rate)

    def observe_request(self, endpoint: str, status: int, seconds: float) -> None:
        known = endpoint if endpoint in KNOWN_ENDPOINTS else "other"  # bounded label values
        self.requests.labels(known, str(status)).inc()
        self.latency.labels(known).observe(seconds)
        if known != "/metrics" and not endpoint.startswith("/dashboard"):  # the watchers are not the traffic
            self.activity.record_request(status, seconds)

    def watch_drift(self, monitor) -> None:
        """Show `monitor` (a `DriftMonitor`) on the dashboard; its gauges join this registry unless
        it was built with a registry of its own."""
        if monitor._gauges is None:
            monitor.register(self.registry)
        self.drift = monitor

    def watch_feedback(self, path) -> None:
        """Export the ratings of the feedback database at `path` (read at each scrape)."""
        self.registry.register(FeedbackCollector(path))

    def observe_generation(self, handle) -> None:
        if getattr(handle, "_observed", False) or handle.state is None:
            return
        handle._observed = True
        state = handle.state
        n = len(state.generated)
        prompt = len(handle.prompt_ids)
        self.tokens.inc(n)
        self.prompt_tokens.inc(prompt)
        self.cached_prompt_tokens.inc(handle.cached)
        self.generation_tokens.labels("prompt").observe(prompt)
        self.generation_tokens.labels("completion").observe(n)
        index = getattr(handle, "adapter", 0)
        label = self.model_name if index == 0 or self.adapters is None else self.adapters.adapters[index - 1].name
        if self.model_tokens is not None:
            self.model_generations.labels(label).inc()
            self.model_tokens.labels(label).inc(n)
        price = price_of(self.prices, label)
        cost = price.cost(prompt, n) if price is not None else 0.0
        if price is not None:
            self.cost.labels(label).inc(cost)
        failed = state.finish_reason == "error"
        refusal = not failed and is_refusal(state.text or "")
        if refusal:
            self.refusals.inc()
        if failed:
            self.failed_generations.inc()
        ttft = None
        if handle.first_token_at is not None:
            ttft = handle.first_token_at - handle.submitted_at
            self.ttft.observe(ttft)
        end = handle.finished_at or time.perf_counter()
        self.generation_latency.observe(end - handle.submitted_at)
        self._recent.append((time.monotonic(), n))
        self.activity.record_generation(ttft=ttft, prompt_tokens=prompt, completion_tokens=n, cost=cost,
                                        refusal=refusal, failed=failed)

    def observe_answer(self, mode: str, answer=None) -> None:
        """An answer from the knowledge base; with the `Answer` itself, its groundedness too."""
        self.answers.labels(mode).inc()
        share = answer_groundedness(answer) if answer is not None else None
        if share is not None:
            self.observe_groundedness(share)

    def observe_groundedness(self, share: float) -> None:
        self.groundedness.observe(min(1.0, max(0.0, float(share))))

    # ---- counters other components feed ------------------------------------------------------
    def _bounded(self, counter: str, value: str) -> str:
        seen = self._label_values.setdefault(counter, set())
        value = str(value)[:64] or OTHER
        if value in seen:
            return value
        if len(seen) >= MAX_LABEL_VALUES:
            return OTHER
        seen.add(value)
        return value

    def count_escalation(self, reason: str = "requested") -> None:
        self.escalations.labels(self._bounded("escalations", reason)).inc()

    def count_intent(self, intent: str) -> None:
        self.intents.labels(self._bounded("intents", intent)).inc()

    def count_blocked(self, layer: str) -> None:
        """A request a guard refused; `layer` names the guard (input, output, tools, rate ...)."""
        self.blocked.labels(self._bounded("blocked", layer)).inc()

    def count_moderation(self, category: str) -> None:
        self.moderation.labels(self._bounded("moderation", category)).inc()

    def dashboard_data(self) -> dict:
        """The /dashboard page's JSON: recent activity, the labelled counters, ratings and drift."""
        data = self.activity.snapshot()
        values: dict[str, dict[str, float]] = {}
        for metric in self.registry.collect():
            for sample in metric.samples:
                values.setdefault(sample.name, {})[",".join(sample.labels.values())] = sample.value
        data["model"] = self.model_name
        data["counters"] = {name: values.get(f"lmforge_{name}_total", {}) for name in
                            ("escalations", "intents", "blocked_requests", "moderation_hits", "rag_answers",
                             "feedback_ratings", "cost_usd")}
        data["live"] = {"queue_depth": self.scheduler.stats.waiting, "running": self.scheduler.stats.running,
                        "tokens_per_second": self.tokens_per_second()}
        grounded = values.get("lmforge_rag_groundedness_count", {}).get("", 0.0)
        data["groundedness_mean"] = (values["lmforge_rag_groundedness_sum"][""] / grounded) if grounded else None
        data["drift"] = self.drift.state.to_dict() if self.drift is not None else None
        return data

    def tokens_per_second(self) -> float:
        now = time.monotonic()
        while self._recent and now - self._recent[0][0] > self.window:
            self._recent.popleft()
        return sum(n for _, n in self._recent) / self.window

    def render(self) -> bytes:
        return generate_latest(self.registry)
