"""What every part of the server shares: its policy (`ServeSettings`) and one `ServerState`.

The middleware and the routes are plain module-level code; they reach the scheduler,
the tokenizer, the metrics and the rest through the one `ServerState` that
`create_app` stores on the application (`app.state.server`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from fastapi import Request

if TYPE_CHECKING:
    from ..infer.scheduler import Scheduler
    from .feedback import FeedbackStore
    from .metrics import ServerMetrics
    from .middleware import RateLimiter


@dataclass
class ServeSettings:
    """Service policy; every field is a `lmforge serve` flag."""

    api_keys: list[str] = field(default_factory=list)  # empty: no authentication (loopback only)
    rate_limit_per_minute: int = 0  # per API key; 0 = unlimited
    max_request_bytes: int = 1 << 20
    max_tokens_limit: int = 4096  # upper bound on max_tokens a client may ask for
    log_prompts: bool = False  # request logs never contain prompt text unless asked
    # The address the server is bound to (--host): a name or address given there is a
    # valid Host header, besides the loopback names.
    host: str = "127.0.0.1"
    # More names clients may reach the server by (--allow-host), checked against the
    # Host header while no API key is set; "*" accepts any.
    allowed_hosts: list[str] = field(default_factory=list)


@dataclass
class ServerState:
    scheduler: Scheduler
    tokenizer: Any
    model_name: str
    settings: ServeSettings
    metrics: ServerMetrics
    limiter: RateLimiter
    store: FeedbackStore | None = None
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def context_length(self) -> int:
        return self.scheduler.max_seq_len


def server_state(request: Request) -> ServerState:
    """The running server's state, as a FastAPI dependency."""
    return request.app.state.server
