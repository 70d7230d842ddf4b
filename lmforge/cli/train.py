"""``lmforge pretrain``: train a language model from a YAML recipe (see recipe.py and loop.py)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from lmforge.cli.common import add_recipe_fields, find_recipe, int_list, recipe_overrides

RECIPE_HELP = ("a recipe YAML file, or the name of one in ./recipes or lmforge's recipes/ "
               "(default: the built-in defaults, a tiny Llama on the offline Wikipedia + news text)")


def cmd_pretrain(args: argparse.Namespace) -> int:
    from lmforge.train.recipe import load_recipe, to_yaml

    config = load_recipe(find_recipe(args.recipe), recipe_overrides(args))  # every check before any work
    if args.print_recipe:
        print(to_yaml(config), end="")
        return 0
    from lmforge.train.loop import pretrain

    report = pretrain(config, resume=args.resume, progress=not args.quiet)
    if not report:  # not the main process of a distributed run
        return 0
    if args.json:
        print(json.dumps(report))
    else:
        last = report["validation"][-1] if report["validation"] else None
        summary = f"trained {report['steps']} steps ({report['tokens']:,} tokens) in {report['train_seconds']:.0f} s"
        if last:
            summary += f"; validation loss {last['val_loss']:.4f} " + (
                f"({last['val_bpb']:.3f} bits/byte)" if "val_bpb" in last
                else f"(masked-token accuracy {last['masked_accuracy']:.3f})" if "masked_accuracy" in last else "")
            if report["unigram_baseline_loss"] is not None:
                summary += f" vs unigram baseline {report['unigram_baseline_loss']:.4f}"
        print(summary)
        print(f"checkpoint: {report['checkpoint']}\nreport: {Path(config.train.out) / 'report.md'}")
    return 0


def cmd_scaling_sweep(args: argparse.Namespace) -> int:
    from lmforge.train.recipe import load_recipe
    from lmforge.train.sweep import law_text, run_sweep

    base = load_recipe(find_recipe(args.recipe), recipe_overrides(args) | {"train.out": args.out})
    result = run_sweep(base, args.widths, args.steps, args.out, args.count,
                       log=(lambda m: None) if args.quiet else (lambda m: print(m, flush=True)))
    print(json.dumps(result) if args.json else f"fitted {result['law']} over {len(result['points'])} runs: "
          f"{law_text(result['fit'])}\n"
          f"report: {Path(args.out) / 'sweep.md'}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    from lmforge.train.recipe import option_names as recipe_option_names

    p = subparsers.add_parser(
        "pretrain", help="train a language model from a YAML recipe (also under torchrun: DDP / FSDP)",
        description="Train a model from a recipe. Every recipe field is also a flag --SECTION.FIELD VALUE "
                    "(VALUE is YAML), e.g. --train.max-steps 50 --optim.lr 1e-3.")
    p.add_argument("recipe", nargs="?", help=RECIPE_HELP)
    p.add_argument("--out", help="output directory (same as --train.out)")
    p.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint in the output")
    p.add_argument("--print-recipe", action="store_true", help="print the resolved recipe and exit (checks it too)")
    p.add_argument("--quiet", action="store_true", help="no progress line")
    p.add_argument("--json", action="store_true", help="print the final report as one JSON object")
    add_recipe_fields(p, recipe_option_names())
    p.set_defaults(func=cmd_pretrain)

    p = subparsers.add_parser("scaling", help="scaling laws: sweep small pretraining runs and fit L(N, D)")
    verbs = p.add_subparsers(dest="scaling_command", required=True, metavar="VERB")
    s = verbs.add_parser("sweep", help="train a grid of widths x step counts from a recipe, fit and plot the law",
                         description="Every (width, steps) pair is one pretraining run of the recipe with that "
                                     "model width and step count; finished runs are skipped on a restart.")
    s.add_argument("recipe", nargs="?", help=RECIPE_HELP)
    s.add_argument("--out", required=True, help="sweep directory (runs/, sweep.json, sweep.md, scaling.png)")
    s.add_argument("--widths", type=int_list, default=[32, 64, 96, 128], help="model widths (default 32,64,96,128)")
    s.add_argument("--steps", type=int_list, default=[100, 200], help="step counts (default 100,200)")
    s.add_argument("--count", choices=("non-embedding", "total"), default="non-embedding",
                   help="which parameters N counts (default non-embedding)")
    s.add_argument("--quiet", action="store_true")
    s.add_argument("--json", action="store_true", help="print the result as one JSON object")
    add_recipe_fields(s, recipe_option_names())
    s.set_defaults(func=cmd_scaling_sweep)
