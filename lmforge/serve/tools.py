"""Function calling in /v1/chat/completions: `tools`, `tool_choice`, `parallel_tool_calls`,
assistant `tool_calls` and `role: "tool"` messages, streamed and not, as OpenAI's API has them.

How the functions reach the model and how its calls are decoded is lmforge/agent/calls.py
(shared with the agent loop): the tools go into the prompt (the chat template's own
`tools` support, else a system block), and a call is decoded under a JSON Schema built
from the tools by the schema-guided decoder, so it always parses and validates. With
`tool_choice` "auto" the model's first few free tokens decide: the call marker starts a
call, anything else is a text answer that simply goes on. "required" or a named
function put the marker into the prompt; "none" hides the tools.

Everything a request sends is checked here first: a malformed tool, schema, choice or
tool message is a 400 in the server's usual error body. Calls stream as OpenAI streams
them: `delta.tool_calls` entries with an `index`, the first naming the call's id and
function, the next carrying its `arguments` text; each call is sent as soon as its JSON
object closes, and the last chunk has finish_reason "tool_calls".
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import replace
from typing import Any

from fastapi import Request
from fastapi.responses import StreamingResponse

from ..agent.calls import (CALL_OPEN, CallScanner, FunctionSpec, ToolCall, call_schema, check_functions,
                           parse_calls, probe_tokens, render_prompt, starts_call)
from ..errors import LmforgeError
from .errors import APIError, error_body
from .protocol import ChatCompletionRequest
from .state import ServerState

CHOICES = ("none", "auto", "required")


def wants_tools(body: ChatCompletionRequest) -> bool:
    """Whether a chat request involves functions: it offers tools, chooses one, or carries calls or results."""
    return (body.tools is not None or body.tool_choice is not None or body.parallel_tool_calls is not None
            or any(m.role == "tool" or m.tool_calls is not None for m in body.messages))


def parse_tools(raw: Any) -> list[FunctionSpec]:
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise APIError(400, "tools must be a list of {'type': 'function', 'function': {...}}", param="tools")
    specs = []
    for i, tool in enumerate(raw):
        where = f"tools[{i}]"
        if not isinstance(tool, dict) or tool.get("type") != "function":
            kind = tool.get("type") if isinstance(tool, dict) else type(tool).__name__
            raise APIError(400, f"{where}: only tools of type 'function' are supported, got {kind!r}", param=where)
        fn = tool.get("function")
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise APIError(400, f"{where}.function must be an object with a 'name'", param=where)
        description = fn.get("description") or ""
        if not isinstance(description, str):
            raise APIError(400, f"{where}.function.description must be a string", param=where)
        params = fn.get("parameters")
        specs.append(FunctionSpec(fn["name"], description, {"type": "object", "properties": {}} if params is None
                                  else params))
    try:
        check_functions(specs)
    except LmforgeError as exc:
        raise APIError(400, str(exc), param="tools") from None
    return specs


def parse_choice(raw: Any, specs: list[FunctionSpec]) -> tuple[str, list[FunctionSpec]]:
    """(mode, the functions a call may name): mode "none", "auto" or "required"."""
    if raw is None:
        return ("auto" if specs else "none"), specs
    if isinstance(raw, str):
        if raw not in CHOICES:
            raise APIError(400, f"tool_choice must be one of {', '.join(CHOICES)} or a function, got {raw!r}",
                           param="tool_choice")
        if raw != "none" and not specs:
            raise APIError(400, f"tool_choice {raw!r} needs tools", param="tool_choice")
        return raw, specs
    fn = raw.get("function") if isinstance(raw, dict) and raw.get("type") == "function" else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
        raise APIError(400, "tool_choice must be 'none', 'auto', 'required' or "
                            "{'type': 'function', 'function': {'name': ...}}", param="tool_choice")
    chosen = [s for s in specs if s.name == fn["name"]]
    if not chosen:
        raise APIError(400, f"tool_choice names {fn['name']!r}, which is not among the tools", param="tool_choice")
    return "required", chosen


def conversation(body: ChatCompletionRequest) -> list[dict[str, Any]]:
    """The messages with their calls and results checked: every tool message answers an earlier call."""
    out: list[dict[str, Any]] = []
    calls: dict[str, str] = {}  # id -> function name
    for i, m in enumerate(body.messages):
        where = f"messages[{i}]"
        try:
            entry: dict[str, Any] = {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
        except ValueError as exc:
            raise APIError(400, f"{where}: {exc}", param="messages") from None
        if m.tool_calls is not None:
            if m.role != "assistant" or not isinstance(m.tool_calls, list):
                raise APIError(400, f"{where}: tool_calls must be a list, on an assistant message", param=where)
            entry["tool_calls"] = [_past_call(c, f"{where}.tool_calls[{k}]") for k, c in enumerate(m.tool_calls)]
            calls.update({c.id: c.name for c in entry["tool_calls"]})
        if m.role == "tool":
            if not isinstance(m.tool_call_id, str) or m.tool_call_id not in calls:
                raise APIError(400, f"{where}: a tool message needs the tool_call_id of an earlier assistant "
                                    f"tool call, got {m.tool_call_id!r}", param=where)
            entry.update(tool_call_id=m.tool_call_id, name=calls[m.tool_call_id])
        out.append(entry)
    return out


def _past_call(raw: Any, where: str) -> ToolCall:
    fn = raw.get("function") if isinstance(raw, dict) else None
    if (not isinstance(raw, dict) or raw.get("type", "function") != "function" or not isinstance(raw.get("id"), str)
            or not isinstance(fn, dict) or not isinstance(fn.get("name"), str)
            or not isinstance(fn.get("arguments", "{}"), str)):
        raise APIError(400, f"{where} must be {{'id': ..., 'type': 'function', 'function': {{'name': ..., "
                            f"'arguments': '<JSON text>'}}}}", param=where)
    try:
        arguments = json.loads(fn.get("arguments") or "{}")
    except json.JSONDecodeError:
        arguments = None
    if not isinstance(arguments, dict):
        raise APIError(400, f"{where}.function.arguments must be the JSON text of an object", param=where)
    return ToolCall(fn["name"], arguments, raw["id"])


def call_entry(call: ToolCall) -> dict[str, Any]:
    return {"id": call.id, "type": "function", "function": {"name": call.name, "arguments": call.arguments_json()}}


def _complete_calls(text: str, specs: list[FunctionSpec]) -> list[ToolCall]:
    """The whole calls at the start of a call list the token budget cut off."""
    scanner, calls = CallScanner(), []
    for piece in scanner.feed(text):
        calls += parse_calls(piece, specs)
    return calls


async def chat_with_tools(state: ServerState, body: ChatCompletionRequest, request: Request, adapter: int):
    from . import routes as r  # the route helpers (routes imports this module when a request needs it)
    from .rag import wants_knowledge_base

    specs = parse_tools(body.tools)
    mode, allowed = parse_choice(body.tool_choice, specs)
    if body.parallel_tool_calls not in (None, True, False):
        raise APIError(400, "parallel_tool_calls must be true or false", param="parallel_tool_calls")
    # A named function is called once, as OpenAI does; otherwise parallel calls unless turned off.
    parallel = body.parallel_tool_calls is not False and not isinstance(body.tool_choice, dict)
    messages = conversation(body)
    if body.n != 1:
        raise APIError(400, "n must be 1 with tools", param="n")
    if body.logprobs:
        raise APIError(400, "logprobs are not supported with tools", param="logprobs")
    if body.response_format is not None and body.response_format.type != "text" and mode != "none":
        raise APIError(400, "response_format cannot be combined with tools", param="response_format")
    if wants_knowledge_base(state, body):
        raise APIError(400, "tools are not served with the knowledge base; send \"rag\": false", param="tools")
    tokenizer = state.tokenizer
    try:
        text = render_prompt(tokenizer, messages, specs if mode != "none" else None)
    except (ValueError, LmforgeError) as exc:
        raise APIError(400, str(exc), param="messages") from None
    ids = r.encode(state, text, "messages", add_special_tokens=False)
    max_tokens = body.max_completion_tokens or body.max_tokens
    if max_tokens == 0:
        raise APIError(400, "max_tokens must be at least 1 for chat completions", param="max_tokens")
    params = r.sampling(state, body, max_tokens, None, len(ids), 0)
    call_params = replace(params, stop=[], json_schema=call_schema(allowed, parallel)) if mode != "none" else None
    call_ids = r.encode(state, CALL_OPEN, "messages", add_special_tokens=False)
    model_name = r.served_name(state, adapter)
    rid, now = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

    # The decision ("auto"): the model's own first tokens, decoded freely.
    probe, calling = None, mode == "required"
    if mode == "auto":
        handle = r.submit(state, ids, replace(params, max_tokens=min(params.max_tokens, probe_tokens(tokenizer))),
                          "messages", adapter)
        probe = (await r.collect([handle], request))[0]
        calling = starts_call(probe.text)
    used = 0 if probe is None else len(probe.token_ids)
    if calling:
        handle = r.submit(state, ids + call_ids, replace(call_params, max_tokens=max(1, params.max_tokens - used)),
                          "messages", adapter)
    elif probe is not None and (probe.finish_reason != "length" or used >= params.max_tokens):
        handle = None  # the probe was the whole answer
    else:
        prefix = [] if probe is None else probe.token_ids
        handle = r.submit(state, ids + prefix, replace(params, max_tokens=params.max_tokens - used), "messages",
                          adapter)
    head = "" if probe is None or calling else probe.text

    def frame(delta: dict[str, Any] | None, finish_reason: str | None = None, **extra: Any) -> str:
        choices = [] if delta is None else [{"index": 0, "delta": delta, "logprobs": None,
                                             "finish_reason": finish_reason}]
        return "data: " + json.dumps({"id": rid, "object": "chat.completion.chunk", "created": now,
                                      "model": model_name, "choices": choices, **extra}) + "\n\n"

    if body.stream:
        async def sse():
            completion = used
            reason = "stop"
            try:
                yield frame({"role": "assistant", "content": None if calling else ""})
                if head:
                    yield frame({"content": head})
                if handle is None:
                    reason = r.finish(probe.finish_reason)
                else:
                    scanner, sent = CallScanner(), 0
                    async for event in handle.events():
                        completion += len(event.token_ids)
                        if event.error:
                            yield "data: " + json.dumps(error_body("generation failed", "server_error")) + "\n\n"
                            return
                        if calling:
                            for piece in scanner.feed(event.text):
                                for call in parse_calls(piece, allowed):
                                    yield frame({"tool_calls": [{"index": sent, "id": call.id, "type": "function",
                                                                 "function": {"name": call.name, "arguments": ""}}]})
                                    yield frame({"tool_calls": [{"index": sent,
                                                                 "function": {"arguments": call.arguments_json()}}]})
                                    sent += 1
                        elif event.text:
                            yield frame({"content": event.text})
                        if event.final:
                            reason = r.finish(event.finish_reason)
                            if calling and reason != "length":
                                reason = "tool_calls"
                yield frame({}, reason)
                if body.stream_options and body.stream_options.include_usage:
                    yield frame(None, usage=r.usage(len(ids), completion))
                yield "data: [DONE]\n\n"
            finally:
                if handle is not None:
                    handle.cancel()

        return StreamingResponse(sse(), media_type="text/event-stream")

    result = None if handle is None else (await r.collect([handle], request))[0]
    completion = used + (0 if result is None else len(result.token_ids))
    if calling:
        if result.finish_reason == "length":
            calls, reason = _complete_calls(result.text, allowed), "length"
        else:
            try:
                calls, reason = parse_calls(result.text, allowed), "tool_calls"
            except LmforgeError as exc:  # the decoder guarantees a valid call: this is a server fault
                raise APIError(500, f"the tool call did not decode: {exc}", "server_error") from None
        message: dict[str, Any] = {"role": "assistant", "content": None}
        if calls:
            message["tool_calls"] = [call_entry(c) for c in calls]
    else:
        message = {"role": "assistant", "content": head + ("" if result is None else result.text)}
        reason = r.finish((probe if result is None else result).finish_reason)
    return {"id": rid, "object": "chat.completion", "created": now, "model": model_name,
            "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": reason}],
            "usage": r.usage(len(ids), completion)}
