"""A Grafana dashboard over lmforge's Prometheus metrics, generated from one table of panels.

`grafana_dashboard()` returns the JSON Grafana imports (Dashboards -> New -> Import); the
copy in docs/monitoring/grafana-dashboard.json is written by `lmforge monitor grafana`.
The datasource is an import-time input (`DS_PROMETHEUS`), so the file fits any
Prometheus that scrapes the server's /metrics. A test checks that every metric the
panels query is one the server exports.
"""

from __future__ import annotations

from typing import Any

DATASOURCE = {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}
CHAT = 'endpoint="/v1/chat/completions"'
GENERATIONS = "sum(rate(lmforge_generation_latency_seconds_count[15m]))"


def _quantiles(metric: str, selector: str = "", by: str = "") -> list[tuple[str, str]]:
    labels = f"{{{selector}}}" if selector else ""
    return [(f"histogram_quantile({q}, sum by (le{by}) (rate({metric}_bucket{labels}[5m])))", f"p{round(q * 100)}")
            for q in (0.5, 0.95, 0.99)]


# (row, title, unit, kind, [(PromQL, legend)], description): what each panel catches is in its description.
PANELS: list[tuple[str, str, str, str, list[tuple[str, str]], str]] = [
    ("Traffic and latency (O1)", "Requests per second by endpoint", "reqps", "timeseries",
     [("sum by (endpoint) (rate(lmforge_requests_total[5m]))", "{{endpoint}}")], "Load; a drop to zero is an outage."),
    ("Traffic and latency (O1)", "Error rate (5xx share)", "percentunit", "timeseries",
     [('sum(rate(lmforge_requests_total{status=~"5.."}[5m])) / sum(rate(lmforge_requests_total[5m]))', "5xx"),
      ('sum(rate(lmforge_requests_total{status=~"4.."}[5m])) / sum(rate(lmforge_requests_total[5m]))', "4xx")],
     "5xx: the server's fault. 4xx: refused requests (rate limits, bad input, wrong host)."),
    ("Traffic and latency (O1)", "Chat request latency", "s", "timeseries",
     _quantiles("lmforge_request_latency_seconds", CHAT), "Whole request, including a streamed answer."),
    ("Traffic and latency (O1)", "Time to first token", "s", "timeseries",
     _quantiles("lmforge_time_to_first_token_seconds"), "Queueing plus prefill: what a user waits before text appears."),
    ("Traffic and latency (O1)", "Generated tokens per second", "short", "timeseries",
     [("sum(rate(lmforge_generated_tokens_total[1m]))", "tokens/s"), ("lmforge_tokens_per_second", "last 10 s")],
     "Throughput of the decode engine."),
    ("Traffic and latency (O1)", "Queue and batch", "short", "timeseries",
     [("lmforge_queue_depth", "waiting"), ("lmforge_running_batch_size", "running")],
     "A growing queue means demand exceeds capacity."),
    ("Traffic and latency (O1)", "Tokens per generation (p95)", "short", "timeseries",
     [("histogram_quantile(0.95, sum by (le, kind) (rate(lmforge_generation_tokens_bucket[15m])))", "{{kind}}")],
     "Longer prompts or answers cost more and take longer."),
    ("Traffic and latency (O1)", "Prefix-cache hit share", "percentunit", "timeseries",
     [("sum(rate(lmforge_prompt_tokens_cached_total[15m])) / sum(rate(lmforge_prompt_tokens_total[15m]))", "cached")],
     "Prompt tokens whose keys/values were reused."),
    ("Cost (O1)", "Estimated cost per hour (USD)", "currencyUSD", "timeseries",
     [("sum by (model) (rate(lmforge_cost_usd_total[1h])) * 3600", "{{model}}")],
     "At the prices given to the server, per 1k prompt and completion tokens."),
    ("Cost (O1)", "Cost per generation (USD)", "currencyUSD", "stat",
     [(f"sum(rate(lmforge_cost_usd_total[1h])) / {GENERATIONS.replace('15m', '1h')}", "per generation")], ""),
    ("Quality (O2)", "Thumbs-up share", "percentunit", "stat",
     [("lmforge_feedback_thumbs_up_ratio", "thumbs up")], "From the web chat's ratings."),
    ("Quality (O2)", "Ratings", "short", "timeseries",
     [("sum by (rating) (increase(lmforge_feedback_ratings_total[1h]))", "{{rating}}")], "Ratings per hour."),
    ("Quality (O2)", "Groundedness of knowledge-base answers", "percentunit", "timeseries",
     [("sum(rate(lmforge_rag_groundedness_sum[1h])) / sum(rate(lmforge_rag_groundedness_count[1h]))", "mean")],
     "Share of generated sentences the cited sources support; a fall means hallucination."),
    ("Quality (O2)", "Knowledge-base answers by mode", "short", "timeseries",
     [("sum by (mode) (rate(lmforge_rag_answers_total[15m]))", "{{mode}}")],
     "A rising share of refused answers says questions left what the index covers."),
    ("Quality (O2)", "Escalation rate", "percentunit", "timeseries",
     [(f"sum(rate(lmforge_escalations_total[15m])) / sum(rate(lmforge_requests_total{{{CHAT}}}[15m]))", "escalated")],
     "Conversations handed to a person per chat request."),
    ("Quality (O2)", "Intent mix", "short", "piechart",
     [("sum by (intent) (increase(lmforge_intents_total[1h]))", "{{intent}}")], "What people ask about."),
    ("Quality (O2)", "Question drift", "short", "timeseries",
     [("lmforge_drift_mmd_p_value", "MMD p-value"), ("lmforge_drift_psi", "PSI"),
      ("max by (test) (lmforge_drift_alert)", "alert {{test}}")],
     "Incoming questions against the reference window (lmforge/monitor/drift.py)."),
    ("Safety (O3)", "Refusal rate", "percentunit", "timeseries",
     [(f"sum(rate(lmforge_refusals_total[15m])) / {GENERATIONS}", "refusals")],
     "Too high: over-refusal after a tuning change; sudden rise: a new kind of request."),
    ("Safety (O3)", "Blocked requests by layer", "short", "timeseries",
     [("sum by (layer) (rate(lmforge_blocked_requests_total[15m]))", "{{layer}}")],
     "Guards refusing input, output or tool calls; spikes are often an attack."),
    ("Safety (O3)", "Moderation hits by category", "short", "timeseries",
     [("sum by (category) (rate(lmforge_moderation_hits_total[15m]))", "{{category}}")], ""),
    ("Safety (O3)", "Failed generations", "short", "timeseries",
     [("sum(rate(lmforge_generations_failed_total[15m]))", "failed")], "Generations that ended in an error."),
]


def grafana_dashboard(title: str = "lmforge") -> dict[str, Any]:
    """The dashboard as Grafana's JSON model (schema 39), with a Prometheus datasource input."""
    panels: list[dict[str, Any]] = []
    y, row_name, column = 0, None, 0
    for index, (row, panel_title, unit, kind, targets, description) in enumerate(PANELS, 1):
        if row != row_name:
            if column:
                y += 8
            panels.append({"type": "row", "title": row, "collapsed": False, "id": 1000 + index,
                           "gridPos": {"h": 1, "w": 24, "x": 0, "y": y}, "panels": []})
            y, column, row_name = y + 1, 0, row
        width = 8
        panels.append({
            "id": index, "type": kind, "title": panel_title, "description": description, "datasource": DATASOURCE,
            "gridPos": {"h": 8, "w": width, "x": column, "y": y},
            "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
            "options": {"legend": {"displayMode": "list", "placement": "bottom"}},
            "targets": [{"datasource": DATASOURCE, "expr": expr, "legendFormat": legend, "refId": chr(65 + i)}
                        for i, (expr, legend) in enumerate(targets)],
        })
        column += width
        if column >= 24:
            column, y = 0, y + 8
    return {
        "__inputs": [{"name": "DS_PROMETHEUS", "label": "Prometheus", "type": "datasource",
                      "pluginId": "prometheus", "pluginName": "Prometheus"}],
        "title": title, "uid": "lmforge-overview", "tags": ["lmforge", "llm"], "timezone": "browser",
        "schemaVersion": 39, "version": 1, "refresh": "30s", "time": {"from": "now-6h", "to": "now"},
        "editable": True, "panels": panels, "templating": {"list": []}, "annotations": {"list": []},
    }


def metric_names(dashboard: dict[str, Any]) -> set[str]:
    """The metric names (as exported, with _total/_bucket/... suffixes) the dashboard's queries read."""
    import re

    names: set[str] = set()
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            names.update(re.findall(r"\blmforge_[a-z0-9_]+", target["expr"]))
    return names
