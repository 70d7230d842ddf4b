"""`lmforge baseline prepare | train KIND | eval NAME | arpa NAME | compare`: n-gram and recurrent LMs against a
Transformer on the same corpus, tokenizer and test tokens (lmforge/eval/baselines.py)."""

from __future__ import annotations

import argparse
import json

from lmforge.cli.common import add_config_flags, config_from_args

KIND_CHOICES = ("ngram", "lstm", "gru", "transformer")


def register(verbs: argparse._SubParsersAction) -> None:
    from lmforge.eval.baselines import BaselineConfig

    p = verbs.add_parser("baseline", help="n-gram, LSTM and GRU language models measured against a Transformer",
                         description="Pre-Transformer baselines on one corpus and one tokenizer: build the corpus, "
                                     "train each model, compare test perplexity, size, time and decode speed.")
    sub = p.add_subparsers(dest="baseline_command", required=True, metavar="SUBCOMMAND")
    prepare = sub.add_parser("prepare", help="build ROOT/data: clean, split by article, train the BPE, pack rows")
    add_config_flags(prepare, BaselineConfig)
    prepare.set_defaults(func=run_prepare)
    train = sub.add_parser("train", help="train (or count) one model and score it on the test rows")
    train.add_argument("kind", choices=KIND_CHOICES)
    add_config_flags(train, BaselineConfig)
    train.set_defaults(func=run_train)
    evaluate = sub.add_parser("eval", help="score a trained model (ngram-N, lstm, gru, transformer) on the test rows")
    evaluate.add_argument("name")
    add_config_flags(evaluate, BaselineConfig)
    evaluate.set_defaults(func=run_eval)
    arpa = sub.add_parser("arpa", help="write a trained n-gram model (ngram-N) as an ARPA file (KenLM, SRILM)")
    arpa.add_argument("name", metavar="NAME", help="the trained n-gram model, e.g. ngram-5")
    arpa.add_argument("--out", help="the ARPA file (default ROOT/NAME/model.arpa)")
    add_config_flags(arpa, BaselineConfig)
    arpa.set_defaults(func=run_arpa)
    compare = sub.add_parser("compare", help="table (comparison.md/.json) and plot (comparison.png) of every result")
    add_config_flags(compare, BaselineConfig)
    compare.set_defaults(func=run_compare)


def _config(args: argparse.Namespace):
    from lmforge.eval.baselines import BaselineConfig

    config = config_from_args(BaselineConfig, args)
    config.validate()
    return config


def run_prepare(args: argparse.Namespace) -> int:
    from lmforge.eval.baselines import load_rows, prepare_corpus

    config = _config(args)
    path = prepare_corpus(config)
    sizes = {split: int(load_rows(config, split).size) for split in ("train", "validation", "test")}
    print(f"{path}: " + ", ".join(f"{split} {n:,} tokens" for split, n in sizes.items()))
    return 0


def run_train(args: argparse.Namespace) -> int:
    from lmforge.eval.baselines import train

    result = train(args.kind, _config(args))
    print(json.dumps({"model": result["model"], **result["test"], "parameters": result["parameters"],
                      "train_seconds": result["train_seconds"], "decode_tokens_per_s": result["decode_tokens_per_s"]}))
    return 0


def run_eval(args: argparse.Namespace) -> int:
    from lmforge.eval.baselines import evaluate

    print(json.dumps({"model": args.name, **evaluate(args.name, _config(args))}))
    return 0


def run_arpa(args: argparse.Namespace) -> int:
    from lmforge.eval.baselines import export_arpa

    path = export_arpa(args.name, _config(args), args.out)
    print(f"{path}: ARPA n-gram model (token strings as words)")
    return 0


def run_compare(args: argparse.Namespace) -> int:
    from lmforge.eval.baselines import compare

    summary = compare(_config(args))
    print(summary["table"], end="")
    if summary["plot"]:
        print(f"\nplot: {summary['plot']}")
    return 0
