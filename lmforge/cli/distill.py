"""``lmforge distill``: knowledge distillation of a teacher into a smaller student, from a recipe.

    lmforge distill distill-smollm2 [--section.field VALUE ...]   (lmforge/tune/distill.py)

Trains the student on the teacher's soft targets, then (``distill.baseline``) the same student
on hard labels only, and compares teacher, student and baseline: parameters, size on disk,
decode speed through the engine, held-out perplexity, agreement with the teacher.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from lmforge.cli.common import add_recipe_fields, find_recipe, recipe_overrides


def cmd_distill(args: argparse.Namespace) -> int:
    from lmforge.errors import LmforgeError

    if len(args.recipe) > 1:
        raise LmforgeError(f"expected at most one RECIPE, got {' '.join(args.recipe)}")
    from lmforge.tune.distill import distill, format_comparison, load_distill_recipe, to_yaml

    config = load_distill_recipe(find_recipe(args.recipe[0] if args.recipe else None), recipe_overrides(args))
    if args.print_recipe:
        print(to_yaml(config), end="")
        return 0
    result = distill(config, resume=args.resume, progress=not args.quiet)
    if not result:  # not the main process of a distributed run
        return 0
    if args.json:
        print(json.dumps(result))
        return 0
    print(format_comparison(result["comparison"]), end="")
    out = Path(config.train.out)
    print(f"student: {result['distilled']['output']}\nreport: {out / 'report.md'}, comparison: {out / 'comparison.md'}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    from lmforge.tune.distill import option_names

    p = subparsers.add_parser(
        "distill", help="knowledge distillation: train a smaller student on a teacher's soft targets",
        description="lmforge distill RECIPE: distil the teacher (default: the default model) into a student "
                    "(layers copied from the teacher, or a smaller random configuration) from a recipe "
                    "(lmforge/recipes/distill-*.yaml); every field is also a flag --SECTION.FIELD VALUE (VALUE is "
                    "YAML), e.g. --distill.temperature 4 --student.keep-every 3 --train.max-steps 100. "
                    "Writes OUT/model (the student), OUT/baseline (the same student on hard labels) and "
                    "OUT/comparison.md.")
    p.add_argument("recipe", nargs="*", metavar="RECIPE", help="a recipe file or name (default: the defaults)")
    p.add_argument("--out", help="output directory (same as --train.out)")
    p.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoints in the output")
    p.add_argument("--print-recipe", action="store_true", help="print the resolved recipe and exit (checks it too)")
    p.add_argument("--quiet", action="store_true", help="no progress line")
    p.add_argument("--json", action="store_true", help="print the reports and the comparison as one JSON object")
    add_recipe_fields(p, option_names())
    p.set_defaults(func=cmd_distill)
