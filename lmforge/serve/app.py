"""The OpenAI-compatible HTTP API (S1) over the continuous-batching `Scheduler`.

Routes: POST /v1/chat/completions, POST /v1/completions, GET /v1/models, GET /health,
GET /metrics. Response shapes, field names and error bodies follow the OpenAI API, so the
official `openai` client and OpenAI-speaking tools (such as lm-evaluation-harness, which
scores with `echo` + `logprobs`) work unchanged.

Every user error is a 4xx with an OpenAI-style body {"error": {"message", "type",
"param", "code"}}; unexpected failures become a 500 with the same shape and no stack
trace. The server is a thin layer: all model work happens on the scheduler's thread.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import math
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import LmforgeError
from ..infer.json_schema import check_schema
from ..infer.request import check_prompt
from ..infer.sampling import SamplingParams
from ..infer.scheduler import QueueFull, RequestHandle, Scheduler, ShuttingDown
from .metrics import ServerMetrics
from .protocol import ChatCompletionRequest, CompletionRequest

log = logging.getLogger("lmforge.serve")


@dataclass
class ServeSettings:
    """Service policy; every field is a `lmforge serve` flag."""

    api_keys: list[str] = field(default_factory=list)  # empty: no authentication (loopback only)
    rate_limit_per_minute: int = 0  # per API key; 0 = unlimited
    max_request_bytes: int = 1 << 20
    max_tokens_limit: int = 4096  # upper bound on max_tokens a client may ask for
    log_prompts: bool = False  # request logs never contain prompt text unless asked


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers or {}


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


class RateLimiter:
    """A token bucket per API key: `per_minute` requests, refilled continuously."""

    def __init__(self, per_minute: int) -> None:
        self.per_minute = per_minute
        self.buckets: dict[str, tuple[float, float]] = {}

    def check(self, key: str) -> float:
        """0 if the request may go ahead, else the seconds until it may."""
        if self.per_minute <= 0:
            return 0.0
        now = time.monotonic()
        tokens, stamp = self.buckets.get(key, (float(self.per_minute), now))
        tokens = min(float(self.per_minute), tokens + (now - stamp) * self.per_minute / 60.0)
        if tokens < 1.0:
            self.buckets[key] = (tokens, now)
            return (1.0 - tokens) * 60.0 / self.per_minute
        self.buckets[key] = (tokens - 1.0, now)
        return 0.0


def create_app(scheduler: Scheduler, tokenizer, model_name: str, settings: ServeSettings | None = None,
               store=None) -> FastAPI:
    settings = settings or ServeSettings()
    metrics = ServerMetrics(scheduler)
    scheduler.on_finish = metrics.observe_generation  # every ending counts: done, cancelled or failed
    limiter = RateLimiter(settings.rate_limit_per_minute)
    context_length = scheduler.max_seq_len
    created = int(time.time())

    app = FastAPI(title="lmforge", version="0.1.0", description="OpenAI-compatible API served by lmforge")
    app.state.scheduler = scheduler
    app.state.metrics = metrics
    app.state.settings = settings

    # ------------------------------------------------------------------ errors
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return JSONResponse(error_body(exc.message, exc.type, exc.param, exc.code), exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        loc = ".".join(str(x) for x in first.get("loc", ()) if x != "body")
        message = f"{loc}: {first.get('msg', 'invalid request')}" if loc else first.get("msg", "invalid request body")
        return JSONResponse(error_body(message, "invalid_request_error", loc or None), 422)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        type_ = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return JSONResponse(error_body(str(exc.detail), type_), exc.status_code)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        log.exception("unexpected error")
        return JSONResponse(error_body("internal server error", "server_error"), 500)

    # -------------------------------------------------------------- middleware
    def deny(path: str, headers: dict[str, str]) -> JSONResponse | None:
        """Size, authentication and rate limits, before any route runs."""
        try:
            size = int(headers.get("content-length") or 0)
        except ValueError:
            size = 0
        if size > settings.max_request_bytes:
            return JSONResponse(error_body(f"request body exceeds {settings.max_request_bytes} bytes",
                                           "invalid_request_error", code="request_too_large"), 413)
        if not path.startswith(("/v1/", "/api/")):
            return None
        key = "anonymous"
        if settings.api_keys:
            header = headers.get("authorization", "")
            given = header[7:].strip() if header.lower().startswith("bearer ") else ""
            if not any(hmac.compare_digest(given, k) for k in settings.api_keys):
                return JSONResponse(error_body("invalid or missing API key (send Authorization: Bearer KEY)",
                                               "invalid_request_error", code="invalid_api_key"), 401)
            key = given
        wait = limiter.check(key)
        if wait > 0:
            return JSONResponse(error_body("rate limit reached for this API key", "rate_limit_error",
                                           code="rate_limit_exceeded"), 429,
                                headers={"Retry-After": str(max(1, math.ceil(wait)))})
        return None

    class Guard:
        """Plain ASGI middleware (it does not wrap `receive`, so disconnects stay visible to routes).

        Latency is observed when the response has been sent completely, streams included.
        """

        def __init__(self, inner) -> None:
            self.inner = inner

        async def __call__(self, scope, receive, send):
            if scope["type"] != "http":
                return await self.inner(scope, receive, send)
            start = time.perf_counter()
            status = {"code": 500}

            async def send_and_watch(message):
                if message["type"] == "http.response.start":
                    status["code"] = message["status"]
                await send(message)

            headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
            denied = deny(scope["path"], headers)
            try:
                if denied is not None:
                    await denied(scope, receive, send_and_watch)
                else:
                    await self.inner(scope, receive, send_and_watch)
            except asyncio.CancelledError:
                status["code"] = 499  # the client closed the request before an answer (nginx's convention)
                raise
            finally:
                elapsed = time.perf_counter() - start
                metrics.observe_request(scope["path"], status["code"], elapsed)
                log.info(json.dumps({"method": scope.get("method"), "path": scope["path"], "status": status["code"],
                                     "seconds": round(elapsed, 4)}))

    app.add_middleware(Guard)

    # ----------------------------------------------------------------- helpers
    def check_model(name: str | None) -> None:
        if name not in (None, "", model_name):
            raise APIError(404, f"model {name!r} does not exist; this server serves {model_name!r}",
                           "not_found_error", "model", "model_not_found")

    def sampling(body, max_tokens: int | None, logprobs: int | None, prompt_len: int, index: int) -> SamplingParams:
        if max_tokens is not None and max_tokens > settings.max_tokens_limit:
            raise APIError(400, f"max_tokens is limited to {settings.max_tokens_limit}", param="max_tokens")
        budget = max_tokens if max_tokens is not None else min(settings.max_tokens_limit, context_length - prompt_len)
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        if len(stop) > 4 or any(not s for s in stop):
            raise APIError(400, "stop must be up to 4 non-empty strings", param="stop")
        seed = None if body.seed is None else body.seed + index  # n choices: distinct, reproducible
        try:
            return SamplingParams(
                max_tokens=max(1, budget), temperature=body.temperature, top_p=body.top_p, top_k=body.top_k,
                min_p=body.min_p, repetition_penalty=body.repetition_penalty, stop=stop, seed=seed,
                presence_penalty=body.presence_penalty, frequency_penalty=body.frequency_penalty, logprobs=logprobs,
                ignore_eos=body.ignore_eos,
            )
        except LmforgeError as exc:
            raise APIError(400, str(exc)) from None

    def submit(ids: list[int], params: SamplingParams) -> RequestHandle:
        try:
            return scheduler.submit(ids, params, loop=asyncio.get_running_loop())
        except QueueFull as exc:
            raise APIError(429, str(exc), "rate_limit_error", code="queue_full", headers={"Retry-After": "1"}) from None
        except ShuttingDown as exc:
            raise APIError(503, str(exc), "server_error", headers={"Retry-After": "5"}) from None
        except LmforgeError as exc:
            raise APIError(400, str(exc), param="messages") from None

    def token_text(token: int) -> str:
        return tokenizer.decode([token])

    def top_entries(top: dict[int, float]) -> list[dict[str, Any]]:
        return [{"token": token_text(t), "logprob": lp, "bytes": list(token_text(t).encode())} for t, lp in top.items()]

    def finish(reason: str | None) -> str:
        return "length" if reason == "length" else "stop"

    def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens}

    async def collect(handles: list[RequestHandle], request: Request):
        """Wait for every handle; if the client goes away first, cancel them (frees batch rows)."""
        gathered = asyncio.ensure_future(asyncio.gather(*(h.aresult() for h in handles)))
        gathered.add_done_callback(lambda f: f.cancelled() or f.exception())  # never "exception not retrieved"
        try:
            while True:
                done, _ = await asyncio.wait({gathered}, timeout=0.25)
                if done:
                    results = gathered.result()
                    break
                if await request.is_disconnected():
                    raise asyncio.CancelledError
        except asyncio.CancelledError:
            for h in handles:
                h.cancel()
            gathered.cancel()
            raise
        for r in results:
            if r.error:
                raise APIError(500, "generation failed", "server_error")
        return results

    async def stream_events(handles: list[RequestHandle], make_chunk, final_chunk) -> AsyncIterator[str]:
        """Merge the handles' events into SSE lines; cancel everything if the client goes away."""
        merged: asyncio.Queue = asyncio.Queue()

        async def pump(index: int, handle: RequestHandle) -> None:
            async for event in handle.events():
                await merged.put((index, event))

        tasks = [asyncio.create_task(pump(i, h)) for i, h in enumerate(handles)]
        open_choices = len(handles)
        completion_tokens = 0
        try:
            while open_choices:
                index, event = await merged.get()
                completion_tokens += len(event.token_ids)
                if event.text or event.token_ids:
                    yield f"data: {json.dumps(make_chunk(index, event))}\n\n"
                if event.final and event.error:
                    log.error(json.dumps({"generation_error": event.error}))
                    yield f"data: {json.dumps(error_body('generation failed', 'server_error'))}\n\n"
                    open_choices -= 1
                elif event.final:
                    open_choices -= 1
                    yield f"data: {json.dumps(final_chunk(index, event))}\n\n"
            yield ("usage", completion_tokens)
        finally:
            for h in handles:
                h.cancel()
            for t in tasks:
                t.cancel()

    # ------------------------------------------------------------------ routes
    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_name, "running": scheduler.stats.running,
                "waiting": scheduler.stats.waiting}

    @app.get("/metrics")
    async def prometheus():
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created, "owned_by": "lmforge"}]}

    @app.get("/v1/models/{model_id}")
    async def get_model(model_id: str):
        check_model(model_id)
        return {"id": model_name, "object": "model", "created": created, "owned_by": "lmforge"}

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        check_model(body.model)
        json_object = body.response_format is not None and body.response_format.type == "json_object"
        json_schema = None
        if body.response_format is not None and body.response_format.type == "json_schema":
            spec = body.response_format.json_schema
            if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict):
                raise APIError(400, "response_format json_schema needs {'name': ..., 'schema': {...}}",
                               param="response_format")
            json_schema = spec["schema"]
        try:
            messages = [{"role": m.role if m.role != "developer" else "system", "content": m.text()} for m in body.messages]
            text = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        except (ValueError, LmforgeError) as exc:
            raise APIError(400, str(exc), param="messages") from None
        ids = tokenizer.encode(text, add_special_tokens=False)
        if settings.log_prompts:
            log.info(json.dumps({"prompt": messages}, ensure_ascii=False))
        max_tokens = body.max_completion_tokens or body.max_tokens
        if max_tokens == 0:
            raise APIError(400, "max_tokens must be at least 1 for chat completions", param="max_tokens")
        top = body.top_logprobs if body.logprobs else None
        if body.top_logprobs is not None and not body.logprobs:
            raise APIError(400, "top_logprobs requires logprobs=true", param="top_logprobs")
        logprobs = (top or 0) if body.logprobs else None
        params = [sampling(body, max_tokens, logprobs, len(ids), i) for i in range(body.n)]
        for p in params:
            p.json_object = json_object
            p.json_schema = json_schema
        if json_schema is not None:
            try:
                check_schema(json_schema)
            except LmforgeError as exc:
                raise APIError(400, str(exc), param="response_format") from None
        handles = [submit(ids, p) for p in params]
        rid, now = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

        def logprob_content(event) -> dict[str, Any] | None:
            if not body.logprobs:
                return None
            return {"content": [{"token": token_text(t), "logprob": lp, "bytes": list(token_text(t).encode()),
                                 "top_logprobs": top_entries(tp)}
                                for t, lp, tp in zip(event.token_ids, event.logprobs, event.top_logprobs)]}

        if body.stream:
            def chunk(index, event):
                return {"id": rid, "object": "chat.completion.chunk", "created": now, "model": model_name,
                        "choices": [{"index": index, "delta": {"content": event.text},
                                     "logprobs": logprob_content(event), "finish_reason": None}]}

            def final(index, event):
                return {"id": rid, "object": "chat.completion.chunk", "created": now, "model": model_name,
                        "choices": [{"index": index, "delta": {}, "logprobs": None,
                                     "finish_reason": finish(event.finish_reason)}]}

            async def sse():
                for i in range(body.n):  # the role comes first, as OpenAI sends it
                    yield "data: " + json.dumps({"id": rid, "object": "chat.completion.chunk", "created": now,
                                                 "model": model_name, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                                                                   "logprobs": None, "finish_reason": None}]}) + "\n\n"
                async for line in stream_events(handles, chunk, final):
                    if isinstance(line, tuple):
                        if body.stream_options and body.stream_options.include_usage:
                            yield "data: " + json.dumps({"id": rid, "object": "chat.completion.chunk", "created": now,
                                                         "model": model_name, "choices": [],
                                                         "usage": usage(len(ids) * body.n, line[1])}) + "\n\n"
                        continue
                    yield line
                yield "data: [DONE]\n\n"

            return StreamingResponse(sse(), media_type="text/event-stream")

        results = await collect(handles, request)
        return {
            "id": rid, "object": "chat.completion", "created": now, "model": model_name,
            "choices": [{"index": i, "message": {"role": "assistant", "content": r.text},
                         "logprobs": logprob_content(r), "finish_reason": finish(r.finish_reason)}
                        for i, r in enumerate(results)],
            "usage": usage(len(ids) * body.n, sum(len(r.token_ids) for r in results)),
        }

    def prompt_lists(prompt) -> list[list[int]]:
        if isinstance(prompt, str):
            return [tokenizer.encode(prompt)]
        if not prompt:
            raise APIError(400, "prompt must not be empty", param="prompt")
        if all(isinstance(p, int) for p in prompt):
            return [list(prompt)]
        if all(isinstance(p, str) for p in prompt):
            return [tokenizer.encode(p) for p in prompt]
        if all(isinstance(p, list) for p in prompt):
            return [list(p) for p in prompt]
        raise APIError(400, "prompt must be a string, a list of strings, or token ids", param="prompt")

    def score_prompt(ids: list[int], top: int) -> tuple[list[float | None], list[dict[int, float] | None]]:
        """Log-prob of every prompt token given the ones before it (runs on the scheduler thread)."""
        def work():
            with torch.inference_mode():
                logits = scheduler.model(torch.tensor([ids], device=scheduler.device))[0].float()
            logp = torch.log_softmax(logits[:-1], dim=-1)
            target = torch.tensor(ids[1:], device=logp.device)
            chosen = logp.gather(-1, target[:, None])[:, 0].tolist()
            tops: list[dict[int, float] | None] = [None]
            if top:
                values, idx = logp.topk(top, dim=-1)
                tops += [dict(zip(i.tolist(), v.tolist())) for i, v in zip(idx, values)]
            else:
                tops += [{} for _ in chosen]
            return [None] + chosen, tops
        return scheduler.run(work)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        check_model(body.model)
        if body.suffix:
            raise APIError(400, "suffix is not supported", param="suffix")
        if body.best_of not in (None, 1, body.n):
            raise APIError(400, "best_of is not supported", param="best_of")
        prompts = prompt_lists(body.prompt)
        vocab = scheduler.model.config.vocab_size
        for ids in prompts:
            try:
                check_prompt(ids, SamplingParams(max_tokens=1), context_length, vocab)
            except LmforgeError as exc:
                raise APIError(400, str(exc), param="prompt") from None
        rid, now = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        generate = body.max_tokens != 0
        if body.stream and body.echo:
            raise APIError(400, "echo is not supported with stream", param="echo")
        if not generate and not body.echo:
            raise APIError(400, "max_tokens=0 only makes sense with echo=true", param="max_tokens")
        handles = []
        for p_index, ids in enumerate(prompts):
            for k in range(body.n if generate else 1):
                if generate:
                    handles.append((p_index, submit(ids, sampling(body, body.max_tokens, body.logprobs, len(ids), k))))
                else:
                    handles.append((p_index, None))

        def lp_block(tokens: list[int], lps: list, tops: list, offset0: int) -> dict[str, Any]:
            texts = [token_text(t) for t in tokens]
            offsets, pos = [], offset0
            for t in texts:
                offsets.append(pos)
                pos += len(t)
            return {"tokens": texts, "token_logprobs": lps, "text_offset": offsets,
                    "top_logprobs": [None if tp is None else {token_text(i): v for i, v in tp.items()} for tp in tops]}

        if body.stream:
            plain = [h for _, h in handles]

            def chunk(index, event):
                return {"id": rid, "object": "text_completion", "created": now, "model": model_name,
                        "choices": [{"index": index, "text": event.text, "finish_reason": None,
                                     "logprobs": lp_block(event.token_ids, event.logprobs, event.top_logprobs, 0)
                                     if body.logprobs is not None else None}]}

            def final(index, event):
                return {"id": rid, "object": "text_completion", "created": now, "model": model_name,
                        "choices": [{"index": index, "text": "", "finish_reason": finish(event.finish_reason), "logprobs": None}]}

            async def sse():
                async for line in stream_events(plain, chunk, final):
                    if isinstance(line, tuple):
                        if body.stream_options and body.stream_options.include_usage:
                            yield "data: " + json.dumps({"id": rid, "object": "text_completion", "created": now,
                                                         "model": model_name, "choices": [],
                                                         "usage": usage(sum(len(p) for p in prompts) * body.n, line[1])}) + "\n\n"
                        continue
                    yield line
                yield "data: [DONE]\n\n"

            return StreamingResponse(sse(), media_type="text/event-stream")

        live = [h for _, h in handles if h is not None]
        results = iter(await collect(live, request)) if live else iter(())
        scored: dict[int, tuple] = {}
        if body.echo and body.logprobs is not None:
            for p_index, ids in enumerate(prompts):
                scored[p_index] = await asyncio.get_running_loop().run_in_executor(None, score_prompt, ids, body.logprobs)
        choices, completion_tokens = [], 0
        for i, (p_index, handle) in enumerate(handles):
            ids = prompts[p_index]
            result = next(results) if handle is not None else None
            prompt_text = tokenizer.decode(ids) if body.echo else ""
            text = prompt_text + (result.text if result else "")
            logprobs = None
            if body.logprobs is not None:
                tokens, lps, tops = [], [], []
                if body.echo:
                    tokens, (lps, tops) = list(ids), scored[p_index]
                    lps, tops = list(lps), list(tops)
                if result is not None:
                    tokens += result.token_ids
                    lps += result.logprobs
                    tops += result.top_logprobs
                logprobs = lp_block(tokens, lps, tops, 0)
            completion_tokens += len(result.token_ids) if result else 0
            choices.append({"index": i, "text": text, "logprobs": logprobs,
                            "finish_reason": finish(result.finish_reason) if result else "length"})
        return {"id": rid, "object": "text_completion", "created": now, "model": model_name, "choices": choices,
                "usage": usage(sum(len(p) for p in prompts), completion_tokens)}

    if store is not None:  # the web chat and its conversation/feedback storage (lmforge/serve/webui.py)
        from .webui import register_webui

        register_webui(app, store)

    return app
