"""lmforge.agent: least-privilege tool scopes, argument validation, confirmation, the loop, built-in tools."""

from __future__ import annotations

import math
import os

import pytest
import torch

from lmforge.agent.calculator import calculator_tool, evaluate
from lmforge.agent.loop import Agent, AgentOptions
from lmforge.agent.tools import Tool, ToolRegistry
from lmforge.agent.validate import schema_errors
from lmforge.errors import LmforgeError
from tests.test_tool_calling import CHATML

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")

LOOKUP = {"type": "object", "properties": {"order_id": {"type": "integer"},
                                           "fields": {"type": "array", "items": {"enum": ["status", "eta"]},
                                                      "maxItems": 2}},
          "required": ["order_id"]}


def registry(calls: list):
    def record(name):
        return lambda **kw: calls.append((name, kw)) or f"{name} done"

    return ToolRegistry([
        Tool("lookup_order", "Look up an order", LOOKUP, record("lookup_order")),
        Tool("ping", "Check the service", function=record("ping")),
        Tool("refund", "Refund an order", LOOKUP, record("refund"), side_effects=True),
    ])


def test_scope_shows_and_runs_only_allowlisted_tools():
    calls: list = []
    reg = registry(calls)
    default = reg.scope()  # least privilege: read-only tools only
    assert sorted(s.name for s in default.specs()) == ["lookup_order", "ping"]
    outcome = default.call("refund", {"order_id": 7})
    assert outcome.status == "refused" and "not available" in outcome.content
    narrow = reg.scope(["ping"])
    assert [s.name for s in narrow.specs()] == ["ping"]
    assert narrow.call("lookup_order", {"order_id": 1}).status == "refused"
    assert narrow.call("ping", {}).content == "ping done"
    assert calls == [("ping", {})]
    with pytest.raises(LmforgeError, match="unknown tool"):
        reg.scope(["ping", "delete_everything"])
    with pytest.raises(LmforgeError, match="already registered"):
        reg.register(Tool("ping", "again", function=print))


@pytest.mark.parametrize("arguments,problem", [
    ({"order_id": "12"}, "must be integer"),
    ({}, "missing required property 'order_id'"),
    ({"order_id": 3, "admin": True}, "unexpected property 'admin'"),
    ({"order_id": True}, "must be integer"),
    ({"order_id": 3, "fields": ["status", "price"]}, "must be one of"),
    ({"order_id": 3, "fields": ["status", "eta", "eta"]}, "at most 2 items"),
    ("order 12", "must be object"),
])
def test_invalid_arguments_never_reach_the_tool(arguments, problem):
    calls: list = []
    outcome = registry(calls).scope().call("lookup_order", arguments)
    assert outcome.status == "invalid" and problem in outcome.content
    assert calls == []


def test_valid_arguments_reach_the_tool_as_keywords():
    calls: list = []
    outcome = registry(calls).scope().call("lookup_order", {"order_id": 3, "fields": ["eta"]})
    assert outcome.ok and calls == [("lookup_order", {"order_id": 3, "fields": ["eta"]})]


def test_side_effects_need_a_confirmation_for_every_call():
    calls: list = []
    asked: list = []
    reg = registry(calls)
    assert reg.scope(["refund"]).call("refund", {"order_id": 1}).status == "refused"  # no callback: refused
    answers = iter([False, True])

    def confirm(tool, arguments):
        asked.append((tool.name, arguments))
        return next(answers)

    scope = reg.scope(["refund"], confirm=confirm)
    first = scope.call("refund", {"order_id": 1})
    second = scope.call("refund", {"order_id": 2})
    assert first.status == "refused" and "did not confirm" in first.content
    assert second.ok
    assert asked == [("refund", {"order_id": 1}), ("refund", {"order_id": 2})]
    assert calls == [("refund", {"order_id": 2})]
    # Invalid arguments are refused before anyone is asked.
    assert scope.call("refund", {"order_id": "x"}).status == "invalid" and len(asked) == 2


def test_a_failing_tool_becomes_an_error_result():
    scope = ToolRegistry([Tool("boom", "fails", function=lambda: 1 / 0)]).scope()
    outcome = scope.call("boom", {})
    assert outcome.status == "error" and "ZeroDivisionError" in outcome.content


def test_validator_reads_anyof_refs_and_numbers():
    schema = {"anyOf": [{"type": "integer"}, {"$ref": "#/$defs/s"}], "$defs": {"s": {"type": "string"}}}
    assert schema_errors(3, schema) == [] and schema_errors("a", schema) == []
    assert schema_errors(2.0, {"type": "integer"}) == []
    assert schema_errors(2.5, {"type": "integer"}) and schema_errors(False, {"type": "number"})
    assert schema_errors(1, {"const": True}) and schema_errors(1.0, {"enum": [1]}) == []


@pytest.mark.parametrize("expression,value", [
    ("2 + 3 * 4", 14), ("(2 + 3) * 4", 20), ("7 / 2", 3.5), ("7 // 2", 3), ("-7 % 3", 2), ("2 ** 10", 1024),
    ("2 ^ 3 ^ 2", 512), ("-2 ** 2", -4), ("sqrt(16) + max(1, 5, 3)", 9), ("round(2.567, 2)", 2.57),
    ("1e3 + .5", 1000.5), ("pi", math.pi), ("log(e)", 1), ("abs(-3) * floor(2.7)", 6),
])
def test_calculator_values(expression, value):
    assert evaluate(expression) == pytest.approx(value)


@pytest.mark.parametrize("expression,problem", [
    ("1 / 0", "division by zero"), ("2 ** 100000", "exponents are limited"), ("__import__('os')", "unexpected"), ("__import__(2)", "unknown function"),
    ("2 +", "ends too early"), ("(1 + 2", "expected ')'"), ("3 3", "after a complete expression"),
    ("sqrt(-1)", "sqrt()"), ("x * 2", "unknown name 'x'"), ("1; 2", "unexpected ';'"), ("", "give an"),
    ("9 ** 999 ** 9", "exponents are limited"), ("max()", "unexpected ')'"),
])
def test_calculator_refuses_what_it_cannot_compute(expression, problem):
    with pytest.raises(LmforgeError, match=problem.replace("(", r"\(").replace(")", r"\)")):
        evaluate(expression)


def test_calculator_tool_reports_errors_as_results():
    scope = ToolRegistry([calculator_tool()]).scope()
    assert scope.call("calculator", {"expression": "6 * 7"}).content == "42"
    bad = scope.call("calculator", {"expression": "6 / 0"})
    assert bad.status == "error" and "division by zero" in bad.content


def test_python_tool_runs_in_the_sandbox():
    from lmforge.agent.python_tool import python_tool
    from lmforge.eval.sandbox import SandboxLimits, detect_isolation

    found = detect_isolation()
    if not found.available:
        if IN_CI:
            pytest.fail(f"the sandbox cannot isolate on this machine: {found.reason}")
        with pytest.raises(LmforgeError, match="refusing to run model-written code without isolation"):
            python_tool()
        pytest.skip(f"the sandbox cannot isolate on this machine: {found.reason}")
    tool = python_tool(limits=SandboxLimits(timeout=5.0, memory_mb=256), isolation=found)
    scope = ToolRegistry([tool]).scope()
    assert scope.call("python", {"code": "print(sum(i * i for i in range(11)))"}).content.strip() == "385"
    home = scope.call("python", {"code": "import os\nprint(os.path.exists(os.path.expanduser('~/.bashrc')),"
                                         " sorted(os.environ))"})
    assert home.ok and "HOME" not in home.content  # an empty environment, none of the user's files
    failed = scope.call("python", {"code": "raise SystemExit('no')"})
    assert failed.ok and failed.content.startswith("error")


@pytest.fixture(scope="module")
def tiny_generator():
    from lmforge.infer.engine import Generator
    from lmforge.model import ModelConfig, Transformer
    from lmforge.tokenizer.train import train_tokenizer

    texts = ['[{"name": "ping", "arguments": {}}]', "You can call functions to help the user.", CHATML]
    tok = train_tokenizer(texts * 4, "bpe", 400, special_tokens=["<|im_end|>", "<|im_start|>"])
    tok.chat_template = CHATML
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=tok.vocab_size, n_layer=1, n_embd=32, n_head=2, intermediate_size=64,
                         max_position_embeddings=4096, eos_token_id=tok.eos_id)
    return Generator(Transformer(config).eval(), tok), tok


def test_loop_stops_at_the_step_limit_and_feeds_results_back(tiny_generator):
    generator, tok = tiny_generator
    calls: list = []
    reg = ToolRegistry([Tool("ping", "Check the service", function=lambda: calls.append(1) or "pong")])
    seen: list = []
    agent = Agent(generator, tok, reg.scope(), AgentOptions(max_steps=2, tool_choice="required", max_tokens=60,
                                                           parallel_calls=False), on_step=seen.append)
    result = agent.run("Is the service up?")
    assert result.stop_reason == "max_steps" and result.answer is None
    assert [s.index for s in result.steps] == [1, 2] and seen == result.steps
    assert all(len(s.calls) == 1 and s.calls[0].name == "ping" and s.outcomes[0].content == "pong"
               for s in result.steps)
    assert len(calls) == 2
    tool_messages = [m for m in result.messages if m["role"] == "tool"]
    assert [m["content"] for m in tool_messages] == ["pong", "pong"]
    assert tool_messages[0]["tool_call_id"] == result.steps[0].calls[0].id


def test_loop_returns_a_refusal_to_the_model(tiny_generator):
    generator, tok = tiny_generator
    done: list = []
    reg = ToolRegistry([Tool("ping", "Restart the service", function=lambda: done.append(1), side_effects=True)])
    agent = Agent(generator, tok, reg.scope(["ping"], confirm=lambda tool, args: False),
                  AgentOptions(max_steps=1, tool_choice="required", max_tokens=60, parallel_calls=False))
    result = agent.run("Restart it")
    assert done == [] and result.steps[0].outcomes[0].status == "refused"
    assert "did not confirm" in result.messages[-1]["content"]


def test_tool_choice_none_answers_in_text(tiny_generator):
    generator, tok = tiny_generator
    reg = ToolRegistry([Tool("ping", "Check", function=lambda: "pong")])
    result = Agent(generator, tok, reg.scope(), AgentOptions(tool_choice="none", max_tokens=5)).run("hi")
    assert result.stop_reason == "answer" and isinstance(result.answer, str) and len(result.steps) == 1


def test_agent_options_are_checked():
    with pytest.raises(LmforgeError, match="max_steps"):
        AgentOptions(max_steps=0)
    with pytest.raises(LmforgeError, match="tool_choice"):
        AgentOptions(tool_choice="always")


def test_cli_refuses_unknown_tools_before_loading(capsys):
    from lmforge.cli import main

    assert main(["agent", "run", "hi", "--tools", "calculator,shell"]) == 1
    assert "unknown tool(s) 'shell'" in capsys.readouterr().err


@pytest.mark.slow
def test_cli_runs_the_default_model_with_the_calculator(capsys):
    from lmforge.cli import main

    assert main(["agent", "run", "What is 12 * 7?", "--max-steps", "2", "--max-tokens", "48", "--device", "cpu",
                 "--tool-choice", "required", "--no-parallel-calls"]) == 0
    out = capsys.readouterr().out
    assert "[step 1] call calculator(" in out and "stopped: max_steps after 2 step(s)" in out
