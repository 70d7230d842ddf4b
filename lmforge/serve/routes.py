"""The OpenAI-compatible routes over the continuous-batching `Scheduler`.

POST /v1/chat/completions, POST /v1/completions, GET /v1/models[/{id}], GET /health and
GET /metrics. With LoRA adapters (`lmforge serve --adapter NAME=PATH`), a request's
`model` picks one: NAME, or BASE:NAME with BASE the served model's id; the base model's id
(or no model) is the base. /v1/models lists each adapter with the base as its `parent`
and `root`, as OpenAI lists fine-tuned models. Response shapes and field names follow the OpenAI API, so the official
`openai` client and OpenAI-speaking tools (lm-evaluation-harness, which scores with
`echo` + `logprobs`) work unchanged. The routes are thin: all model work happens on the
scheduler's thread, and everything they share lives in the app's `ServerState`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from dataclasses import replace
from typing import Annotated, Any, AsyncIterator

import torch
from fastapi import APIRouter, Depends, Request
from fastapi.responses import PlainTextResponse, StreamingResponse

from ..errors import LmforgeError
from ..infer.json_schema import check_schema
from ..infer.request import check_prompt
from ..infer.sampling import SamplingParams
from ..infer.scheduler import Event, QueueFull, RequestHandle, ShuttingDown
from .errors import APIError, error_body
from .protocol import ChatCompletionRequest, CompletionRequest
from .rag import answer_from_knowledge_base, wants_knowledge_base
from .state import ServerState, server_state

log = logging.getLogger("lmforge.serve")

router = APIRouter()
State = Annotated[ServerState, Depends(server_state)]


# ---------------------------------------------------------------------- helpers
def adapter_bank(state: ServerState):
    """The LoRA adapters the scheduler serves (lmforge/infer/adapters.py), or None."""
    return getattr(state.scheduler, "adapters", None)


def check_model(state: ServerState, name: str | None) -> int:
    """The adapter a request's model name picks (0: the base model); 404 for a name not served."""
    if name in (None, "", state.model_name):
        return 0
    bank = adapter_bank(state)
    if bank is not None:
        index = bank.index(name.removeprefix(state.model_name + ":"))
        if index is not None:
            return index
    served = ", ".join(repr(c["id"]) for c in model_cards(state) if c["id"] != getattr(state.embeddings, "name", None))
    raise APIError(404, f"model {name!r} does not exist; this server serves {served}",
                   "not_found_error", "model", "model_not_found")


def served_name(state: ServerState, adapter: int) -> str:
    """The model id a response names: the base's, or the adapter's."""
    return state.model_name if adapter == 0 else adapter_bank(state).adapters[adapter - 1].name


def sampling(state: ServerState, body, max_tokens: int | None, logprobs: int | None, prompt_len: int,
             index: int) -> SamplingParams:
    limit = state.settings.max_tokens_limit
    if max_tokens is not None and max_tokens > limit:
        raise APIError(400, f"max_tokens is limited to {limit}", param="max_tokens")
    budget = max_tokens if max_tokens is not None else min(limit, state.context_length - prompt_len)
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


def encode(state: ServerState, text: str, param: str, **kwargs) -> list[int]:
    """`text`'s token ids; text the tokenizer refuses (a lone surrogate, say) is the client's error."""
    try:
        return state.tokenizer.encode(text, **kwargs)
    except LmforgeError as exc:
        raise APIError(400, str(exc), param=param) from None


def submit(state: ServerState, ids: list[int], params: SamplingParams, param: str, adapter: int = 0) -> RequestHandle:
    try:
        return state.scheduler.submit(ids, params, loop=asyncio.get_running_loop(), adapter=adapter)
    except QueueFull as exc:
        raise APIError(429, str(exc), "rate_limit_error", code="queue_full", headers={"Retry-After": "1"}) from None
    except ShuttingDown as exc:
        raise APIError(503, str(exc), "server_error", headers={"Retry-After": "5"}) from None
    except LmforgeError as exc:
        raise APIError(400, str(exc), param=param) from None


def token_text(state: ServerState, token: int) -> str:
    return state.tokenizer.decode([token])


def token_entry(state: ServerState, token: int, logprob: float) -> dict[str, Any]:
    """One entry of chat log-probs. `bytes` are the token's own (a token may hold part of a
    character, which its text can only show as U+FFFD); the text's where the vocabulary has none."""
    text = token_text(state, token)
    raw = state.tokenizer.token_bytes(token)
    return {"token": text, "logprob": logprob, "bytes": list(text.encode() if raw is None else raw)}


def finish(reason: str | None) -> str:
    return "length" if reason == "length" else "stop"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def with_end(event: Event, handle: RequestHandle) -> Event:
    """`handle`'s final `event` with the end token that finished it added to its tokens and
    log-probs, for the logprobs fields (unchanged if it ended otherwise or no log-probs were asked).

    The end token is no part of the answer's text or its token count, but OpenAI-style
    servers list it among the log-probs, and clients rely on that: lm-evaluation-harness
    asks for echo + max_tokens=1 and drops the last entry as the generated token.
    """
    decode = handle.state
    if decode is None or decode.end_logprobs is None:
        return event
    logprob, top = decode.end_logprobs
    return replace(event, token_ids=event.token_ids + [decode.end_token], logprobs=event.logprobs + [logprob],
                   top_logprobs=event.top_logprobs + [top])


async def collect(handles: list[RequestHandle], request: Request) -> list[Event]:
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


async def stream_events(handles: list[RequestHandle], make_chunk, final_chunk) -> AsyncIterator[str | tuple]:
    """Merge the handles' events into SSE lines; cancel everything if the client goes away.

    The last item is ("usage", completion tokens) for the caller to report or drop.
    """
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
            completion_tokens += len(event.token_ids)  # before the end token is listed: it is not counted
            if event.error:
                log.error(json.dumps({"generation_error": event.error}))
                yield f"data: {json.dumps(error_body('generation failed', 'server_error'))}\n\n"
                open_choices -= 1
                continue
            if event.final:
                event = with_end(event, handles[index])
            if event.text or event.token_ids:
                yield f"data: {json.dumps(make_chunk(index, event))}\n\n"
            if event.final:
                open_choices -= 1
                yield f"data: {json.dumps(final_chunk(index, event))}\n\n"
        yield ("usage", completion_tokens)
    finally:
        for h in handles:
            h.cancel()
        for t in tasks:
            t.cancel()


def prompt_lists(state: ServerState, prompt) -> list[list[int]]:
    if isinstance(prompt, str):
        return [encode(state, prompt, "prompt")]
    if not prompt:
        raise APIError(400, "prompt must not be empty", param="prompt")
    if all(isinstance(p, int) for p in prompt):
        return [list(prompt)]
    if all(isinstance(p, str) for p in prompt):
        return [encode(state, p, "prompt") for p in prompt]
    if all(isinstance(p, list) for p in prompt):
        return [list(p) for p in prompt]
    raise APIError(400, "prompt must be a string, a list of strings, or token ids", param="prompt")


def score_prompt(state: ServerState, ids: list[int], top: int, adapter: int = 0
                 ) -> tuple[list[float | None], list[dict[int, float] | None]]:
    """Log-prob of every prompt token given the ones before it (runs on the scheduler thread)."""
    scheduler = state.scheduler

    def work():
        bank = adapter_bank(state)
        with torch.inference_mode(), bank.rows([adapter], scheduler.device) if bank else contextlib.nullcontext():
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


def lp_block(state: ServerState, tokens: list[int], lps: list, tops: list) -> dict[str, Any]:
    """The `logprobs` object of /v1/completions: tokens, their log-probs, alternatives, offsets."""
    texts = [token_text(state, t) for t in tokens]
    offsets, pos = [], 0
    for t in texts:
        offsets.append(pos)
        pos += len(t)
    return {"tokens": texts, "token_logprobs": lps, "text_offset": offsets,
            "top_logprobs": [None if tp is None else {token_text(state, i): v for i, v in tp.items()} for tp in tops]}


def model_card(state: ServerState, name: str | None = None, parent: str | None = None) -> dict[str, Any]:
    card = {"id": name or state.model_name, "object": "model", "created": state.created, "owned_by": "lmforge"}
    if (adapter_bank(state) is not None and name is None) or parent is not None:
        card.update(root=parent or state.model_name, parent=parent)  # a fine-tune names the model it was made from
    return card


def model_cards(state: ServerState) -> list[dict[str, Any]]:
    """The chat model first, its LoRA adapters, then the embedding model /v1/embeddings serves (if any)."""
    cards = [model_card(state)]
    bank = adapter_bank(state)
    for name in bank.names() if bank is not None else []:
        cards.append(model_card(state, name, parent=state.model_name))
    if state.embeddings is not None and state.embeddings.name != state.model_name:
        cards.append(model_card(state, state.embeddings.name))
    return cards


# ----------------------------------------------------------------------- routes
@router.get("/health")
async def health(state: State):
    stats = state.scheduler.stats
    return {"status": "ok", "model": state.model_name, "running": stats.running, "waiting": stats.waiting,
            "knowledge_base": state.knowledge is not None}


@router.get("/metrics")
async def prometheus(state: State):
    return PlainTextResponse(state.metrics.render(), media_type="text/plain; version=0.0.4")


@router.get("/v1/models")
async def list_models(state: State):
    return {"object": "list", "data": model_cards(state)}


@router.get("/v1/models/{model_id}")
async def get_model(model_id: str, state: State):
    for card in model_cards(state):
        if card["id"] == model_id:
            return card
    adapter = check_model(state, model_id)  # BASE:NAME, or a 404
    return model_cards(state)[adapter]


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request, state: State):
    adapter = check_model(state, body.model)
    from .tools import chat_with_tools, wants_tools  # function calling: tools.py (imports these helpers)

    if wants_tools(body):
        return await chat_with_tools(state, body, request, adapter)
    model_name, tokenizer = served_name(state, adapter), state.tokenizer
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
    ids = encode(state, text, "messages", add_special_tokens=False)
    if state.settings.log_prompts:
        log.info(json.dumps({"prompt": messages}, ensure_ascii=False))
    max_tokens = body.max_completion_tokens or body.max_tokens
    if max_tokens == 0:
        raise APIError(400, "max_tokens must be at least 1 for chat completions", param="max_tokens")
    if body.top_logprobs is not None and not body.logprobs:
        raise APIError(400, "top_logprobs requires logprobs=true", param="top_logprobs")
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    params = [sampling(state, body, max_tokens, logprobs, len(ids), i) for i in range(body.n)]
    for p in params:
        p.json_object = json_object
        p.json_schema = json_schema
    if json_schema is not None:
        try:
            check_schema(json_schema)
        except LmforgeError as exc:
            raise APIError(400, str(exc), param="response_format") from None
    if wants_knowledge_base(state, body):  # everything above was checked as for any chat request
        if adapter:
            raise APIError(400, f"the knowledge base answers with the base model {state.model_name!r}; send "
                                f"\"rag\": false to chat with {model_name!r}", param="model")
        return await answer_from_knowledge_base(state, body, request)
    handles = [submit(state, ids, p, "messages", adapter) for p in params]
    rid, now = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

    def logprob_content(event: Event) -> dict[str, Any] | None:
        if not body.logprobs:
            return None
        return {"content": [{**token_entry(state, t, lp),
                             "top_logprobs": [token_entry(state, i, v) for i, v in tp.items()]}
                            for t, lp, tp in zip(event.token_ids, event.logprobs, event.top_logprobs)]}

    def frame(choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        return {"id": rid, "object": "chat.completion.chunk", "created": now, "model": model_name,
                "choices": choices, **extra}

    if body.stream:
        def chunk(index, event):
            return frame([{"index": index, "delta": {"content": event.text}, "logprobs": logprob_content(event),
                           "finish_reason": None}])

        def final(index, event):
            return frame([{"index": index, "delta": {}, "logprobs": None, "finish_reason": finish(event.finish_reason)}])

        async def sse():
            for i in range(body.n):  # the role comes first, as OpenAI sends it
                yield "data: " + json.dumps(frame([{"index": i, "delta": {"role": "assistant", "content": ""},
                                                    "logprobs": None, "finish_reason": None}])) + "\n\n"
            async for line in stream_events(handles, chunk, final):
                if isinstance(line, tuple):
                    if body.stream_options and body.stream_options.include_usage:
                        yield "data: " + json.dumps(frame([], usage=usage(len(ids) * body.n, line[1]))) + "\n\n"
                    continue
                yield line
            yield "data: [DONE]\n\n"

        return StreamingResponse(sse(), media_type="text/event-stream")

    results = await collect(handles, request)
    return {
        "id": rid, "object": "chat.completion", "created": now, "model": model_name,
        "choices": [{"index": i, "message": {"role": "assistant", "content": r.text},
                     "logprobs": logprob_content(with_end(r, h)), "finish_reason": finish(r.finish_reason)}
                    for i, (r, h) in enumerate(zip(results, handles))],
        "usage": usage(len(ids) * body.n, sum(len(r.token_ids) for r in results)),
    }


@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request, state: State):
    adapter = check_model(state, body.model)
    model_name, tokenizer = served_name(state, adapter), state.tokenizer
    if body.suffix:
        raise APIError(400, "suffix is not supported", param="suffix")
    if body.best_of not in (None, 1, body.n):
        raise APIError(400, "best_of is not supported", param="best_of")
    prompts = prompt_lists(state, body.prompt)
    if state.settings.log_prompts:
        log.info(json.dumps({"prompt": body.prompt}, ensure_ascii=False))
    vocab = state.scheduler.model.config.vocab_size
    for ids in prompts:
        try:
            check_prompt(ids, SamplingParams(max_tokens=1), state.context_length, vocab)
        except LmforgeError as exc:
            raise APIError(400, str(exc), param="prompt") from None
    rid, now = f"cmpl-{uuid.uuid4().hex}", int(time.time())
    generate = body.max_tokens != 0
    if body.stream and body.echo:
        raise APIError(400, "echo is not supported with stream", param="echo")
    if not generate and not body.echo:
        raise APIError(400, "max_tokens=0 only makes sense with echo=true", param="max_tokens")
    handles: list[tuple[int, RequestHandle | None]] = []
    for p_index, ids in enumerate(prompts):
        for k in range(body.n if generate else 1):
            if generate:
                params = sampling(state, body, body.max_tokens, body.logprobs, len(ids), k)
                handles.append((p_index, submit(state, ids, params, "prompt", adapter)))
            else:
                handles.append((p_index, None))

    def frame(choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        return {"id": rid, "object": "text_completion", "created": now, "model": model_name,
                "choices": choices, **extra}

    if body.stream:
        plain = [h for _, h in handles]

        def chunk(index, event):
            return frame([{"index": index, "text": event.text, "finish_reason": None,
                           "logprobs": lp_block(state, event.token_ids, event.logprobs, event.top_logprobs)
                           if body.logprobs is not None else None}])

        def final(index, event):
            return frame([{"index": index, "text": "", "finish_reason": finish(event.finish_reason), "logprobs": None}])

        async def sse():
            async for line in stream_events(plain, chunk, final):
                if isinstance(line, tuple):
                    if body.stream_options and body.stream_options.include_usage:
                        prompt_tokens = sum(len(p) for p in prompts) * body.n
                        yield "data: " + json.dumps(frame([], usage=usage(prompt_tokens, line[1]))) + "\n\n"
                    continue
                yield line
            yield "data: [DONE]\n\n"

        return StreamingResponse(sse(), media_type="text/event-stream")

    live = [h for _, h in handles if h is not None]
    results = iter(await collect(live, request))
    scored: dict[int, tuple] = {}
    if body.echo and body.logprobs is not None:
        loop = asyncio.get_running_loop()
        for p_index, ids in enumerate(prompts):
            scored[p_index] = await loop.run_in_executor(None, score_prompt, state, ids, body.logprobs, adapter)
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
                listed = with_end(result, handle)
                tokens += listed.token_ids
                lps += listed.logprobs
                tops += listed.top_logprobs
            logprobs = lp_block(state, tokens, lps, tops)
        completion_tokens += len(result.token_ids) if result else 0
        choices.append({"index": i, "text": text, "logprobs": logprobs,
                        "finish_reason": finish(result.finish_reason) if result else "length"})
    return {"id": rid, "object": "text_completion", "created": now, "model": model_name, "choices": choices,
            "usage": usage(sum(len(p) for p in prompts), completion_tokens)}
