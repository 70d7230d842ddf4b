"""POST /v1/embeddings on a live server, driven by the official `openai` client, plain HTTP and
schemathesis; the vectors come from the real all-MiniLM-L6-v2."""

from __future__ import annotations

import json

import httpx
import numpy as np
import openai
import pytest
import torch

from lmforge.errors import LmforgeError
from lmforge.infer.scheduler import Scheduler
from lmforge.model import ModelConfig, Transformer
from lmforge.serve.app import ServeSettings, create_app
from lmforge.serve.embeddings import embedding_model_from
from tests.conftest import live_server

EMBEDDER = "all-minilm-l6-v2"
TEXTS = ["The ferry leaves at seven.", "Boats cross to the island every morning.", "機器學習需要資料。"]


@pytest.fixture(scope="module")
def embedder(minilm_dir):
    from lmforge.rag.embedder import load_embedder

    return load_embedder(EMBEDDER)


def make_app(tokenizer, **settings):
    """The real HTTP layer over a tiny random chat model (the chat routes are not under test here)."""
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=tokenizer.vocab_size, n_layer=1, n_embd=16, n_head=2, intermediate_size=32,
                         max_position_embeddings=64)
    scheduler = Scheduler(Transformer(config).eval(), tokenizer, max_batch=2, max_seq_len=64).start()
    defaults = {"allowed_hosts": ["testserver"], "embedding_model": EMBEDDER}
    return create_app(scheduler, tokenizer, "tiny-chat", ServeSettings(**{**defaults, **settings})), scheduler


@pytest.fixture(scope="module")
def served(embedder):
    app, scheduler = make_app(embedder.tokenizer, embedding_max_inputs=8, embedding_max_tokens=600)
    assert app.state.server.embeddings._embedder is None  # nothing loaded before the first request
    with live_server(app, scheduler) as url:
        yield url, app


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=served[0] + "/v1", api_key="unused", max_retries=0)


def test_openai_client_gets_the_embedders_vectors(client, embedder, served):
    r = client.embeddings.create(model=EMBEDDER, input=TEXTS)  # the client asks for base64 by default
    got = np.array([d.embedding for d in r.data], dtype=np.float32)
    assert [d.index for d in r.data] == [0, 1, 2] and r.model == EMBEDDER
    assert np.abs(got - embedder.encode(TEXTS)).max() == 0  # base64 carries the float32 bits exactly
    assert r.usage.prompt_tokens == r.usage.total_tokens == sum(embedder.count_tokens(t) for t in TEXTS)
    assert served[1].state.server.embeddings._embedder is not None  # loaded by that first request
    floats = client.embeddings.create(model=EMBEDDER, input=TEXTS[0], encoding_format="float", dimensions=384)
    # Alone or in a batch, a text gets the same vector up to float rounding (batches are packed differently).
    assert len(floats.data) == 1 and np.abs(np.array(floats.data[0].embedding) - got[0]).max() < 1e-6


def test_models_lists_the_embedding_model(client):
    assert [m.id for m in client.models.list().data] == ["tiny-chat", EMBEDDER]
    assert client.models.retrieve(EMBEDDER).id == EMBEDDER
    assert client.models.retrieve("tiny-chat").id == "tiny-chat"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("not-served")


def test_raw_base64_is_little_endian_float32(served, embedder):
    r = httpx.post(served[0] + "/v1/embeddings", json={"input": "hello", "encoding_format": "base64"})
    import base64

    raw = base64.b64decode(r.json()["data"][0]["embedding"])
    assert len(raw) == 384 * 4
    assert np.array_equal(np.frombuffer(raw, dtype="<f4"), embedder.encode(["hello"])[0])


def test_token_id_inputs(client, embedder):
    ids = [embedder.tokenizer.encode(t, add_special_tokens=False) for t in TEXTS]
    one = client.embeddings.create(model=EMBEDDER, input=ids[0])
    many = client.embeddings.create(model=EMBEDDER, input=ids)
    expected = embedder.encode(TEXTS)
    assert np.abs(np.array(one.data[0].embedding) - expected[0]).max() < 1e-6
    assert np.abs(np.array([d.embedding for d in many.data]) - expected).max() < 1e-6
    assert many.usage.prompt_tokens == sum(map(len, ids))


def test_text_the_normalizer_cleans_is_embedded_without_it(served, embedder):
    # BERT's cleaning drops control characters and lone surrogates (JSON can carry "\ud800").
    r = httpx.post(served[0] + "/v1/embeddings", content=json.dumps({"input": ["a\ud800b\x07c"]}),
                   headers={"content-type": "application/json"})
    assert r.status_code == 200
    assert np.abs(np.array(r.json()["data"][0]["embedding"]) - embedder.encode(["abc"])[0]).max() < 1e-6


def test_client_errors_are_typed(client):
    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(model="text-embedding-3-small", input="hi")
    with pytest.raises(openai.BadRequestError, match="384"):
        client.embeddings.create(model=EMBEDDER, input="hi", dimensions=256)
    with pytest.raises(openai.BadRequestError, match="reads at most 254"):
        client.embeddings.create(model=EMBEDDER, input="word " * 300)


@pytest.mark.parametrize("payload, status, words", [
    ({"input": ""}, 400, "input[0] is empty"),
    ({"input": []}, 400, "must not be empty"),
    ({"input": [[]]}, 400, "input[0] is empty"),
    ({"input": ["a"] * 9}, 400, "at most 8"),
    ({"input": ["word " * 200] * 4}, 400, "at most 600"),
    ({"input": [5, 10**9]}, 400, "outside the vocabulary"),
    ({"input": [[5], [-1]]}, 400, "input[1] holds token ids outside"),
    ({"input": ["a", 1]}, 422, "input"),
    ({"input": "a", "encoding_format": "int8"}, 422, "encoding_format"),
    ({"input": "a", "dimensions": 0}, 400, "dimensions must be 384"),
    ({"model": "gpt-9", "input": "a"}, 404, "does not exist"),
    ({}, 422, "input"),
])
def test_bad_bodies_get_openai_error_bodies(served, payload, status, words):
    r = httpx.post(served[0] + "/v1/embeddings", content=json.dumps(payload), timeout=60,
                   headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and words in err["message"]


def test_server_without_an_embedding_model(embedder):
    app, scheduler = make_app(embedder.tokenizer, embedding_model="none")
    with live_server(app, scheduler) as url:
        r = httpx.post(url + "/v1/embeddings", json={"input": "hi"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


def test_embedding_model_setting_is_checked_at_start(minilm_dir):
    assert embedding_model_from(ServeSettings()).name == EMBEDDER  # auto: the MiniLM, installed here
    assert embedding_model_from(ServeSettings(embedding_model="none")) is None
    assert embedding_model_from(ServeSettings(embedding_model=str(minilm_dir))).name == str(minilm_dir)
    with pytest.raises(LmforgeError, match="is no embedding model"):
        embedding_model_from(ServeSettings(embedding_model="smollm2-135m-instruct"))
    with pytest.raises(LmforgeError, match="unknown model"):
        embedding_model_from(ServeSettings(embedding_model="no-such-model"))
    with pytest.raises(LmforgeError, match="embedding-max-inputs"):
        ServeSettings(embedding_max_inputs=0)


def test_serve_has_the_flags():
    from lmforge.cli import build_parser

    args = build_parser().parse_args(["serve", "--embedding-model", "none", "--embedding-max-inputs", "4"])
    from lmforge.cli.common import config_from_args

    settings = config_from_args(ServeSettings, args)
    assert settings.embedding_model == "none" and settings.embedding_max_inputs == 4


def test_no_generated_body_causes_a_server_error(embedder):
    """schemathesis on /v1/embeddings, from the server's own OpenAPI document."""
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from schemathesis.checks import not_a_server_error

    app, scheduler = make_app(embedder.tokenizer, embedding_max_inputs=16, embedding_max_tokens=512)
    try:
        schema = schemathesis.openapi.from_asgi("/openapi.json", app)
        operations = [r.ok() for r in schema.get_all_operations() if r.ok().path == "/v1/embeddings"]
        assert len(operations) == 1
        seen = {"n": 0, "ok": 0}

        @given(case=operations[0].as_strategy())
        @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
        def check(case):
            response = case.call()
            seen["n"] += 1
            seen["ok"] += response.status_code == 200
            case.validate_response(response, checks=[not_a_server_error])
            assert response.status_code < 500, response.text

        check()
        assert seen["n"] >= 30 and seen["ok"] >= 1  # some generated bodies were embedded, none failed
    finally:
        scheduler.shutdown(drain=False, timeout=10)
