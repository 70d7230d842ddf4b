"""The OpenAI-compatible HTTP server (S1), assembled: `create_app(scheduler, tokenizer, name)`.

The parts live in their own modules and share one `ServerState` (state.py):

- errors.py: `APIError` and the OpenAI-shaped error bodies; no request ends in a trace.
- middleware.py: `Guard`, in front of every route: the Host check against DNS
  rebinding, body size, API keys and rate limits, request metrics and logs.
- routes.py: /v1/chat/completions, /v1/completions, /v1/models, /health, /metrics; a
  request's model may name a LoRA adapter the scheduler's `AdapterBank` serves
  (adapters.py reads and checks them for `lmforge serve --adapter NAME=PATH`).
- embeddings.py: /v1/embeddings, with the embedding model `ServeSettings.embedding_model`
  names (loaded on the first request).
- rag.py: with `ServeSettings.rag`, chat answers from a knowledge base with numbered
  sources, and the sources' pages (GET /v1/rag/sources/{id}, /rag/sources/{id}).
- webui.py: the web chat page and its /api/* storage routes, when a store is given.
- lmforge/monitor/dashboard.py: the /dashboard page and its JSON of recent aggregates.
"""

from __future__ import annotations

from typing import Sequence

from fastapi import APIRouter, FastAPI

from ..infer.scheduler import Scheduler
from ..monitor.activity import Price
from ..monitor.dashboard import register_dashboard
from .config import ServeSettings
from .embeddings import embedding_model_from
from .embeddings import router as embeddings_router
from .errors import install_error_handlers
from .metrics import ServerMetrics
from .middleware import Guard, HostCheck, RateLimiter
from .rag import KnowledgeBase
from .rag import router as rag_router
from .routes import router
from .state import ServerState

__all__ = ["ServeSettings", "create_app"]


def explicit_embedding_model(settings: ServeSettings) -> str | None:
    """--embedding-model when it names a model (not auto or none): what --rag may try too."""
    name = settings.embedding_model.strip()
    return None if name.lower() in ("auto", "none") else name


def create_app(scheduler: Scheduler, tokenizer, model_name: str, settings: ServeSettings | None = None,
               store=None, knowledge: KnowledgeBase | None = None, prices: dict[str, Price] | None = None,
               drift=None, routers: Sequence[APIRouter] = ()) -> FastAPI:
    """The server's application. `store`: the web chat's `FeedbackStore` (no web chat without it).
    `knowledge`: the opened `settings.rag` index (opened here when not given; its owner closes it).
    `prices`: dollars per 1k tokens per served model, for the cost estimate in the metrics.
    `drift`: a `lmforge.monitor.drift.DriftMonitor` that the caller feeds questions to; its state
    shows on /dashboard and its gauges join /metrics.
    `routers`: an application's own routes (the assistant's), matched before the default ones,
    behind the same middleware, error handling and metrics."""
    settings = settings or ServeSettings()
    hosts = HostCheck(settings)  # a malformed --host / --allow-host fails here, before serving
    embeddings = embedding_model_from(settings)
    if knowledge is None and settings.rag is not None:
        knowledge = KnowledgeBase.open(settings.rag, explicit_embedding_model(settings))
    metrics = ServerMetrics(scheduler, model_name=model_name, prices=prices)
    if store is not None and str(store.path) != ":memory:":
        metrics.watch_feedback(store.path)
    if drift is not None:
        metrics.watch_drift(drift)
    scheduler.on_finish = metrics.observe_generation  # every ending counts: done, cancelled or failed
    state = ServerState(scheduler=scheduler, tokenizer=tokenizer, model_name=model_name, settings=settings,
                        metrics=metrics, limiter=RateLimiter(settings.rate_limit_per_minute), embeddings=embeddings,
                        knowledge=knowledge, retriever=knowledge.served_by(scheduler) if knowledge else None)

    app = FastAPI(title="lmforge", version="0.1.0", description="OpenAI-compatible API served by lmforge")
    app.state.server = state
    install_error_handlers(app)
    app.add_middleware(Guard, state=state, hosts=hosts)
    for extra in routers:
        app.include_router(extra)
    app.include_router(router)
    app.include_router(embeddings_router)
    app.include_router(rag_router)
    register_dashboard(app, metrics)
    if store is not None:  # the web chat and its conversation/feedback storage
        from .webui import register_webui

        register_webui(app, store)
    return app
