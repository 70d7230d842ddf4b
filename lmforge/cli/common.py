"""What every verb shares: the model argument and its flags, loading with progress,
sampling flags, remote endpoints, and flags generated from configuration dataclasses."""

from __future__ import annotations

import argparse
import dataclasses
import os
import types
import typing
from pathlib import Path
from typing import Any

from lmforge.errors import LmforgeError
from lmforge import options
from lmforge.options import flag_spec

MODEL_HELP = "registered model name, Hugging Face directory or .gguf file (default: the default model)"
TOKENIZER_HELP = "tokenizer.json, a directory with one, a .gguf file or a registered model name"


def add_model_argument(p: argparse.ArgumentParser, name: str = "model") -> None:
    p.add_argument(name, nargs="?", help=MODEL_HELP)


def add_device_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N, mps or auto (default)")
    p.add_argument("--dtype", default="auto", help="float32, bfloat16, float16 or auto (fp32 on CPU, bf16 on recent GPUs)")
    p.add_argument("--weights", default="float", choices=("float", "q4", "q8"),
                   help="linear layers as float (default), or kept quantized on CPU: q4 (int4 groups of 32; a GGUF "
                        "file's Q4_0/Q4_1 blocks as stored) or q8 (int8 per row); for commands that generate or score")
    p.add_argument("--prefill", default="auto", choices=("auto", "float32", "bf16", "int8"),
                   help="precision of a prompt's matrix products on a CPU, for generation: auto (bf16 where the "
                        "CPU has bf16 units, else float32), float32, bf16, or int8 (per-token int8 activations "
                        "against smoothed int8 weights, calibrated at load; fastest where the CPU has VNNI/AMX)")


def add_remote_flags(p: argparse.ArgumentParser, needs: str = "", scoring: bool = False) -> None:
    """--base-url and --api-key; with `scoring`, what scoring prompts through an endpoint needs too."""
    p.add_argument("--base-url", help="use an OpenAI-compatible endpoint instead of a local model"
                                      + (f" ({needs})" if needs else " (MODEL is then the remote model name)"))
    p.add_argument("--api-key", default=None, help="API key for --base-url (default: $OPENAI_API_KEY)")
    if scoring:
        p.add_argument("--tokenizer", help=f"with --base-url: the served model's tokenizer ({TOKENIZER_HELP}; "
                                           "default: the default model's)")
        p.add_argument("--request-timeout", type=float, default=300.0,
                       help="with --base-url: seconds to wait for one scoring request (default 300)")
        p.add_argument("--retries", type=int, default=2,
                       help="with --base-url: repeat a scoring request this often on network errors or busy "
                            "answers (default 2)")


def check_remote_arguments(args: argparse.Namespace) -> None:
    if getattr(args, "tokenizer", None) and not args.base_url:
        raise LmforgeError("--tokenizer applies to --base-url (a local model brings its own tokenizer)")


def api_key(args: argparse.Namespace) -> str | None:
    return args.api_key or os.environ.get("OPENAI_API_KEY")


def add_sampling_flags(p: argparse.ArgumentParser, temperature: float) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--max-tokens", type=int, default=256, help="most tokens to generate (default 256)")
    g.add_argument("--temperature", type=float, default=temperature, help=f"0 = greedy (default {temperature})")
    g.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling mass (default 0.9; 1 = off)")
    g.add_argument("--top-k", type=int, default=0, help="keep only the k most likely tokens (0 = off)")
    g.add_argument("--min-p", type=float, default=0.0, help="drop tokens below min_p x the top probability")
    g.add_argument("--repetition-penalty", type=float, default=1.0, help="> 1 discourages repeats (1 = off)")
    g.add_argument("--stop", action="append", default=[], help="stop before this string (repeatable)")
    g.add_argument("--seed", type=int, default=None, help="random seed for reproducible sampling")


def sampling_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    return dict(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                min_p=args.min_p, repetition_penalty=args.repetition_penalty, stop=args.stop, seed=args.seed)


def load_model(args: argparse.Namespace):
    """The model a verb works on: a `RemoteModel` for --base-url, else the local MODEL (`load_local`)."""
    if getattr(args, "base_url", None):
        from lmforge.infer.remote import RemoteModel

        return RemoteModel(args.base_url, api_key(args), args.model)
    return load_local(args.model, args)


def load_local(name: str | None, args: argparse.Namespace):
    """`lmforge.load` of a model name or path on --device/--dtype, with a progress line."""
    from lmforge.infer.loaded import load
    from lmforge.io.progress import Progress

    progress = Progress(f"loading {name or 'the default model'}", unit="tensors", log_every=5.0)
    lm = load(name, dtype=getattr(args, "dtype", "auto"), device=getattr(args, "device", "auto"), progress=progress,
              weights=getattr(args, "weights", "float"), prefill=getattr(args, "prefill", "auto"))
    progress.close(f"loaded {lm.name}" if progress.tty else None)
    return lm


def int_list(text: str) -> list[int]:
    """``1,10,100`` -> [1, 10, 100], as an argparse type."""
    try:
        return options.int_list(text)
    except LmforgeError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


# ---- flags from configuration dataclasses -------------------------------------------------

def _without_none(hint: Any) -> Any:
    """``int | None`` -> int: the type a flag's value converts to."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return args[0] if len(args) == 1 else str
    return hint


def config_flags(cls: type) -> list[tuple[dataclasses.Field, Any]]:
    hints = typing.get_type_hints(cls)
    return [(f, hints[f.name]) for f in dataclasses.fields(cls) if (spec := flag_spec(f)) is not None and spec.cli]


def flag_name(field: dataclasses.Field, hint: Any) -> str:
    spec = flag_spec(field)
    if spec.flag:
        return spec.flag
    name = field.name.replace("_", "-")
    return f"--no-{name}" if hint is bool and field.default is True else f"--{name}"


def _dest(cls: type, field: dataclasses.Field) -> str:
    """Where a field's flag value is kept: per class, so two configurations on one parser may share field names."""
    return f"cfg:{cls.__qualname__}:{field.name}"


def add_config_flags(p: argparse.ArgumentParser, cls: type, title: str | None = None) -> None:
    """One flag per `option(...)` field of `cls`; `config_from_args` reads them back."""
    group = p.add_argument_group(title) if title else p
    for field, hint in config_flags(cls):
        spec = flag_spec(field)
        kwargs: dict[str, Any] = {"dest": _dest(cls, field), "help": spec.help, "default": argparse.SUPPRESS}
        base = _without_none(hint)
        if base is bool:
            kwargs["action"] = "store_false" if field.default is True else "store_true"
        else:
            if spec.repeat:
                kwargs["action"] = "append"
            if spec.nargs:
                kwargs["nargs"] = spec.nargs
            if spec.choices:
                kwargs["choices"] = spec.choices
            else:
                kwargs["metavar"] = spec.metavar or flag_name(field, hint).lstrip("-").upper().replace("-", "_")
            element = typing.get_args(base)[0] if typing.get_origin(base) in (list, tuple) else base
            if spec.parse is None and element in (int, float):
                kwargs["type"] = element
            if field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
                kwargs["required"] = True
            elif field.default not in (dataclasses.MISSING, None, "", False) and not spec.repeat:
                kwargs["help"] += f" (default {field.default})"
        group.add_argument(flag_name(field, hint), **kwargs)


def config_from_args(cls: type, args: argparse.Namespace, **given: Any):
    """An instance of `cls` from the flags `add_config_flags` made (absent flags keep the defaults)."""
    values = dict(given)
    for field, _ in config_flags(cls):
        key = _dest(cls, field)
        if key in vars(args) and field.name not in given:
            raw = getattr(args, key)
            parse = flag_spec(field).parse
            values[field.name] = parse(raw) if parse is not None else raw
    return cls(**values)


# -------------------------------------------------------------- recipes (pretrain, finetune, align)
SHIPPED_RECIPES = Path(__file__).resolve().parents[1] / "recipes"  # package data: there in installed copies too


def find_recipe(spec: str | None) -> Path | None:
    """A recipe file: a path, or NAME for ./recipes/NAME.yaml or lmforge's recipes/NAME.yaml."""
    if spec is None:
        return None
    path = Path(spec).expanduser()
    if path.is_file():
        return path
    if path.suffix or "/" in spec:
        raise LmforgeError(f"no such recipe: {spec}")
    for folder in (Path.cwd() / "recipes", SHIPPED_RECIPES):
        candidate = folder / f"{spec}.yaml"
        if candidate.is_file():
            return candidate
    raise LmforgeError(f"no recipe named {spec!r} (looked for {spec}.yaml in ./recipes and lmforge's recipes/)")


def add_recipe_fields(p: argparse.ArgumentParser, names: list[str]) -> None:
    """A hidden flag --SECTION.FIELD (and --SECTION.FIELD_NAME) for every recipe field in `names`."""
    fields = p.add_argument_group("recipe fields")
    for name in names:
        section, field = name.split(".")
        flags = [f"--{section}.{field.replace('_', '-')}"] + ([f"--{name}"] if "_" in field else [])
        fields.add_argument(*flags, dest=f"set:{name}", default=argparse.SUPPRESS, metavar="V", help=argparse.SUPPRESS)


def recipe_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The recipe fields given as flags, values read as YAML (text that is not YAML stays text),
    plus --out as train.out."""
    import yaml

    values: dict[str, Any] = {}
    for key, raw in vars(args).items():
        if key.startswith("set:"):
            try:
                values[key[4:]] = yaml.safe_load(raw)
            except yaml.YAMLError:
                values[key[4:]] = raw
    if getattr(args, "out", None) is not None:
        values["train.out"] = args.out
    return values
