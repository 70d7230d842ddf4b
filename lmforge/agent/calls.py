"""How a chat model is shown functions and how its calls are decoded (S5).

Shared by the OpenAI-compatible server (lmforge/serve/tools.py) and the agent loop
(loop.py), so both speak to the model the same way:

* Showing the tools. A chat template that reads a `tools` variable gets them as
  `tools=[{"type": "function", "function": {...}}]`, with earlier calls and results in
  the Hugging Face message shape. Otherwise (SmolLM2's template has no tools) the
  functions go into the system message as a block written here (`tools_block`), earlier
  calls are written back into the assistant's text exactly as the model writes them, and
  each result becomes a `<tool_response>` message.
* The call format: `<tool_call>[{"name": ..., "arguments": {...}}, ...]</tool_call>`.
  The JSON array after the opening marker is decoded under `call_schema`: every item is
  one of the offered functions, its `name` fixed and its `arguments` under that
  function's own parameters schema. The schema-guided decoder (lmforge/infer/json_schema.py)
  cannot produce anything else, so a call from even a tiny model always parses and validates.
* Text or call ("auto"): the grammar is "plain text, or the marker and then a call".
  The model decodes freely for as many tokens as the marker has (`probe_tokens`); if
  what it wrote is the marker (or its beginning), the rest is decoded under the call
  schema; otherwise the free text goes on. The choice is the model's own first step,
  not a separate classifier. "required" and a named function skip the probe: the marker
  is put into the prompt and only a call can follow. "none" hides the tools.
"""

from __future__ import annotations

import copy
import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from ..errors import LmforgeError
from ..infer.json_schema import check_schema
from .validate import schema_errors

CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
RESPONSE_OPEN, RESPONSE_CLOSE = "<tool_response>", "</tool_response>"
_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")  # what OpenAI allows for a function name
NO_PARAMETERS = {"type": "object", "properties": {}, "additionalProperties": False}


@dataclass
class FunctionSpec:
    """A function as the model sees it: name, what it does, and a JSON Schema for its arguments."""

    name: str
    description: str = ""
    parameters: dict[str, Any] = field(default_factory=lambda: dict(NO_PARAMETERS))

    def as_openai(self) -> dict[str, Any]:
        return {"type": "function", "function": {"name": self.name, "description": self.description,
                                                 "parameters": self.parameters}}


@dataclass
class ToolCall:
    """One call the model made: its id, the function's name and the decoded arguments."""

    name: str
    arguments: dict[str, Any]
    id: str = field(default_factory=lambda: new_call_id())

    def arguments_json(self) -> str:
        return json.dumps(self.arguments, ensure_ascii=False)


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def check_functions(specs: Sequence[FunctionSpec]) -> None:
    """Raise LmforgeError naming the first bad function: its name, a duplicate, or a schema the decoder cannot follow."""
    seen: set[str] = set()
    for i, spec in enumerate(specs):
        where = f"tools[{i}]"
        if not isinstance(spec.name, str) or not _NAME.fullmatch(spec.name):
            raise LmforgeError(f"{where}: a function name must be 1-64 letters, digits, '_' or '-', got {spec.name!r}")
        if spec.name in seen:
            raise LmforgeError(f"{where}: two functions are named {spec.name!r}")
        seen.add(spec.name)
        if not isinstance(spec.parameters, dict):
            raise LmforgeError(f"{where}: parameters must be a JSON Schema object")
        kind = spec.parameters.get("type", "object")
        if kind != "object":
            raise LmforgeError(f"{where}: parameters must describe an object (type 'object'), got {kind!r}")
        try:
            check_schema(spec.parameters, path=f"{where}.function.parameters")
        except LmforgeError as exc:
            raise LmforgeError(str(exc)) from None
        _check_ref_cycles(spec.parameters, f"{where}.function.parameters")


def _check_ref_cycles(root: dict[str, Any], where: str) -> None:
    """Refuse a `$ref` that only leads to more `$ref`s in a circle: no reader could ever reach a schema."""
    defs = {f"#/{section}/{name}": sub for section in ("$defs", "definitions")
            for name, sub in (root.get(section) or {}).items()}

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            seen, here = set(), node
            while isinstance(here, dict) and "$ref" in here:
                if here["$ref"] in seen:
                    raise LmforgeError(f"{where}: $ref {here['$ref']!r} refers to itself in a circle")
                seen.add(here["$ref"])
                here = defs.get(here["$ref"])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(root)


def _arguments_schema(spec: FunctionSpec, defs: dict[str, Any]) -> dict[str, Any]:
    """`spec`'s parameters, with its own $defs moved to the call schema's root under names of its own."""
    params = copy.deepcopy(spec.parameters)
    params.setdefault("type", "object")
    if not params.get("properties"):  # no declared arguments: the call's arguments are {} (not any object)
        params.setdefault("properties", {})
        params.setdefault("additionalProperties", False)
    local = {**params.pop("definitions", {}), **params.pop("$defs", {})}
    for name, sub in local.items():
        defs[f"{spec.name}.{name}"] = sub

    def rename(node: Any) -> Any:
        if isinstance(node, dict):
            out = {k: rename(v) for k, v in node.items()}
            ref = out.get("$ref")
            if isinstance(ref, str) and ref.split("/")[:2] in (["#", "$defs"], ["#", "definitions"]):
                out["$ref"] = f"#/$defs/{spec.name}.{ref.split('/')[2]}"
            return out
        if isinstance(node, list):
            return [rename(v) for v in node]
        return node

    for name in local:
        defs[f"{spec.name}.{name}"] = rename(defs[f"{spec.name}.{name}"])
    return rename(params)


def call_schema(specs: Sequence[FunctionSpec], parallel: bool = True, max_calls: int = 8) -> dict[str, Any]:
    """The JSON Schema of a call list: 1..max_calls items (1 unless `parallel`), each one offered function."""
    if not specs:
        raise LmforgeError("a call needs at least one function to call")
    defs: dict[str, Any] = {}
    options = [{"type": "object",
                "properties": {"name": {"const": s.name}, "arguments": _arguments_schema(s, defs)},
                "required": ["name", "arguments"]} for s in specs]
    schema: dict[str, Any] = {"type": "array", "items": options[0] if len(options) == 1 else {"anyOf": options},
                              "minItems": 1, "maxItems": max_calls if parallel else 1}
    if defs:
        schema["$defs"] = defs
    return schema


def tools_block(specs: Sequence[FunctionSpec]) -> str:
    """The system-prompt text that shows a model without a tools-aware template its functions."""
    lines = [json.dumps({"name": s.name, "description": s.description, "parameters": s.parameters},
                        ensure_ascii=False) for s in specs]
    return ("You can call functions to help the user. These are the functions, with a JSON Schema for the "
            "arguments of each:\n<tools>\n" + "\n".join(lines) + "\n</tools>\n"
            f"To call functions, reply with nothing but {CALL_OPEN}[{{\"name\": <function name>, \"arguments\": "
            f"<arguments object>}}]{CALL_CLOSE}; several calls go in the one list. Results come back between "
            f"{RESPONSE_OPEN} and {RESPONSE_CLOSE}. When no function helps, or the results are in, answer in "
            "plain text.")


def format_calls(calls: Sequence[ToolCall]) -> str:
    """Calls as the model writes them (the text an earlier assistant turn is rendered back with)."""
    body = json.dumps([{"name": c.name, "arguments": c.arguments} for c in calls], ensure_ascii=False)
    return f"{CALL_OPEN}{body}{CALL_CLOSE}"


def template_reads_tools(tokenizer) -> bool:
    """Whether the tokenizer's chat template renders a `tools` variable itself."""
    return bool(re.search(r"\btools\b", getattr(tokenizer, "chat_template", None) or ""))


def render_prompt(tokenizer, messages: Sequence[Mapping[str, Any]], specs: Sequence[FunctionSpec] | None) -> str:
    """The prompt text of a conversation whose messages may carry tool calls and tool results.

    `messages`: {"role", "content"} dicts; an assistant turn may add "tool_calls" (a list of
    `ToolCall`), a "tool" turn has "tool_call_id" and, optionally, "name". `specs`: the
    functions to show (None or empty: none shown, earlier calls are still rendered).
    """
    specs = list(specs or [])
    if template_reads_tools(tokenizer):
        out = []
        for m in messages:
            entry = {"role": m["role"], "content": m.get("content") or ""}
            if m.get("tool_calls"):
                entry["tool_calls"] = [{"id": c.id, "type": "function",
                                        "function": {"name": c.name, "arguments": c.arguments}}
                                       for c in m["tool_calls"]]
            if m["role"] == "tool":
                entry.update(tool_call_id=m.get("tool_call_id"), name=m.get("name"))
            out.append(entry)
        extra = {"tools": [s.as_openai() for s in specs]} if specs else {}
        return tokenizer.apply_chat_template(out, add_generation_prompt=True, **extra)
    out = []
    for m in messages:
        role, content = m["role"], m.get("content") or ""
        if role == "assistant" and m.get("tool_calls"):
            content = content + format_calls(m["tool_calls"])
        elif role == "tool":
            result = {"name": m.get("name"), "content": content} if m.get("name") else {"content": content}
            role, content = "user", f"{RESPONSE_OPEN}{json.dumps(result, ensure_ascii=False)}{RESPONSE_CLOSE}"
        out.append({"role": role, "content": content})
    if specs:
        block = tools_block(specs)
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": f"{out[0]['content']}\n\n{block}"}
        else:
            out.insert(0, {"role": "system", "content": block})
    return tokenizer.apply_chat_template(out, add_generation_prompt=True)


def probe_tokens(tokenizer) -> int:
    """How many tokens the free first step of "auto" decodes: enough to write the marker after a blank."""
    return len(tokenizer.encode(" " + CALL_OPEN, add_special_tokens=False))


def starts_call(text: str) -> bool:
    """Whether the free first tokens begin a call: the marker, or (cut off) a non-empty start of it."""
    head = text.lstrip()
    return bool(head) and (head.startswith(CALL_OPEN) or CALL_OPEN.startswith(head))


def parse_calls(text: str, specs: Sequence[FunctionSpec]) -> list[ToolCall]:
    """The calls in `text` (the JSON array decoded after the marker), each checked against its function.

    Raises LmforgeError when the text is no complete call list or a call breaks its schema.
    """
    try:
        items = json.loads(text)
    except json.JSONDecodeError:
        raise LmforgeError("the model's tool call is not complete JSON") from None
    if isinstance(items, dict):
        items = [items]
    by_name = {s.name: s for s in specs}
    calls = []
    for item in items if isinstance(items, list) else [None]:
        if not isinstance(item, dict) or set(item) != {"name", "arguments"}:
            raise LmforgeError("a tool call must be {\"name\": ..., \"arguments\": {...}}")
        spec = by_name.get(item["name"])
        if spec is None:
            raise LmforgeError(f"the model called {item['name']!r}, which it was not offered")
        errors = schema_errors(item["arguments"], spec.parameters)
        if errors:
            raise LmforgeError(f"arguments of {spec.name!r}: {errors[0]}")
        calls.append(ToolCall(spec.name, item["arguments"]))
    return calls


class CallScanner:
    """Cuts a streamed call list into its complete call objects as they close.

    Fed the decoded text piece by piece, `feed` returns the text of each top-level object
    of the array that has just closed, so a stream can send every call as soon as it is whole.
    """

    def __init__(self) -> None:
        self.depth = 0
        self.in_string = False
        self.escape = False
        self.start: int | None = None
        self.text = ""

    def feed(self, piece: str) -> list[str]:
        done = []
        for c in piece:
            self.text += c
            if self.in_string:
                if self.escape:
                    self.escape = False
                elif c == "\\":
                    self.escape = True
                elif c == '"':
                    self.in_string = False
                continue
            if c == '"':
                self.in_string = True
            elif c in "[{":
                self.depth += 1
                if c == "{" and self.depth == 2:
                    self.start = len(self.text) - 1
            elif c in "]}":
                self.depth -= 1
                if c == "}" and self.depth == 1 and self.start is not None:
                    done.append(self.text[self.start:])
                    self.start = None
        return done
