"""Tools an agent may call, and who may call which (S5: least privilege, confirmation).

A `Tool` is a function with a name, a description and a JSON Schema for its arguments;
`side_effects=True` marks one that changes something (sends, writes, pays) rather than
only reading. A `ToolRegistry` holds every tool a deployment has. An assistant never
gets the registry: it gets a `ToolScope` from `registry.scope(allow, confirm)`, which

* shows and runs only the allowlisted tools (by default: every read-only tool and no
  tool with side effects; a side-effect tool must be named in `allow`);
* checks the arguments against the tool's schema before the call: invalid arguments
  never reach the tool, the model gets the errors back as the tool's result;
* asks `confirm(tool, arguments)` before every call of a tool with side effects; no
  callback, or a callback that says no, refuses the call, and the refusal is the result;
* turns a tool's exception into an error result instead of ending the agent.

Every outcome is returned as a `ToolOutcome`, whose `content` is what the model reads.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

from ..errors import LmforgeError
from .calls import NO_PARAMETERS, FunctionSpec, check_functions
from .validate import schema_errors

Confirm = Callable[["Tool", dict[str, Any]], bool]


@dataclass
class Tool:
    name: str
    description: str
    parameters: dict[str, Any] = field(default_factory=lambda: dict(NO_PARAMETERS))
    function: Callable[..., Any] | None = None  # called with the arguments as keywords
    side_effects: bool = False

    def spec(self) -> FunctionSpec:
        return FunctionSpec(self.name, self.description, self.parameters)


@dataclass
class ToolOutcome:
    """What became of one call. status: "ok", "invalid" (bad arguments), "refused" (not allowed or
    not confirmed), or "error" (the tool raised). `content` is the text the model is given."""

    name: str
    arguments: Any
    status: str
    content: str

    @property
    def ok(self) -> bool:
        return self.status == "ok"


def _as_text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str)


class ToolRegistry:
    """Every tool of a deployment, by name; assistants see scopes of it, never the whole."""

    def __init__(self, tools: Iterable[Tool] = ()) -> None:
        self._tools: dict[str, Tool] = {}
        for tool in tools:
            self.register(tool)

    def register(self, tool: Tool) -> Tool:
        if tool.name in self._tools:
            raise LmforgeError(f"a tool named {tool.name!r} is already registered")
        check_functions([tool.spec()])
        if tool.function is None:
            raise LmforgeError(f"tool {tool.name!r} has no function to call")
        self._tools[tool.name] = tool
        return tool

    def names(self) -> list[str]:
        return list(self._tools)

    def __getitem__(self, name: str) -> Tool:
        return self._tools[name]

    def scope(self, allow: Iterable[str] | None = None, confirm: Confirm | None = None) -> "ToolScope":
        """The tools one assistant may use: `allow` by name (None: every read-only tool)."""
        if allow is None:
            chosen = [t for t in self._tools.values() if not t.side_effects]
        else:
            names = list(dict.fromkeys(allow))
            unknown = [n for n in names if n not in self._tools]
            if unknown:
                raise LmforgeError(f"unknown tool(s) {', '.join(map(repr, unknown))}; registered: "
                                   f"{', '.join(self._tools) or 'none'}")
            chosen = [self._tools[n] for n in names]
        return ToolScope(chosen, confirm)


class ToolScope:
    """The allowlisted tools of one assistant: what it is shown and all it can run."""

    def __init__(self, tools: Iterable[Tool], confirm: Confirm | None = None) -> None:
        self.tools = {t.name: t for t in tools}
        self.confirm = confirm

    def specs(self) -> list[FunctionSpec]:
        return [t.spec() for t in self.tools.values()]

    def call(self, name: str, arguments: Any) -> ToolOutcome:
        tool = self.tools.get(name)
        if tool is None:
            return ToolOutcome(name, arguments, "refused", f"refused: the tool {name!r} is not available to you")
        errors = schema_errors(arguments, tool.parameters)
        if errors:
            return ToolOutcome(name, arguments, "invalid", "invalid arguments: " + "; ".join(errors))
        if tool.side_effects:
            approved = False
            if self.confirm is not None:
                try:
                    approved = bool(self.confirm(tool, arguments))
                except Exception as exc:  # a failing confirmation is no confirmation
                    return ToolOutcome(name, arguments, "refused", f"refused: confirmation failed ({exc})")
            if not approved:
                return ToolOutcome(name, arguments, "refused",
                                   f"refused: the user did not confirm this call of {name!r}; do not retry it")
        try:
            result = tool.function(**arguments)
        except LmforgeError as exc:
            return ToolOutcome(name, arguments, "error", f"error: {exc}")
        except Exception as exc:
            return ToolOutcome(name, arguments, "error", f"error: {type(exc).__name__}: {exc}")
        return ToolOutcome(name, arguments, "ok", _as_text(result))
