"""An `Assistant` assembled from its configuration: stores, router, tools, knowledge, models, guard.

    assistant = build_assistant(load_assistant_config("my-shop.yaml"))
    ...
    assistant.close()

Built once per process (the CLI's ``ask`` and ``serve``). What is missing is made or said:
an empty orders table gets the demo store when ``store.seed_demo`` is on; a missing
knowledge index is built from ``knowledge.documents`` (a few seconds for the demo's pages);
a missing router is an error that says how to train one (``lmforge assistant
train-router``), because routing on an untrained model would be guessing.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import LmforgeError
from .config import AssistantConfig


def open_knowledge(config: AssistantConfig, progress: bool = False):
    """The knowledge index (built from ``knowledge.documents`` when missing) and its retriever."""
    from ..rag.embedder import load_embedder
    from ..rag.index import build_index
    from ..rag.store import is_postgres_url
    from ..serve.rag import KnowledgeBase

    k = config.knowledge
    if not is_postgres_url(k.index) and not Path(k.index).exists():
        missing = [d for d in k.documents if not Path(d).exists()]
        if missing:
            raise LmforgeError(f"knowledge.documents: no such file or folder: {', '.join(missing)}")
        from ..io.progress import Progress

        bar = Progress("indexing", None, unit="chunks", enabled=progress)
        embedder = load_embedder(k.embedding_model, device="cpu")
        Path(k.index).parent.mkdir(parents=True, exist_ok=True)
        build_index(k.documents, k.index, embedder, progress=lambda stage, done, total: bar.update(done, total=total))
        bar.close()
    return KnowledgeBase.open(k.index, k.embedding_model, device="cpu")


def build_assistant(config: AssistantConfig, progress: bool = False, local=None, scheduler=None):
    """The assistant of `config`. `local`: the chat model already loaded (a `LoadedModel`);
    `scheduler`: a running scheduler on it, through which the model calls and the knowledge
    base's embedder then run (a server's: shared batches, one thread running PyTorch)."""
    from ..agent.tools import ToolRegistry
    from ..infer.loaded import load
    from ..rag.answer import Answerer
    from ..rag.config import AnswerOptions
    from .conversations import ConversationStore
    from .db import open_database
    from .orders import OrderStore
    from .prompts import PromptRegistry, ResponseCache, TrafficSplit
    from .router import IntentRouter
    from .service import Assistant, order_tools

    router = IntentRouter.load(config.router.path)  # first: the cheapest thing to be missing
    db = open_database(config.store.url)
    closers = [db.close]
    try:
        orders = OrderStore(db)
        if config.store.seed_demo and not orders.order_ids():
            orders.seed_demo()
        registry = PromptRegistry(db)
        variant = registry.publish(config.prompts.name, config.prompts.text)
        split = TrafficSplit(config.prompts.split) if config.prompts.split else None
        if split is not None:
            for name in split.weights:
                registry.text(name)  # every variant of the split must be published
        tools = ToolRegistry(order_tools(orders)).scope(config.tools.allow)
        knowledge = open_knowledge(config, progress)
        closers.append(knowledge.close)
        local = local or load(config.models.local, dtype="float32", device="cpu")
        chat, retriever = local, knowledge.retriever
        if scheduler is not None:
            from .server import SchedulerChat

            chat, retriever = SchedulerChat(scheduler, local.tokenizer, local.name), knowledge.served_by(scheduler)
        strong = None
        if config.models.strong_url:  # hard questions: the stronger model writes, checked against the pages
            from ..infer.remote import RemoteModel

            remote = RemoteModel(config.models.strong_url, os.environ.get(config.models.strong_api_key_env),
                                 config.models.strong_model)
            strong = Answerer(retriever, remote, AnswerOptions(mode="generate"))
        assistant = Assistant(
            conversations=ConversationStore(db), orders=orders, router=router, tools=tools,
            answerer=Answerer(retriever, chat, AnswerOptions(mode=config.knowledge.answer_mode)), chat_model=chat,
            strong_answerer=strong,
            guard=build_guard(config), registry=registry, split=split,
            cache=ResponseCache(config.prompts.cache_entries) if config.prompts.cache_entries else None,
            system_prompt=config.prompts.text, prompt_variant=variant, handoff=config.handoff,
            max_new_tokens=config.models.max_new_tokens)
    except BaseException:
        for close in reversed(closers):
            close()
        raise
    assistant.closers = closers
    return assistant


def build_guard(config: AssistantConfig):
    """The defense layers the configuration switches on (lmforge/guard)."""
    from .guarding import AssistantGuard

    return AssistantGuard.from_config(config.guard, keep_original=config.store.keep_original)
