"""The `lmforge` command: every verb of lmforge, one module per verb group.

Each module has `register(subparsers)`; a verb is a thin shell over the library: parse
flags, call the library, print. Errors the user can cause end as one line on stderr and
exit status 1. Heavy modules (torch, the model code) are imported only inside the verbs
that need them, so `lmforge --help` answers at once. What the verbs share (model flags,
loading with progress, flags generated from configuration dataclasses) is in `common`.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from lmforge.errors import LmforgeError

VERB_MODULES: tuple[str, ...] = (
    "lmforge.cli.generate",   # generate, chat
    "lmforge.cli.models",     # convert, models, info
    "lmforge.cli.serve",      # serve
    "lmforge.cli.embed",      # embed
    "lmforge.cli.eval",       # eval perplexity | metrics | ratings | bench | judge | ...
    "lmforge.cli.data",       # data prepare | validate
    "lmforge.cli.tokenizer",  # tokenizer train | report
    "lmforge.cli.estimate",   # estimate
    "lmforge.cli.train",      # pretrain, scaling sweep
    "lmforge.cli.finetune",   # finetune RECIPE | data NAME | eval
    "lmforge.cli.rag",        # rag index | ask | eval, ask
    "lmforge.cli.align",      # align data | reward | dpo
    "lmforge.cli.merge",      # merge
    "lmforge.cli.prune",      # prune
    "lmforge.cli.quantize",   # quantize
    "lmforge.cli.export",     # export onnx | gguf
    "lmforge.cli.distill",    # distill RECIPE
    "lmforge.cli.agent",      # agent run
    "lmforge.cli.monitor",    # monitor questions | drift | golden | grafana
    "lmforge.cli.assistant",  # assistant data | train-router | ask
    "lmforge.cli.guard",      # guard check | redact | train | eval
    "lmforge.cli.baseline",   # baseline prepare | train ngram|lstm|gru|transformer | eval | compare
    "lmforge.cli.vlm",        # vlm train cnn|vit|clip | eval | classify
    "lmforge.cli.translate",  # translate MODEL_DIR [FILE] | translate train RECIPE
    "lmforge.cli.explain",    # explain MODEL PROMPT --out report.html [--compare PROMPT]
    "lmforge.cli.hpsearch",   # hpsearch RECIPE --space SPACE.toml --method random|halving
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lmforge", description="A hackable end-to-end LLM toolkit.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in VERB_MODULES:
        importlib.import_module(module).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except LmforgeError as exc:
        print(f"lmforge: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
