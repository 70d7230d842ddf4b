"""The web chat: the page at `/`, its static files, and the /api/* routes behind it.

The page (lmforge/serve/static/) talks to the same OpenAI-compatible endpoint as any
other client (POST /v1/chat/completions with stream=true); the routes here only keep
conversations and ratings in a `FeedbackStore`. Bodies are validated by pydantic, so a
malformed request gets the server's usual OpenAI-style 422; unknown ids get a 404.

The routes are plain `def` functions on purpose: FastAPI runs them on its thread pool,
so the fsync at each SQLite commit never blocks the event loop that streams tokens,
and the response leaves only after the commit returned.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from fastapi import FastAPI, Query
from fastapi.responses import HTMLResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from .errors import APIError
from .feedback import FeedbackStore, NotFound

STATIC_DIR = Path(__file__).parent / "static"

# The page loads nothing from anywhere but this server, and the browser enforces it.
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                               "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "Cache-Control": "no-cache",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}

MAX_CONTENT_CHARS = 200_000
MAX_MESSAGES = 1000
MAX_SOURCES = 64


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SourceIn(BaseModel):
    """A source an answer cited, as `/v1/chat/completions` listed it (fields added later are dropped)."""

    model_config = ConfigDict(extra="ignore")

    number: int = Field(ge=1, le=1000, strict=True)
    id: str = Field(min_length=1, max_length=200)
    source: str = Field(max_length=2000)
    title: str = Field(default="", max_length=2000)
    headings: list[str] = Field(default_factory=list, max_length=32)
    line_start: int = Field(default=1, ge=0, strict=True)
    line_end: int = Field(default=1, ge=0, strict=True)
    url: str | None = Field(default=None, max_length=4000)


class MessageIn(_Strict):
    role: Literal["system", "user", "assistant"]
    content: str = Field(max_length=MAX_CONTENT_CHARS)
    # An answer from a knowledge base: its sources, shown again when the conversation is reopened.
    sources: list[SourceIn] | None = Field(default=None, max_length=MAX_SOURCES)

    @model_validator(mode="after")
    def _sources_on_answers(self) -> MessageIn:
        if self.sources is not None and self.role != "assistant":
            raise ValueError("sources belong to assistant messages only")
        return self


class ConversationIn(_Strict):
    title: str = Field(default="", max_length=200)
    model: str | None = Field(default=None, max_length=200)
    settings: dict[str, Any] = Field(default_factory=dict)
    messages: list[MessageIn] = Field(default_factory=list, max_length=MAX_MESSAGES)


class MessagesIn(_Strict):
    messages: list[MessageIn] = Field(min_length=1, max_length=MAX_MESSAGES)


class FeedbackIn(_Strict):
    message_id: int = Field(ge=1, strict=True)
    rating: int = Field(strict=True, description="+1 (thumbs up) or -1 (thumbs down)",
                        json_schema_extra={"enum": [1, -1]})
    comment: str = Field(default="", max_length=4000)

    @field_validator("rating")
    @classmethod
    def _one_or_minus_one(cls, value: int) -> int:
        if value not in (1, -1):
            raise ValueError("rating must be 1 (thumbs up) or -1 (thumbs down)")
        return value


def _not_found(exc: NotFound, param: str) -> APIError:
    return APIError(404, str(exc), "not_found_error", param, f"{param}_not_found")


def register_webui(app: FastAPI, store: FeedbackStore) -> None:
    """Add the web chat page, its static files and the /api/* storage routes to `app`."""
    app.state.feedback_store = store
    page = (STATIC_DIR / "index.html").read_text(encoding="utf-8")

    @app.get("/", include_in_schema=False)
    def index():
        return HTMLResponse(page, headers=PAGE_HEADERS)

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    @app.post("/api/conversations", status_code=201)
    def create_conversation(body: ConversationIn):
        return store.create_conversation(body.title, body.model, body.settings,
                                         [m.model_dump() for m in body.messages])

    @app.get("/api/conversations")
    def list_conversations(limit: int = Query(50, ge=1, le=500), offset: int = Query(0, ge=0)):
        return {"object": "list", "data": store.list_conversations(limit, offset)}

    @app.get("/api/conversations/{conversation_id}")
    def get_conversation(conversation_id: str):
        try:
            return store.get_conversation(conversation_id)
        except NotFound as exc:
            raise _not_found(exc, "conversation") from None

    @app.post("/api/conversations/{conversation_id}/messages", status_code=201)
    def append_messages(conversation_id: str, body: MessagesIn):
        try:
            added = store.append_messages(conversation_id, [m.model_dump() for m in body.messages])
        except NotFound as exc:
            raise _not_found(exc, "conversation") from None
        return {"object": "list", "data": added}

    @app.post("/api/feedback", status_code=201)
    def add_feedback(body: FeedbackIn):
        try:
            return store.add_feedback(body.message_id, body.rating, body.comment)
        except NotFound as exc:
            raise _not_found(exc, "message") from None
        except ValueError as exc:
            raise APIError(400, str(exc), param="message_id") from None

    @app.get("/api/feedback")
    def export_feedback(rating: int | None = Query(None, description="only answers rated 1 or -1"),
                        format: Literal["json", "jsonl"] = Query("json")):
        if rating not in (None, 1, -1):
            raise APIError(422, "rating must be 1 or -1", param="rating")
        records = store.export(rating)
        if format == "jsonl":  # one training record a line, ready for dataset loaders
            text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
            return Response(text, media_type="application/x-ndjson")
        return {"object": "list", "data": records}
