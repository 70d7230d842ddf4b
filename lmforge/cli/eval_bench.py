"""`lmforge eval bench`, `lmforge eval judge` and `lmforge eval contamination`."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from lmforge.cli.common import (MODEL_HELP, add_config_flags, add_device_flags, add_model_argument, add_remote_flags,
                                check_remote_arguments, config_from_args, load_local, load_model)
from lmforge.errors import LmforgeError

TASK_HELP = "mmlu-cot-281, humaneval, arith-word-problems, or a task file (.yaml) naming a JSONL data file"


def register(verbs: argparse._SubParsersAction) -> None:
    from lmforge.eval.bench.options import BenchOptions

    p = verbs.add_parser(
        "bench", help="benchmark accuracy: multiple choice by log-likelihood, generation, code pass@k",
        description="Run a benchmark task. Multiple-choice tasks score each choice by log-likelihood "
                    "(acc and byte-normalized acc_norm); generation tasks extract and compare answers "
                    "(majority vote over --samples); code tasks run tests in a sandbox (pass@k).")
    add_model_argument(p)
    p.add_argument("--task", required=True, help=TASK_HELP)
    add_config_flags(p, BenchOptions)
    p.add_argument("--json", action="store_true", help="print the result (without per-item details) as one JSON object")
    p.add_argument("--out", help="directory for bench-TASK.json, .md, -items.jsonl and (with matplotlib) a per-group .png")
    p.add_argument("--quiet", action="store_true", help="no progress line on stderr")
    add_device_flags(p)
    add_remote_flags(p, scoring=True, needs="multiple-choice tasks need /v1/completions with echo + logprobs + "
                                            "max_tokens=0; MODEL is then the served model's name")
    p.set_defaults(func=run_bench)

    p = verbs.add_parser(
        "contamination", help="n-gram overlap between a task's texts and a training corpus",
        description="Report, per item and overall, how many of a task's word n-grams (default 13-grams) "
                    "also occur in a corpus file (.txt, or .jsonl with a \"text\" field per line).")
    p.add_argument("--task", required=True, help=TASK_HELP)
    p.add_argument("--corpus", required=True, action="append", help="corpus file (.txt or .jsonl); repeatable")
    p.add_argument("--n", type=int, default=13, help="n-gram length in words (default 13)")
    p.add_argument("--threshold", type=float, default=0.0,
                   help="an item is contaminated when more than this fraction of its n-grams is found (default 0: any)")
    p.add_argument("--limit", type=int, help="check only the first N items")
    p.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    p.add_argument("--out", help="directory for contamination-TASK.json and .md")
    p.set_defaults(func=run_contamination)

    p = verbs.add_parser("judge", help="LLM-as-judge: pointwise scores, pairwise comparisons, golden-set regressions",
                         description="Use a model as a judge. Modes: score (rubric 1-5), compare (A vs B, both "
                                     "orders), regression (two models on a golden set).")
    modes = p.add_subparsers(dest="judge_mode", required=True, metavar="MODE")

    s = modes.add_parser("score", help="pointwise: rate each answer 1-5 against a rubric",
                         description="Rate answers 1-5. FILE: JSONL with \"question\" and \"answer\" (optional "
                                     "\"reference\"); records without an answer are answered by --model first.")
    s.add_argument("--file", required=True, help="JSONL of {question, answer[, reference]}")
    s.add_argument("--model", help="answer records that have no \"answer\" with this model")
    s.add_argument("--rubric", help="text file with the rubric (default: a general helpfulness/correctness rubric)")
    _judge_common(s)
    s.set_defaults(func=run_judge_score)

    c = modes.add_parser("compare", help="pairwise: which of two answers is better (judged in both orders)",
                         description="FILE: JSONL with \"question\", \"answer_a\", \"answer_b\". Each pair is judged "
                                     "twice with the answers swapped; disagreement counts as a tie.")
    c.add_argument("--file", required=True, help="JSONL of {question, answer_a, answer_b}")
    _judge_common(c)
    c.set_defaults(func=run_judge_compare)

    r = modes.add_parser("regression", help="golden-set regression: candidate vs baseline, judged pairwise",
                         description="Both models answer every prompt of the golden set (greedy); the judge "
                                     "compares the answers in both orders; exact metrics against references "
                                     "where given. Items where the candidate is worse are flagged.")
    r.add_argument("--golden", required=True, help="JSONL of {prompt[, reference][, id]}")
    r.add_argument("--baseline", required=True, help="baseline model (" + MODEL_HELP + ")")
    r.add_argument("--candidate", required=True, help="candidate model or checkpoint")
    r.add_argument("--max-answer-tokens", type=int, default=256, help="answer length limit (default 256)")
    r.add_argument("--margin", type=float, default=0.1,
                   help="flag a regression when (losses - wins) / items exceeds this (default 0.1)")
    r.add_argument("--fail-on-regression", action="store_true", help="exit with status 2 when a regression is flagged")
    _judge_common(r)
    r.set_defaults(func=run_judge_regression)


def _judge_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--judge", help="judge model (" + MODEL_HELP + ")")
    p.add_argument("--judge-base-url", help="use an OpenAI-compatible endpoint as the judge")
    p.add_argument("--judge-api-key", help="API key for --judge-base-url (default: $OPENAI_API_KEY)")
    p.add_argument("--judge-max-tokens", type=int, default=256, help="longest judge reply in tokens (default 256)")
    p.add_argument("--limit", type=int, help="only the first N records")
    p.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    p.add_argument("--out", help="directory for the report (JSON, markdown, per-item JSONL)")
    p.add_argument("--quiet", action="store_true", help="no progress line on stderr")
    add_device_flags(p)


# -- bench ---------------------------------------------------------------------------------------

def _slug(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "-" for ch in Path(name).stem) or "task"


def run_bench(args: argparse.Namespace) -> int:
    from lmforge.eval.bench import BenchOptions, evaluate, load_task
    from lmforge.eval.report import write_jsonl, write_report
    from lmforge.io.progress import Progress

    options = config_from_args(BenchOptions, args)
    task = load_task(args.task)  # bad task names, files and variants fail before the slow model load
    spec = task.spec.variant(options.variant) if options.variant else task.spec
    check_remote_arguments(args)
    if args.base_url and spec.kind == "multiple_choice":  # scored from the endpoint's prompt log-probs
        from lmforge.eval.remote import connect_scorer

        lm = connect_scorer(args.base_url, args.api_key, args.model, args.tokenizer, batch_tokens=options.batch_tokens,
                            timeout=args.request_timeout, retries=args.retries)
    else:
        lm = load_model(args)
    n = min(options.limit or len(task.records), len(task.records))
    label = task.name + (f" ({options.variant})" if options.variant else "")
    progress = Progress(label, n, unit="items", enabled=not args.quiet)
    try:
        result = evaluate(lm, task, options, progress=progress)
    finally:
        progress.close()
    if args.out:
        name = f"bench-{_slug(task.name)}" + (f"-{_slug(options.variant)}" if options.variant else "")
        json_path, md_path = write_report(args.out, name, result.to_dict(items=False), result.markdown())
        items_path = write_jsonl(Path(args.out) / f"{name}-items.jsonl", result.items)
        from lmforge.eval.bench.plot import plot_groups

        chance = 1 / len(task.records[0][task.spec.choices]) if result.kind == "multiple_choice" else None
        png = plot_groups(result, Path(args.out) / f"{name}.png", chance=chance)
        extra = f", {png.name}" if png else ""
        print(f"wrote {json_path}, {md_path.name}, {items_path.name}{extra}", file=sys.stderr)
    if args.json:
        print(json.dumps(result.to_dict(items=False), ensure_ascii=False))
    else:
        print(result.summary())
        if result.groups and not args.out:
            print("per group: " + ", ".join(
                f"{g} {v.get('acc', v.get('pass@1', 0.0)):.2f}" for g, v in sorted(result.groups.items())))
    return 0


# -- contamination -----------------------------------------------------------------------------------

def run_contamination(args: argparse.Namespace) -> int:
    from lmforge.eval.bench import load_task
    from lmforge.eval.contamination import check_contamination
    from lmforge.eval.report import write_jsonl, write_report

    task = load_task(args.task).limited(args.limit)
    report = check_contamination(task, args.corpus, n=args.n, threshold=args.threshold)
    if args.out:
        name = f"contamination-{_slug(task.name)}"
        json_path, _ = write_report(args.out, name, report.to_dict(items=False), report.markdown())
        write_jsonl(Path(args.out) / f"{name}-items.jsonl", [i.to_dict() for i in report.items])
        print(f"wrote {json_path}, {name}.md and {name}-items.jsonl", file=sys.stderr)
    if args.json:
        print(json.dumps(report.to_dict(items=False), ensure_ascii=False))
    else:
        print(report.summary())
        for item in report.contaminated_items()[:20]:
            print(f"  {item.id}: {item.matched}/{item.ngrams} {report.n}-grams found ({item.overlap:.0%})")
    return 0


# -- judge -----------------------------------------------------------------------------------------------

def _judge_backend(args: argparse.Namespace, loaded: dict):
    if args.judge_base_url:
        from lmforge.infer.remote import RemoteModel

        return RemoteModel(args.judge_base_url, args.judge_api_key or os.environ.get("OPENAI_API_KEY"),
                           args.judge)
    return _load_local(args.judge, args, loaded)


def _judge_sampling(args: argparse.Namespace) -> dict:
    if args.judge_max_tokens < 1:
        raise LmforgeError("--judge-max-tokens must be at least 1")
    return {"max_tokens": args.judge_max_tokens}


def _load_local(name: str | None, args: argparse.Namespace, loaded: dict):
    """Load each distinct model once (the judge is often one of the compared models)."""
    key = name or ""
    if key not in loaded:
        loaded[key] = load_local(name, args)
    return loaded[key]


def _records(path: str, limit: int | None, required: tuple[str, ...]) -> list[dict]:
    from lmforge.eval.bench.task import read_jsonl

    records = read_jsonl(Path(path))
    if limit is not None:
        if limit < 1:
            raise LmforgeError("--limit must be at least 1")
        records = records[:limit]
    if not records:
        raise LmforgeError(f"{path}: no records")
    for number, record in enumerate(records, 1):
        missing = [k for k in required if not isinstance(record.get(k), str)]
        if missing:
            raise LmforgeError(f"{path}: record {number} needs string field(s) {', '.join(missing)}")
    return records


def _finish(args: argparse.Namespace, name: str, summary: dict, markdown: str, items: list[dict], line: str) -> None:
    from lmforge.eval.report import write_jsonl, write_report

    if args.out:
        json_path, _ = write_report(args.out, name, summary, markdown)
        write_jsonl(Path(args.out) / f"{name}-items.jsonl", items)
        print(f"wrote {json_path}, {name}.md and {name}-items.jsonl", file=sys.stderr)
    if args.json:
        print(json.dumps(summary, ensure_ascii=False))
    else:
        print(line)


def run_judge_score(args: argparse.Namespace) -> int:
    from lmforge.eval.judge import DEFAULT_RUBRIC, PointwiseJudge, summarize_scores
    from lmforge.eval.report import markdown_table
    from lmforge.io.progress import Progress

    records = _records(args.file, args.limit, ("question",))
    rubric = DEFAULT_RUBRIC
    if args.rubric:
        try:
            rubric = Path(args.rubric).read_text(encoding="utf-8")
        except OSError as exc:
            raise LmforgeError(f"cannot read rubric {args.rubric}: {exc.strerror or exc}") from None
    unanswered = [r for r in records if not isinstance(r.get("answer"), str)]
    if unanswered and not args.model:
        raise LmforgeError(f"{len(unanswered)} record(s) have no \"answer\": give --model to answer them")
    loaded: dict = {}
    if unanswered:
        answerer = _load_local(args.model, args, loaded)
        for r in unanswered:
            r["answer"] = answerer.chat(r["question"], temperature=0, max_tokens=256)
    judge = PointwiseJudge(_judge_backend(args, loaded), rubric=rubric, sampling=_judge_sampling(args))
    progress = Progress("judge score", len(records), enabled=not args.quiet)
    items = []
    try:
        for i, r in enumerate(records):
            verdict = judge.score(r["question"], r["answer"], reference=r.get("reference"))
            items.append({"id": r.get("id", i), **verdict.to_dict()})
            progress(i + 1)
    finally:
        progress.close()
    summary = summarize_scores([it["score"] for it in items])
    md = "# Judge scores\n\n" + markdown_table(["metric", "value"], list(summary.items()))
    _finish(args, "judge-score", summary, md, items,
            f"mean score {summary['mean']:.2f} / 5 over {summary['scored']} answers "
            f"({summary['unparsed']} unparsed judgements)" if summary["scored"] else
            f"no judgement could be parsed ({summary['unparsed']} answers)")
    return 0


def run_judge_compare(args: argparse.Namespace) -> int:
    from lmforge.eval.judge import PairwiseJudge, summarize_pairs
    from lmforge.eval.report import markdown_table
    from lmforge.io.progress import Progress

    records = _records(args.file, args.limit, ("question", "answer_a", "answer_b"))
    judge = PairwiseJudge(_judge_backend(args, {}), sampling=_judge_sampling(args))
    progress = Progress("judge compare", len(records), enabled=not args.quiet)
    items = []
    try:
        for i, r in enumerate(records):
            items.append({"id": r.get("id", i), **judge.compare(r["question"], r["answer_a"], r["answer_b"]).to_dict()})
            progress(i + 1)
    finally:
        progress.close()
    summary = summarize_pairs([it["winner"] for it in items], [it["consistent"] for it in items],
                              [(len(r["answer_a"]), len(r["answer_b"])) for r in records])
    md = "# Pairwise judgements\n\n" + markdown_table(["metric", "value"], list(summary.items()))
    _finish(args, "judge-compare", summary, md, items,
            f"A wins {summary['a_wins']}, B wins {summary['b_wins']}, ties {summary['ties']} "
            f"(position-consistent {summary['consistency']:.0%})")
    return 0


def run_judge_regression(args: argparse.Namespace) -> int:
    from lmforge.eval.judge import GoldenItem, PairwiseJudge, regression_run
    from lmforge.io.progress import Progress

    records = _records(args.golden, args.limit, ("prompt",))
    golden = [GoldenItem(r["prompt"], r.get("reference"), str(r.get("id", i))) for i, r in enumerate(records)]
    loaded: dict = {}
    baseline = _load_local(args.baseline, args, loaded)
    candidate = _load_local(args.candidate, args, loaded)
    judge = PairwiseJudge(_judge_backend(args, loaded), sampling=_judge_sampling(args))
    progress = Progress("regression", len(golden), enabled=not args.quiet)
    try:
        report = regression_run(golden, baseline, candidate, judge, max_tokens=args.max_answer_tokens,
                                margin=args.margin, progress=progress,
                                names=(args.baseline or "default", args.candidate or "default"))
    finally:
        progress.close()
    _finish(args, "judge-regression", report.to_dict(items=False), report.markdown(),
            [i.to_dict() for i in report.items], report.summary())
    return 2 if report.regressed and args.fail_on_regression else 0
