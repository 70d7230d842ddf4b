"""`lmforge eval ...`: one subcommand group; each evaluation module adds its own verbs.

Every module listed in `EVAL_COMMAND_MODULES` has `register(eval_subparsers)` and imports
nothing heavy at module level.
"""

from __future__ import annotations

import argparse
import importlib

EVAL_COMMAND_MODULES: tuple[str, ...] = (
    "lmforge.eval.cli_perplexity",
    "lmforge.eval.cli_metrics",
    "lmforge.eval.cli_ratings",
    "lmforge.eval.cli_bench",
)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("eval", help="evaluate models: perplexity, metrics, benchmarks, judges, ratings")
    verbs = parser.add_subparsers(dest="eval_command", required=True, metavar="VERB")
    for module in EVAL_COMMAND_MODULES:
        importlib.import_module(module).register(verbs)
