"""Property-based fuzzing of the HTTP API from its own OpenAPI description: no input gives a 5xx.

The server runs a tiny random model with the default model's tokenizer and chat
template, so thousands of generated requests finish in seconds; the HTTP layer, request
validation and the scheduler are the real ones.
"""

from __future__ import annotations

import pytest
import schemathesis
import torch
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error

from lmforge.infer.scheduler import Scheduler
from lmforge.model import ModelConfig, Transformer
from lmforge.serve.app import ServeSettings, create_app


def tiny_app(tokenizer):
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=tokenizer.vocab_size, n_layer=1, n_embd=32, n_head=2, intermediate_size=64,
                         max_position_embeddings=256, eos_token_id=tokenizer.eos_id)
    model = Transformer(config).eval()
    scheduler = Scheduler(model, tokenizer, max_batch=4, max_waiting=64).start()
    # "testserver": the host name Starlette's test client and schemathesis put in every request.
    settings = ServeSettings(max_tokens_limit=8, allowed_hosts=["testserver"])
    return create_app(scheduler, tokenizer, "tiny", settings), scheduler


@pytest.fixture(scope="module")
def fuzz_app(default_lm):
    app, scheduler = tiny_app(default_lm.tokenizer)
    yield app
    scheduler.shutdown(drain=False, timeout=10)


def test_openapi_document_lists_the_api(fuzz_app):
    from starlette.testclient import TestClient

    spec = TestClient(fuzz_app).get("/openapi.json").json()
    for path in ("/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics"):
        assert path in spec["paths"]


def test_no_input_causes_a_server_error(fuzz_app):
    schema = schemathesis.openapi.from_asgi("/openapi.json", fuzz_app)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 5
    calls = {"n": 0}
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(max_examples=50, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
        def check(case):
            response = case.call()
            calls["n"] += 1
            case.validate_response(response, checks=[not_a_server_error])
            assert response.status_code < 500

        check()
    assert calls["n"] >= 100
