"""`lmforge serve`: run the OpenAI-compatible server on a model."""

from __future__ import annotations

import argparse
import ipaddress
import os
import signal
import socket
import sys

from lmforge.cli.common import add_device_flags, add_model_argument, load_model
from lmforge.errors import LmforgeError


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("serve", help="serve a model over an OpenAI-compatible HTTP API")
    add_model_argument(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", action="append", default=[],
                   help="accepted API key (repeatable; also LMFORGE_API_KEYS, comma-separated); "
                        "required when binding to a non-loopback address")
    p.add_argument("--max-batch", type=int, default=16, help="requests decoded together (KV-cache rows)")
    p.add_argument("--max-waiting", type=int, default=64, help="requests queued beyond the batch before 429")
    p.add_argument("--max-seq-len", type=int, default=None, help="tokens per request, prompt included (default: the model's context, at most 4096)")
    p.add_argument("--prefix-cache-mb", type=float, default=128,
                   help="memory for keys/values of prompt prefixes seen before, reused by later requests "
                        "that start the same way (default 128; 0 = off)")
    p.add_argument("--max-tokens-limit", type=int, default=4096, help="largest max_tokens a client may ask for")
    p.add_argument("--rate-limit", type=int, default=0, help="requests per minute per API key (0 = unlimited)")
    p.add_argument("--log-prompts", action="store_true", help="include prompt text in request logs")
    p.add_argument("--db", default="lmforge-serve.db", metavar="PATH",
                   help="SQLite file keeping the web chat's conversations and feedback, created if missing "
                        "(default: lmforge-serve.db in the current directory)")
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
    keys = list(args.api_key) + [k for k in os.environ.get("LMFORGE_API_KEYS", "").split(",") if k.strip()]
    if not is_loopback(args.host) and not keys:
        raise LmforgeError(f"binding to {args.host} exposes the server to the network: give --api-key "
                           "(or LMFORGE_API_KEYS), or bind to 127.0.0.1")
    if args.max_batch < 1 or args.max_waiting < 0 or args.prefix_cache_mb < 0:
        raise LmforgeError("--max-batch must be >= 1, --max-waiting and --prefix-cache-mb >= 0")
    import logging

    import uvicorn

    from lmforge.infer.scheduler import Scheduler
    from lmforge.serve.app import ServeSettings, create_app
    from lmforge.serve.feedback import FeedbackStore

    store = FeedbackStore(args.db)  # opened first: a bad path fails before the model loads
    lm = load_model(args, remote=False)
    max_len = args.max_seq_len or min(lm.config.max_position_embeddings, 4096)
    scheduler = Scheduler(lm.model, lm.tokenizer, max_batch=args.max_batch, max_seq_len=max_len,
                          max_waiting=args.max_waiting, prefix_cache_bytes=int(args.prefix_cache_mb * 2**20)).start()
    settings = ServeSettings(api_keys=keys, rate_limit_per_minute=args.rate_limit,
                             max_tokens_limit=args.max_tokens_limit, log_prompts=args.log_prompts)
    app = create_app(scheduler, lm.tokenizer, lm.name, settings, store=store)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    shown = "127.0.0.1" if args.host in ("0.0.0.0", "::") else args.host
    print(f"lmforge serving {lm.name} at http://{shown}:{args.port}/ (OpenAI API at /v1)", file=sys.stderr, flush=True)
    # uvicorn stops accepting on SIGTERM, lets in-flight requests (and streams) finish, then
    # re-raises the signal; this handler turns that into a clean exit instead of a kill.
    signal.signal(signal.SIGTERM, _exit_cleanly)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning", timeout_graceful_shutdown=30)
    except SystemExit as exc:
        if exc.code not in (0, None):
            raise
    finally:
        scheduler.shutdown(drain=False, timeout=10)
        store.close()
    print("lmforge server stopped", file=sys.stderr)
    return 0


def _exit_cleanly(signum, frame) -> None:
    raise SystemExit(0)
