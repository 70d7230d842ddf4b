"""``lmforge monitor``: watch a deployed model (O1-O4).

    lmforge monitor questions --n 400 --shift-share 0.3 > traffic.txt    # generated customer questions
    lmforge monitor drift --reference reference.txt traffic.txt          # MMD and PSI, window by window
    lmforge monitor golden --golden golden.jsonl --out runs/today.json --against runs/yesterday.json
    lmforge monitor golden --golden golden.jsonl --base-url http://host:8000 --out runs/today.json
    lmforge monitor golden --golden golden.jsonl --against runs/a.json runs/b.json   # compare stored runs
    lmforge monitor grafana --out docs/monitoring/grafana-dashboard.json

`golden` exits with status 2 when the comparison flags a regression, so a nightly job
can fail on it; the server's own dashboard is at /dashboard of `lmforge serve`.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from dataclasses import dataclass

from lmforge.cli.common import (add_config_flags, add_device_flags, add_model_argument, add_remote_flags, api_key,
                                config_from_args, load_local)
from lmforge.errors import LmforgeError
from lmforge.options import option

REGRESSION_EXIT = 2


@dataclass
class QuestionOptions:
    """Generated customer-service questions (lmforge/monitor/questions.py)."""

    n: int = option(200, help="how many questions")
    shift_share: float = option(0.0, help="share of questions from the new topic (0..1)")
    shift_topic: str = option("privacy", help="the topic of the shifted share")
    seed: int = option(0, help="random seed")


def _read_lines(path: str, jsonl: bool, field: str) -> list[str]:
    from lmforge.io.text_files import parse_jsonl, read_text, text_of

    content = sys.stdin.read() if path == "-" else read_text(path, "question")
    if jsonl:
        return [text_of(r, f"{path}:{n}", field) for n, r in parse_jsonl(content.splitlines(), path)]
    return [line for line in content.splitlines() if line.strip()]


def cmd_questions(args: argparse.Namespace) -> int:
    from lmforge.monitor.questions import questions

    o = config_from_args(QuestionOptions, args)
    if o.n < 1:
        raise LmforgeError("--n must be at least 1")
    for text in questions(o.n, random.Random(o.seed), shift_share=o.shift_share, shift_topic=o.shift_topic):
        print(text)
    return 0


def cmd_drift(args: argparse.Namespace) -> int:
    from lmforge.io.progress import Progress
    from lmforge.monitor.config import DriftOptions
    from lmforge.monitor.drift import DriftMonitor

    options = config_from_args(DriftOptions, args)
    reference = _read_lines(args.reference, args.jsonl, args.field)
    texts = [t for path in args.inputs for t in _read_lines(path, args.jsonl, args.field)]
    if len(reference) < max(4, options.clusters):
        raise LmforgeError(f"the reference {args.reference} holds {len(reference)} questions; "
                           f"at least {max(4, options.clusters)} are needed")
    if len(texts) < options.window:
        raise LmforgeError(f"{len(texts)} questions to watch are fewer than one window ({options.window})")
    monitor = DriftMonitor(options)
    progress = Progress("embedding questions", total=len(reference) + len(texts), unit="questions")
    monitor.set_reference(monitor.embed(reference))
    progress(len(reference))
    alerts = 0
    step = options.check_every
    for start in range(0, len(texts), step):
        state = monitor.feed(texts[start:start + step])
        progress(len(reference) + min(start + step, len(texts)))
        if state is not None:
            alerts += len(state.alerted_now)
            print(json.dumps({"after": start + step, "mmd2": round(state.mmd2, 6), "p_value": round(state.mmd_p_value, 4),
                              "psi": round(state.psi, 4), "drifting": state.drifting, "alerts": state.alerted_now}),
                  flush=True)
    progress.close(f"{monitor.state.checks} checks of a {options.window}-question window, {alerts} alert(s)")
    if args.out:
        from lmforge.io.atomic import write_json_atomic

        write_json_atomic(args.out, monitor.state.to_dict())
    return 0


def cmd_golden(args: argparse.Namespace) -> int:
    from lmforge.monitor.golden import (GoldenOptions, compare, format_comparison, load_run, model_answerer,
                                        read_golden, run_golden, save_run)

    options = config_from_args(GoldenOptions, args)
    items = read_golden(args.golden)
    against = args.against or []
    if len(against) > 2:
        raise LmforgeError("--against takes one stored run (compared with a new run) or two (compared with each other)")
    if len(against) == 2:
        if args.out or args.model or args.base_url:
            raise LmforgeError("with two runs after --against nothing is generated: drop MODEL, --base-url and --out")
        baseline, candidate = (load_run(path) for path in against)
    else:
        baseline = load_run(against[0]) if against else None  # read first: a bad path fails before generating
        if not args.out:
            raise LmforgeError("--out RUN.json is needed to keep the new run (the next comparison's baseline)")
        candidate = _new_run(args, items, options, model_answerer, run_golden)
        save_run(candidate, args.out)
        s = candidate["summary"]
        print(f"{s['items']} items: mean score {s['mean_score']:.3f}, pass rate {s['pass_rate']:.1%} -> {args.out}")
    if baseline is None:
        return 0
    report = compare(baseline, candidate, options, items)
    print(format_comparison(report))
    if args.report:
        from lmforge.io.atomic import write_json_atomic

        write_json_atomic(args.report, report)
    return REGRESSION_EXIT if report["regressed"] or (args.fail_on_item and report["regressed_items"]) else 0


def _new_run(args, items, options, model_answerer, run_golden):
    from lmforge.io.progress import Progress

    if args.base_url:
        from lmforge.infer.remote import RemoteModel

        model = RemoteModel(args.base_url, api_key(args), args.model)
        label = f"{model.name} at {args.base_url}"
    else:
        model = load_local(args.model, args)
        label = model.name
    progress = Progress("golden set", total=len(items), unit="questions")
    run = run_golden(items, model_answerer(model, options), options, name=args.name or args.out, model=label,
                     progress=progress)
    progress.close()
    return run


def cmd_grafana(args: argparse.Namespace) -> int:
    from lmforge.monitor.grafana import grafana_dashboard

    dashboard = grafana_dashboard(args.title)
    if args.out:
        from lmforge.io.atomic import write_json_atomic

        write_json_atomic(args.out, dashboard)
        print(f"{len(dashboard['panels'])} panels -> {args.out}")
    else:
        print(json.dumps(dashboard, indent=2))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("monitor", help="monitoring: drift, golden-set regressions, dashboards",
                              description="Watch a deployed model: question drift, golden-set regression runs, "
                                          "the Grafana dashboard and generated traffic.")
    sub = p.add_subparsers(dest="monitor_command", required=True, metavar="COMMAND")

    q = sub.add_parser("questions", help="generated customer-service questions, one a line")
    add_config_flags(q, QuestionOptions)
    q.set_defaults(func=cmd_questions)

    from lmforge.monitor.config import DriftOptions

    d = sub.add_parser("drift", help="MMD and PSI drift checks of questions against a reference",
                       description="Embed the reference questions and feed the others in order; print one JSON "
                                   "line per check (every --check-every questions once a window is full).")
    d.add_argument("inputs", nargs="+", metavar="FILE", help="questions to watch, in arrival order (- for stdin)")
    d.add_argument("--reference", required=True, metavar="FILE", help="questions of a period known to be fine")
    d.add_argument("--jsonl", action="store_true", help="files are JSONL records (see --field)")
    d.add_argument("--field", default="text", help="with --jsonl: the field holding the question (default text)")
    d.add_argument("--out", metavar="FILE", help="write the final state as JSON")
    add_config_flags(d, DriftOptions, "drift")
    d.set_defaults(func=cmd_drift)

    from lmforge.monitor.config import GoldenOptions

    g = sub.add_parser("golden", help="run a golden set and flag regressions against a stored run",
                       description="Answer a golden set (JSONL of question + expected/checks) with a local model or "
                                   "an OpenAI-compatible endpoint, store the run, and compare it with a previous "
                                   "one (exit status 2 on a regression).")
    add_model_argument(g)
    g.add_argument("--golden", required=True, metavar="FILE", help="the golden set (JSONL)")
    g.add_argument("--against", nargs="+", metavar="RUN", help="a stored run to compare the new run with, or two "
                                                                "stored runs (baseline, candidate) to compare")
    g.add_argument("--out", metavar="RUN", help="write the new run here (JSON)")
    g.add_argument("--name", help="the run's name in reports (default: the --out path)")
    g.add_argument("--report", metavar="FILE", help="write the comparison as JSON")
    g.add_argument("--fail-on-item", action="store_true", help="exit 2 on any regressed item, not only on an overall "
                                                                 "regression")
    add_remote_flags(g)
    add_device_flags(g)
    add_config_flags(g, GoldenOptions, "golden")
    g.set_defaults(func=cmd_golden)

    f = sub.add_parser("grafana", help="the Grafana dashboard JSON over lmforge's Prometheus metrics")
    f.add_argument("--out", metavar="FILE", help="write it here (default: stdout)")
    f.add_argument("--title", default="lmforge", help="the dashboard's title")
    f.set_defaults(func=cmd_grafana)
