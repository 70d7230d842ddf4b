"""``lmforge align``: preference data, reward models and DPO (see lmforge/align/).

    lmforge align data OUT                       # write the generated pairs (train/validation/test.jsonl)
    lmforge align reward [RECIPE] [--flags]      # reward model, Bradley-Terry loss
    lmforge align dpo [RECIPE] [--flags]         # DPO / IPO / SimPO ... against the frozen start
    lmforge align ppo [RECIPE] [--flags]         # PPO from rewards: value head, GAE, KL penalty
    lmforge align grpo [RECIPE] [--flags]        # GRPO: group-relative advantages, no value head
    lmforge align safety-eval [--model M] [--adapter DIR]   # refusal, over-refusal, bias probes
    lmforge align safety-data OUT                # chat records for safety SFT (refusals + look-alikes + tasks)

A RECIPE is a YAML file (or the name of one in ./recipes or lmforge's recipes/, e.g.
``dpo-smollm2``) whose keys are the run's fields; flags override it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from lmforge.align.config import DPOConfig, GRPOConfig, PPOConfig, PreferenceLossConfig, RewardConfig
from lmforge.align.preference_data import PreferenceDataConfig
from lmforge.cli.common import _dest, add_config_flags, config_flags, config_from_args
from lmforge.tune.peft.options import PeftOptions


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
    if cls in (PPOConfig, GRPOConfig):
        peft = dict(values.get("peft") or {})
        peft.update(_given_flags(PeftOptions, args))
        values["peft"] = peft
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


def _print_rl_result(report: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(report))
        return
    a, b = report["first_quarter"], report["last_quarter"]
    line = (f"{report['objective']}: {report['steps']} steps in {report['seconds']:.0f} s; mean reward "
            f"{a['reward']:.3f} -> {b['reward']:.3f} (first -> last quarter), KL to the reference {b['kl']:.4f}/token")
    if report["accuracy_start"] is not None:
        line += f"; greedy accuracy {report['accuracy_start']:.3f} -> {report['accuracy_end']:.3f}"
    print(line)
    out = Path(report["config"]["out"])
    print(f"report: {out / 'report.md'}" + (f"\nmodel: {report['model']}" if report["model"] else ""))


def _run_rl(cls: type, args: argparse.Namespace) -> int:
    """`lmforge align ppo|grpo`: the config from recipe + flags, then lmforge.align.rl's `train_rl`."""
    config = _config(cls, args)
    if args.print_config:
        from dataclasses import asdict

        print(json.dumps(asdict(config), indent=2))
        return 0
    from lmforge.align.rl import train_rl

    _print_rl_result(train_rl(config, progress=not args.quiet), args.json)
    return 0


def cmd_ppo(args: argparse.Namespace) -> int:
    return _run_rl(PPOConfig, args)


def cmd_grpo(args: argparse.Namespace) -> int:
    return _run_rl(GRPOConfig, args)


def cmd_safety_eval(args: argparse.Namespace) -> int:
    from lmforge.align.config import SafetyEvalConfig
    from lmforge.align.safety import evaluate_safety, format_table, write_report

    config = config_from_args(SafetyEvalConfig, args)
    config.validate()
    report = evaluate_safety(config, progress=not args.quiet)
    paths = write_report(report, config.out, plots=config.plots)
    if args.json:
        print(json.dumps({k: v for k, v in report.items() if k != "answers"}))
        return 0
    print(format_table(report))
    print(f"report: {paths['json']} ({report['seconds']:.0f} s)" + (f", plot: {paths['png']}" if "png" in paths else ""))
    return 0


def cmd_safety_data(args: argparse.Namespace) -> int:
    from lmforge.align.config import SafetySftDataConfig
    from lmforge.align.safety import write_safety_sft

    for split, path in write_safety_sft(args.out, config_from_args(SafetySftDataConfig, args)).items():
        print(f"{split}: {sum(1 for _ in open(path, encoding='utf-8'))} records -> {path}")
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    from lmforge.align.preference_data import generate_pairs, write_pairs

    config = config_from_args(PreferenceDataConfig, args)
    splits = generate_pairs(config)
    paths = write_pairs(args.out, splits)
    for split, path in paths.items():
        print(f"{split}: {len(splits[split])} pairs -> {path}")
    return 0


def _run_parser(verbs, name: str, cls: type, help_text: str, loss: bool, peft: bool = False):
    p = verbs.add_parser(name, help=help_text,
                         description=help_text + ". Every field of the recipe is also a flag; flags win.")
    p.add_argument("recipe", nargs="?", help="a recipe YAML file or the name of one (e.g. dpo-smollm2)")
    p.add_argument("--print-config", action="store_true", help="print the resolved configuration and exit")
    p.add_argument("--quiet", action="store_true", help="no progress line")
    p.add_argument("--json", action="store_true", help="print the final report as one JSON object")
    add_config_flags(p, cls, "run")
    if loss:
        add_config_flags(p, PreferenceLossConfig, "preference loss")
    if peft:
        add_config_flags(p, PeftOptions, "adapters (LoRA / QLoRA)")
    return p


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("align", help="alignment: preference pairs, reward models, DPO and relatives, PPO, GRPO")
    verbs = p.add_subparsers(dest="align_command", required=True, metavar="VERB")
    _run_parser(verbs, "dpo", DPOConfig, "preference optimisation (DPO, IPO, SimPO, ...) of a model",
                loss=True).set_defaults(func=cmd_dpo)
    _run_parser(verbs, "reward", RewardConfig, "train a reward model on preference pairs",
                loss=False).set_defaults(func=cmd_reward)
    _run_parser(verbs, "ppo", PPOConfig, "PPO from rewards (a checker or a reward model): value head, GAE, "
                "clipped objective, KL penalty to the start", loss=False, peft=True).set_defaults(func=cmd_ppo)
    _run_parser(verbs, "grpo", GRPOConfig, "GRPO from rewards: group-relative advantages, clipped objective, "
                "KL penalty to the start", loss=False, peft=True).set_defaults(func=cmd_grpo)
    from lmforge.align.config import SafetyEvalConfig, SafetySftDataConfig

    s = verbs.add_parser("safety-eval", help="refusal rate on held-out harmful requests, over-refusal on benign "
                         "look-alikes, reworded requests, bias probes (writes OUT/report.json and a plot)")
    s.add_argument("--quiet", action="store_true", help="no progress line")
    s.add_argument("--json", action="store_true", help="print the report (without the answers) as one JSON object")
    add_config_flags(s, SafetyEvalConfig)
    s.set_defaults(func=cmd_safety_eval)
    sd = verbs.add_parser("safety-data", help="write chat records for safety SFT: refusals, helpful answers to "
                          "look-alikes, stereotype answers and general tasks (train/validation.jsonl)")
    sd.add_argument("out", help="output directory")
    add_config_flags(sd, SafetySftDataConfig)
    sd.set_defaults(func=cmd_safety_data)
    d = verbs.add_parser("data", help="write the generated preference pairs as JSONL (train/validation/test)")
    d.add_argument("out", help="output directory")
    add_config_flags(d, PreferenceDataConfig)
    d.set_defaults(func=cmd_data)
