"""FAQ answers from the demo store's pages: cited, correct page, a planted page withheld (MiniLM; slow)."""

from __future__ import annotations

import shutil

import pytest

from lmforge.assistant.config import KB_DIR
from lmforge.assistant.conversations import ConversationStore
from lmforge.assistant.db import open_database
from lmforge.assistant.guarding import AssistantGuard
from lmforge.assistant.orders import DemoSize, OrderStore
from lmforge.assistant.router import Route
from lmforge.assistant.scenarios import ATTACK_DOMAIN, POISONED_PAGE
from lmforge.assistant.service import SAFE_OUTPUT_REPLY, Assistant, order_tools

pytestmark = pytest.mark.slow


class _FaqRouter:
    """Every message is a FAQ here: the answer path is under test, not the router."""

    labels = ["faq"]

    def route(self, text):
        return Route("faq", 1.0, True, {"faq": 1.0})


@pytest.fixture(scope="module")
def assistant(tmp_path_factory):
    from lmforge.agent.tools import ToolRegistry
    from lmforge.rag.answer import Answerer
    from lmforge.rag.config import AnswerOptions
    from lmforge.rag.embedder import load_embedder
    from lmforge.rag.index import build_index
    from lmforge.serve.rag import KnowledgeBase

    work = tmp_path_factory.mktemp("faq")
    shutil.copytree(KB_DIR, work / "kb")
    (work / "kb" / "shipping-update.md").write_text(POISONED_PAGE, encoding="utf-8")
    build_index([work / "kb"], work / "index", load_embedder("all-minilm-l6-v2", device="cpu"))
    knowledge = KnowledgeBase.open(str(work / "index"), "all-minilm-l6-v2", device="cpu")
    db = open_database(work / "store.db")
    orders = OrderStore(db)
    orders.seed_demo(seed=0, size=DemoSize(customers=10, orders=20))
    a = Assistant(conversations=ConversationStore(db), orders=orders, router=_FaqRouter(),
                  tools=ToolRegistry(order_tools(orders)).scope(), guard=AssistantGuard(),
                  answerer=Answerer(knowledge.retriever, None, AnswerOptions(mode="extractive")))
    yield a
    knowledge.close()
    db.close()


def test_answers_quote_the_right_page(assistant):
    reply = assistant.handle(None, "Do gift cards expire?")
    assert "never expire" in reply.text and reply.citations[0]["source"] == "gift-cards.md"
    password = assistant.handle(None, "How do I reset my password?")
    assert password.handler == "faq" and password.citations and password.text != SAFE_OUTPUT_REPLY


def test_a_page_that_gives_orders_is_not_passed_on(assistant):
    reply = assistant.handle(None, "Is there a shipping update for the holiday season?")
    assert ATTACK_DOMAIN not in reply.text
    assert reply.blocked_by == "retrieved_data" and reply.text == SAFE_OUTPUT_REPLY


def test_questions_the_pages_do_not_answer_are_refused_then_handed_off(assistant):
    first = assistant.handle(None, "What is the boiling point of tungsten?")
    assert first.handler == "faq-refused"
    second = assistant.handle(first.conversation_id, "What is the melting point of osmium?")
    assert second.handler == "handoff" and second.state == "waiting"


def test_hard_questions_go_to_the_stronger_model_behind_an_openai_endpoint(assistant):
    """A long, many-part question is answered through the configured remote endpoint (here an
    lmforge server on a tiny random model: what it writes is unsupported and falls back to
    quotes, but the request must reach it)."""
    import httpx
    import torch

    from conftest import live_server
    from lmforge.infer.remote import RemoteModel
    from lmforge.infer.scheduler import Scheduler
    from lmforge.model import ModelConfig, Transformer
    from lmforge.model.loading import resolve_tokenizer
    from lmforge.rag.answer import Answerer
    from lmforge.rag.config import AnswerOptions
    from lmforge.serve.app import ServeSettings, create_app

    tokenizer = resolve_tokenizer(None)
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=tokenizer.vocab_size, n_layer=1, n_embd=32, n_head=2, intermediate_size=64,
                         max_position_embeddings=4096, eos_token_id=tokenizer.eos_id)
    scheduler = Scheduler(Transformer(config).eval(), tokenizer, max_batch=2, max_seq_len=4096).start()
    app = create_app(scheduler, tokenizer, "strong", ServeSettings(embedding_model="none"))
    with live_server(app, scheduler) as url:
        assistant.strong_answerer = Answerer(assistant.answerer.retriever, RemoteModel(url, model="strong"),
                                             AnswerOptions(mode="generate"))
        try:
            reply = assistant.handle(None, "How long is the warranty on lamps? And does the warranty cover bulbs?")
        finally:
            assistant.strong_answerer = None
        generations = httpx.get(url + "/metrics").text
    assert reply.handler == "faq-strong"
    assert "lmforge_generation_latency_seconds_count 1.0" in generations or \
        "lmforge_generation_latency_seconds_count 2.0" in generations
    short = assistant.handle(None, "Do gift cards expire?")
    assert short.handler == "faq"
    # an endpoint that is gone: the question is answered from the pages here instead
    assistant.strong_answerer = Answerer(assistant.answerer.retriever, RemoteModel("http://127.0.0.1:9", model="x"),
                                         AnswerOptions(mode="generate"))
    try:
        fallback = assistant.handle(None, "How long is the warranty on lamps? And does the warranty cover bulbs?")
    finally:
        assistant.strong_answerer = None
    assert fallback.handler == "faq" and fallback.citations
