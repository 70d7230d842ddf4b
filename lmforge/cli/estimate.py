"""``lmforge estimate``: training memory, FLOPs and the Chinchilla budget for a model."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def load_config(spec: str | None):
    """ModelConfig from a registered name, HF directory, .gguf, config.json or recipe YAML."""
    from lmforge.errors import LmforgeError
    from lmforge.model.config import ModelConfig

    path = Path(spec).expanduser() if spec else None
    try:
        if path is not None and path.is_file() and path.suffix.lower() == ".json":
            from lmforge.model.families import config_from_hf

            data = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(data, dict):
                raise LmforgeError(f"{path}: expected a JSON object")
            return config_from_hf(data) if "model_type" in data else ModelConfig.from_dict(data)
        if path is not None and path.is_file() and path.suffix.lower() in (".yaml", ".yml"):
            import yaml

            recipe = yaml.safe_load(path.read_text(encoding="utf-8"))
            if isinstance(recipe, dict) and ("train" in recipe or "data" in recipe):  # an `lmforge pretrain` recipe
                from lmforge.train.recipe import from_dict, model_config_of

                pretrain = from_dict(recipe, str(path))
                if pretrain.model.init_from:
                    return load_config(pretrain.model.init_from)
                return model_config_of(pretrain.model, pretrain.data.tokenizer_vocab_size, pretrain.data.seq_len)
            model = recipe.get("model") if isinstance(recipe, dict) else None
            if isinstance(model, dict):
                return ModelConfig.from_dict(model)
            if isinstance(model, str):
                return load_config(model)
            raise LmforgeError(f"{path}: a recipe needs a 'model' entry (a model name or a mapping of ModelConfig fields)")
        from lmforge.model.info import read_config
        from lmforge.model.registry import resolve

        return read_config(resolve(spec))
    except LmforgeError:
        raise
    except (ValueError, TypeError, KeyError, OSError) as exc:  # malformed JSON/YAML or config values
        raise LmforgeError(f"cannot read a model config from {spec}: {exc}") from None
    except Exception as exc:  # yaml.YAMLError and friends, without importing yaml up front
        raise LmforgeError(f"cannot read a model config from {spec}: {exc}") from None


def cmd_estimate(args: argparse.Namespace) -> int:
    from lmforge.errors import LmforgeError
    from lmforge.train.estimate import TrainSetup, estimate, format_report

    try:
        setup = TrainSetup(
            batch_size=args.batch_size, seq_len=args.seq_len, weight_dtype=args.dtype, grad_dtype=args.grad_dtype,
            optimizer_dtype=args.optimizer_dtype, activation_dtype=args.activation_dtype, optimizer=args.optimizer,
            checkpointing=args.checkpointing, attention=args.attention, tokens=args.tokens,
        )
    except ValueError as exc:
        raise LmforgeError(str(exc)) from None
    config = load_config(args.model)
    report = estimate(config, setup)
    print(json.dumps(report) if args.json else format_report(report))
    return 0


def _count(text: str) -> int:
    try:
        return int(float(text))  # accepts 2e9
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "estimate", help="memory, FLOPs and Chinchilla token budget of training a model",
        description="Estimate training memory (weights, gradients, optimizer, activations) and compute "
                    "(6ND + attention) for a model, from its config alone.",
    )
    p.add_argument("model", nargs="?", default=None,
                   help="registered name, Hugging Face directory, .gguf, config.json or recipe YAML (default: the default model)")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per step (default 8)")
    p.add_argument("--seq-len", type=int, default=1024, help="tokens per sequence (default 1024)")
    p.add_argument("--dtype", default="float32", help="weight dtype: float32, bfloat16, float16 (default float32)")
    p.add_argument("--grad-dtype", default=None, help="gradient dtype (default: the weight dtype)")
    p.add_argument("--optimizer-dtype", default="float32", help="optimizer state dtype (default float32)")
    p.add_argument("--activation-dtype", default=None, help="activation dtype (default: the weight dtype)")
    p.add_argument("--optimizer", default="adamw", help="adamw (2 states) or sgd (no momentum, no state)")
    p.add_argument("--checkpointing", action="store_true", help="activation checkpointing, one block at a time")
    p.add_argument("--attention", default="sdpa", help="sdpa (fused, default) or eager (materialised scores)")
    p.add_argument("--tokens", type=_count, default=None, help="training tokens D (default: 20 per parameter)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_estimate)
