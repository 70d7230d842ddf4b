"""Render a model's Jinja chat template, the way transformers does.

A chat model was fine-tuned on conversations laid out in one exact format (role markers,
special tokens, newlines). The model's files carry that format as a Jinja template; rendering
it here, with the same Jinja settings and helper functions as transformers, gives
byte-identical prompts. Templates come from downloaded files, so they run in Jinja's
immutable sandbox: they can format data but cannot reach Python internals.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from functools import lru_cache
from typing import Any

from lmforge.errors import LmforgeError


def _raise_exception(message: str) -> None:
    """Templates call this to reject a conversation (e.g. roles out of order)."""
    import jinja2

    raise jinja2.exceptions.TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    # Jinja's own tojson escapes <, >, & for HTML, which would change the prompt text.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=32)
def compile_chat_template(template: str) -> Any:
    """Compile once per template string (templates are re-rendered for every request)."""
    import jinja2
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationBlock(Extension):
        """Accept ``{% generation %}...{% endgeneration %}`` (assistant-mask markers) as a no-op."""

        tags = {"generation"}

        def parse(self, parser: Any) -> Any:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

        def _render(self, caller: Any) -> str:
            return caller()

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[GenerationBlock, loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as exc:
        raise LmforgeError(f"chat template has a syntax error (line {exc.lineno}): {exc.message}") from None


def render_chat_template(
    template: str,
    messages: Sequence[Mapping[str, Any]],
    *,
    add_generation_prompt: bool = True,
    tools: list[dict[str, Any]] | None = None,
    documents: list[dict[str, Any]] | None = None,
    **variables: Any,
) -> str:
    """Render ``messages`` (dicts with "role" and "content") with ``template``.

    Keys whose value is None are dropped from each message first, as transformers does, so
    templates that test ``message.tool_calls is defined`` behave the same.
    """
    import jinja2

    if not messages:
        raise LmforgeError("cannot apply a chat template to an empty conversation")
    chat = []
    for message in messages:
        if not isinstance(message, Mapping):
            raise LmforgeError(f"chat messages must be dicts with 'role' and 'content', got {message!r}")
        chat.append({k: v for k, v in message.items() if v is not None})
    compiled = compile_chat_template(template)
    try:
        return compiled.render(messages=chat, tools=tools, documents=documents,
                               add_generation_prompt=add_generation_prompt, **variables)
    except jinja2.TemplateError as exc:
        raise LmforgeError(f"chat template rejected the conversation: {exc}") from None
