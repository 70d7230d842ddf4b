"""The agent loop (S5): model -> tool calls -> results -> model, until it answers or the steps run out.

Each step is one model turn through the generation engine (`Generator`, which drives the
scheduler's step: there is no other decode loop). A turn either answers in text, which
ends the run ("answer"), or calls tools (calls.py decodes them under the tools' schemas);
each call goes through the assistant's `ToolScope` (allowlist, argument validation,
confirmation) and its outcome goes back to the model as a tool message. After
`max_steps` turns that all called tools the run stops ("max_steps"); a call cut off by
the token budget stops it too ("length").
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Callable

from ..infer.sampling import SamplingParams
from .calls import CALL_OPEN, ToolCall, call_schema, parse_calls, probe_tokens, render_prompt, starts_call
from .options import AgentOptions
from .tools import ToolOutcome, ToolScope

@dataclass
class Turn:
    """What one model turn produced: text, or calls (or neither, when the budget cut a call off)."""

    text: str
    calls: list[ToolCall] | None
    finish_reason: str
    completion_tokens: int
    cut_call: bool = False  # a call began but the token budget ended before it was complete


@dataclass
class AgentStep:
    index: int
    text: str
    calls: list[ToolCall] = field(default_factory=list)
    outcomes: list[ToolOutcome] = field(default_factory=list)


@dataclass
class AgentResult:
    answer: str | None
    stop_reason: str  # "answer", "max_steps" or "length"
    steps: list[AgentStep]
    messages: list[dict[str, Any]]


def model_turn(generator, tokenizer, messages: list[dict[str, Any]], scope: ToolScope | None,
               params: SamplingParams, tool_choice: str = "auto", parallel: bool = True) -> Turn:
    """One assistant turn of `messages` with `scope`'s tools (calls.py explains the protocol)."""
    specs = scope.specs() if scope is not None and tool_choice != "none" else []
    prompt = tokenizer.encode(render_prompt(tokenizer, messages, specs), add_special_tokens=False)
    if not specs:
        done = generator.generate(prompt, params)[0]
        return Turn(done.text, None, done.finish_reason, done.completion_tokens)
    used = 0
    if tool_choice == "auto":
        probe = generator.generate(prompt, replace(params, max_tokens=min(params.max_tokens,
                                                                          probe_tokens(tokenizer))))[0]
        used = probe.completion_tokens
        if not starts_call(probe.text):
            if probe.finish_reason != "length" or used >= params.max_tokens:
                return Turn(probe.text, None, probe.finish_reason, used)
            more = generator.generate(prompt + probe.token_ids, replace(params, max_tokens=params.max_tokens - used))[0]
            text = tokenizer.decode(probe.token_ids + more.token_ids, skip_special_tokens=True)
            return Turn(text, None, more.finish_reason, used + more.completion_tokens)
    constrained = replace(params, json_schema=call_schema(specs, parallel))
    done = generator.generate(prompt + tokenizer.encode(CALL_OPEN, add_special_tokens=False), constrained)[0]
    used += done.completion_tokens
    if done.finish_reason == "length":
        return Turn(done.text, None, "length", used, cut_call=True)
    return Turn(done.text, parse_calls(done.text, specs), "tool_calls", used)


class Agent:
    """An assistant with a tool scope: `run(question)` loops model turns and tool calls."""

    def __init__(self, generator, tokenizer, scope: ToolScope, options: AgentOptions | None = None,
                 on_step: Callable[[AgentStep], None] | None = None) -> None:
        self.generator, self.tokenizer, self.scope = generator, tokenizer, scope
        self.options = options or AgentOptions()
        self.on_step = on_step

    def run(self, question: str | list[dict[str, Any]]) -> AgentResult:
        o = self.options
        if isinstance(question, str):
            messages = ([{"role": "system", "content": o.system}] if o.system else []) + \
                       [{"role": "user", "content": question}]
        else:
            messages = list(question)
        steps: list[AgentStep] = []
        for index in range(1, o.max_steps + 1):
            params = SamplingParams(max_tokens=o.max_tokens, temperature=o.temperature,
                                    seed=None if o.seed is None else o.seed + index)
            turn = model_turn(self.generator, self.tokenizer, messages, self.scope, params, o.tool_choice,
                              o.parallel_calls)
            step = AgentStep(index, turn.text)
            steps.append(step)
            if turn.calls is None:
                if self.on_step:
                    self.on_step(step)
                if turn.cut_call:
                    return AgentResult(None, "length", steps, messages)
                messages.append({"role": "assistant", "content": turn.text})
                return AgentResult(turn.text, "answer", steps, messages)
            step.calls = turn.calls
            messages.append({"role": "assistant", "content": "", "tool_calls": turn.calls})
            for call in turn.calls:
                outcome = self.scope.call(call.name, call.arguments)
                step.outcomes.append(outcome)
                messages.append({"role": "tool", "tool_call_id": call.id, "name": call.name,
                                 "content": outcome.content})
            if self.on_step:
                self.on_step(step)
        return AgentResult(None, "max_steps", steps, messages)
