"""`lmforge serve`: run the OpenAI-compatible server on a model."""

from __future__ import annotations

import argparse
import ipaddress
import os
import signal
import socket
import sys

from lmforge.cli.common import add_config_flags, add_device_flags, add_model_argument, config_from_args, load_local
from lmforge.errors import LmforgeError


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("serve", help="serve a model over an OpenAI-compatible HTTP API")
    add_model_argument(p)
    from lmforge.serve.config import ServeRuntime, ServeSettings, SpeculativeOptions

    add_config_flags(p, ServeSettings, "service policy")
    add_config_flags(p, ServeRuntime, "runtime")
    add_config_flags(p, SpeculativeOptions, "speculative decoding")
    add_device_flags(p)
    p.set_defaults(func=run)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        try:
            return ipaddress.ip_address(socket.gethostbyname(host)).is_loopback
        except OSError:
            return False


def run(args: argparse.Namespace) -> int:
    from lmforge.serve.config import ServeRuntime, ServeSettings, SpeculativeOptions

    settings = config_from_args(ServeSettings, args)
    speculative = config_from_args(SpeculativeOptions, args)
    settings.api_keys += [k for k in os.environ.get("LMFORGE_API_KEYS", "").split(",") if k.strip()]
    runtime = config_from_args(ServeRuntime, args)
    if not is_loopback(settings.host) and not settings.api_keys:
        raise LmforgeError(f"binding to {settings.host} exposes the server to the network: give --api-key "
                           "(or LMFORGE_API_KEYS), or bind to 127.0.0.1")
    import logging

    from lmforge.cli.generate import use_speculation
    from lmforge.infer.scheduler import Scheduler
    from lmforge.serve.adapters import install_adapters
    from lmforge.serve.app import create_app
    from lmforge.serve.embeddings import embedding_model_from
    from lmforge.serve.feedback import FeedbackStore

    embeddings = embedding_model_from(settings)  # a bad --embedding-model fails before the model loads
    store = FeedbackStore(runtime.db)  # opened first: a bad path fails before the model loads
    knowledge = None
    vision = None
    translator = None
    try:
        if runtime.vlm is not None and runtime.translator is not None:
            raise LmforgeError("--vlm and --translator cannot be combined yet: serve them from two servers")
        if runtime.translator is not None:  # a bad directory fails before the model loads
            from lmforge.serve.translation import Translator

            translator = Translator(runtime.translator, num_beams=runtime.translator_beams)
        if runtime.vlm is not None:  # a bad checkpoint fails before the model loads
            from lmforge.serve.vision import VisionChat

            vision = VisionChat(runtime.vlm)
        if settings.rag is not None:  # a bad index fails before the model loads, too
            knowledge = _open_knowledge_base(settings, args)
        lm = load_local(args.model, args)
        adapters = install_adapters(lm.model, lm.spec, runtime.adapters)  # checked before serving
        speculator = use_speculation(lm, speculative)  # a bad --draft-model fails before serving
    except BaseException:
        store.close()
        if knowledge is not None:
            knowledge.close()
        raise
    max_len = runtime.max_seq_len or min(lm.config.max_position_embeddings, 4096)
    scheduler = Scheduler(lm.model, lm.tokenizer, max_batch=runtime.max_batch, max_seq_len=max_len,
                          max_waiting=runtime.max_waiting,
                          prefix_cache_bytes=int(runtime.prefix_cache_mb * 2**20), adapters=adapters,
                          speculator=speculator, prefill_chunk=runtime.prefill_chunk, kv_cache=runtime.kv_cache,
                          kv_block_size=runtime.kv_block_size,
                          kv_memory_bytes=int(runtime.kv_memory_mb * 2**20)).start()
    routers = []
    if vision is not None:
        from lmforge.serve.vision import vision_router

        routers.append(vision_router(vision))
    if translator is not None:
        from lmforge.serve.translation import translator_router

        routers.append(translator_router(translator))
    app = create_app(scheduler, lm.tokenizer, lm.name, settings, store=store, knowledge=knowledge, routers=routers)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    shown = "127.0.0.1" if settings.host in ("0.0.0.0", "::") else settings.host
    print(f"lmforge serving {lm.name} at http://{shown}:{runtime.port}/ (OpenAI API at /v1)", file=sys.stderr, flush=True)
    for adapter in adapters.adapters if adapters is not None else []:
        print(f"adapter: {adapter.name} (LoRA r={adapter.rank}, {len(adapter.layers)} layers, from {adapter.source}); "
              f"request it as model {adapter.name} or {lm.name}:{adapter.name}", file=sys.stderr, flush=True)
    if translator is not None:
        print(f"translator: {translator.name} ({translator.model.config.family}, {translator.num_beams} beams) "
              f"answers requests that name it as their model", file=sys.stderr, flush=True)
    if vision is not None:
        print(f"images: {vision.name} ({vision.task}) answers chat requests with an image_url part, or that name "
              f"it as their model", file=sys.stderr, flush=True)
    if embeddings is not None:
        print(f"embeddings: {embeddings.name} at /v1/embeddings (loaded on the first request)", file=sys.stderr,
              flush=True)
    if knowledge is not None:
        print(f"knowledge base: {knowledge.describe()}; chat answers cite it ({settings.rag_answer} answers; "
              "\"rag\": false in a request talks to the bare model)", file=sys.stderr, flush=True)
    try:
        run_until_stopped(app, settings.host, runtime.port)
    finally:
        scheduler.shutdown(drain=False, timeout=10)
        store.close()
        if knowledge is not None:
            knowledge.close()
    print("lmforge server stopped", file=sys.stderr)
    return 0


def _open_knowledge_base(settings, args: argparse.Namespace):
    """The --rag index with its embedder; the handbook is indexed on first use, with a progress line."""
    from lmforge.io.progress import Progress
    from lmforge.serve.app import explicit_embedding_model
    from lmforge.serve.rag import KnowledgeBase

    line = Progress("indexing the handbook (first use)", unit="chunks")
    device = None if getattr(args, "device", "auto") == "auto" else args.device
    try:
        return KnowledgeBase.open(settings.rag, explicit_embedding_model(settings), device=device,
                                  progress=lambda stage, done, total: line.update(done, total=total))
    finally:
        line.close()


def _exit_cleanly(signum, frame) -> None:
    raise SystemExit(0)


def run_until_stopped(app, host: str, port: int) -> None:
    """Serve `app` until Ctrl-C or SIGTERM. uvicorn stops accepting on SIGTERM, lets in-flight
    requests (and streams) finish, then re-raises the signal; the handler turns that into a
    clean exit instead of a kill."""
    import uvicorn

    signal.signal(signal.SIGTERM, _exit_cleanly)
    try:
        uvicorn.run(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=30)
    except SystemExit as exc:
        if exc.code not in (0, None):
            raise
