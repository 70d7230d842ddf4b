"""Function calling through a live server and the official `openai` client (S5).

A tiny random model with a small byte-level tokenizer of its own: its calls are noise, but
the schema-guided decoder must still make every one parse and validate, and the small
vocabulary keeps the decoder's candidate scans short.
"""

from __future__ import annotations

import json

import httpx
import openai
import pytest
import torch

from lmforge.agent.calls import CallScanner, FunctionSpec, call_schema, parse_calls, render_prompt, ToolCall
from lmforge.agent.validate import schema_errors
from lmforge.infer.json_schema import SchemaPrefix
from lmforge.infer.scheduler import Scheduler
from lmforge.model import ModelConfig, Transformer
from lmforge.serve.app import ServeSettings, create_app
from tests.conftest import live_server

CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "Rome", "Oslo"]},
                                                    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
                   "required": ["city"]}}}
ORDER = {"type": "function", "function": {
    "name": "order_status", "description": "Where an order is",
    "parameters": {"type": "object", "properties": {"order_id": {"type": "integer"},
                                                    "notify": {"type": "boolean"}},
                   "required": ["order_id", "notify"]}}}
LAMP = {"type": "function", "function": {"name": "lamp", "description": "Switch the lamp",
                                        "parameters": {"type": "object", "properties": {"on": {"type": "boolean"}},
                                                       "required": ["on"]}}}
TOOLS = [WEATHER, ORDER]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS + [LAMP]}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def tiny_tokenizer():
    from lmforge.agent.calls import tools_block
    from lmforge.tokenizer.train import train_tokenizer

    specs = [FunctionSpec(t["function"]["name"], t["function"]["description"], t["function"]["parameters"])
             for t in TOOLS]
    texts = [tools_block(specs), json.dumps([{"name": "get_weather", "arguments": {"city": "Paris"}}]), CHATML]
    tok = train_tokenizer(texts * 4, "bpe", 600, special_tokens=["<|im_end|>", "<|im_start|>"])
    tok.chat_template = CHATML
    return tok


@pytest.fixture(scope="module")
def server(tiny_tokenizer):
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=tiny_tokenizer.vocab_size, n_layer=1, n_embd=32, n_head=2, intermediate_size=64,
                         max_position_embeddings=4096, eos_token_id=tiny_tokenizer.eos_id)
    scheduler = Scheduler(Transformer(config).eval(), tiny_tokenizer, max_batch=2, max_seq_len=4096).start()
    app = create_app(scheduler, tiny_tokenizer, "tiny", ServeSettings(max_tokens_limit=160))
    with live_server(app, scheduler) as url:
        yield url


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0)


def assert_valid(calls, names=None):
    assert calls, "expected at least one tool call"
    for call in calls:
        assert call.type == "function" and call.id
        assert call.function.name in (names or SCHEMAS)
        arguments = json.loads(call.function.arguments)
        assert schema_errors(arguments, SCHEMAS[call.function.name]) == []


def test_required_call_stream_and_not_parse_and_validate(client):
    # A small schema keeps this quick; the larger ones run with the slow tests below.
    kwargs = dict(model="tiny", messages=ASK, tools=[LAMP], tool_choice="required", seed=1, max_tokens=120,
                  parallel_tool_calls=False)
    out = client.chat.completions.create(**kwargs)
    choice = out.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    assert_valid(choice.message.tool_calls, ["lamp"])
    assert out.usage.completion_tokens > 0
    with client.chat.completions.stream(**kwargs) as stream:
        final = stream.get_final_completion()
    assert final.choices[0].finish_reason == "tool_calls"
    assert_valid(final.choices[0].message.tool_calls, ["lamp"])
    # Same seed, same model: the streamed call is the non-streamed one.
    assert final.choices[0].message.tool_calls[0].function.arguments == choice.message.tool_calls[0].function.arguments


def test_raw_stream_chunks_carry_indexed_tool_call_deltas(server):
    body = {"model": "tiny", "messages": ASK, "tools": [LAMP], "tool_choice": "required", "stream": True,
            "seed": 5, "max_tokens": 120, "parallel_tool_calls": False, "stream_options": {"include_usage": True}}
    with httpx.stream("POST", server + "/v1/chat/completions", json=body, timeout=120) as r:
        lines = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    chunks = [json.loads(x) for x in lines[:-1]]
    deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
    assert deltas[0] == {"role": "assistant", "content": None}
    calls = [d["tool_calls"][0] for d in deltas if "tool_calls" in d]
    assert [c["index"] for c in calls] == [0, 0]
    assert calls[0]["function"] == {"name": "lamp", "arguments": ""} and calls[0]["id"].startswith("call_")
    assert isinstance(json.loads(calls[1]["function"]["arguments"])["on"], bool)
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "tool_calls"
    assert chunks[-1]["usage"]["completion_tokens"] > 0


@pytest.mark.slow
def test_named_function_with_enums_and_integers(client):
    kwargs = dict(model="tiny", messages=ASK, tools=TOOLS, max_tokens=160, seed=3, parallel_tool_calls=False,
                  tool_choice={"type": "function", "function": {"name": "order_status"}})
    plain = client.chat.completions.create(**kwargs)
    assert_valid(plain.choices[0].message.tool_calls, ["order_status"])
    assert len(plain.choices[0].message.tool_calls) == 1  # a named function: one call
    with client.chat.completions.stream(**kwargs) as stream:
        streamed = stream.get_final_completion().choices[0]
    assert streamed.finish_reason == "tool_calls"
    assert [json.loads(c.function.arguments) for c in streamed.message.tool_calls] == \
           [json.loads(c.function.arguments) for c in plain.choices[0].message.tool_calls]


def test_tool_choice_none_answers_in_text(client):
    out = client.chat.completions.create(model="tiny", messages=ASK, tools=TOOLS, tool_choice="none", max_tokens=8,
                                         seed=0)
    choice = out.choices[0]
    assert choice.message.tool_calls is None
    assert isinstance(choice.message.content, str)
    assert choice.finish_reason in ("stop", "length")


@pytest.mark.slow
def test_auto_either_answers_or_calls_validly(client):
    seen = set()
    for seed in range(3):
        out = client.chat.completions.create(model="tiny", messages=ASK, tools=TOOLS, max_tokens=160, seed=seed,
                                             temperature=1.0, parallel_tool_calls=False)
        choice = out.choices[0]
        if choice.message.tool_calls:
            assert choice.finish_reason == "tool_calls"
            assert_valid(choice.message.tool_calls)
            seen.add("call")
        else:
            assert isinstance(choice.message.content, str) and choice.finish_reason in ("stop", "length")
            seen.add("text")
    assert seen


def test_multi_turn_with_a_tool_result(client):
    first = client.chat.completions.create(model="tiny", messages=ASK, tools=[LAMP], tool_choice="required",
                                           max_tokens=120, seed=2, parallel_tool_calls=False)
    call = first.choices[0].message.tool_calls[0]
    history = ASK + [first.choices[0].message.model_dump(exclude_none=True),
                     {"role": "tool", "tool_call_id": call.id, "content": "18 C, sunny"}]
    second = client.chat.completions.create(model="tiny", messages=history, tools=[LAMP], tool_choice="none",
                                            max_tokens=8, seed=0)
    alone = client.chat.completions.create(model="tiny", messages=ASK, tools=[LAMP], tool_choice="none",
                                           max_tokens=1)
    assert isinstance(second.choices[0].message.content, str)
    assert second.usage.prompt_tokens > alone.usage.prompt_tokens + 10  # the call and its result are in the prompt


def test_prompt_renders_tools_calls_and_results(tiny_tokenizer):
    specs = [FunctionSpec("get_weather", "Current weather", SCHEMAS["get_weather"])]
    messages = [{"role": "user", "content": "Weather in Oslo?"},
                {"role": "assistant", "content": "", "tool_calls": [ToolCall("get_weather", {"city": "Oslo"}, "c1")]},
                {"role": "tool", "tool_call_id": "c1", "name": "get_weather", "content": "-3 C"}]
    text = render_prompt(tiny_tokenizer, messages, specs)
    assert text.startswith("<|im_start|>system\nYou can call functions")
    assert '"name": "get_weather"' in text.split("</tools>")[0]
    assert '<tool_call>[{"name": "get_weather", "arguments": {"city": "Oslo"}}]</tool_call>' in text
    assert '<tool_response>{"name": "get_weather", "content": "-3 C"}</tool_response>' in text
    assert text.endswith("<|im_start|>assistant\n")
    assert "<tools>" not in render_prompt(tiny_tokenizer, messages, None)  # "none": no tools shown


def test_template_with_its_own_tools_support_gets_them(tiny_tokenizer):
    import copy

    tok = copy.copy(tiny_tokenizer)
    tok.chat_template = ("{% for t in tools %}[{{ t.function.name }}]{% endfor %}{% for m in messages %}"
                         "{{ m.role }}:{{ m.content }}{% for c in m.tool_calls or [] %}"
                         "call {{ c.function.name }}({{ c.function.arguments.city }}){% endfor %};{% endfor %}")
    messages = [{"role": "assistant", "content": "", "tool_calls": [ToolCall("get_weather", {"city": "Oslo"})]}]
    text = render_prompt(tok, messages, [FunctionSpec("get_weather", "w", SCHEMAS["get_weather"])])
    assert text == "[get_weather]assistant:call get_weather(Oslo);"


def test_call_schema_keeps_each_tools_own_definitions():
    shared = {"type": "object", "properties": {"where": {"$ref": "#/$defs/place"}}, "required": ["where"],
              "$defs": {"place": {"type": "object", "properties": {"city": {"type": "string"}},
                                  "required": ["city"]}}}
    other = {"type": "object", "properties": {"n": {"$ref": "#/$defs/place"}}, "$defs": {"place": {"type": "integer"}}}
    schema = call_schema([FunctionSpec("a", parameters=shared), FunctionSpec("b", parameters=other)])
    for text, ok in (('[{"name":"a","arguments":{"where":{"city":"X"}}}]', True),
                     ('[{"name":"b","arguments":{"n":3}}]', True),
                     ('[{"name":"b","arguments":{"n":{"city":"X"}}}]', False),
                     ('[{"name":"a","arguments":{"where":3}}]', False)):
        prefix = SchemaPrefix(schema)
        assert (prefix.feed(text.encode()) and prefix.done) is ok, text
    assert parse_calls('[{"name":"a","arguments":{"where":{"city":"X"}}}]', [FunctionSpec("a", parameters=shared)])


def test_a_failed_alternative_does_not_open_a_key_to_any_character():
    # Two functions: after '[{"' a key of either may follow, never a stray multi-byte character.
    schema = call_schema([FunctionSpec("a", parameters=SCHEMAS["get_weather"]), FunctionSpec("b")])
    assert not SchemaPrefix(schema).feed('[{"'.encode() + b"\xd3")
    assert SchemaPrefix(schema).feed(b'[{"na')


def test_one_call_only_without_parallel_calls():
    schema = call_schema([FunctionSpec("b")], parallel=False)
    assert not SchemaPrefix(schema).feed(b'[{"name":"b","arguments":{}},')
    full = SchemaPrefix(schema)
    assert full.feed(b'[{"name":"b","arguments":{}} ]') and full.done


def test_call_scanner_cuts_whole_calls():
    scanner = CallScanner()
    pieces = ['[{"name": "a", "argu', 'ments": {"s": "}{\\"]"}}', ', {"name"', ': "b", "arguments": {}}]']
    found = [p for piece in pieces for p in scanner.feed(piece)]
    assert [json.loads(p)["name"] for p in found] == ["a", "b"]
    assert json.loads(found[0])["arguments"] == {"s": '}{"]'}


BAD = [
    ({"tools": [{"type": "retrieval"}]}, "type 'function'"),
    ({"tools": "get_weather"}, "tools must be a list"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties":
                 {"x": {"type": "string", "pattern": "a+"}}}}}]}, "unsupported JSON Schema keyword"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "array"}}}]}, "object"),
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "function name"),
    ({"tools": [WEATHER, WEATHER]}, "two functions are named 'get_weather'"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"x": {"$ref": "#/$defs/a"}},
        "$defs": {"a": {"$ref": "#/$defs/b"}, "b": {"$ref": "#/$defs/a"}}}}}]}, "in a circle"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": "none"}}]}, "JSON Schema object"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "send_money"}}}, "not among the tools"),
    ({"tools": TOOLS, "tool_choice": "always"}, "tool_choice must be one of"),
    ({"tool_choice": "required"}, "needs tools"),
    ({"tools": TOOLS, "parallel_tool_calls": "yes"}, "parallel_tool_calls"),
    ({"tools": TOOLS, "n": 2}, "n must be 1"),
    ({"tools": TOOLS, "messages": ASK + [{"role": "tool", "tool_call_id": "call_x", "content": "42"}]},
     "tool_call_id"),
    ({"tools": TOOLS, "messages": ASK + [{"role": "assistant", "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": "{not json"}}]}]},
     "arguments must be the JSON text of an object"),
    ({"tools": TOOLS, "messages": ASK + [{"role": "user", "tool_calls": []}]}, "on an assistant message"),
]


@pytest.mark.parametrize("extra,message", BAD)
def test_bad_tool_requests_are_400_with_an_error_body(server, extra, message):
    body = {"model": "tiny", "messages": ASK, "max_tokens": 4, **extra}
    r = httpx.post(server + "/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert message in error["message"] and error["type"] == "invalid_request_error"


def test_openai_client_raises_bad_request_for_an_unknown_named_tool(client):
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="tiny", messages=ASK, tools=TOOLS,
                                       tool_choice={"type": "function", "function": {"name": "nope"}})
