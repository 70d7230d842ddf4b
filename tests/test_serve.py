"""A real server on loopback, driven by the official `openai` client and plain HTTP."""

from __future__ import annotations

import contextlib
import time

import httpx
import openai
import pytest
import torch

from lmforge.infer.scheduler import Scheduler
from lmforge.serve.app import ServeSettings, create_app
from tests.conftest import live_server

MODEL = "smollm2-135m-instruct"


@contextlib.contextmanager
def running_server(lm, settings=None, store=None, **scheduler_kwargs):
    scheduler = Scheduler(lm.model, lm.tokenizer, max_seq_len=2048, **scheduler_kwargs).start()
    app = create_app(scheduler, lm.tokenizer, MODEL, settings or ServeSettings(), store=store)
    with live_server(app, scheduler) as url:
        yield url, scheduler


@pytest.fixture(scope="module")
def server(default_lm):
    with running_server(default_lm, max_batch=4) as (url, scheduler):
        yield url, scheduler


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="unused", max_retries=0)


QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def test_chat_completion(client):
    r = client.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0, max_tokens=30)
    assert r.choices[0].message.content == "The capital of France is Paris."
    assert r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens == 7 and r.usage.total_tokens == r.usage.prompt_tokens + 7


def test_chat_streaming_equals_non_streaming(client):
    chunks = list(client.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0, max_tokens=30,
                                                 stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "The capital of France is Paris."
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["stop"]
    assert chunks[-1].usage.completion_tokens == 7
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) >= 3  # really streamed


def test_n_choices_and_seed_reproducibility(client):
    kwargs = dict(model=MODEL, messages=[{"role": "user", "content": "Tell me a one-line joke."}],
                  temperature=1.0, max_tokens=20, n=3, seed=11)
    a = client.chat.completions.create(**kwargs)
    b = client.chat.completions.create(**kwargs)
    texts = [c.message.content for c in a.choices]
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert texts == [c.message.content for c in b.choices]
    assert len(set(texts)) > 1  # distinct samples per choice


def test_stop_sequence(client):
    r = client.completions.create(model=MODEL, prompt="1, 2, 3, 4,", max_tokens=20, temperature=0, stop=[" 7"])
    assert r.choices[0].text == " 5, 6,"
    assert r.choices[0].finish_reason == "stop"


def test_completion_echo_logprobs_equal_lmforge(client, default_lm):
    text = "The quick brown fox jumps over the lazy dog."
    r = client.completions.create(model=MODEL, prompt=text, max_tokens=0, echo=True, logprobs=2)
    lp = r.choices[0].logprobs
    ids = default_lm.tokenizer.encode(text)
    assert r.choices[0].text == text and len(lp.tokens) == len(ids)
    with torch.no_grad():
        logp = torch.log_softmax(default_lm.model(torch.tensor([ids]))[0].float(), -1)
    expected = [None] + [logp[i - 1, ids[i]].item() for i in range(1, len(ids))]
    assert lp.token_logprobs[0] is None
    assert lp.token_logprobs[1:] == pytest.approx(expected[1:], abs=1e-4)
    assert all(len(t) == 2 for t in lp.top_logprobs[1:])
    assert "".join(lp.tokens) == text and lp.text_offset[1] == len(lp.tokens[0])


def test_completion_token_prompts_and_generated_logprobs(client, default_lm):
    ids = default_lm.tokenizer.encode("Paris is the capital of")
    r = client.completions.create(model=MODEL, prompt=[ids, ids], max_tokens=3, temperature=0, logprobs=1)
    from lmforge.infer import SamplingParams

    expected = default_lm.generator.generate(ids, SamplingParams(max_tokens=3, temperature=0))[0]
    assert len(r.choices) == 2 and r.choices[0].text == r.choices[1].text == expected.text
    assert r.usage.prompt_tokens == 2 * len(ids) and r.usage.completion_tokens == 6
    # The log-prob of each greedy token equals the model's own log-softmax at that position.
    with torch.no_grad():
        seq = ids + expected.token_ids
        logp = torch.log_softmax(default_lm.model(torch.tensor([seq]))[0].float(), -1)
    want = [logp[len(ids) - 1 + k, t].item() for k, t in enumerate(expected.token_ids)]
    assert r.choices[0].logprobs.token_logprobs == pytest.approx(want, abs=1e-4)


def test_models_health_metrics(server, client):
    # The chat model first; then the embedding model /v1/embeddings serves (auto: the default one, installed).
    assert [m.id for m in client.models.list().data] == [MODEL, "all-minilm-l6-v2"]
    assert httpx.get(server[0] + "/health").json()["status"] == "ok"
    body = httpx.get(server[0] + "/metrics").text
    for name in ("lmforge_requests_total", "lmforge_time_to_first_token_seconds_bucket", "lmforge_generated_tokens_total",
                 "lmforge_queue_depth", "lmforge_running_batch_size", "lmforge_tokens_per_second"):
        assert name in body


def test_repeated_system_prompt_is_served_from_the_prefix_cache(server, client):
    url, scheduler = server
    before = scheduler.stats.cached_prompt_tokens
    for question in ("Name a colour.", "Name a fruit."):  # both start with the template's system prompt
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": question}],
                                       temperature=0, max_tokens=2)
    assert scheduler.stats.cached_prompt_tokens - before >= 16
    cached = [line for line in httpx.get(url + "/metrics").text.splitlines()
              if line.startswith("lmforge_prompt_tokens_cached_total")]
    assert cached and float(cached[0].split()[-1]) >= 16


def test_a_repeated_prompt_joins_a_running_stream_without_a_prefill(server, client):
    """Its prompt cached but for the last tokens, a request sent while another streams is fed through
    the running decode steps (`Scheduler._feeds`) and answers as it did when prefilled."""
    url, scheduler = server
    question = [{"role": "user", "content": "Name a planet."}]
    first = client.chat.completions.create(model=MODEL, messages=question, temperature=0, max_tokens=4)
    fed = scheduler.stats.fed_prompts
    stream = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Count to fifty."}],
                                            temperature=0, max_tokens=60, stream=True, extra_body={"ignore_eos": True})
    chunks = iter(stream)
    next(chunks)  # streaming now
    again = client.chat.completions.create(model=MODEL, messages=question, temperature=0, max_tokens=4)
    rest = list(chunks)
    assert rest[-1].choices[0].finish_reason == "length"  # still running when the repeat came
    assert again.choices[0].message.content == first.choices[0].message.content
    assert scheduler.stats.fed_prompts == fed + 1
    metric = [line for line in httpx.get(url + "/metrics").text.splitlines() if line.startswith("lmforge_fed_prompts")]
    assert metric and float(metric[0].split()[-1]) == fed + 1


@pytest.mark.parametrize(
    "payload, status",
    [
        ({"model": MODEL, "messages": []}, 422),
        ({"model": MODEL}, 422),
        ({"model": "gpt-9", "messages": QUESTION}, 404),
        ({"model": MODEL, "messages": QUESTION, "temperature": 5}, 422),
        ({"model": MODEL, "messages": QUESTION, "stop": [""]}, 400),
        ({"model": MODEL, "messages": QUESTION, "max_tokens": 100000}, 400),
        ({"model": MODEL, "messages": [{"role": "user", "content": "word " * 3000}]}, 400),
    ],
)
def test_bad_requests_get_openai_error_bodies(server, payload, status):
    r = httpx.post(server[0] + "/v1/chat/completions", json=payload, timeout=60)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]


def test_openai_client_raises_typed_errors(client):
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=QUESTION)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL, prompt="hi", max_tokens=0)  # max_tokens=0 needs echo


def test_api_keys_and_rate_limit(default_lm):
    with running_server(default_lm, ServeSettings(api_keys=["k1"], rate_limit_per_minute=2), max_batch=1) as (url, _):
        bad = openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()
        good = openai.OpenAI(base_url=url + "/v1", api_key="k1", max_retries=0)
        good.models.list()
        good.models.list()
        with pytest.raises(openai.RateLimitError) as info:
            good.models.list()
        assert int(info.value.response.headers["retry-after"]) >= 1


def test_queue_full_is_429_with_retry_after(default_lm):
    with running_server(default_lm, max_batch=1, max_waiting=0) as (url, _):
        r = httpx.post(url + "/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 2})
        assert r.status_code == 429 and r.headers["retry-after"] == "1"
        assert r.json()["error"]["code"] == "queue_full"


def test_remote_backend_matches_local(server, default_lm):
    import lmforge

    remote = lmforge.connect(server[0])
    assert remote.name == MODEL
    assert remote.chat(QUESTION, temperature=0, max_tokens=30) == default_lm.chat(QUESTION, temperature=0, max_tokens=30)
    assert "".join(remote.stream_chat(QUESTION, temperature=0, max_tokens=30)) == "The capital of France is Paris."
    assert remote.generate("1, 2, 3,", temperature=0, max_tokens=6) == default_lm.generate("1, 2, 3,", temperature=0, max_tokens=6)
    tokens, lps = remote.prompt_logprobs("Hello world, this is a test.")
    ids = default_lm.tokenizer.encode("Hello world, this is a test.")
    with torch.no_grad():
        logp = torch.log_softmax(default_lm.model(torch.tensor([ids]))[0].float(), -1)
    assert len(tokens) == len(ids) and lps[0] is None
    assert lps[1:] == pytest.approx([logp[i - 1, ids[i]].item() for i in range(1, len(ids))], abs=1e-4)


def test_cli_against_remote_endpoint(server, capsys):
    from lmforge.cli import main

    code = main(["generate", "--base-url", server[0], "--prompt", "1, 2, 3,", "--max-tokens", "6",
                 "--temperature", "0", "--json"])
    out = capsys.readouterr()
    assert code == 0, out.err
    import json

    assert json.loads(out.out)["model"] == MODEL
    code = main(["chat", "--base-url", server[0], "--message", "What is the capital of France?", "--temperature", "0"])
    assert code == 0 and capsys.readouterr().out.strip() == "The capital of France is Paris."
    code = main(["chat", "--base-url", "http://127.0.0.1:9", "--message", "hi"])
    err = capsys.readouterr().err
    assert code == 1 and err.startswith("lmforge: error: cannot reach") and err.count("\n") == 1


def test_client_disconnect_cancels_generation(server, default_lm):
    """Closing a stream mid-way frees the batch row instead of generating to the end."""
    url, scheduler = server
    finished_before, tokens_before = scheduler.stats.finished, scheduler.stats.generated_tokens
    with httpx.stream("POST", url + "/v1/completions", json={"model": MODEL, "prompt": "Once upon a time",
                      "max_tokens": 2000, "temperature": 0.8, "stream": True}, timeout=60) as r:
        for i, _ in enumerate(r.iter_lines()):
            if i > 3:
                break
    deadline = time.time() + 20
    while (scheduler.stats.running or scheduler.stats.finished == finished_before) and time.time() < deadline:
        time.sleep(0.05)
    assert scheduler.stats.running == 0 and scheduler.stats.finished == finished_before + 1
    assert scheduler.stats.generated_tokens - tokens_before < 500  # far from the 2000 asked for


def test_response_format_json_object(client):
    import json

    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Describe a cat as JSON with name and colour."}],
                                       response_format={"type": "json_object"}, temperature=0, max_tokens=200)
    assert r.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(r.choices[0].message.content), dict)

    schema = {"type": "object", "properties": {"name": {"type": "string"}, "legs": {"type": "integer"},
                                               "colour": {"enum": ["black", "white", "ginger"]}},
              "required": ["name", "legs", "colour"], "additionalProperties": False}
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Describe a cat."}],
                                       response_format={"type": "json_schema", "json_schema": {"name": "cat", "schema": schema,
                                                                                                "strict": True}},
                                       temperature=0.8, seed=3, max_tokens=80)
    doc = json.loads(r.choices[0].message.content)
    assert set(doc) == {"name", "legs", "colour"} and isinstance(doc["legs"], int) and doc["colour"] in schema["properties"]["colour"]["enum"]
    for bad in ({"name": "x", "schema": {"type": "string", "pattern": "a+"}}, {"name": "x"}):
        with pytest.raises(openai.BadRequestError):
            client.chat.completions.create(model=MODEL, messages=QUESTION,
                                           response_format={"type": "json_schema", "json_schema": bad})


def test_non_streaming_client_timeout_cancels_generation(server):
    url, scheduler = server
    finished_before, tokens_before = scheduler.stats.finished, scheduler.stats.generated_tokens
    with pytest.raises(httpx.TimeoutException):
        httpx.post(url + "/v1/completions", json={"model": MODEL, "prompt": "Once upon a time", "max_tokens": 2000,
                                                  "ignore_eos": True}, timeout=1.5)
    deadline = time.time() + 20
    while scheduler.stats.finished == finished_before and time.time() < deadline:
        time.sleep(0.05)
    assert scheduler.stats.finished == finished_before + 1 and scheduler.stats.running == 0
    assert scheduler.stats.generated_tokens - tokens_before < 1000


def paris_answer_ids(tokenizer) -> list[int]:
    """The chat prompt for QUESTION followed by the model's own answer: what comes next is the end token."""
    text = tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True) + "The capital of France is Paris."
    return tokenizer.encode(text, add_special_tokens=False)


def test_end_token_is_listed_in_logprobs_but_not_in_the_text(client, default_lm):
    """lm-evaluation-harness scores a prompt with echo + max_tokens=1 and drops the last entry as
    the generated token, so that entry must exist even when the generated token is the end token."""
    tok = default_lm.tokenizer
    ids = paris_answer_ids(tok)
    with torch.no_grad():
        logp = torch.log_softmax(default_lm.model(torch.tensor([ids]))[0, -1].float(), -1)
    assert int(logp.argmax()) == tok.eos_id  # the premise: greedy decoding ends here
    r = client.completions.create(model=MODEL, prompt=ids, max_tokens=1, temperature=0, echo=True, logprobs=1)
    choice, lp = r.choices[0], r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == len(ids) + 1
    assert lp.tokens[-1] == "<|im_end|>" and lp.token_logprobs[-1] == pytest.approx(logp[tok.eos_id].item(), abs=1e-4)
    assert lp.top_logprobs[-1] == {"<|im_end|>": pytest.approx(lp.token_logprobs[-1])}
    assert choice.text == tok.decode(ids) and lp.text_offset[-1] == len(choice.text)  # listed, not written
    assert choice.finish_reason == "stop" and r.usage.completion_tokens == 0

    # Generated tokens, then the end token; the same in a stream.
    r = client.completions.create(model=MODEL, prompt=ids[:-2], max_tokens=10, temperature=0, logprobs=0)
    assert r.choices[0].text == " Paris." and r.usage.completion_tokens == 2
    assert r.choices[0].logprobs.tokens == [" Paris", ".", "<|im_end|>"]
    chunks = list(client.completions.create(model=MODEL, prompt=ids[:-2], max_tokens=10, temperature=0, logprobs=0,
                                            stream=True))
    streamed = [t for c in chunks if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.tokens]
    assert streamed == [" Paris", ".", "<|im_end|>"] and "".join(c.choices[0].text for c in chunks) == " Paris."


def test_chat_logprobs_list_the_end_token(client):
    kwargs = dict(model=MODEL, messages=QUESTION, temperature=0, max_tokens=30, logprobs=True, top_logprobs=2)
    r = client.chat.completions.create(**kwargs)
    content = r.choices[0].logprobs.content
    assert r.choices[0].message.content == "The capital of France is Paris." and r.usage.completion_tokens == 7
    assert len(content) == 8 and content[-1].token == "<|im_end|>" and len(content[-1].top_logprobs) == 2
    assert "".join(c.token for c in content[:-1]) == r.choices[0].message.content
    chunks = list(client.chat.completions.create(**kwargs, stream=True))
    streamed = [c for chunk in chunks if chunk.choices and chunk.choices[0].logprobs
                for c in chunk.choices[0].logprobs.content]
    assert [c.token for c in streamed] == [c.token for c in content]
    assert [c.logprob for c in streamed] == pytest.approx([c.logprob for c in content], abs=1e-4)
    assert "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices) == "The capital of France is Paris."
