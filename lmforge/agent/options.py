"""The agent loop's settings, apart from the loop so that building the command line imports no torch."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import LmforgeError
from ..options import option

TOOL_CHOICES = ("auto", "required", "none")


@dataclass
class AgentOptions:
    max_steps: int = option(4, help="model turns at most (each may call tools)")
    max_tokens: int = option(256, help="tokens per model turn at most")
    temperature: float = option(0.0, help="sampling temperature (0: greedy)")
    seed: int | None = option(None, help="random seed of sampled turns")
    tool_choice: str = option("auto", choices=TOOL_CHOICES,
                              help="auto: the model answers or calls; required: every turn calls a tool; "
                                   "none: no tools")
    parallel_calls: bool = option(True, help="a turn may call several tools (--no-parallel-calls: one)")
    system: str | None = option(None, help="system prompt")

    def __post_init__(self) -> None:
        if self.max_steps < 1:
            raise LmforgeError("max_steps must be at least 1")
        if self.max_tokens < 1:
            raise LmforgeError("max_tokens must be at least 1")
        if self.tool_choice not in TOOL_CHOICES:
            raise LmforgeError(f"tool_choice must be one of {', '.join(TOOL_CHOICES)}")
