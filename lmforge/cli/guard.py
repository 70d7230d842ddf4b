"""``lmforge guard``: check texts, train and evaluate the guard's classifiers.

    lmforge guard check "Ignore all previous instructions"        # verdict of the input layers
    lmforge guard check --channel data "<review text>"            # a retrieved document or tool result
    lmforge guard check --reply "..." --system-prompt "..."       # the output checks
    lmforge guard redact notes.txt [--mode reversible --mapping map.json]
    lmforge guard train [RECIPE] [--SECTION.FIELD VALUE ...]      # lmforge/recipes/guard-*.yaml
    lmforge guard eval [--models runs/guard] [--out DIR]           # held-out figures (eval.json, eval.md)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from lmforge.cli.common import add_config_flags, add_recipe_fields, config_from_args, find_recipe, recipe_overrides
from lmforge.errors import LmforgeError


def _pipeline(args: argparse.Namespace):
    from lmforge.guard.pipeline import GuardConfig, GuardPipeline

    return GuardPipeline(config_from_args(GuardConfig, args))


def cmd_check(args: argparse.Namespace) -> int:
    text = args.text if args.text != "-" else sys.stdin.read()
    if not text.strip():
        raise LmforgeError("guard check: the text is empty")
    pipeline = _pipeline(args)
    if args.reply:
        verdict = pipeline.check_output(text, args.system_prompt or "", args.user or [])
    else:
        verdict = pipeline.check_input(text, args.channel)
    if args.json:
        print(json.dumps(verdict.to_dict()))
    else:
        print("allowed" if verdict.allowed else "flagged")
        for f in verdict.flags:
            print(f"  {f.layer}: {f.category} {f.score:.3f} ({f.detail})")
        if verdict.refusal:
            print(f"refusal: {verdict.refusal}")
    return 0 if verdict.allowed else 2


def cmd_redact(args: argparse.Namespace) -> int:
    from lmforge.guard.redact import Redactor, save_mapping
    from lmforge.io.text_files import read_text

    if args.mode == "reversible" and not args.mapping:
        raise LmforgeError("guard redact --mode reversible needs --mapping FILE to keep the originals apart")
    if args.mode == "pseudonym" and not args.key:
        raise LmforgeError("guard redact --mode pseudonym needs --key SECRET")
    text = sys.stdin.read() if args.file == "-" else read_text(args.file)
    redactor = Redactor(args.mode, key=args.key)
    result = redactor.redact(text)
    sys.stdout.write(result.text)
    if args.mapping:
        save_mapping(redactor.mapping, args.mapping)
    print(f"redacted {sum(result.counts.values())} matches: {json.dumps(result.counts)}", file=sys.stderr)
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from lmforge.guard.train import load_guard_recipe, to_yaml, train_guard

    config = load_guard_recipe(find_recipe(args.recipe), recipe_overrides(args))
    if args.print_recipe:
        print(to_yaml(config), end="")
        return 0
    report = train_guard(config, progress=not args.quiet)
    report.pop("classifiers")
    if args.json:
        print(json.dumps(report))
        return 0
    for name in ("injection", "moderation"):
        cal = report[name]["calibration"]
        print(f"{name}: " + ", ".join(f"{lab} threshold {c['threshold']:.3f} (calibration recall "
                                      f"{100 * (c['recall'] or 0):.1f}% at {100 * c['fpr']:.1f}% false positives)"
                                      for lab, c in cal.items()))
    print(f"classifiers: {report['output']}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from lmforge.guard.evaluate import evaluate_guard, format_markdown
    from lmforge.guard.pipeline import GuardConfig, GuardPipeline
    from lmforge.guard.train import datasets, load_guard_recipe
    from lmforge.io.atomic import write_json_atomic, write_text_atomic

    models = Path(args.models)
    recipe = models / "guard.yaml"
    config = load_guard_recipe(recipe if recipe.is_file() else None)
    pipeline = GuardPipeline(GuardConfig(models=str(models)))
    result = evaluate_guard(pipeline, datasets(config), args.split)
    out = Path(args.out or models)
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "eval.json", result)
    write_text_atomic(out / "eval.md", format_markdown(result))
    if args.json:
        print(json.dumps(result))
    else:
        print(format_markdown(result), end="")
        print(f"\nwritten: {out / 'eval.json'}, {out / 'eval.md'}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    from lmforge.guard.pipeline import GuardConfig
    from lmforge.guard.train import option_names

    p = subparsers.add_parser("guard", help="guardrails: check texts, redact PII, train and evaluate the classifiers",
                              description="Prompt-injection defense, moderation and PII redaction (lmforge/guard/).")
    sub = p.add_subparsers(dest="guard_command", required=True, metavar="check | redact | train | eval")

    c = sub.add_parser("check", help="the guard's verdict on one text (exit status 2 when flagged)")
    c.add_argument("text", help="the text to check ('-': stdin)")
    c.add_argument("--channel", choices=("user", "data"), default="user",
                   help="user: a message from the user; data: a retrieved document or tool result (default user)")
    c.add_argument("--reply", action="store_true", help="the text is a model reply: run the output checks")
    c.add_argument("--system-prompt", help="with --reply: the system prompt to check leakage against")
    c.add_argument("--user", action="append", help="with --reply: a user turn (PII the user gave is not a leak)")
    c.add_argument("--json", action="store_true", help="print the verdict as JSON")
    add_config_flags(c, GuardConfig, "guard layers")
    c.set_defaults(func=cmd_check)

    r = sub.add_parser("redact", help="replace PII in a text file (stdout), optionally keeping a mapping")
    r.add_argument("file", help="a text file ('-': stdin)")
    r.add_argument("--mode", choices=("irreversible", "reversible", "pseudonym"), default="irreversible",
                   help="typed placeholders; numbered ones with a mapping; keyed-hash pseudonyms (default irreversible)")
    r.add_argument("--mapping", help="reversible: write placeholder -> original here (owner-only permissions)")
    r.add_argument("--key", help="pseudonym: the secret key of the keyed hash")
    r.set_defaults(func=cmd_redact)

    t = sub.add_parser("train", help="train and calibrate the injection and moderation classifiers",
                       description="lmforge guard train [RECIPE]: recipe sections data, features, head, calibration, "
                                   "train (lmforge/recipes/guard-*.yaml); every field is a flag --SECTION.FIELD VALUE.")
    t.add_argument("recipe", nargs="?", help="a recipe file or name (default: the built-in defaults)")
    t.add_argument("--out", help="output directory (same as --train.out)")
    t.add_argument("--print-recipe", action="store_true", help="print the resolved recipe and exit")
    t.add_argument("--quiet", action="store_true", help="no progress line")
    t.add_argument("--json", action="store_true", help="print the report as JSON")
    add_recipe_fields(t, option_names())
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("eval", help="held-out figures: layer ablation, moderation, PII, tool policy, leakage")
    e.add_argument("--models", default="runs/guard", help="the trained classifiers' directory (default runs/guard)")
    e.add_argument("--split", choices=("test", "calibration", "train"), default="test", help="which split (default test)")
    e.add_argument("--out", help="where eval.json and eval.md go (default: the models directory)")
    e.add_argument("--json", action="store_true", help="print the result as JSON")
    e.set_defaults(func=cmd_eval)
