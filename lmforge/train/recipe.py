"""Pretraining recipes: dataclasses with working defaults, read from YAML, overridden by flags.

A recipe has one section per concern; each section is a dataclass and each YAML key is
one of its fields, so ``recipes/*.yaml`` map 1:1 onto `PretrainConfig`::

    model:    the architecture (ModelConfig fields) or ``init_from`` a checkpoint
    data:     a packed token directory, or the sources to build one from
    optim:    AdamW (or Adam + L2) and its parameter groups
    schedule: warmup + cosine, warmup-stable-decay, linear or constant
    train:    steps, batch, accumulation, clipping, precision, checkpoints, logging
    objective: next-token (causal) or masked-token (mlm) prediction

Every field is also a command-line flag, ``--section.field VALUE`` (dashes or
underscores), whose VALUE is read as YAML (``--train.max-steps 50``,
``--data.sources '[wiki, news]'``). A recipe with an unknown key, a value of the wrong
type or an impossible combination is refused before anything runs, with one message
that names the offending key.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmforge.errors import LmforgeError
from lmforge.train.schedule import SCHEDULES


@dataclass
class ModelSection:
    """The network. Fields other than ``init_from`` are `ModelConfig` fields."""

    init_from: str | None = None  # a registered model, HF directory or .gguf: continue from its weights
    family: str = "llama"
    vocab_size: int | None = None  # None: the tokenizer's vocabulary size
    n_layer: int = 4
    n_embd: int = 128
    n_head: int = 4
    n_kv_head: int | None = 2
    intermediate_size: int = 352
    max_position_embeddings: int | None = None  # None: the data's sequence length
    norm: str = "rmsnorm"
    mlp: str = "swiglu"
    position: str = "rope"
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = True
    # Mixture of experts (0: a dense model); see ModelConfig for their meaning.
    num_experts: int = 0
    experts_per_token: int = 2
    router_aux_loss_coef: float = 0.01
    router_z_loss_coef: float = 0.001
    capacity_factor: float | None = None
    router_aux_per_layer: bool = False


@dataclass
class DataSection:
    """Where training rows come from.

    ``path`` is a directory written by ``lmforge data prepare`` (index.json + .npy shards).
    If it does not exist yet and ``sources`` are given, it is built first: the sources are
    cleaned and deduplicated, a byte-level BPE tokenizer of ``tokenizer_vocab_size`` is
    trained on the cleaned training text (unless ``tokenizer`` names one), and the text is
    packed into rows of ``seq_len`` tokens.
    """

    path: str = "runs/data/wiki-news"
    sources: list[str] = field(default_factory=list)
    tokenizer: str | None = None  # tokenizer.json / directory / .gguf / model name
    tokenizer_vocab_size: int = 4096
    seq_len: int = 256
    val_fraction: float = 0.05
    max_docs: int | None = None
    # A tokenizer trained here: bpe (byte-level, GPT-2 style) or wordpiece (BERT style: lowercased,
    # [PAD] [UNK] [CLS] [SEP] [MASK], texts encoded as [CLS] text [SEP]; what a masked LM needs).
    tokenizer_algorithm: str = "bpe"


@dataclass
class OptimSection:
    """Optimizer. ``adamw`` decouples weight decay from the gradient (Loshchilov & Hutter);
    ``adam_l2`` adds ``weight_decay * w`` to the gradient instead (for comparison). Norm
    weights and biases never decay; embeddings decay unless ``decay_embeddings`` is off."""

    name: str = "adamw"
    lr: float = 3e-3
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    weight_decay: float = 0.1
    decay_embeddings: bool = True


@dataclass
class ScheduleSection:
    """Learning rate against the optimizer step (see schedule.py)."""

    name: str = "cosine"  # cosine | wsd | linear | constant
    warmup_steps: int = 20
    min_lr_ratio: float = 0.1  # the floor, as a fraction of optim.lr
    decay_fraction: float = 0.2  # wsd: share of the steps spent in the final decay


@dataclass
class TrainSection:
    """The loop."""

    out: str = "runs/pretrain"
    max_steps: int = 300
    stop_at_step: int | None = None  # end this invocation after that step (checkpointed); continue with --resume
    batch_size: int = 8  # rows per process per micro-step
    grad_accum: int = 1  # micro-steps per optimizer step
    clip_grad_norm: float | None = 1.0
    precision: str = "auto"  # auto (bf16 on GPUs that support it and CPUs with AMX/AVX512-BF16, else fp32) | fp32 | bf16 | fp16
    gradient_checkpointing: bool = False
    seed: int = 0
    device: str = "auto"
    threads: int | None = None  # CPU threads (None: PyTorch's default)
    distributed: str = "auto"  # auto (ddp under torchrun) | none | ddp | fsdp
    log_interval: int = 10  # steps between progress lines when stderr is not a terminal
    eval_interval: int = 100
    eval_batches: int = 8  # validation rows = eval_batches x batch_size (per process)
    save_interval: int = 100
    keep_last: int = 2  # checkpoints kept (the newest N)
    sample_prompts: list[str] = field(default_factory=lambda: ["The history of", "In 1998, the"])
    sample_tokens: int = 32
    spike_factor: float = 3.0  # a step's loss is a spike when it exceeds mean + factor x std of recent steps
    peak_tflops: float | None = None  # hardware peak for MFU (None: measured matmul rate on CPU, table on GPU)
    plots: bool = True


@dataclass
class ObjectiveSection:
    """What the model learns to predict. ``causal``: the next token (a decoder). ``mlm``: BERT's
    masked tokens (an encoder, family bert; see lmforge/train/mlm.py): ``mask_probability`` of
    the ordinary tokens are chosen, of those ``mask_fraction`` become [MASK], ``random_fraction``
    a random token and the rest stay as they are; ``whole_word`` chooses whole words."""

    name: str = "causal"  # causal | mlm
    mask_probability: float = 0.15
    mask_fraction: float = 0.8
    random_fraction: float = 0.1
    whole_word: bool = False


@dataclass
class PretrainConfig:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    schedule: ScheduleSection = field(default_factory=ScheduleSection)
    train: TrainSection = field(default_factory=TrainSection)
    objective: ObjectiveSection = field(default_factory=ObjectiveSection)

    def validate(self) -> None:
        t, o, s, d = self.train, self.optim, self.schedule, self.data
        positive = {"train.max_steps": t.max_steps, "train.batch_size": t.batch_size,
                    "train.grad_accum": t.grad_accum, "train.log_interval": t.log_interval,
                    "train.eval_interval": t.eval_interval, "train.save_interval": t.save_interval,
                    "train.keep_last": t.keep_last}
        for key, value in positive.items():
            if value < 1:
                raise LmforgeError(f"{key} must be positive")
        if d.seq_len < 2:
            raise LmforgeError("data.seq_len must be at least 2")
        if t.stop_at_step is not None and not 0 < t.stop_at_step <= t.max_steps:
            raise LmforgeError(f"train.stop_at_step must be between 1 and train.max_steps ({t.max_steps})")
        if t.eval_batches < 0 or t.sample_tokens < 0:
            raise LmforgeError("train.eval_batches and train.sample_tokens must be >= 0")
        choices = {"train.precision": (t.precision, ("auto", "fp32", "bf16", "fp16")),
                   "train.distributed": (t.distributed, ("auto", "none", "ddp", "fsdp")),
                   "optim.name": (o.name, ("adamw", "adam_l2")),
                   "schedule.name": (s.name, SCHEDULES)}
        for key, (value, allowed) in choices.items():
            if value not in allowed:
                raise LmforgeError(f"{key} must be one of {', '.join(allowed)}, got {value!r}")
        if o.lr <= 0 or o.weight_decay < 0 or o.eps <= 0:
            raise LmforgeError("optim.lr and optim.eps must be > 0 and optim.weight_decay >= 0")
        if len(o.betas) != 2 or not all(0 <= b < 1 for b in o.betas):
            raise LmforgeError("optim.betas must be two numbers in [0, 1)")
        if not 0 <= s.warmup_steps <= t.max_steps:
            raise LmforgeError(f"schedule.warmup_steps must be between 0 and train.max_steps ({t.max_steps})")
        if not 0 <= s.min_lr_ratio <= 1 or not 0 < s.decay_fraction <= 1:
            raise LmforgeError("schedule.min_lr_ratio must be in [0, 1] and schedule.decay_fraction in (0, 1]")
        if t.clip_grad_norm is not None and t.clip_grad_norm <= 0:
            raise LmforgeError("train.clip_grad_norm must be > 0 (or null for no clipping)")
        if not 0 < d.val_fraction < 1:
            raise LmforgeError("data.val_fraction must be in (0, 1)")
        if t.spike_factor <= 0:
            raise LmforgeError("train.spike_factor must be > 0")
        if d.tokenizer_algorithm not in ("bpe", "wordpiece"):
            raise LmforgeError(f"data.tokenizer_algorithm must be bpe or wordpiece, got {d.tokenizer_algorithm!r}")
        j = self.objective
        if j.name not in ("causal", "mlm"):
            raise LmforgeError(f"objective.name must be causal or mlm, got {j.name!r}")
        if not 0 < j.mask_probability < 1 or j.mask_fraction < 0 or j.random_fraction < 0 \
                or j.mask_fraction + j.random_fraction > 1:
            raise LmforgeError("objective.mask_probability must be in (0, 1); objective.mask_fraction and "
                               "objective.random_fraction >= 0 with a sum of at most 1")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def model_config_of(section: ModelSection, vocab_size: int, seq_len: int, bos_id: int | None = None,
                    eos_id: int | None = None):
    """The `ModelConfig` a model section describes, for a tokenizer of ``vocab_size`` ids and
    rows of ``seq_len`` tokens (used when the section leaves those open)."""
    from lmforge.model.config import ModelConfig

    if section.vocab_size is not None and section.vocab_size < vocab_size:
        raise LmforgeError(f"model.vocab_size {section.vocab_size} is smaller than the tokenizer's {vocab_size} ids")
    try:
        config = ModelConfig(
            family=section.family, vocab_size=section.vocab_size or vocab_size, n_layer=section.n_layer,
            n_embd=section.n_embd, n_head=section.n_head, n_kv_head=section.n_kv_head,
            intermediate_size=section.intermediate_size,
            max_position_embeddings=section.max_position_embeddings or seq_len, norm=section.norm, mlp=section.mlp,
            position=section.position, rope_theta=section.rope_theta, tie_word_embeddings=section.tie_word_embeddings,
            bos_token_id=bos_id, eos_token_id=eos_id, num_experts=section.num_experts,
            experts_per_token=section.experts_per_token, router_aux_loss_coef=section.router_aux_loss_coef,
            router_z_loss_coef=section.router_z_loss_coef, capacity_factor=section.capacity_factor,
            router_aux_per_layer=section.router_aux_per_layer,
        )
    except ValueError as exc:
        raise LmforgeError(f"model: {exc}") from None
    if config.max_position_embeddings < seq_len:
        raise LmforgeError(f"model.max_position_embeddings {config.max_position_embeddings} is below the data's "
                           f"sequence length {seq_len}")
    return config


_CLASSES = {"model": ModelSection, "data": DataSection, "optim": OptimSection,
            "schedule": ScheduleSection, "train": TrainSection, "objective": ObjectiveSection}
_HINTS = {name: typing.get_type_hints(cls) for name, cls in _CLASSES.items()}


def _type_name(hint: Any) -> str:
    if isinstance(hint, type):
        return hint.__name__
    return str(hint).replace("typing.", "")


def coerce(value: Any, hint: Any, key: str) -> Any:
    """``value`` checked against the annotation ``hint`` (int, float, bool, str, X | None,
    list[X], dict[K, V]); ints are accepted where floats are expected. Raises LmforgeError naming ``key``."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        for option in options:
            if option is type(None):
                continue
            try:
                return coerce(value, option, key)
            except LmforgeError:
                pass
        raise LmforgeError(f"{key} must be {_type_name(hint)}, got {value!r}")
    if origin is list:
        if not isinstance(value, list):
            raise LmforgeError(f"{key} must be a list, got {value!r}")
        (item,) = typing.get_args(hint)
        return [coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise LmforgeError(f"{key} must be a mapping, got {value!r}")
        key_hint, value_hint = typing.get_args(hint)
        return {coerce(k, key_hint, f"{key} key"): coerce(v, value_hint, f"{key}[{k!r}]") for k, v in value.items()}
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # PyYAML reads 3e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif hint is str:
        if isinstance(value, str):
            return value
    else:  # pragma: no cover - only the types above are used in the sections
        raise TypeError(f"unsupported annotation {hint!r}")
    raise LmforgeError(f"{key} must be {_type_name(hint)}, got {value!r}")


def build_sections(data: Any, classes: dict[str, type], source: str,
                   optional: tuple[str, ...] = ()) -> dict[str, Any]:
    """Each section's dataclass from nested dicts (a parsed YAML recipe), strictly checked.

    A section missing from `data` gets its defaults, except the `optional` ones, which are left out.
    """
    if not isinstance(data, dict):
        raise LmforgeError(f"{source}: a recipe is a mapping of sections ({', '.join(classes)})")
    unknown = sorted(set(data) - set(classes))
    if unknown:
        raise LmforgeError(f"{source}: unknown section {unknown[0]!r} (sections: {', '.join(classes)})")
    sections = {}
    for name, cls in classes.items():
        values = data.get(name)
        if values is None and name in optional:
            continue
        values = values or {}
        if not isinstance(values, dict):
            raise LmforgeError(f"{source}: section {name!r} must be a mapping of fields")
        hints = typing.get_type_hints(cls)
        bad = sorted(set(values) - set(hints))
        if bad:
            raise LmforgeError(f"{source}: unknown field {name}.{bad[0]} (known: {', '.join(hints)})")
        sections[name] = cls(**{k: coerce(v, hints[k], f"{name}.{k}") for k, v in values.items()})
    return sections


def read_recipe(path: str | Path | None, overrides: dict[str, Any] | None,
                classes: dict[str, type]) -> tuple[dict[str, Any], str]:
    """A YAML recipe's nested dicts (None: no file, the defaults) with ``{"section.field": value}``
    overrides applied, and the name of its source for messages."""
    import yaml

    data: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        file = Path(path)
        source = str(file)
        try:
            data = yaml.safe_load(file.read_text(encoding="utf-8")) or {}
        except FileNotFoundError:
            raise LmforgeError(f"no such recipe: {file}") from None
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" at line {mark.line + 1}" if mark is not None else ""
            raise LmforgeError(f"{file}: not valid YAML{where}") from None
        if not isinstance(data, dict):
            raise LmforgeError(f"{file}: a recipe is a mapping of sections ({', '.join(classes)})")
    for key, value in (overrides or {}).items():
        section, _, name = key.partition(".")
        if section not in classes or not name:
            raise LmforgeError(f"unknown option --{key} (options are --SECTION.FIELD, sections {', '.join(classes)})")
        if data.get(section) is None:
            data[section] = {}
        if not isinstance(data[section], dict):
            raise LmforgeError(f"{source}: section {section!r} must be a mapping of fields")
        data[section][name.replace("-", "_")] = value
    return data, source


def from_dict(data: dict[str, Any], source: str = "recipe") -> PretrainConfig:
    """A `PretrainConfig` from nested dicts (a parsed YAML recipe), strictly checked."""
    config = PretrainConfig(**build_sections(data, _CLASSES, source))
    config.validate()
    return config


def load_recipe(path: str | Path | None, overrides: dict[str, Any] | None = None) -> PretrainConfig:
    """Read a YAML recipe (None: the defaults), apply ``{"section.field": value}`` overrides."""
    return from_dict(*read_recipe(path, overrides, _CLASSES))


def option_names() -> list[str]:
    """Every ``section.field`` a flag can set."""
    return [f"{section}.{name}" for section, hints in _HINTS.items() for name in hints]


def to_yaml(config: PretrainConfig) -> str:
    import yaml

    return yaml.safe_dump(config.to_dict(), sort_keys=False, default_flow_style=False)
