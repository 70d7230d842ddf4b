"""Answers from a knowledge base in the chat API (`lmforge serve --rag INDEX`), and pages for their sources.

With `ServeSettings.rag` set, POST /v1/chat/completions answers the conversation's last
user message from the index: `Answerer` retrieves, lets the served model write (or quotes
the sources, per `ServeSettings.rag_answer`) and keeps only what the sources support. The
response keeps OpenAI's shape, so every OpenAI client reads it; the answer's text carries
[n] markers, and one extra top-level field, `sources`, lists them (number, chunk id, file,
title, heading path, lines and the `url` of a page showing the passage): in the body, or
in the streamed chunk that carries `finish_reason`. A refusal ("not in the knowledge
base") is a plain assistant message with no sources. A request sends `"rag": false` to
talk to the bare model instead.

How the work is split, so that the event loop never waits and the model has one owner:

- `Answerer` is synchronous. Each answer runs it on a thread of its own (`AnswerJob`),
  which hands the text deltas to the route through the event loop as they are decided.
- The model writes through the server's scheduler like every other request
  (`ServedChatModel.stream_chat` submits the grounded prompt and reads its events), so
  answers share the running batch with plain chat requests.
- The embedder (question vectors, support checks, extractive answers) runs on the
  scheduler's thread too, between decode steps (`OnSchedulerThread`): one thread runs
  PyTorch, as the scheduler expects, instead of two OpenMP thread pools fighting over the
  cores. Beside clients asking back to back, plain requests decoded 1.4-1.8x faster this
  way than with the embedder on the answers' threads, and answers took 1.3-1.6x longer
  (benchmarks/serve_rag.py, docs/benchmarks.md).

GET /v1/rag/sources/{id} returns a cited chunk as JSON; GET /rag/sources/{id} is a small
page showing it (the link the web chat opens, so like the page at / it needs no API key: a
chunk id is a 64-bit digest of the passage's own text, handed out only with answers).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import html
import json
import logging
import threading
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Iterator, Sequence

from fastapi import APIRouter, Depends, Request
from fastapi.responses import HTMLResponse, StreamingResponse

from ..errors import LmforgeError
from ..infer.sampling import SamplingParams
from ..infer.scheduler import QueueFull, ShuttingDown
from .errors import APIError, error_body
from .state import ServerState, server_state

if TYPE_CHECKING:
    from ..rag.answer import Answer
    from ..rag.types import Chunk
    from .protocol import ChatCompletionRequest

log = logging.getLogger("lmforge.serve")

router = APIRouter()
State = Annotated[ServerState, Depends(server_state)]

MAX_QUESTION_CHARS = 8000  # a question, not a document: longer ones are refused before any work
MAX_CHUNK_ID_CHARS = 200
HANDBOOK = "handbook"


# ------------------------------------------------------------------ the knowledge base
class OnSchedulerThread:
    """The embedder with `encode` run on the scheduler's thread, between decode steps.

    Everything else (`model_id`, `tokenizer`, `dim`, ...) is the embedder's own.
    """

    def __init__(self, embedder, scheduler) -> None:
        self._embedder = embedder
        self._scheduler = scheduler

    def __getattr__(self, name: str) -> Any:
        return getattr(self._embedder, name)

    def encode(self, texts, *args: Any, **kwargs: Any):
        return self._scheduler.run(lambda: self._embedder.encode(texts, *args, **kwargs))


class KnowledgeBase:
    """The index a server answers from: its store, its embedder and a retriever over them.

    Opened once (by `lmforge serve`, or by `create_app` from `ServeSettings.rag`) and
    closed by its owner; several apps may share one.
    """

    def __init__(self, store, embedder, location: str) -> None:
        from ..rag.retriever import Retriever

        self.store = store
        self.embedder = embedder
        self.location = location
        self.retriever = Retriever(store, embedder)  # checks that the index was built with this embedder
        self.retriever.bm25  # built now, once, rather than by the first question
        self.chunks = store.count()

    @classmethod
    def open(cls, location: str, embedding_model: str | None = None, device: str | None = None,
             progress=None) -> KnowledgeBase:
        """The index at `location` (a file, a postgresql:// URL, or "handbook"), with its embedder.

        The embedder is the one the index records; `embedding_model` (a directory, say,
        when the index recorded only a directory's name) is tried when that one does not
        load or is not the model the index was built with. The handbook is indexed on first
        use with the default embedder; `progress(stage, done, total)` follows the embedding.
        """
        from ..rag.embedder import load_embedder
        from ..rag.store import is_postgres_url, open_store

        location = location.strip()
        if location.lower() == HANDBOOK:
            from ..rag.handbook import handbook_index

            embedder = load_embedder(None, device=device)
            store = open_store(handbook_index(embedder, progress=progress))
        else:
            if not is_postgres_url(location) and "://" not in location and not Path(location).exists():
                raise LmforgeError(f"--rag {location}: no such index; build one with `lmforge rag index DOCS "
                                   f"--out {location}` (or give --rag handbook)")
            store = open_store(location)
            try:
                embedder = _index_embedder(store, location, embedding_model, device)
            except BaseException:
                store.close()
                raise
        try:
            return cls(store, embedder, location)
        except BaseException:
            store.close()
            raise

    def chunk(self, chunk_id: str) -> Chunk | None:
        if not chunk_id or len(chunk_id) > MAX_CHUNK_ID_CHARS:
            return None
        found = self.store.get([chunk_id])
        return found[0] if found else None

    def served_by(self, scheduler):
        """A retriever for answers inside the server: the same index, its embedder run on `scheduler`'s thread."""
        from ..rag.retriever import Retriever

        retriever = Retriever(self.store, OnSchedulerThread(self.embedder, scheduler), self.retriever.options)
        retriever._bm25 = self.retriever.bm25  # built once, shared (read-only)
        return retriever

    def close(self) -> None:
        self.store.close()

    def describe(self) -> str:
        shown = "the handbook" if self.location.lower() == HANDBOOK else _without_password(self.location)
        return f"{shown} ({self.chunks} chunks, embedded by {self.embedder.name})"


def _index_embedder(store, location: str, fallback: str | None, device: str | None):
    """The embedding model `store` was built with: the name it records, else `fallback`."""
    from ..rag.embedder import load_embedder

    built = store.meta.get("model_id")
    if built is None:
        raise LmforgeError(f"--rag {_without_password(location)} holds no documents yet: index some with "
                           "`lmforge rag index`")
    tried = []
    for name in dict.fromkeys(n for n in (store.meta.get("embedder"), fallback) if n):
        try:
            embedder = load_embedder(name, device=device)
        except LmforgeError as exc:
            tried.append(f"{name}: {exc}")
            continue
        if embedder.model_id == built:
            return embedder
        tried.append(f"{name} is {embedder.model_id}")
    raise LmforgeError(f"--rag {_without_password(location)} was indexed with the embedding model {built}, which "
                       f"could not be loaded ({'; '.join(tried) or 'no name recorded'}); give its directory with "
                       "--embedding-model")


def _without_password(location: str) -> str:
    """A postgresql:// URL with its password hidden (for logs and banners)."""
    scheme, sep, rest = location.partition("://")
    if not sep or "@" not in rest:
        return location
    credentials, at, host = rest.rpartition("@")
    user = credentials.split(":", 1)[0]
    return f"{scheme}://{user}:***@{host}" if ":" in credentials else location


def answer_options(settings):
    """How the server's answers are made: `AnswerOptions` with `ServeSettings.rag_answer` as the mode."""
    from ..rag.config import AnswerOptions

    return AnswerOptions(mode=settings.rag_answer)


# ---------------------------------------------------------------- generation and jobs
class Cancelled(Exception):
    """The client went away: the answer stops where it is."""


class GenerationFailed(Exception):
    """The scheduler ended the answer's generation with an error (a server fault)."""


class ServedChatModel:
    """`Answerer`'s chat model: the grounded prompt goes through the server's scheduler.

    Used from the answer's own thread: it submits a request and reads its events as they
    arrive. Counts the tokens for the response's `usage`, and stops when the job is cancelled.
    """

    def __init__(self, scheduler, tokenizer, cancelled: threading.Event) -> None:
        self.scheduler = scheduler
        self.tokenizer = tokenizer
        self.cancelled = cancelled
        self.handle = None
        self.prompt_tokens = 0
        self.completion_tokens = 0

    def stream_chat(self, messages: Sequence[dict[str, Any]], **sampling: Any) -> Iterator[str]:
        text = self.tokenizer.apply_chat_template(list(messages), add_generation_prompt=True)
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        if len(ids) >= self.scheduler.max_seq_len:
            # The sources do not fit the server's context: no generated answer, so the
            # answerer quotes the sources instead.
            log.warning(json.dumps({"rag": "grounded prompt longer than the context", "tokens": len(ids),
                                    "context": self.scheduler.max_seq_len}))
            return
        params = SamplingParams(**sampling)
        if self.cancelled.is_set():
            raise Cancelled
        self.handle = self.scheduler.submit(ids, params)  # no event loop: a plain queue, read below
        self.prompt_tokens += len(ids)
        try:
            for event in self.handle:
                if self.cancelled.is_set():
                    raise Cancelled
                if event.error:
                    raise GenerationFailed(event.error)
                self.completion_tokens += len(event.token_ids)
                if event.text:
                    yield event.text
        finally:
            self.handle.cancel()  # stopped early (cancelled, or the answerer is done): free the row

    def cancel(self) -> None:
        self.cancelled.set()
        handle = self.handle
        if handle is not None:
            handle.cancel()  # the scheduler ends it at its next step, which wakes the reader


class AnswerJob:
    """One answer, computed on its own thread; its deltas and its end arrive on the event loop.

    `next_item()` gives ("delta", text) items, then ("done", Answer); a failure is raised
    there as an `APIError`.
    """

    def __init__(self, state: ServerState, question: str, sampling: dict[str, Any]) -> None:
        from ..rag.answer import Answerer
        from ..rag.groundedness import SupportChecker

        self.loop = asyncio.get_running_loop()
        self.items: asyncio.Queue = asyncio.Queue()
        self.model = ServedChatModel(state.scheduler, state.tokenizer, threading.Event())
        retriever = state.retriever
        # A checker per answer: its cache of passage vectors lives as long as the answer.
        self.answerer = Answerer(retriever, self.model, answer_options(state.settings),
                                 SupportChecker(retriever.embedder))
        self.question = question
        self.sampling = sampling
        self.finished = False
        # A daemon thread, not the default executor: a job stuck at shutdown never holds the process.
        self.thread = threading.Thread(target=self._run, name="lmforge-rag-answer", daemon=True)

    def start(self) -> AnswerJob:
        self.thread.start()
        return self

    def _run(self) -> None:
        try:
            stream = self.answerer.stream(self.question, **self.sampling)
            for delta in stream:
                self._put(("delta", delta))
            self._put(("done", stream.answer))
        except BaseException as exc:  # handed to the route, which decides what the client sees
            self._put(("error", exc))

    def _put(self, item: tuple[str, Any]) -> None:
        try:
            self.loop.call_soon_threadsafe(self.items.put_nowait, item)
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            self.model.cancel()

    async def next_item(self) -> tuple[str, Any]:
        kind, value = await self.items.get()
        if kind == "error":
            self.finished = True
            raise _api_error(value)
        if kind == "done":
            self.finished = True
        return kind, value

    def cancel(self) -> None:
        if not self.finished:
            self.model.cancel()


def _api_error(exc: BaseException) -> APIError:
    if isinstance(exc, QueueFull):
        return APIError(429, str(exc), "rate_limit_error", code="queue_full", headers={"Retry-After": "1"})
    if isinstance(exc, ShuttingDown):
        return APIError(503, str(exc), "server_error", headers={"Retry-After": "5"})
    if isinstance(exc, Cancelled):
        return APIError(499, "the request was cancelled", "server_error")
    if isinstance(exc, GenerationFailed):
        log.error(json.dumps({"generation_error": str(exc)}))
        return APIError(500, "generation failed", "server_error")
    if isinstance(exc, LmforgeError):  # the index failed (a database gone away, a file removed)
        log.error(json.dumps({"rag_error": str(exc)}))
        return APIError(503, f"the knowledge base could not answer: {exc}", "server_error")
    log.error("unexpected error in a knowledge-base answer", exc_info=exc)
    return APIError(500, "internal server error", "server_error")


# ------------------------------------------------------------------------ the route
def wants_knowledge_base(state: ServerState, body: ChatCompletionRequest) -> bool:
    """Whether this chat request is answered from the knowledge base (`rag` in the body, else: when there is one)."""
    if body.rag is None:
        return state.knowledge is not None
    if body.rag and state.knowledge is None:
        raise APIError(400, "this server has no knowledge base (start it with --rag INDEX)", param="rag")
    return body.rag


def question_of(body: ChatCompletionRequest) -> str:
    """The conversation's last user message: what the knowledge base answers."""
    users = [m for m in body.messages if m.role == "user"]
    if not users:
        raise APIError(400, "an answer from the knowledge base needs a user message (the question)", param="messages")
    try:
        question = users[-1].text().strip()
    except ValueError as exc:
        raise APIError(400, str(exc), param="messages") from None
    if not question:
        raise APIError(400, "the last user message is empty: there is no question to answer", param="messages")
    if len(question) > MAX_QUESTION_CHARS:
        raise APIError(400, f"the question has {len(question)} characters; a knowledge-base question may have at "
                            f"most {MAX_QUESTION_CHARS} (send \"rag\": false to talk to the model)", param="messages")
    return question


SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "min_p", "seed", "presence_penalty", "frequency_penalty",
                   "repetition_penalty")


def answer_sampling(state: ServerState, body: ChatCompletionRequest) -> dict[str, Any]:
    """The sampling settings the client chose (the answerer's own defaults for the rest: greedy,
    `AnswerOptions.max_tokens`); a client's max_tokens lowers the budget, never raises it."""
    chosen = body.model_fields_set
    sampling = {name: getattr(body, name) for name in SAMPLING_FIELDS if name in chosen}
    if body.stop:
        sampling["stop"] = [body.stop] if isinstance(body.stop, str) else list(body.stop)
    budget = answer_options(state.settings).max_tokens
    asked = body.max_completion_tokens or body.max_tokens
    sampling["max_tokens"] = min(budget, asked) if asked else budget
    return sampling


def refuse_unsupported(body: ChatCompletionRequest) -> None:
    """What a knowledge-base answer cannot honour, refused (the answer is one text, partly quoted)."""
    if body.n != 1:
        raise APIError(400, "n must be 1 for an answer from the knowledge base (send \"rag\": false to sample "
                            "several replies from the model)", param="n")
    if body.logprobs:
        raise APIError(400, "logprobs are not available for answers from the knowledge base (their text is "
                            "checked and partly quoted, not sampled token by token)", param="logprobs")
    if body.response_format is not None and body.response_format.type != "text":
        raise APIError(400, "response_format must be text for answers from the knowledge base",
                       param="response_format")


def source_entries(answer: Answer, request: Request) -> list[dict[str, Any]]:
    """The `sources` of a response: the citations the answer's text refers to, with links."""
    out = []
    for citation in answer.cited():
        c = citation.chunk
        out.append({"number": citation.number, "id": c.id, "source": c.source, "title": c.title,
                    "headings": list(c.headings), "line_start": c.line_start, "line_end": c.line_end,
                    "url": str(request.url_for("rag_source_page", chunk_id=c.id))})
    return out


def answer_info(answer: Answer) -> dict[str, Any]:
    return {"mode": answer.mode, "refused": answer.refused, "verified": answer.verified,
            "confidence": round(float(answer.confidence), 4)}


def usage_of(model: ServedChatModel) -> dict[str, int]:
    return {"prompt_tokens": model.prompt_tokens, "completion_tokens": model.completion_tokens,
            "total_tokens": model.prompt_tokens + model.completion_tokens}


async def answer_from_knowledge_base(state: ServerState, body: ChatCompletionRequest, request: Request):
    """POST /v1/chat/completions with a knowledge base: an OpenAI-shaped answer plus its `sources`."""
    refuse_unsupported(body)
    question = question_of(body)
    job = AnswerJob(state, question, answer_sampling(state, body)).start()
    rid, now, model_name = f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), state.model_name

    def frame(choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        return {"id": rid, "object": "chat.completion.chunk", "created": now, "model": model_name,
                "choices": choices, **extra}

    if body.stream:
        async def sse():
            yield "data: " + json.dumps(frame([{"index": 0, "delta": {"role": "assistant", "content": ""},
                                                "logprobs": None, "finish_reason": None}])) + "\n\n"
            try:
                while True:
                    kind, value = await job.next_item()
                    if kind == "done":
                        answer = value
                        break
                    yield "data: " + json.dumps(frame([{"index": 0, "delta": {"content": value}, "logprobs": None,
                                                        "finish_reason": None}])) + "\n\n"
            except APIError as exc:
                yield f"data: {json.dumps(error_body(exc.message, exc.type, exc.param, exc.code))}\n\n"
                yield "data: [DONE]\n\n"
                return
            finally:
                job.cancel()  # the client went away (or the answer failed): stop generating
            state.metrics.observe_answer(answer.mode, answer)
            yield "data: " + json.dumps(frame([{"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}],
                                              sources=source_entries(answer, request), rag=answer_info(answer))) + "\n\n"
            if body.stream_options and body.stream_options.include_usage:
                yield "data: " + json.dumps(frame([], usage=usage_of(job.model))) + "\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(sse(), media_type="text/event-stream")

    answer = await _finished(job, request)
    state.metrics.observe_answer(answer.mode, answer)
    return {
        "id": rid, "object": "chat.completion", "created": now, "model": model_name,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": answer.text}, "logprobs": None,
                     "finish_reason": "stop"}],
        "usage": usage_of(job.model),
        "sources": source_entries(answer, request),
        "rag": answer_info(answer),
    }


async def _finished(job: AnswerJob, request: Request) -> Answer:
    """The job's answer; if the client goes away first, the job is cancelled (frees its batch row)."""
    async def answer() -> Answer:
        while True:
            kind, value = await job.next_item()
            if kind == "done":
                return value

    waiting = asyncio.ensure_future(answer())
    waiting.add_done_callback(lambda f: f.cancelled() or f.exception())  # never "exception not retrieved"
    try:
        while True:
            done, _ = await asyncio.wait({waiting}, timeout=0.25)
            if done:
                return waiting.result()
            if await request.is_disconnected():
                raise asyncio.CancelledError
    except asyncio.CancelledError:
        job.cancel()
        waiting.cancel()
        raise


# ------------------------------------------------------------------ the source pages
def _knowledge(state: ServerState):
    if state.knowledge is None:
        raise APIError(404, "this server has no knowledge base (start it with --rag INDEX)", "not_found_error")
    return state.knowledge


@router.get("/v1/rag/sources/{chunk_id}")
def source_json(chunk_id: str, request: Request, state: State):
    """A passage the knowledge base cites: its text, file, heading path and lines."""
    chunk = _knowledge(state).chunk(chunk_id)
    if chunk is None:
        raise APIError(404, f"no source {chunk_id[:MAX_CHUNK_ID_CHARS]!r} in the knowledge base", "not_found_error",
                       "chunk_id", "source_not_found")
    return {"object": "rag.source", "id": chunk.id, "source": chunk.source, "title": chunk.title,
            "headings": list(chunk.headings), "line_start": chunk.line_start, "line_end": chunk.line_end,
            "text": chunk.text, "metadata": chunk.metadata,
            "url": str(request.url_for("rag_source_page", chunk_id=chunk.id))}


PAGE_STYLE = """
body{margin:0;font:16px/1.55 system-ui,-apple-system,"Segoe UI",sans-serif;color:#1d2330;background:#f6f7f9}
main{max-width:52rem;margin:2rem auto;padding:0 1.25rem}
.where{color:#4a5366;font-size:.92rem;margin:0}
h1{font-size:1.45rem;margin:.35rem 0 .2rem}
.path{color:#4a5366;margin:0 0 1rem}
pre{white-space:pre-wrap;overflow-wrap:anywhere;font:inherit;background:#fff;border:1px solid #d5d9e2;
border-radius:8px;padding:1rem 1.15rem;margin:0}
.note{color:#5c6578;font-size:.85rem;margin-top:1rem}
a{color:#1f5fbf}
@media (prefers-color-scheme:dark){body{color:#e4e7ee;background:#15181e}pre{background:#1d2129;border-color:#333a47}
.where,.path,.note{color:#a8b0c0}a{color:#7fb0ff}}
"""
_STYLE_HASH = base64.b64encode(hashlib.sha256(PAGE_STYLE.encode()).digest()).decode()
# Nothing but the one inline style block may load or run: no scripts at all. The empty icon
# keeps browsers from asking for /favicon.ico.
ICON = '<link rel="icon" href="data:,">\n'
SOURCE_PAGE_HEADERS = {
    "Content-Security-Policy": f"default-src 'none'; style-src 'sha256-{_STYLE_HASH}'; img-src data:; "
                               "base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "Cache-Control": "no-cache",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


def source_page(chunk: Chunk) -> str:
    """The HTML page of one passage; every piece of the chunk is escaped."""
    e = html.escape
    lines = f"line {chunk.line_start}" if chunk.line_start == chunk.line_end else \
        f"lines {chunk.line_start}\u2013{chunk.line_end}"
    source = e(chunk.source)
    if chunk.source.startswith(("https://", "http://")):  # a document fetched from the web: link to it
        source = f'<a href="{e(chunk.source)}" rel="noopener noreferrer">{source}</a>'
    path = " \u203a ".join(e(h) for h in chunk.headings[1:] if h)
    return (
        "<!doctype html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n" + ICON +
        f"<title>{e(chunk.title)} \u2013 source</title>\n<style>{PAGE_STYLE}</style>\n</head>\n<body>\n<main>\n"
        f"<p class=\"where\"><span class=\"source\">{source}</span>, <span class=\"lines\">{lines}</span></p>\n"
        f"<h1>{e(chunk.title)}</h1>\n"
        + (f"<p class=\"path\">{path}</p>\n" if path else "")
        + f"<pre class=\"passage\">{e(chunk.text)}</pre>\n"
        f"<p class=\"note\">A passage of the knowledge base this server answers from (source id "
        f"<code>{e(chunk.id)}</code>).</p>\n</main>\n</body>\n</html>\n"
    )


def _missing_page(chunk_id: str) -> str:
    return (
        "<!doctype html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n" + ICON + "<title>Source not found</title>\n"
        f"<style>{PAGE_STYLE}</style>\n</head>\n<body>\n<main>\n<h1>Source not found</h1>\n"
        f"<p>The knowledge base has no passage <code>{html.escape(chunk_id[:MAX_CHUNK_ID_CHARS])}</code> (it may "
        "have been re-indexed since the answer was given).</p>\n</main>\n</body>\n</html>\n"
    )


@router.get("/rag/sources/{chunk_id}", name="rag_source_page", include_in_schema=False)
def source_html(chunk_id: str, state: State):
    knowledge = state.knowledge
    chunk = knowledge.chunk(chunk_id) if knowledge is not None else None
    if chunk is None:
        return HTMLResponse(_missing_page(chunk_id), 404, headers=SOURCE_PAGE_HEADERS)
    return HTMLResponse(source_page(chunk), headers=SOURCE_PAGE_HEADERS)
