"""Configuration of the alignment runs and losses: plain dataclasses, no torch import.

Every `option(...)` field is a flag of ``lmforge align`` (lmforge/cli/align.py) and a key
of a recipe (lmforge/recipes/dpo-*.yaml, reward-*.yaml, ppo-*.yaml, grpo-*.yaml); the loss
settings of a DPO run are the recipe's ``loss:`` section and the flags --loss-type, --beta,
...; the adapters of an RL run are its ``peft:`` section and the flags --peft, --lora-r, ...
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lmforge.align.preference_data import KINDS
from lmforge.errors import LmforgeError
from lmforge.options import option
from lmforge.tune.peft.options import PeftOptions

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


RL_REWARDS = ("checker", "model")
GRPO_AGGREGATIONS = ("grpo", "bnpo", "dr_grpo")


@dataclass
class RLConfig:
    """A reinforcement-learning run from rewards (``lmforge align ppo|grpo``; every field is a flag)."""

    model: str | None = option(None, help="registered model, HF directory or .gguf to start from (default: the default model)")
    out: str = option("runs/rl", help="output directory")
    task: str = option("addition", help="prompt source: addition (operands 0..--max-operand) or a generated task of "
                                        "lmforge/tune/datasets.py (arithmetic, format, units, ...)")
    max_operand: int = option(9, help="addition: largest operand")
    reward: str = option("checker", choices=RL_REWARDS,
                         help="checker (1 if the answer is right, else 0) or model (--reward-model scores it)")
    reward_model: str | None = option(None, help="reward model directory (from `lmforge align reward`) for --reward model")
    reward_max_length: int = option(128, help="most tokens of prompt + response the reward model reads")
    system: str | None = option(None, help="system message for the chat template (default: the template's own)")
    max_steps: int = option(20, help="RL steps (sample, then update)")
    prompts_per_step: int = option(4, help="prompts sampled per step")
    group_size: int = option(1, help="responses sampled per prompt")
    max_new_tokens: int = option(12, help="most tokens per response")
    temperature: float = option(1.0, help="sampling temperature of the rollouts")
    lr: float = option(1e-5, help="policy learning rate (AdamW, constant)")
    weight_decay: float = option(0.0, help="AdamW weight decay")
    clip_grad_norm: float = option(1.0, help="global gradient-norm bound")
    beta: float = option(0.04, help="weight of the KL penalty to the reference (0: none)")
    epsilon: float = option(0.2, help="clip range of the probability ratio")
    trainable_layers: int = option(0, help="train only the top N blocks and the final norm (0: all weights)")
    eval_prompts: int = option(32, help="prompts answered greedily to measure the checked accuracy (0: none)")
    eval_interval: int = option(10, help="steps between accuracy measurements (also at the start and the end)")
    seed: int = option(0, help="seed of prompts, sampling and new weights")
    threads: int | None = option(None, help="CPU threads (default: PyTorch's)")
    device: str = option("auto", help="cpu, cuda, mps or auto")
    save: bool = option(True, help="write the trained policy into OUT/model (an adapter with --peft)")
    plots: bool = option(True, help="write OUT/plots/*.png")
    peft: PeftOptions = option(default_factory=PeftOptions, cli=False,
                       help="adapters to train instead of the weights (flags: --peft lora, --lora-r, ...)")

    def validate(self) -> None:
        positive = {"max_steps": self.max_steps, "prompts_per_step": self.prompts_per_step,
                    "group_size": self.group_size, "max_new_tokens": self.max_new_tokens,
                    "eval_interval": self.eval_interval, "max_operand": self.max_operand,
                    "reward_max_length": self.reward_max_length}
        for key, value in positive.items():
            if value < 1:
                raise LmforgeError(f"{key} must be positive, got {value}")
        if not self.lr > 0:
            raise LmforgeError("lr must be positive")
        if not self.epsilon > 0:
            raise LmforgeError(f"epsilon (the clip range) must be positive, got {self.epsilon}")
        if self.beta < 0 or self.temperature < 0 or self.eval_prompts < 0 or self.trainable_layers < 0:
            raise LmforgeError("beta, temperature, eval_prompts and trainable_layers must be >= 0")
        if self.reward not in RL_REWARDS:
            raise LmforgeError(f"unknown reward source {self.reward!r}; choose one of {', '.join(RL_REWARDS)}")
        if self.reward == "model" and not self.reward_model:
            raise LmforgeError("--reward model needs --reward-model DIR (train one with `lmforge align reward`)")
        from lmforge.align.rl_tasks import task_names

        if self.task not in task_names():
            raise LmforgeError(f"unknown RL task {self.task!r}; choose one of {', '.join(task_names())}")


@dataclass
class PPOConfig(RLConfig):
    out: str = option("runs/ppo", help="output directory")
    beta: float = option(0.05, help="initial weight of the per-token KL penalty in the reward")
    ppo_epochs: int = option(4, help="passes over each rollout")
    minibatch_size: int = option(4, help="responses per update")
    value_clip: float = option(0.2, help="clip range of the value update")
    vf_coef: float = option(0.1, help="weight of the value loss")
    value_lr: float = option(1e-3, help="learning rate of the value head (it starts at zero)")
    entropy_coef: float = option(0.0, help="weight of the entropy bonus")
    gamma: float = option(1.0, help="discount")
    lam: float = option(0.95, help="GAE lambda")
    whiten_advantages: bool = option(True, help="normalise advantages over each rollout")
    target_kl: float | None = option(None, help="adaptive KL controller: per-response KL to aim for (default: fixed beta)")
    kl_horizon: float = option(10000.0, help="adaptive KL controller horizon (responses)")

    def validate(self) -> None:
        super().validate()
        if self.ppo_epochs < 1 or self.minibatch_size < 1:
            raise LmforgeError("ppo_epochs and minibatch_size must be positive")
        if not self.value_clip > 0 or not self.value_lr > 0 or self.vf_coef < 0 or self.entropy_coef < 0:
            raise LmforgeError("value_clip and value_lr must be positive; vf_coef and entropy_coef >= 0")
        if not (0 <= self.gamma <= 1 and 0 <= self.lam <= 1):
            raise LmforgeError("gamma and lam must lie in [0, 1]")
        if self.target_kl is not None and not self.target_kl > 0:
            raise LmforgeError("target_kl must be positive")
        if not self.kl_horizon > 0:
            raise LmforgeError("kl_horizon must be positive")


@dataclass
class GRPOConfig(RLConfig):
    out: str = option("runs/grpo", help="output directory")
    group_size: int = option(8, help="responses sampled per prompt (the group; at least 2)")
    aggregation: str = option("grpo", choices=GRPO_AGGREGATIONS,
                              help="loss average: per response then over responses (grpo), over all tokens (bnpo), "
                                   "or over responses x max_new_tokens (dr_grpo)")

    def validate(self) -> None:
        super().validate()
        if self.group_size < 2:
            raise LmforgeError(f"GRPO needs groups of at least 2 responses per prompt (got group_size "
                               f"{self.group_size}): the group mean is the baseline, so one response has advantage 0")
        if self.aggregation not in GRPO_AGGREGATIONS:
            raise LmforgeError(f"unknown GRPO aggregation {self.aggregation!r}")


SAFETY_SETS = ("harmful", "benign", "reworded", "bias_pairs", "bias_generation", "ability")


def _safety_sets(text: Any) -> list[str]:
    values = text if isinstance(text, list) else [v.strip() for v in str(text).split(",") if v.strip()]
    unknown = [v for v in values if v not in SAFETY_SETS]
    if unknown or not values:
        raise LmforgeError(f"unknown evaluation set(s) {', '.join(unknown) or '(none)'}; "
                           f"choose from {', '.join(SAFETY_SETS)}")
    return values


@dataclass
class SafetyEvalConfig:
    """`lmforge align safety-eval`: every field is a flag."""

    model: str | None = option(None, help="registered model, HF directory or .gguf (default: the default model)")
    adapter: str | None = option(None, help="a PEFT adapter directory (lmforge or peft format) applied to --model")
    out: str = option("runs/safety-eval", help="output directory (report.json, report.md, safety.png)")
    sets: list[str] = option(default_factory=lambda: list(SAFETY_SETS), parse=_safety_sets, metavar="SET,...",
                             help=f"what to measure ({','.join(SAFETY_SETS)})")
    system: str | None = option("You are a helpful assistant.",
                                help="system message of the chat template (the safety recipes train with this one; "
                                     "empty: the template's own)")
    max_new_tokens: int = option(48, help="tokens generated per answer (a refusal shows in its first sentence)")
    batch_size: int = option(16, help="prompts decoded together")
    limit: int = option(0, help="use only the first N prompts of each set (0: all)")
    ability_examples: int = option(24, help="generated tasks (arithmetic, units, dates, JSON, format) answered "
                                           "for the general-ability check")
    ability_chars: int = option(12000, help="characters of held-out Wikipedia text for the perplexity check "
                                            "(0: none)")
    confidence: float = option(0.95, help="confidence of the intervals")
    resamples: int = option(2000, help="bootstrap resamples")
    seed: int = option(0, help="seed of the bootstrap and of the generated tasks")
    threads: int | None = option(None, help="CPU threads (default: PyTorch's)")
    device: str = option("auto", help="cpu, cuda, mps or auto")
    plots: bool = option(True, help="write OUT/safety.png")

    def validate(self) -> None:
        for key in ("max_new_tokens", "batch_size", "resamples"):
            if getattr(self, key) < 1:
                raise LmforgeError(f"{key} must be positive")
        if self.limit < 0 or self.ability_examples < 0 or self.ability_chars < 0:
            raise LmforgeError("limit, ability_examples and ability_chars must be >= 0")
        if self.ability_examples > 100:
            raise LmforgeError("ability_examples must be at most 100 "
                               "(the generated tasks that safety data never trains on)")
        if not 0 < self.confidence < 1:
            raise LmforgeError(f"confidence must be between 0 and 1, got {self.confidence}")
        if self.threads is not None and self.threads < 1:
            raise LmforgeError("threads must be positive")
        _safety_sets(self.sets)


@dataclass
class SafetySftDataConfig:
    """`lmforge align safety-data OUT`: chat records for safety SFT (every field is a flag)."""

    seed: int = option(0, help="seed of the generated pairs and tasks")
    harmful: int = option(100, help="harmful requests (answer: a refusal with a safe alternative)")
    benign: int = option(60, help="benign look-alikes (answer: the helpful answer)")
    bias: int = option(60, help="stereotype questions (answer: the information does not say)")
    general: int = option(200, help="general instructions (generated tasks with checkable answers) mixed in so "
                                    "that the model does not learn to refuse everything")
    system: str | None = option("You are a helpful assistant.", help="system message of every record (empty: none)")

    def validate(self) -> None:
        if min(self.harmful, self.benign, self.bias, self.general) < 0:
            raise LmforgeError("the numbers of harmful, benign, bias and general records must be >= 0")
        if self.harmful + self.benign + self.bias + self.general == 0:
            raise LmforgeError("no records asked for")


def config_from_dict(cls: type, values: dict[str, Any]):
    """A DPOConfig / RewardConfig / PPOConfig / GRPOConfig from a recipe mapping (unknown keys are refused)."""
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
    if "peft" in values:
        peft = values["peft"] or {}
        peft_names = {f.name for f in dataclasses.fields(PeftOptions)}
        if isinstance(peft, PeftOptions):
            pass
        elif not isinstance(peft, dict) or set(peft) - peft_names:
            raise LmforgeError(f"recipe 'peft' takes the keys {', '.join(sorted(peft_names))}")
        else:
            values["peft"] = PeftOptions(**peft)
    if "kinds" in values:
        values["kinds"] = _kinds(values["kinds"])
    try:
        return cls(**values)
    except TypeError as exc:
        raise LmforgeError(f"bad recipe: {exc}") from None
