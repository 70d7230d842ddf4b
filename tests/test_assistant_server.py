"""The assistant over HTTP, through the official openai client and the hand-off desk's API.

A tiny random model stands in for the chat model (only small talk reaches it here); the
router is tests/conftest.py's `intent_router` (hashed n-grams), the store is the real
demo store.
"""

from __future__ import annotations

import httpx
import openai
import pytest
import torch

from lmforge.assistant.conversations import ConversationStore
from lmforge.assistant.db import open_database
from lmforge.assistant.orders import DemoSize, OrderStore
from lmforge.assistant.server import SchedulerChat, create_assistant_app
from lmforge.assistant.service import HANDOFF_REPLY, Assistant, order_tools
from tests.conftest import live_server


@pytest.fixture(scope="module")
def server(tmp_path_factory, intent_router):
    from lmforge.agent.tools import ToolRegistry
    from lmforge.infer.scheduler import Scheduler
    from lmforge.model.config import ModelConfig
    from lmforge.model.loading import resolve_tokenizer
    from lmforge.model.transformer import Transformer

    tokenizer = resolve_tokenizer(None)
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=tokenizer.vocab_size, n_layer=2, n_embd=32, n_head=4, n_kv_head=2,
                                    intermediate_size=64, max_position_embeddings=512)).eval()
    scheduler = Scheduler(model, tokenizer, max_seq_len=512, max_batch=4).start()
    db = open_database(tmp_path_factory.mktemp("assistant") / "store.db")
    orders = OrderStore(db)
    orders.seed_demo(seed=0, size=DemoSize(customers=30, orders=80))
    assistant = Assistant(conversations=ConversationStore(db), orders=orders, router=intent_router,
                          tools=ToolRegistry(order_tools(orders)).scope(),
                          chat_model=SchedulerChat(scheduler, tokenizer, "tiny"), max_new_tokens=8)
    app = create_assistant_app(assistant, scheduler, tokenizer, "tiny")
    with live_server(app, scheduler) as url:
        yield url, assistant
    db.close()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="unused", max_retries=0)


def test_a_conversation_through_the_openai_client(server, client):
    _, assistant = server
    order_id = assistant.orders.order_ids("delivered")[0]
    first = client.chat.completions.create(model="assistant",
                                           messages=[{"role": "user", "content": f"Where is my order {order_id}?"}])
    extra = first.model_extra
    assert order_id in first.choices[0].message.content and extra["intent"] == "order_status"
    conversation = extra["conversation_id"]
    stream = client.chat.completions.create(model="assistant", stream=True, extra_body={"conversation_id": conversation},
                                            messages=[{"role": "user", "content": "hi"}])
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert chunks[-1].model_extra["conversation_id"] == conversation and chunks[-1].choices[0].finish_reason == "stop"
    assert text and chunks[-1].model_extra["handler"] == "chit-chat"
    stored = assistant.conversations.messages(conversation)
    assert [m["role"] for m in stored] == ["user", "assistant", "user", "assistant"] and stored[3]["content"] == text
    rated = httpx.post(server[0] + "/v1/assistant/feedback",
                       json={"conversation_id": conversation, "message_index": extra["message_index"], "rating": 1})
    assert rated.status_code == 200 and rated.json()["ok"]


def test_a_hand_off_through_the_desk(server, client):
    url, assistant = server
    reply = client.chat.completions.create(model="assistant", messages=[{"role": "user", "content": "human please"}])
    extra = reply.model_extra
    assert reply.choices[0].message.content == HANDOFF_REPLY and extra["state"] == "waiting"
    ticket, conversation = extra["handoff_ticket"], extra["conversation_id"]
    queue = httpx.get(url + "/v1/assistant/handoffs").json()["queue"]
    assert ticket in [t["id"] for t in queue]
    taken = httpx.post(f"{url}/v1/assistant/handoffs/{ticket}/take", json={"agent": "maria"})
    assert taken.status_code == 200 and taken.json()["messages"][0]["content"] == "human please"
    assert httpx.post(f"{url}/v1/assistant/handoffs/{ticket}/take", json={"agent": "li"}).status_code == 409
    assert httpx.post(f"{url}/v1/assistant/handoffs/{ticket}/reply",
                      json={"agent": "li", "text": "hi"}).status_code == 409  # maria has it
    sent = httpx.post(f"{url}/v1/assistant/handoffs/{ticket}/reply", json={"agent": "maria", "text": "Maria here."})
    index = sent.json()["message_index"]
    seen = httpx.get(f"{url}/v1/assistant/conversations/{conversation}", params={"after": index - 1}).json()
    assert seen["state"] == "human" and seen["messages"][0]["content"] == "Maria here."
    quiet = client.chat.completions.create(model="assistant", extra_body={"conversation_id": conversation},
                                           messages=[{"role": "user", "content": "thanks"}])
    assert quiet.choices[0].message.content == "" and quiet.model_extra["handler"] == "human"
    done = httpx.post(f"{url}/v1/assistant/handoffs/{ticket}/resolve", json={"resolution": "answered"})
    assert done.status_code == 200 and assistant.conversations.state(conversation) == "closed"
    assert httpx.post(f"{url}/v1/assistant/handoffs/{ticket}/resolve", json={"resolution": "x"}).status_code == 409
    sft, _ = assistant.conversations.flywheel()
    assert any(r["messages"][-1]["content"] == "Maria here." for r in sft)


@pytest.mark.parametrize("path, body, status", [
    ("/v1/chat/completions", {"model": "assistant", "messages": []}, 422),
    ("/v1/chat/completions", {"model": "assistant", "messages": [{"role": "system", "content": "x"}]}, 400),
    ("/v1/chat/completions", {"model": "assistant", "messages": [{"role": "user", "content": "  "}]}, 400),
    ("/v1/chat/completions", {"model": "gpt-4", "messages": [{"role": "user", "content": "hi"}]}, 404),
    ("/v1/chat/completions", {"model": "assistant", "conversation_id": "nope",
                              "messages": [{"role": "user", "content": "hi"}]}, 404),
    ("/v1/chat/completions", {"model": "assistant", "conversation_id": "../../etc",
                              "messages": [{"role": "user", "content": "hi"}]}, 400),
    ("/v1/chat/completions", {"model": "assistant", "messages": [{"role": "user", "content": "x" * 5000}]}, 400),
    ("/v1/assistant/feedback", {"conversation_id": "nope", "message_index": 0, "rating": 1}, 404),
    ("/v1/assistant/feedback", {"conversation_id": "nope", "message_index": 0, "rating": 7}, 422),
    ("/v1/assistant/handoffs/999999/take", {"agent": "maria"}, 404),
    ("/v1/assistant/handoffs/abc/take", {"agent": "maria"}, 422),
    ("/v1/assistant/handoffs/1/resolve", {"resolution": ""}, 422),
])
def test_bad_requests_are_4xx_with_openai_error_bodies(server, path, body, status):
    response = httpx.post(server[0] + path, json=body)
    assert response.status_code == status, response.text
    assert response.json()["error"]["message"]


def test_pages_are_served(server):
    url, _ = server
    for page, marker in (("/assistant", "chat.js"), ("/agent", "agent.js")):
        response = httpx.get(url + page)
        assert response.status_code == 200 and marker in response.text
        assert "default-src 'self'" in response.headers["content-security-policy"]
    assert httpx.get(url + "/assistant/static/chat.js").status_code == 200
    assert httpx.get(url + "/assistant/static/../server.py").status_code == 404
    assert httpx.get(url + "/v1/assistant/conversations/" + "x" * 100).status_code == 404


def test_the_assistant_events_reach_the_metrics(server, client):
    url, _ = server
    client.chat.completions.create(model="assistant", messages=[{"role": "user", "content": "get me an agent"}])
    text = httpx.get(url + "/metrics").text
    assert 'lmforge_intents_total{intent="handoff"}' in text
    assert 'lmforge_escalations_total{reason="the customer asked for a person"}' in text
