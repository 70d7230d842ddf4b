"""``lmforge assistant``: the customer-service assistant and what it is built from.

    lmforge assistant data --out runs/data/intents       # generated intent messages (split by template)
    lmforge assistant train-router                       # train, calibrate and test the intent router
    lmforge assistant ask "where is my order A10042?"    # one message through the whole flow
    lmforge assistant ask --conversation ID "thanks"     # continue a conversation
    lmforge assistant serve                              # OpenAI API, chat page, agents' desk
    lmforge assistant golden                             # golden set vs the last run; exit 2 on a regression
    lmforge assistant flywheel --out DIR                 # corrections and hand-offs as SFT / preference data
    lmforge assistant variants                           # the prompt A/B split's results

The assistant's settings come from a YAML file (``--config FILE``; the defaults are the
demo store) and every field is also a flag ``--SECTION.FIELD VALUE`` (see
lmforge/assistant/config.py).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from lmforge.cli.common import add_recipe_fields, recipe_overrides

INTENT_DATA = "runs/data/intents"


def _config(args: argparse.Namespace):
    from lmforge.assistant.config import load_assistant_config

    overrides = recipe_overrides(args)
    overrides.pop("train.out", None)  # --out here names an output of the subcommand, not a training run
    return load_assistant_config(args.config, overrides)


def cmd_data(args: argparse.Namespace) -> int:
    from lmforge.assistant.intents import write_intent_dataset

    info = write_intent_dataset(args.out or INTENT_DATA, seed=args.seed)
    counts = {split: sum(c.values()) for split, c in info["counts"].items()}
    print(f"intents: {', '.join(f'{s} {n}' for s, n in counts.items())} messages, {len(info['labels'])} intents "
          f"-> {args.out or INTENT_DATA}/{{train,validation,test}}.jsonl")
    return 0


def cmd_train_router(args: argparse.Namespace) -> int:
    from lmforge.assistant.router import IntentRouter
    from lmforge.cli.common import find_recipe
    from lmforge.tune.classify import classify, load_classify_recipe
    from lmforge.tune.sft_data import read_jsonl

    config = _config(args)
    data = Path(args.out or INTENT_DATA)
    if not (data / "train.jsonl").is_file():
        cmd_data(argparse.Namespace(out=str(data), seed=args.seed))
    recipe = load_classify_recipe(find_recipe("classify-intents-minilm"),
                                  {"data.dataset": str(data), "train.out": config.router.path,
                                   **({"train.max_steps": args.steps} if args.steps else {})})
    if not args.calibrate_only:
        classify(recipe, progress=not args.quiet)
    router = IntentRouter.load(config.router.path)
    calibration = router.calibrate(read_jsonl(data / "validation.jsonl"), config.router.max_error)
    router.save_settings(config.router.path)
    test = read_jsonl(data / "test.jsonl")
    routes = router.route_many([r["text"] for r in test])
    right = [r.intent == t["label"] for r, t in zip(routes, test)]
    accepted = [ok for ok, r in zip(right, routes) if r.confident]
    result = {"router": config.router.path, "calibration": calibration, "test_accuracy": sum(right) / len(right),
              "test_coverage": len(accepted) / len(test),
              "test_accepted_accuracy": (sum(accepted) / len(accepted)) if accepted else None}
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"router {config.router.path}: test accuracy {result['test_accuracy']:.3f} on {len(test)} held-out "
          f"messages; confidence floor {calibration['threshold']:.3f} (error budget {config.router.max_error:.0%} on "
          f"the validation split): {result['test_coverage']:.1%} of test messages routed, "
          + (f"{result['test_accepted_accuracy']:.3f} of them correctly" if accepted else "none routed"))
    print(f"confusion matrix: {Path(config.router.path) / 'metrics.md'}")
    return 0


def cmd_ask(args: argparse.Namespace) -> int:
    from lmforge.assistant.build import build_assistant

    if not args.message:
        from lmforge.errors import LmforgeError

        raise LmforgeError("assistant ask: give the customer's MESSAGE")
    assistant = build_assistant(_config(args), progress=not args.quiet)
    try:
        reply = assistant.handle(args.conversation, " ".join(args.message))
    finally:
        assistant.close()
    if args.json:
        print(json.dumps(reply.to_dict()))
        return 0
    print(reply.text)
    for c in reply.citations:
        print(f"  [{c['number']}] {c['source']}" + (f" ({' > '.join(h for h in c['headings'] if h)})"
                                                    if c["headings"] else ""))
    print(f"-- intent {reply.intent} ({reply.confidence or 0:.2f}), handler {reply.handler}, conversation "
          f"{reply.conversation_id} ({reply.state})")
    return 0


GOLDEN = Path(__file__).resolve().parents[1] / "assistant" / "data" / "golden.jsonl"
GOLDEN_RUNS = "runs/assistant/golden"


def _staging_copy(url: str, directory: Path) -> str:
    """A copy of a SQLite store for a golden run: its conversations and hand-offs stay out of the real one."""
    import sqlite3

    from lmforge.assistant.db import is_postgres_url
    from lmforge.errors import LmforgeError

    if is_postgres_url(url):
        raise LmforgeError("golden runs answer through a copy of the store; for PostgreSQL give a staging database "
                           "with --store.url and --staging false")
    copy = directory / "store.db"
    source = Path(url.removeprefix("sqlite:///"))
    target = sqlite3.connect(copy)
    if source.is_file():
        with sqlite3.connect(source) as original:
            original.backup(target)
    target.close()
    return str(copy)


def cmd_golden(args: argparse.Namespace) -> int:
    import tempfile
    import time

    from lmforge.assistant.build import build_assistant
    from lmforge.monitor.config import GoldenOptions
    from lmforge.monitor.golden import compare, format_comparison, load_run, read_golden, run_golden, save_run

    config = _config(args)
    items = read_golden(args.golden or GOLDEN)
    options = GoldenOptions()
    runs = Path(args.runs)
    earlier = sorted(runs.glob("*.json"))
    baseline = Path(args.against) if args.against else (earlier[-1] if earlier else None)
    with tempfile.TemporaryDirectory(prefix="lmforge-golden-") as tmp:
        if args.staging:
            config.store.url = _staging_copy(config.store.url, Path(tmp))
        assistant = build_assistant(config, progress=not args.quiet)
        try:
            run = run_golden(items, lambda item: assistant.handle(None, item.question).text, options,
                             name=args.name or time.strftime("%Y%m%d-%H%M%S"), model=config.models.local or "default")
        finally:
            assistant.close()
    run["settings"]["assistant"] = config.to_dict()
    runs.mkdir(parents=True, exist_ok=True)
    saved = save_run(run, runs / f"{run['name']}.json")
    summary = run["summary"]
    print(f"golden run {saved}: score {summary['mean_score']:.3f}, {summary['pass_rate']:.0%} of {summary['items']} "
          "items passed")
    if baseline is None:
        print("no earlier run to compare with: this one is the baseline")
        return 0
    report = compare(load_run(baseline), run, options)
    print(f"against {baseline}:")
    print(format_comparison(report))
    return 2 if report["regressed"] or report["regressed_items"] else 0


def cmd_train_guard(args: argparse.Namespace) -> int:
    """The guard's classifiers trained with this assistant's customer messages as benign text."""
    from lmforge.assistant.guard_training import train_assistant_guard
    from lmforge.cli.common import find_recipe
    from lmforge.guard.train import load_guard_recipe

    config = load_guard_recipe(find_recipe("guard-classifiers"), {"train.out": args.out})
    report = train_assistant_guard(config, progress=not args.quiet, seed=args.seed)
    if args.json:
        print(json.dumps(report["held_out"]))
        return 0
    held = report["held_out"]
    print(f"guard classifiers -> {args.out} (use them: --guard.models {args.out} --guard.classifier true "
          "--guard.moderation true)")
    print("| layers | attack success | false positives | of them on data |\n|---|---:|---:|---:|")
    for name, row in held["ablation"]["layers"].items():
        data_fp = "-" if row["false_positive_data"] is None else f"{row['false_positive_data']:.1%}"
        print(f"| {name} | {row['attack_success']:.1%} | {row['false_positive']:.1%} | {data_fp} |")
    print(f"held-out customer messages flagged (all layers): {held['customer_false_positive']:.1%} of "
          f"{held['customer_messages']}; by intent: "
          + ", ".join(f"{k} {v:.1%}" for k, v in held["customer_false_positive_by_intent"].items()))
    return 0


def cmd_flywheel(args: argparse.Namespace) -> int:
    """Corrections, thumbs-up answers and resolved hand-offs as SFT and preference JSONL files."""
    from lmforge.assistant.conversations import ConversationStore
    from lmforge.assistant.db import open_database
    from lmforge.io.atomic import write_text_atomic

    config = _config(args)
    db = open_database(config.store.url)
    try:
        sft, pairs = ConversationStore(db).flywheel()
    finally:
        db.close()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "sft.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in sft))
    write_text_atomic(out / "preferences.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in pairs))
    print(f"{len(sft)} SFT conversations -> {out / 'sft.jsonl'} (lmforge finetune: data.train), {len(pairs)} "
          f"preference pairs -> {out / 'preferences.jsonl'} (lmforge align dpo: data)")
    return 0


def cmd_variants(args: argparse.Namespace) -> int:
    """Per prompt variant: conversations, thumbs-up rate, hand-off rate, and the two-variant test."""
    from lmforge.assistant.db import open_database
    from lmforge.assistant.prompts import PromptRegistry

    config = _config(args)
    db = open_database(config.store.url)
    try:
        results = PromptRegistry(db).results()
    finally:
        db.close()
    if args.json:
        print(json.dumps(results))
        return 0
    if not results:
        print("no conversations with a prompt variant yet")
        return 0
    print("| variant | conversations | rated | thumbs up | hand-off rate |\n|---|---:|---:|---:|---:|")
    for name, r in sorted(results.items()):
        up = "-" if r["up_rate"] is None else f"{r['up_rate']:.1%}"
        print(f"| {name} | {r['conversations']} | {r['rated']} | {up} | {r['handoff_rate']:.1%} |")
    first = next(iter(results.values()))
    if first.get("up_rate_p") is not None:
        print(f"thumbs-up rates differ: z = {first['up_rate_z']:.2f}, two-sided p = {first['up_rate_p']:.3f}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    import os
    import sys

    from lmforge.assistant.build import build_assistant
    from lmforge.assistant.server import MODEL_NAME, create_assistant_app
    from lmforge.errors import LmforgeError
    from lmforge.infer.loaded import load
    from lmforge.infer.scheduler import Scheduler
    from lmforge.cli.serve import is_loopback, run_until_stopped
    from lmforge.serve.config import ServeSettings

    config = _config(args)
    settings = ServeSettings(host=args.host, api_keys=list(args.api_key or []))
    settings.api_keys += [k for k in os.environ.get("LMFORGE_API_KEYS", "").split(",") if k.strip()]
    if not is_loopback(settings.host) and not settings.api_keys:
        raise LmforgeError(f"binding to {settings.host} exposes the assistant to the network: give --api-key "
                           "(or LMFORGE_API_KEYS), or bind to 127.0.0.1")
    local = load(config.models.local, dtype="float32", device="cpu")
    scheduler = Scheduler(local.model, local.tokenizer, max_batch=args.max_batch,
                          max_seq_len=min(local.config.max_position_embeddings, 4096)).start()
    try:
        assistant = build_assistant(config, progress=not args.quiet, local=local, scheduler=scheduler)
    except BaseException:
        scheduler.shutdown(drain=False, timeout=10)
        raise
    app = create_assistant_app(assistant, scheduler, local.tokenizer, local.name, settings)
    shown = "127.0.0.1" if settings.host in ("0.0.0.0", "::") else settings.host
    print(f"lmforge assistant at http://{shown}:{args.port}/assistant (agents: /agent, dashboard: /dashboard; "
          f"OpenAI API at /v1 as model {MODEL_NAME!r})", file=sys.stderr, flush=True)
    try:
        run_until_stopped(app, settings.host, args.port)
    finally:
        scheduler.shutdown(drain=False, timeout=10)
        assistant.close()
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    from lmforge.assistant.config import option_names

    p = subparsers.add_parser(
        "assistant", help="the customer-service assistant: intent data, router, one-shot questions",
        description="The customer-service assistant (lmforge/assistant/): generate its intent data, train its "
                    "router, ask it a question. Settings: --config FILE (YAML; default: the demo store), and every "
                    "field as --SECTION.FIELD VALUE.")
    sub = p.add_subparsers(dest="assistant_command", required=True, metavar="COMMAND")

    def common(q: argparse.ArgumentParser) -> None:
        q.add_argument("--config", help="the assistant's YAML configuration (default: the demo store)")
        q.add_argument("--json", action="store_true", help="print the result as one JSON object")
        q.add_argument("--quiet", action="store_true", help="no progress output")
        add_recipe_fields(q, option_names())

    q = sub.add_parser("data", help="write the generated intent messages (split by template)")
    q.add_argument("--out", help=f"output directory (default {INTENT_DATA})")
    q.add_argument("--seed", type=int, default=0, help="generation seed (default 0)")
    q.set_defaults(func=cmd_data)

    q = sub.add_parser("train-router", help="train the intent router (MiniLM + head), calibrate its floor, test it")
    q.add_argument("--out", help=f"intent data directory (default {INTENT_DATA}; written when missing)")
    q.add_argument("--seed", type=int, default=0, help="data generation seed (default 0)")
    q.add_argument("--steps", type=int, help="training steps (default: the recipe's)")
    q.add_argument("--calibrate-only", action="store_true", help="only recalibrate and test a trained router")
    common(q)
    q.set_defaults(func=cmd_train_router)

    q = sub.add_parser("serve", help="serve the assistant: OpenAI API, customer chat, agents' hand-off desk")
    q.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    q.add_argument("--port", type=int, default=8000, help="TCP port (default 8000)")
    q.add_argument("--api-key", action="append", metavar="KEY", help="accepted API key (repeatable)")
    q.add_argument("--max-batch", type=int, default=16, help="requests decoded together (default 16)")
    common(q)
    q.set_defaults(func=cmd_serve)

    q = sub.add_parser("golden", help="answer the golden set, compare with the last run, flag regressions (exit 2)")
    q.add_argument("--golden", help="a golden-set JSONL file (default: the demo store's)")
    q.add_argument("--runs", default=GOLDEN_RUNS, help=f"where runs are kept (default {GOLDEN_RUNS})")
    q.add_argument("--against", help="compare with this run file (default: the newest in --runs)")
    q.add_argument("--name", help="this run's name (default: the time)")
    q.add_argument("--staging", type=lambda v: v.lower() not in ("false", "0", "no"), default=True,
                   help="answer through a copy of the store (default true): no golden conversation or hand-off "
                        "reaches the real one")
    common(q)
    q.set_defaults(func=cmd_golden)

    q = sub.add_parser("train-guard", help="train the guard's classifiers with the customers' messages as benign")
    q.add_argument("--out", default="runs/assistant/guard", help="output directory (default runs/assistant/guard)")
    q.add_argument("--seed", type=int, default=0, help="customer message generation seed (default 0)")
    q.add_argument("--json", action="store_true", help="print the held-out figures as one JSON object")
    q.add_argument("--quiet", action="store_true", help="no progress output")
    q.set_defaults(func=cmd_train_guard)

    q = sub.add_parser("flywheel", help="export corrections, up-rated answers and resolved hand-offs as training data")
    q.add_argument("--out", default="runs/assistant/flywheel", help="output directory (default runs/assistant/flywheel)")
    common(q)
    q.set_defaults(func=cmd_flywheel)

    q = sub.add_parser("variants", help="the prompt variants' results (A/B): thumbs up, hand-offs, significance")
    common(q)
    q.set_defaults(func=cmd_variants)

    q = sub.add_parser("ask", help="send one customer message through the whole assistant")
    q.add_argument("message", nargs="*", help="the customer's message")
    q.add_argument("--conversation", help="continue this conversation id")
    common(q)
    q.set_defaults(func=cmd_ask)
