"""The assistant over HTTP: the OpenAI chat API, feedback, and the human agents' hand-off desk.

    lmforge assistant serve [--config FILE]        # http://127.0.0.1:8000/ (chat), /agent (agents)

Routes (matched before lmforge serve's own, behind its middleware: Host check, API keys,
size and rate limits, metrics, OpenAI-shaped errors):

    POST /v1/chat/completions        model "assistant": the last user message goes through
                                     the assistant; the conversation lives on the server, named
                                     by ``conversation_id`` (extra body field, ``metadata``, or
                                     the X-Conversation-Id header; a new one when absent) and
                                     returned in the response with intent, handler, state,
                                     citations and the reply's message index. Streams too.
    GET  /v1/assistant/conversations/{id}?after=N   messages after index N (agents' replies)
    POST /v1/assistant/feedback      {conversation_id, message_index, rating, correction?}
    GET  /v1/assistant/handoffs      the queue (agents)
    POST /v1/assistant/handoffs/{ticket}/take      {agent}
    POST /v1/assistant/handoffs/{ticket}/reply     {agent, text}
    POST /v1/assistant/handoffs/{ticket}/resolve   {resolution, back_to_bot}
    GET  /assistant, /agent          the customer's chat page and the agents' desk

The assistant's flow is synchronous (database, router, retrieval, the model through the
server's scheduler), so each request runs it on a worker thread; the event loop never
waits on it. Model calls go through the server's scheduler, so concurrent conversations
share its batches like any other requests.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from pathlib import Path
from typing import Annotated, Any, Iterator, Literal

from fastapi import APIRouter, Depends, Header, Request
from fastapi.responses import HTMLResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from ..errors import LmforgeError
from ..serve.errors import APIError
from .conversations import Conflict, NotFound

MODEL_NAME = "assistant"
MAX_MESSAGE_CHARS = 4000
STATIC = Path(__file__).parent / "static"

router = APIRouter()


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _Message(BaseModel):
    model_config = ConfigDict(extra="allow")  # name, tool_calls, ... are accepted and ignored
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[dict[str, Any]] | None = None


class AssistantChatRequest(BaseModel):
    model_config = ConfigDict(extra="allow")  # the OpenAI client sends fields the assistant does not use
    model: str = MODEL_NAME
    messages: list[_Message] = Field(min_length=1, max_length=256)
    stream: bool = False
    conversation_id: str | None = Field(None, max_length=64)
    metadata: dict[str, str] | None = None


class FeedbackRequest(_Strict):
    conversation_id: str = Field(max_length=64)
    message_index: int = Field(ge=0)
    rating: Literal[-1, 1]
    correction: str | None = Field(None, max_length=MAX_MESSAGE_CHARS)


class TakeRequest(_Strict):
    agent: str = Field(min_length=1, max_length=64)


class AgentReply(_Strict):
    agent: str = Field(min_length=1, max_length=64)
    text: str = Field(min_length=1, max_length=MAX_MESSAGE_CHARS)


class ResolveRequest(_Strict):
    resolution: str = Field(min_length=1, max_length=MAX_MESSAGE_CHARS)
    back_to_bot: bool = False


class SchedulerChat:
    """A chat model whose generations go through the server's scheduler (shared batches)."""

    def __init__(self, scheduler, tokenizer, name: str) -> None:
        self.scheduler, self.tokenizer, self.name = scheduler, tokenizer, name

    def stream_chat(self, messages, **sampling: Any) -> Iterator[str]:
        from ..serve.rag import ServedChatModel

        yield from ServedChatModel(self.scheduler, self.tokenizer, threading.Event()).stream_chat(messages, **sampling)

    def chat(self, messages, **sampling: Any) -> str:
        return "".join(self.stream_chat(messages, **sampling))


def assistant_of(request: Request):
    return request.app.state.assistant


Assistant = Annotated[Any, Depends(assistant_of)]


def _text(content) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
    return ""


def _user_error(exc: LmforgeError) -> APIError:
    if isinstance(exc, NotFound):
        return APIError(404, str(exc), "not_found_error")
    return APIError(409 if isinstance(exc, Conflict) else 400, str(exc))


async def _call(fn, *args, **kwargs):
    try:
        return await run_in_threadpool(fn, *args, **kwargs)
    except LmforgeError as exc:
        raise _user_error(exc) from None


def _conversation_id(body: AssistantChatRequest, header: str | None) -> str | None:
    found = body.conversation_id or (body.metadata or {}).get("conversation_id") or header
    if found is not None and (len(found) > 64 or not found.replace("-", "").isalnum()):
        raise APIError(400, "conversation_id must be up to 64 letters, digits or dashes", param="conversation_id")
    return found


@router.post("/v1/chat/completions")
async def chat_completions(body: AssistantChatRequest, assistant: Assistant,
                           x_conversation_id: Annotated[str | None, Header()] = None):
    if body.model not in (MODEL_NAME, "") and not body.model.startswith(MODEL_NAME):
        raise APIError(404, f"this server runs the assistant: use model {MODEL_NAME!r}", "not_found_error", "model",
                       "model_not_found")
    users = [m for m in body.messages if m.role == "user"]
    if not users:
        raise APIError(400, "messages hold no user message", param="messages")
    text = _text(users[-1].content).strip()
    if not text:
        raise APIError(400, "the last user message is empty", param="messages")
    if len(text) > MAX_MESSAGE_CHARS:
        raise APIError(400, f"the message is longer than {MAX_MESSAGE_CHARS} characters", param="messages")
    conversation = _conversation_id(body, x_conversation_id)
    reply = await _call(assistant.handle, conversation, text)
    created, rid = int(time.time()), f"chatcmpl-{uuid.uuid4().hex[:24]}"
    extra = {"conversation_id": reply.conversation_id, "intent": reply.intent, "handler": reply.handler,
             "state": reply.state, "message_index": reply.message_index, "citations": reply.citations,
             "handoff_ticket": reply.handoff_ticket, "blocked_by": reply.blocked_by}
    if not body.stream:
        return {"id": rid, "object": "chat.completion", "created": created, "model": MODEL_NAME,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": reply.text},
                             "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}, **extra}

    def frame(delta: dict[str, Any], finish: str | None, **more: Any) -> str:
        chunk = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": MODEL_NAME,
                 "choices": [{"index": 0, "delta": delta, "finish_reason": finish}], **more}
        return f"data: {json.dumps(chunk)}\n\n"

    def events() -> Iterator[str]:
        yield frame({"role": "assistant", "content": ""}, None)
        if reply.text:
            yield frame({"content": reply.text}, None)
        yield frame({}, "stop", **extra)
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream")


@router.get("/v1/assistant/conversations/{conversation_id}")
async def conversation(conversation_id: str, assistant: Assistant, after: int = -1):
    if len(conversation_id) > 64:
        raise APIError(404, "no such conversation", "not_found_error")
    store = assistant.conversations

    def read():
        if not store.exists(conversation_id):
            raise NotFound(f"no conversation {conversation_id!r}")
        return {"conversation_id": conversation_id, "state": store.state(conversation_id),
                "messages": [{k: m[k] for k in ("idx", "role", "content", "author", "created")}
                             for m in store.messages(conversation_id) if m["idx"] > after and m["role"] != "tool"]}

    return await _call(read)


@router.post("/v1/assistant/feedback")
async def feedback(body: FeedbackRequest, assistant: Assistant):
    rating_id = await _call(assistant.conversations.rate, body.conversation_id, body.message_index, body.rating,
                            body.correction)
    assistant.observe("feedback", {"rating": body.rating})
    return {"id": rating_id, "ok": True}


@router.get("/v1/assistant/handoffs")
async def handoffs(assistant: Assistant, include_taken: bool = True):
    return {"queue": await _call(assistant.conversations.queue, include_taken)}


@router.post("/v1/assistant/handoffs/{ticket}/take")
async def take(ticket: int, body: TakeRequest, assistant: Assistant):
    found = await _call(assistant.conversations.take, ticket, body.agent)
    messages = await _call(assistant.conversations.messages, found["conversation_id"])
    return {"ticket": found, "messages": messages}


@router.post("/v1/assistant/handoffs/{ticket}/reply")
async def agent_reply(ticket: int, body: AgentReply, assistant: Assistant):
    store = assistant.conversations

    def reply():
        found = store.ticket(ticket)
        if found["resolved"] is not None:
            raise Conflict(f"ticket {ticket} is already resolved")
        if found["agent"] != body.agent:
            raise Conflict(f"ticket {ticket} is taken by {found['agent']}" if found["agent"] else
                           f"take ticket {ticket} before replying")
        stored, _ = assistant.guard.redact(body.text)
        return store.add(found["conversation_id"], "agent", stored, author=body.agent)

    return {"message_index": await _call(reply)}


@router.post("/v1/assistant/handoffs/{ticket}/resolve")
async def resolve(ticket: int, body: ResolveRequest, assistant: Assistant):
    await _call(assistant.conversations.resolve, ticket, body.resolution, body.back_to_bot)
    assistant.observe("resolved", {})
    return {"ok": True}


def _page(name: str) -> HTMLResponse:
    return HTMLResponse((STATIC / name).read_text(encoding="utf-8"),
                        headers={"Content-Security-Policy": "default-src 'self'; style-src 'self' 'unsafe-inline'",
                                 "X-Content-Type-Options": "nosniff"})


@router.get("/assistant", include_in_schema=False)
async def chat_page():
    return _page("chat.html")


@router.get("/agent", include_in_schema=False)
async def agent_page():
    return _page("agent.html")


@router.get("/assistant/static/{name}", include_in_schema=False)
async def static_file(name: str):
    from fastapi.responses import FileResponse

    files = {"chat.js": "text/javascript", "agent.js": "text/javascript", "assistant.css": "text/css",
             "favicon.svg": "image/svg+xml"}
    if name not in files:
        raise APIError(404, "no such file", "not_found_error")
    folder = STATIC if name != "favicon.svg" else Path(__file__).parents[1] / "serve" / "static"  # the web chat's
    return FileResponse(folder / name, media_type=files[name])


def create_assistant_app(assistant, scheduler, tokenizer, model_name: str, settings=None, drift=None):
    """The serve application with the assistant's routes in front (see the module docstring)."""
    from ..serve.app import create_app

    app = create_app(scheduler, tokenizer, model_name, settings, drift=drift, routers=[router])
    app.state.assistant = assistant
    assistant.observe = metrics_observer(app.state.server.metrics, drift)
    return app


def metrics_observer(metrics, drift=None):
    """The assistant's events as Prometheus counters (intents, hand-offs, blocks by layer,
    moderation hits) and, with a drift monitor, its customers' messages as drift input."""

    def observe(event: str, data: dict[str, Any]) -> None:
        if event == "intent":
            metrics.count_intent(data["intent"])
        elif event == "handoff":
            metrics.count_escalation(data.get("reason", "requested"))
        elif event == "blocked":
            metrics.count_blocked(data.get("layer") or "input")
            if data.get("layer") == "moderation":
                metrics.count_moderation(data.get("category") or "unknown")
        elif event == "message" and drift is not None:
            drift.feed([data["text"]])

    return observe
