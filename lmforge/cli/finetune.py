"""``lmforge finetune``: supervised fine-tuning from a recipe, its datasets, and exact-match scoring.

    lmforge finetune sft-arithmetic [--section.field VALUE ...]   train (lmforge/tune/sft.py)
    lmforge finetune data arithmetic --out runs/data/arithmetic    write a dataset's splits
    lmforge finetune eval [MODEL] --data FILE.jsonl               greedy exact match on a split
    lmforge finetune classify RECIPE [--section.field VALUE ...]  a task head (lmforge/tune/classify.py)
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from lmforge.cli.common import add_recipe_fields, find_recipe, recipe_overrides

USAGE = "RECIPE | data NAME | eval [MODEL] | classify RECIPE"


def _overrides(args: argparse.Namespace) -> dict:
    values = recipe_overrides(args)
    if args.no_pack:
        values["data.pack"] = False
    return values


def cmd_finetune(args: argparse.Namespace) -> int:
    from lmforge.errors import LmforgeError

    what = list(args.what)
    if what and what[0] == "data":
        return _data(args, what[1:])
    if what and what[0] == "eval":
        return _eval(args, what[1:])
    if what and what[0] == "classify":
        return _classify(args, what[1:])
    if len(what) > 1:
        raise LmforgeError(f"expected {USAGE}, got {' '.join(what)}")
    from lmforge.tune.sft import finetune, load_finetune_recipe, to_yaml

    config = load_finetune_recipe(find_recipe(what[0] if what else None), _overrides(args))
    if args.print_recipe:
        print(to_yaml(config), end="")
        return 0
    report = finetune(config, resume=args.resume, progress=not args.quiet)
    if not report:  # not the main process of a distributed run
        return 0
    if args.json:
        print(json.dumps(report))
        return 0
    summary = f"trained {report['steps']} steps ({report['tokens']:,} tokens) in {report['train_seconds']:.0f} s"
    last = report["validation"][-1] if report["validation"] else None
    if last:
        if "val_loss" in last:
            summary += f"; validation loss {last['val_loss']:.4f}"
        if "exact_match" in last:
            summary += f", exact match {100 * last['exact_match']:.1f}%"
    print(summary)
    print(f"model: {report['output']}\nreport: {Path(config.train.out) / 'report.md'}")
    return 0


def _classify(args: argparse.Namespace, rest: list[str]) -> int:
    from lmforge.errors import LmforgeError
    from lmforge.tune.classify import classify, load_classify_recipe, to_yaml

    if len(rest) > 1:
        raise LmforgeError(f"finetune classify: at most one RECIPE, got {' '.join(rest)}")
    overrides = recipe_overrides(args)
    if args.no_pack:
        raise LmforgeError("finetune classify: --no-pack applies to chat fine-tuning, not to classification")
    config = load_classify_recipe(find_recipe(rest[0] if rest else None), overrides)
    if args.print_recipe:
        print(to_yaml(config), end="")
        return 0
    report = classify(config, resume=args.resume, progress=not args.quiet)
    if not report:  # not the main process of a distributed run
        return 0
    if args.json:
        print(json.dumps(report))
        return 0
    print(f"trained {report['steps']} steps in {report['train_seconds']:.0f} s; "
          f"{100 * report['trainable_fraction']:.2f}% of the parameters trainable ({report['peft']})")
    test = report.get("test")
    if test and report["task"] == "sequence":
        print(f"test split ({test['examples']} texts): accuracy {test['accuracy']:.3f}, macro F1 {test['macro_f1']:.3f}, "
              f"micro F1 {test['micro_f1']:.3f}")
    elif test:
        print(f"test split ({test['examples']} sentences): entity F1 {test['entity_f1']:.3f} (precision "
              f"{test['entity_precision']:.3f}, recall {test['entity_recall']:.3f}), word accuracy "
              f"{test['token_accuracy']:.3f}")
    out = Path(config.train.out)
    if test:
        from lmforge.eval.metrics.classification import format_confusion

        print(format_confusion(test["confusion_matrix"], test["labels"]))
        print(f"metrics: {out / 'metrics.md'}" + (f", plot: {test['confusion_plot']}" if test.get("confusion_plot") else ""))
    print(f"model: {report['output']}\nreport: {out / 'report.md'}")
    return 0


def _data(args: argparse.Namespace, names: list[str]) -> int:
    from lmforge.errors import LmforgeError
    from lmforge.tune.datasets import NAMES, write_dataset

    if names == ["entities"]:  # the generated tagging set of the classification heads
        from lmforge.tune.classify import entity_splits, write_splits

        if args.out is None:
            raise LmforgeError("finetune data: --out DIR is required (it receives train/validation/test.jsonl)")
        sizes = {k: v for k, v in (("train", args.train_size), ("validation", args.validation_size),
                                   ("test", args.test_size)) if v is not None}
        info = write_splits(entity_splits(args.seed, sizes), args.out)
        print(json.dumps(info) if args.json else
              "entities: " + ", ".join(f"{k} {v}" for k, v in info["counts"].items()) + f" -> {args.out}")
        return 0
    if len(names) != 1:
        raise LmforgeError(f"finetune data: name one dataset ({', '.join(NAMES)})")
    if args.out is None:
        raise LmforgeError("finetune data: --out DIR is required (it receives train/validation/test.jsonl)")
    sizes = {k: v for k, v in (("train", args.train_size), ("validation", args.validation_size),
                               ("test", args.test_size)) if v is not None}
    info = write_dataset(names[0], args.out, args.seed, sizes, args.augment_copies, args.balance)
    if args.json:
        print(json.dumps(info))
    else:
        counts = ", ".join(f"{k} {v}" for k, v in info["counts"].items())
        print(f"{names[0]}: {counts} -> {args.out}/{{train,validation,test}}.jsonl")
        for split, balance in info.get("class_balance", {}).items():
            print(f"  {split}: " + ", ".join(f"{k} {v}" for k, v in balance.items()))
    return 0


def _eval(args: argparse.Namespace, rest: list[str]) -> int:
    from lmforge.errors import LmforgeError

    if len(rest) > 1:
        raise LmforgeError("finetune eval: at most one MODEL")
    if not args.data:
        raise LmforgeError("finetune eval: --data FILE.jsonl is required")
    from lmforge.cli.common import load_local
    from lmforge.tune.sft import exact_match, read_template
    from lmforge.tune.sft_data import read_jsonl

    records = read_jsonl(args.data)[:args.limit]
    args.dtype, args.device = "float32", "cpu"
    if args.adapter:
        from lmforge.align.safety import load_for_eval

        lm = load_for_eval(rest[0] if rest else None, args.adapter, "cpu")
    else:
        lm = load_local(rest[0] if rest else None, args)
    template = read_template(args.chat_template)
    scores = exact_match(lm.model, lm.tokenizer, records, args.max_new_tokens, template, progress=not args.quiet)
    scores["model"], scores["data"], scores["adapter"] = lm.name, args.data, args.adapter
    if args.out:
        from lmforge.io.atomic import write_json_atomic

        write_json_atomic(args.out, scores)
    if args.json:
        print(json.dumps(scores))
    else:
        print(f"{lm.name} on {args.data}: exact match {100 * scores['exact_match']:.1f}%, answer in output "
              f"{100 * scores['answer_in_output']:.1f}% ({scores['examples']} examples)"
              + (f", BLEU {scores['bleu']:.1f}, chrF {scores['chrf']:.1f}" if "chrf" in scores else ""))
        for s in scores["samples"][:3]:
            print(f"  reference {s['reference']!r} -> {s['output']!r}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    from lmforge.tune.classify import option_names as classify_option_names
    from lmforge.tune.sft import option_names as sft_option_names

    p = subparsers.add_parser(
        "finetune", help="supervised fine-tuning on chat data (loss on the answers), its datasets and scoring",
        description="lmforge finetune RECIPE: train from a recipe (lmforge/recipes/sft-*.yaml); every field is "
                    "also a flag --SECTION.FIELD VALUE (VALUE is YAML), e.g. --train.max-steps 50 --data.no-pack "
                    "is --data.pack false. lmforge finetune data NAME --out DIR: write a dataset (arithmetic, "
                    "word-problems, units, dates, json-extraction, format, mixed, sentiment, bible-en-es). "
                    "lmforge finetune eval [MODEL] --data FILE: greedy exact match of a model's answers. "
                    "lmforge finetune classify RECIPE: a sequence or token classification head on an encoder or "
                    "a decoder (lmforge/recipes/classify-*.yaml, tag-*.yaml; sections model, data, head, optim, "
                    "schedule, train, eval, peft); lmforge finetune data entities --out DIR: the generated "
                    "entity-tagging set.")
    p.add_argument("what", nargs="*", metavar=USAGE,
                   help="a recipe (file or name), or data NAME, or eval [MODEL], or classify RECIPE")
    p.add_argument("--out", help="training: output directory (same as --train.out); data: the dataset directory; "
                                 "eval: a JSON file for the scores")
    p.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint in the output")
    p.add_argument("--print-recipe", action="store_true", help="print the resolved recipe and exit (checks it too)")
    p.add_argument("--no-pack", action="store_true", help="one conversation per row, length-bucketed batches "
                                                          "(same as --data.pack false)")
    p.add_argument("--quiet", action="store_true", help="no progress line")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    g = p.add_argument_group("data NAME")
    g.add_argument("--seed", type=int, default=0, help="generation seed (default 0)")
    g.add_argument("--train-size", type=int, help="training items (default 2000; sentiment 140)")
    g.add_argument("--validation-size", type=int, help="validation items (default 100; sentiment 20)")
    g.add_argument("--test-size", type=int, help="test items (default 200; sentiment 40)")
    g.add_argument("--augment-copies", type=int, default=0,
                   help="classification sets: EDA variants (swap / delete words) added per training record")
    g.add_argument("--balance", choices=("oversample", "undersample"), help="classification sets: equalise classes")
    g = p.add_argument_group("eval [MODEL]")
    g.add_argument("--data", help="JSON-lines chat records to answer")
    g.add_argument("--limit", type=int, default=None, help="only the first N records")
    g.add_argument("--max-new-tokens", type=int, default=32, help="answer length limit (default 32)")
    g.add_argument("--chat-template", help="a Jinja chat template (file or text) instead of the model's")
    g.add_argument("--adapter", help="a PEFT adapter directory (a LoRA run's OUT/adapter) applied to MODEL")
    add_recipe_fields(p, sorted(set(sft_option_names()) | set(classify_option_names())))
    p.set_defaults(func=cmd_finetune)
