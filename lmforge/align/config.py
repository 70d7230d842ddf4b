"""Configuration of the alignment runs and losses: plain dataclasses, no torch import.

Every `option(...)` field is a flag of ``lmforge align`` (lmforge/cli/align.py) and a key
of a recipe (lmforge/recipes/dpo-*.yaml, reward-*.yaml); the loss settings of a DPO run
are the recipe's ``loss:`` section and the flags --loss-type, --beta, ...
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lmforge.align.preference_data import KINDS
from lmforge.errors import LmforgeError
from lmforge.options import option

LOSS_TYPES = ("sigmoid", "robust", "hinge", "ipo", "simpo")


@dataclass
class PreferenceLossConfig:
    """Which preference loss and its constants."""

    loss_type: str = option("sigmoid", choices=LOSS_TYPES,
                            help="sigmoid (DPO), robust, hinge, ipo or simpo (reference-free, length-normalised)")
    beta: float = option(0.1, help="inverse temperature: larger keeps the policy closer to the reference")
    label_smoothing: float = option(0.0, help="assumed probability that a pair's label is flipped (sigmoid, robust, simpo)")
    simpo_gamma: float = option(0.5, help="simpo: target reward margin")
    reference_free: bool = option(False, help="score responses by the policy alone (no reference model)")

    def validate(self) -> None:
        if self.loss_type not in LOSS_TYPES:
            raise LmforgeError(f"unknown preference loss {self.loss_type!r}; choose one of {', '.join(LOSS_TYPES)}")
        if not self.beta > 0:
            raise LmforgeError(f"beta must be positive, got {self.beta}")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise LmforgeError(f"label_smoothing must be in [0, 0.5), got {self.label_smoothing}")

    @property
    def needs_reference(self) -> bool:
        return not self.reference_free and self.loss_type != "simpo"


def _kinds(text: Any) -> list[str]:
    values = text if isinstance(text, list) else [v.strip() for v in str(text).split(",") if v.strip()]
    unknown = [v for v in values if v not in KINDS]
    if unknown or not values:
        raise LmforgeError(f"unknown pair kind(s) {', '.join(unknown) or '(none)'}; choose from {', '.join(KINDS)}")
    return values


@dataclass
class AlignConfig:
    """A training run on preference pairs (every field is also a flag)."""

    model: str | None = option(None, help="registered model, HF directory or .gguf to start from (default: the default model)")
    data: str | None = option(None, help="directory with train.jsonl and validation.jsonl pairs "
                                         "(default: pairs generated from --data-seed)")
    kinds: list[str] = option(default_factory=lambda: list(KINDS), parse=_kinds, metavar="KIND,...",
                              help=f"generated pair kinds to use ({','.join(KINDS)})")
    data_seed: int = option(0, help="seed of the generated pairs")
    out: str = option("runs/align", help="output directory")
    max_steps: int = option(60, help="optimizer steps")
    batch_size: int = option(4, help="pairs per step")
    lr: float = option(1e-5, help="peak learning rate")
    weight_decay: float = option(0.0, help="AdamW weight decay")
    warmup_steps: int = option(5, help="linear warmup steps")
    min_lr_ratio: float = option(0.1, help="cosine floor as a fraction of --lr")
    clip_grad_norm: float = option(1.0, help="global gradient-norm bound")
    max_length: int = option(128, help="most tokens of prompt + response")
    trainable_layers: int = option(0, help="train only the top N blocks and the final norm (0: all weights)")
    eval_interval: int = option(20, help="steps between held-out evaluations")
    eval_pairs: int = option(64, help="held-out pairs evaluated (0: all)")
    eval_batch_size: int = option(8, help="pairs per evaluation forward")
    system: str | None = option(None, help="system message for the chat template (default: the template's own)")
    seed: int = option(0, help="seed of the shuffles and of new weights")
    threads: int | None = option(None, help="CPU threads (default: PyTorch's)")
    device: str = option("auto", help="cpu, cuda, mps or auto")
    save: bool = option(True, help="write the trained model into OUT/model")
    plots: bool = option(True, help="write OUT/plots/*.png")
    resume: bool = option(False, help="continue the run from the newest checkpoint in OUT/checkpoints "
                                      "(DPO runs; the same losses as an uninterrupted run)")

    def validate(self) -> None:
        positive = {"max_steps": self.max_steps, "batch_size": self.batch_size, "eval_interval": self.eval_interval,
                    "max_length": self.max_length, "eval_batch_size": self.eval_batch_size}
        for key, value in positive.items():
            if value < 1:
                raise LmforgeError(f"{key} must be positive")
        if self.max_length < 8:
            raise LmforgeError("max_length must be at least 8 tokens")
        if not self.lr > 0:
            raise LmforgeError("lr must be positive")
        if self.trainable_layers < 0 or self.eval_pairs < 0 or self.warmup_steps < 0:
            raise LmforgeError("trainable_layers, eval_pairs and warmup_steps must be >= 0")
        _kinds(self.kinds)


@dataclass
class DPOConfig(AlignConfig):
    out: str = option("runs/dpo", help="output directory")
    loss: PreferenceLossConfig = option(default_factory=PreferenceLossConfig, cli=False,
                                        help="the preference loss (flags: --loss-type, --beta, ...)")

    def validate(self) -> None:
        super().validate()
        self.loss.validate()


@dataclass
class RewardConfig(AlignConfig):
    out: str = option("runs/reward", help="output directory")
    lr: float = option(5e-5, help="peak learning rate")
    margin: float = option(0.0, help="required reward margin in the Bradley-Terry loss")
    center_coefficient: float = option(0.01, help="weight of the (r_chosen + r_rejected)^2 centring penalty")


def config_from_dict(cls: type, values: dict[str, Any]) -> AlignConfig:
    """A DPOConfig / RewardConfig from a recipe mapping (unknown keys are refused)."""
    import dataclasses

    names = {f.name: f for f in dataclasses.fields(cls)}
    values = dict(values or {})
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise LmforgeError(f"unknown recipe key(s): {', '.join(unknown)} (known: {', '.join(sorted(names))})")
    if "loss" in values:
        loss = values["loss"] or {}
        loss_names = {f.name for f in dataclasses.fields(PreferenceLossConfig)}
        if not isinstance(loss, dict) or set(loss) - loss_names:
            raise LmforgeError(f"recipe 'loss' takes the keys {', '.join(sorted(loss_names))}")
        values["loss"] = PreferenceLossConfig(**loss)
    if "kinds" in values:
        values["kinds"] = _kinds(values["kinds"])
    try:
        return cls(**values)
    except TypeError as exc:
        raise LmforgeError(f"bad recipe: {exc}") from None
