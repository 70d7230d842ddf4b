"""What every part of the server shares: one `ServerState` (its policy, `ServeSettings`, is in config.py).

The middleware and the routes are plain module-level code; they reach the scheduler,
the tokenizer, the metrics and the rest through the one `ServerState` that
`create_app` stores on the application (`app.state.server`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from fastapi import Request

from .config import ServeSettings

if TYPE_CHECKING:
    from ..infer.scheduler import Scheduler
    from .embeddings import EmbeddingModel
    from .metrics import ServerMetrics
    from .middleware import RateLimiter
    from .rag import KnowledgeBase


@dataclass
class ServerState:
    scheduler: Scheduler
    tokenizer: Any
    model_name: str
    settings: ServeSettings
    metrics: ServerMetrics
    limiter: RateLimiter
    embeddings: EmbeddingModel | None = None  # POST /v1/embeddings; None: not served
    knowledge: KnowledgeBase | None = None  # chat answers from an index (--rag); None: the bare model
    retriever: Any = None  # the knowledge base's retriever, its embedder run on the scheduler's thread
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def context_length(self) -> int:
        return self.scheduler.max_seq_len


def server_state(request: Request) -> ServerState:
    """The running server's state, as a FastAPI dependency."""
    return request.app.state.server
