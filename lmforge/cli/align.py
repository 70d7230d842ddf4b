"""``lmforge align``: preference data, reward models and DPO (see lmforge/align/).

    lmforge align data OUT                       # write the generated pairs (train/validation/test.jsonl)
    lmforge align reward [RECIPE] [--flags]      # reward model, Bradley-Terry loss
    lmforge align dpo [RECIPE] [--flags]         # DPO / IPO / SimPO ... against the frozen start

A RECIPE is a YAML file (or the name of one in ./recipes or lmforge's recipes/, e.g.
``dpo-smollm2``) whose keys are the run's fields; flags override it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from lmforge.align.config import DPOConfig, PreferenceLossConfig, RewardConfig
from lmforge.align.preference_data import PreferenceDataConfig
from lmforge.cli.common import _dest, add_config_flags, config_flags, config_from_args


def _recipe_values(spec: str | None) -> dict:
    from lmforge.cli.common import find_recipe
    from lmforge.errors import LmforgeError

    path = find_recipe(spec)
    if path is None:
        return {}
    import yaml

    try:
        values = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise LmforgeError(f"{path} is not valid YAML: {exc}") from None
    if not isinstance(values, dict):
        raise LmforgeError(f"{path} must hold a mapping of field: value")
    return values


def _given_flags(cls: type, args: argparse.Namespace) -> dict:
    """The flags of `cls` that were given on the command line (absent ones keep the recipe's values)."""
    full = config_from_args(cls, args)
    return {f.name: getattr(full, f.name) for f, _ in config_flags(cls) if _dest(cls, f) in vars(args)}


def _config(cls: type, args: argparse.Namespace):
    from lmforge.align.config import config_from_dict

    values = _recipe_values(args.recipe)
    values.update(_given_flags(cls, args))
    if cls is DPOConfig:
        loss = dict(values.get("loss") or {})
        loss.update(_given_flags(PreferenceLossConfig, args))
        values["loss"] = loss
    config = config_from_dict(cls, values)
    config.validate()
    return config


def _print_result(report: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(report))
        return
    start, end = report["heldout_start"], report["heldout_end"]
    line = f"{report['objective']}: {report['steps']} steps in {report['seconds']:.0f} s"
    if start and end:
        if "logp_accuracy" in end:
            line += (f"; held-out preference accuracy {start['logp_accuracy']:.3f} -> {end['logp_accuracy']:.3f}, "
                     f"reward accuracy {end['reward_accuracy']:.3f}, margin {end['reward_margin']:+.3f}")
        else:
            line += f"; held-out pair accuracy {start['reward_accuracy']:.3f} -> {end['reward_accuracy']:.3f}"
    print(line)
    out = Path(report["config"]["out"])
    print(f"report: {out / 'report.md'}" + (f"\nmodel: {report['model']}" if report["model"] else ""))


def _run(cls: type, train: str, args: argparse.Namespace) -> int:
    """`lmforge align dpo|reward`: the config from recipe + flags, then lmforge.align.train's `train`."""
    config = _config(cls, args)
    if args.print_config:
        from dataclasses import asdict

        print(json.dumps(asdict(config), indent=2))
        return 0
    from lmforge.align import train as training

    _print_result(getattr(training, train)(config, progress=not args.quiet), args.json)
    return 0


def cmd_dpo(args: argparse.Namespace) -> int:
    return _run(DPOConfig, "train_dpo", args)


def cmd_reward(args: argparse.Namespace) -> int:
    return _run(RewardConfig, "train_reward", args)


def cmd_data(args: argparse.Namespace) -> int:
    from lmforge.align.preference_data import generate_pairs, write_pairs

    config = config_from_args(PreferenceDataConfig, args)
    splits = generate_pairs(config)
    paths = write_pairs(args.out, splits)
    for split, path in paths.items():
        print(f"{split}: {len(splits[split])} pairs -> {path}")
    return 0


def _run_parser(verbs, name: str, cls: type, help_text: str, loss: bool):
    p = verbs.add_parser(name, help=help_text,
                         description=help_text + ". Every field of the recipe is also a flag; flags win.")
    p.add_argument("recipe", nargs="?", help="a recipe YAML file or the name of one (e.g. dpo-smollm2)")
    p.add_argument("--print-config", action="store_true", help="print the resolved configuration and exit")
    p.add_argument("--quiet", action="store_true", help="no progress line")
    p.add_argument("--json", action="store_true", help="print the final report as one JSON object")
    add_config_flags(p, cls, "run")
    if loss:
        add_config_flags(p, PreferenceLossConfig, "preference loss")
    return p


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("align", help="alignment: preference pairs, reward models, DPO and relatives")
    verbs = p.add_subparsers(dest="align_command", required=True, metavar="VERB")
    _run_parser(verbs, "dpo", DPOConfig, "preference optimisation (DPO, IPO, SimPO, ...) of a model",
                loss=True).set_defaults(func=cmd_dpo)
    _run_parser(verbs, "reward", RewardConfig, "train a reward model on preference pairs",
                loss=False).set_defaults(func=cmd_reward)
    d = verbs.add_parser("data", help="write the generated preference pairs as JSONL (train/validation/test)")
    d.add_argument("out", help="output directory")
    add_config_flags(d, PreferenceDataConfig)
    d.set_defaults(func=cmd_data)
