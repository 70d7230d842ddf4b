"""``lmforge hpsearch``: random search or successive halving over a pretraining recipe (lmforge/train/hpsearch.py)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from lmforge.cli.common import add_config_flags, add_recipe_fields, config_from_args, find_recipe, recipe_overrides


def cmd_hpsearch(args: argparse.Namespace) -> int:
    from lmforge.train.hpsearch import SearchOptions, read_space, run_search
    from lmforge.train.recipe import load_recipe

    options = config_from_args(SearchOptions, args)
    options.validate()
    if options.space is None:
        from lmforge.errors import LmforgeError

        raise LmforgeError("give a search space: --space FILE.toml (see `lmforge hpsearch --help`)")
    space = read_space(options.space)  # every check before any training
    base = load_recipe(find_recipe(args.recipe), recipe_overrides(args))
    result = run_search(base, options, space, log=(lambda m: None) if args.quiet else (lambda m: print(m, flush=True)),
                        progress=not args.quiet)
    if args.json:
        print(json.dumps(result))
    else:
        best = result["best"]
        print(f"best: trial {best['trial']}, validation loss {best['loss']:.4f} after {best['steps']} steps "
              f"({', '.join(f'{k}={v:.3g}' if isinstance(v, float) else f'{k}={v}' for k, v in best['params'].items())})"
              f"; {result['steps_trained']:,} steps trained of {result['steps_if_all_finished']:,}\n"
              f"report: {Path(options.out) / 'hpsearch.md'}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    from lmforge.train.hpsearch import SearchOptions
    from lmforge.train.recipe import option_names

    p = subparsers.add_parser(
        "hpsearch", help="hyperparameter search over a pretraining recipe: random search or successive halving",
        description="Draw --trials configurations of the recipe from a TOML search space, e.g.\n"
                    '  "optim.lr" = { log_uniform = [1e-4, 1e-2] }\n'
                    '  "schedule.warmup_steps" = { int_uniform = [0, 40] }\n'
                    '  "model.n_embd" = { choice = [64, 128] }\n'
                    "and train them (halving: all to --min-steps, the best 1/eta continue from their checkpoints "
                    "to eta times as many steps, ... up to the budget). Started again with the same arguments, an "
                    "interrupted search continues.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("recipe", nargs="?", help="a pretraining recipe (file or name; default: the built-in defaults)")
    add_config_flags(p, SearchOptions)
    p.add_argument("--quiet", action="store_true", help="no progress or per-trial lines")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    add_recipe_fields(p, option_names())
    p.set_defaults(func=cmd_hpsearch)
