"""Monitoring an LLM product (O1-O4): what the served model does, how well, how safely, and for whom.

- `activity`: recent requests and generations in per-minute buckets, and per-model prices.
- `quality`: ratings from the web chat's store, refusals, groundedness of knowledge-base answers.
- `drift`: the incoming questions' embeddings against a reference (MMD and PSI, with alerts).
- `golden`: golden-set runs against a local model or an endpoint, compared with the last run.
- `dashboard`: the server's /dashboard page; `grafana`: the Grafana dashboard over /metrics.
- `questions`: generated customer-service questions to exercise all of the above.
- `config`: the settings (every field a flag of `lmforge monitor`).

The Prometheus metrics themselves live with the server (lmforge/serve/metrics.py).
"""
