"""``lmforge agent run``: a question answered by a model that may call tools, step by step.

    lmforge agent run "What is 17 * 23 + 4?" --tools calculator
    lmforge agent run "Sum the squares of 1..10" --tools calculator,python --max-steps 3

Each step prints what the model did: its calls with their arguments and results, or its
answer. The built-in tools are read-only; `python` runs code in the OS-isolated sandbox
and refuses to start where the machine cannot isolate, unless --allow-unsafe.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass

from lmforge.cli.common import add_config_flags, add_device_flags, config_from_args, load_local
from lmforge.errors import LmforgeError
from lmforge.options import option

BUILT_IN = ("calculator", "python")


@dataclass
class AgentRunOptions:
    question: str = option("", cli=False, help="the question (positional)")
    model: str | None = option(None, metavar="MODEL", help="model name or path (default: lmforge's default model)")
    tools: str = option("calculator", help=f"comma-separated tools the agent may use: {', '.join(BUILT_IN)}")
    allow_unsafe: bool = option(False, help="let the python tool run WITHOUT isolation where the sandbox cannot "
                                            "isolate (it can then read and change your files)")
    json: bool = option(False, help="print one JSON object (steps, answer, stop reason) instead of the steps")

    def tool_names(self) -> list[str]:
        names = [n.strip() for n in self.tools.split(",") if n.strip()]
        unknown = [n for n in names if n not in BUILT_IN]
        if unknown or not names:
            raise LmforgeError(f"--tools: unknown tool(s) {', '.join(map(repr, unknown)) or '(none given)'}; "
                               f"choose from {', '.join(BUILT_IN)}")
        return list(dict.fromkeys(names))


def cmd_agent_run(args: argparse.Namespace) -> int:
    from lmforge.agent.calculator import calculator_tool
    from lmforge.agent.loop import Agent, AgentOptions
    from lmforge.agent.tools import ToolRegistry

    run = config_from_args(AgentRunOptions, args, question=args.question)
    options = config_from_args(AgentOptions, args)
    names = run.tool_names()
    if not run.question.strip():
        raise LmforgeError("give a question")
    registry = ToolRegistry([calculator_tool()])
    if "python" in names:
        from lmforge.agent.python_tool import python_tool

        registry.register(python_tool(allow_unsafe=run.allow_unsafe))
    lm = load_local(run.model, args)

    def show(step) -> None:
        if run.json:
            return
        if not step.calls:
            print(f"[step {step.index}] answer: {step.text}")
        for call, outcome in zip(step.calls, step.outcomes):
            print(f"[step {step.index}] call {call.name}({json.dumps(call.arguments, ensure_ascii=False)})")
            print(f"[step {step.index}]   -> {outcome.status}: {outcome.content}")
        sys.stdout.flush()

    agent = Agent(lm.generator, lm.tokenizer, registry.scope(names), options, on_step=show)
    result = agent.run(run.question)
    if run.json:
        print(json.dumps({"answer": result.answer, "stop_reason": result.stop_reason, "steps": [
            {"index": s.index, "text": s.text if not s.calls else None,
             "calls": [{"name": c.name, "arguments": c.arguments, "status": o.status, "result": o.content}
                       for c, o in zip(s.calls, s.outcomes)]} for s in result.steps]}, ensure_ascii=False))
    else:
        print(f"stopped: {result.stop_reason} after {len(result.steps)} step(s)")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("agent", help="run a tool-using agent")
    verbs = p.add_subparsers(dest="agent_command", required=True, metavar="VERB")
    r = verbs.add_parser("run", help="answer a question, calling tools as the model decides")
    r.add_argument("question", help="the question")
    add_config_flags(r, AgentRunOptions)
    from lmforge.agent.options import AgentOptions

    add_config_flags(r, AgentOptions, "agent loop")
    add_device_flags(r)
    r.set_defaults(func=cmd_agent_run)
