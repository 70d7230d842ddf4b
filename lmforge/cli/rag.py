"""``lmforge rag index | ask | eval`` and ``lmforge ask``: retrieval-augmented answers with citations."""

from __future__ import annotations

import argparse
import json
import sys

from lmforge.cli.common import add_config_flags, add_device_flags, add_remote_flags, api_key, config_from_args
from lmforge.errors import LmforgeError

EMBEDDER_HELP = "embedding model: registered name or sentence-transformers directory (default all-minilm-l6-v2)"


def _embedder(args: argparse.Namespace):
    from lmforge.rag.embedder import load_embedder

    device = None if args.device == "auto" else args.device
    dtype = None if args.dtype == "auto" else args.dtype
    return load_embedder(args.embedding_model, device=device, dtype=dtype)


def _progress_line(label: str):
    from lmforge.io.progress import Progress

    line = Progress(label, unit="chunks")

    def report(stage: str, done: int, total: int) -> None:
        line.update(done, total=total)

    return line, report


def _filters(pairs: list[str]) -> dict[str, list[str]] | None:
    if not pairs:
        return None
    out: dict[str, list[str]] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise LmforgeError(f"--filter expects KEY=VALUE (e.g. source=kv-cache.md), got {pair!r}")
        out.setdefault(key, []).append(value)
    return out


def cmd_index(args: argparse.Namespace) -> int:
    from lmforge.rag.config import IndexOptions
    from lmforge.rag.index import build_index

    options = config_from_args(IndexOptions, args)
    embedder = _embedder(args)
    line, report = _progress_line(f"indexing into {args.out}")
    result = build_index(args.paths, args.out, embedder, options, progress=report)
    line.close()
    print(json.dumps(result.to_dict()) if args.json else result.summary())
    return 0


def _generator(args: argparse.Namespace, mode: str):
    """The chat model that writes answers, or None for extractive answers.

    In auto mode a model writes only when one is named (--model or --base-url): the 135M
    default model does not follow its sources, so loading it would only cost time before the
    extractive fallback.
    """
    if mode == "extractive" or (mode == "auto" and not args.model and not args.base_url):
        return None
    if args.base_url:
        from lmforge.infer.remote import RemoteModel

        return RemoteModel(args.base_url, api_key(args), args.model)
    from lmforge.cli.common import load_local

    return load_local(args.model, args)


def _ask(args: argparse.Namespace, index: str | None) -> int:
    from lmforge.rag.answer import Answerer
    from lmforge.rag.config import AnswerOptions, RetrieverOptions
    from lmforge.rag.retriever import Retriever
    from lmforge.rag.store import open_store

    answer_options = config_from_args(AnswerOptions, args)
    retriever_options = config_from_args(RetrieverOptions, args)
    embedder = _embedder(args)
    if index is None:
        from lmforge.rag.handbook import handbook_index

        line, report = _progress_line("building the handbook index (first use)")
        index = str(handbook_index(embedder, progress=report))
        line.close()
    question = " ".join(args.question).strip()
    if question == "-":
        question = sys.stdin.read().strip()
    model = _generator(args, answer_options.mode)
    with open_store(index) as store:
        retriever = Retriever(store, embedder, retriever_options)
        answerer = Answerer(retriever, model, answer_options)
        sampling = {"temperature": args.temperature, "max_tokens": answer_options.max_tokens}
        stream = answerer.stream(question, filters=_filters(args.filter), **sampling)
        if args.json:
            for _ in stream:
                pass
            print(json.dumps(stream.answer.to_dict(), ensure_ascii=False))
            return 0
        for delta in stream:
            print(delta, end="", flush=True)
        print()
        answer = stream.answer
        if answer.citations and not answer.refused:
            print("\nSources:")
            print(answer.sources_text())
    return 0


def cmd_ask(args: argparse.Namespace) -> int:
    return _ask(args, getattr(args, "index", None))


def _add_ask_flags(p: argparse.ArgumentParser, index_required: bool) -> None:
    from lmforge.rag.config import AnswerOptions, RetrieverOptions

    p.add_argument("question", nargs="+", help="the question ('-' reads it from stdin)")
    if index_required:
        p.add_argument("--index", required=True, help="an index made by `lmforge rag index` (file or postgresql:// URL)")
    p.add_argument("--model", help="the model that writes answers (verified sentence by sentence): registered "
                                   "name, HF directory or .gguf, or the remote model name with --base-url "
                                   "(default: none, the answer quotes the sources; with --answer generate: the "
                                   "default model)")
    p.add_argument("--embedding-model", help=EMBEDDER_HELP)
    p.add_argument("--filter", action="append", default=[], metavar="KEY=VALUE",
                   help="only chunks whose metadata KEY equals VALUE (repeatable; the same KEY twice means either)")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature of the answer (default 0)")
    p.add_argument("--json", action="store_true", help="print the answer, citations and signals as one JSON object")
    add_remote_flags(p)
    add_device_flags(p)
    add_config_flags(p, RetrieverOptions, "retrieval")
    add_config_flags(p, AnswerOptions, "answering")
    p.set_defaults(func=cmd_ask)


def cmd_eval(args: argparse.Namespace) -> int:
    from lmforge.rag.evaluate import EvalOptions, run_eval

    options = config_from_args(EvalOptions, args)
    embedder = _embedder(args)
    model = None
    if options.answers:
        model = _generator(args, "generate" if options.answer_mode != "extractive" else "extractive")
    from lmforge.io.progress import Progress

    lines: dict[str, Progress] = {}

    def progress(done: int, total: int, stage: str = "questions") -> None:
        if stage not in lines:
            for previous in list(lines):
                lines.pop(previous).close()
            lines[stage] = Progress(f"rag eval: {stage}", total=total, unit=stage)
        lines[stage].update(done, total=total)

    try:
        report = run_eval(options, embedder, model=model, index=args.index, progress=progress)
    finally:
        for line in lines.values():
            line.close()
    print(json.dumps(report["summary"], ensure_ascii=False) if args.json else report["text"])
    return 0


def cmd_train_reranker(args: argparse.Namespace) -> int:
    from lmforge.rag.config import RerankTrainOptions
    from lmforge.rag.rerank_train import format_summary, train_reranker

    options = config_from_args(RerankTrainOptions, args)
    embedder = _embedder(args)
    summary = train_reranker(options, embedder, index=args.index, log=lambda m: print(m, file=sys.stderr))
    print(json.dumps(summary, ensure_ascii=False) if args.json else format_summary(summary))
    return 0


def cmd_train_answerable(args: argparse.Namespace) -> int:
    from lmforge.rag.answerable import train_answerable
    from lmforge.rag.config import AnswerableTrainOptions
    from lmforge.rag.rerank_train import format_summary

    options = config_from_args(AnswerableTrainOptions, args)
    embedder = _embedder(args)
    summary = train_answerable(options, embedder, index=args.index, log=lambda m: print(m, file=sys.stderr))
    print(json.dumps(summary, ensure_ascii=False) if args.json else format_summary(summary))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    from lmforge.rag.config import IndexOptions

    parser = subparsers.add_parser("rag", help="retrieval-augmented answers: index documents, ask, evaluate")
    verbs = parser.add_subparsers(dest="rag_command", required=True, metavar="VERB")

    p = verbs.add_parser("index", help="documents (Markdown, text, HTML, PDF) -> a searchable index; "
                                       "only changed files are re-embedded")
    p.add_argument("paths", nargs="+", help="files and directories to index")
    p.add_argument("--out", required=True, help="the index: a .sqlite file (created if missing) or a postgresql:// URL")
    p.add_argument("--embedding-model", help=EMBEDDER_HELP)
    p.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    add_device_flags(p)
    add_config_flags(p, IndexOptions, "chunking")
    p.set_defaults(func=cmd_index)

    p = verbs.add_parser("ask", help="answer a question from an index, with numbered citations")
    _add_ask_flags(p, index_required=True)

    p = verbs.add_parser("eval", help="retrieval and answer quality on a labelled question set")
    _add_eval_flags(p)

    p = verbs.add_parser("train-reranker", help="train the cross-encoder that reranks hits and checks support, "
                                                "on pairs generated from an index (a few minutes on a CPU)")
    _add_train_reranker_flags(p)

    p = verbs.add_parser("train-answerable", help="train the judgement 'does this passage answer this question' "
                                                  "(a refusal signal) on pairs generated from an index")
    _add_train_reranker_flags(p, answerable=True)

    p = subparsers.add_parser("ask", help="ask the handbook (lmforge's own knowledge base), with citations")
    _add_ask_flags(p, index_required=False)


def _add_eval_flags(p: argparse.ArgumentParser) -> None:
    from lmforge.rag.config import EvalOptions

    p.add_argument("--index", help="the index to evaluate (default: the handbook's)")
    p.add_argument("--model", help="the model that writes answers for --answers (default: the default model)")
    p.add_argument("--embedding-model", help=EMBEDDER_HELP)
    p.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    add_remote_flags(p)
    add_device_flags(p)
    add_config_flags(p, EvalOptions, "evaluation")
    p.set_defaults(func=cmd_eval)


def _add_train_reranker_flags(p: argparse.ArgumentParser, answerable: bool = False) -> None:
    from lmforge.rag.config import AnswerableTrainOptions, RerankTrainOptions

    p.add_argument("--index", help="the index whose chunks the training pairs come from (default: the handbook's)")
    p.add_argument("--embedding-model", help=EMBEDDER_HELP + "; it finds the hard negatives")
    p.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    add_device_flags(p)
    add_config_flags(p, AnswerableTrainOptions if answerable else RerankTrainOptions, "training")
    p.set_defaults(func=cmd_train_answerable if answerable else cmd_train_reranker)
