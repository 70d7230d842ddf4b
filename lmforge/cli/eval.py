"""`lmforge eval ...`: one verb group whose verbs live in the `eval_*` modules beside this one."""

from __future__ import annotations

import argparse

from lmforge.cli import eval_bench, eval_metrics, eval_perplexity, eval_ratings


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("eval", help="evaluate models: perplexity, metrics, benchmarks, judges, ratings")
    verbs = parser.add_subparsers(dest="eval_command", required=True, metavar="VERB")
    for module in (eval_perplexity, eval_metrics, eval_ratings, eval_bench):
        module.register(verbs)
