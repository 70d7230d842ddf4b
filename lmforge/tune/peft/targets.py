"""Where Hugging Face module names land in lmforge's fused Transformer.

PEFT configurations name Hugging Face modules (``q_proj``, ``gate_proj``, ``query``,
``c_attn``). lmforge fuses q/k/v into ``attn.qkv`` and gate/up into ``mlp.fc``, so one
Hugging Face module is a *slice of the output rows* of an lmforge ``nn.Linear``. This module
derives that correspondence from the family's weight-name map (lmforge/model/families.py),
so a family added there is adaptable here with no further code.

A `Site` is one lmforge linear layer of one block with the Hugging Face modules it holds:
``Site(layer=0, module="attn.qkv", parts=[Part("model.layers.0.self_attn.q_proj", 0, 576), ...])``.
Target names match a Hugging Face module path the way PEFT matches them: the whole path,
or a suffix of it that starts after a dot (``q_proj``, ``self_attn.q_proj``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from lmforge.errors import LmforgeError
from lmforge.model.config import ModelConfig
from lmforge.model.families import FAMILIES

LINEAR_MODULES = ("attn.qkv", "attn.out", "mlp.fc", "mlp.proj")
FEEDFORWARD_OUTPUT = "mlp.proj"  # the one projection whose input is the feed-forward's hidden state

# The modules PEFT adapts when a configuration names none (its per-model defaults).
DEFAULT_TARGETS = {
    "lora": {"llama": ["q_proj", "v_proj"], "qwen2": ["q_proj", "v_proj"], "mistral": ["q_proj", "v_proj"],
             "gpt2": ["c_attn"], "bert": ["query", "value"]},
    "ia3": {"llama": ["k_proj", "v_proj", "down_proj"], "qwen2": ["k_proj", "v_proj", "down_proj"],
            "mistral": ["k_proj", "v_proj", "down_proj"], "gpt2": ["c_attn", "mlp.c_proj"],
            "bert": ["key", "value", "output.dense"]},
}
DEFAULT_FEEDFORWARD = {"llama": ["down_proj"], "qwen2": ["down_proj"], "mistral": ["down_proj"],
                       "gpt2": ["mlp.c_proj"], "bert": ["output.dense"]}


@dataclass(frozen=True)
class Part:
    """One Hugging Face module: its full path and its rows [start, stop) in the fused output."""

    path: str
    start: int
    stop: int

    @property
    def leaf(self) -> str:
        return self.path.rsplit(".", 1)[-1]

    @property
    def size(self) -> int:
        return self.stop - self.start


@dataclass
class Site:
    layer: int
    module: str  # lmforge name inside the block: attn.qkv, attn.out, mlp.fc, mlp.proj
    parts: list[Part] = field(default_factory=list)

    @property
    def name(self) -> str:
        return f"layers.{self.layer}.{self.module}"


def _part_sizes(config: ModelConfig, module: str, n_parts: int) -> list[int]:
    if n_parts == 1:
        out = {"attn.qkv": config.q_size + 2 * config.kv_size, "attn.out": config.n_embd,
               "mlp.fc": config.intermediate_size * (2 if config.mlp == "swiglu" else 1), "mlp.proj": config.n_embd}
        return [out[module]]
    if module == "attn.qkv":
        return [config.q_size, config.kv_size, config.kv_size]
    if module == "mlp.fc":
        return [config.intermediate_size] * n_parts
    raise LmforgeError(f"cannot split lmforge module {module} into {n_parts} parts")


def sites(config: ModelConfig) -> list[Site]:
    """Every adaptable linear layer of the model, with the Hugging Face modules it holds."""
    family = FAMILIES.get(config.family)
    if family is None:
        raise LmforgeError(f"no Hugging Face weight map for model family {config.family!r}")
    out = []
    for i in range(config.n_layer):
        prefix = family.hf_layer_prefix.format(i=i)
        for module in LINEAR_MODULES:
            names = family.layer_map.get(module + ".weight")
            if not names:
                continue
            site = Site(i, module)
            start = 0
            for name, size in zip(names, _part_sizes(config, module, len(names))):
                site.parts.append(Part(prefix + name.removesuffix(".weight"), start, start + size))
                start += size
            out.append(site)
    return out


def matches(path: str, target: str) -> bool:
    return path == target or path.endswith("." + target)


def select(config: ModelConfig, targets: list[str] | str, method: str = "lora") -> list[Site]:
    """The sites (each with only its targeted parts) that `targets` name; an error names unknown targets.

    ``all-linear`` is every linear layer of every block (the vocabulary head stays frozen, as in PEFT).
    An empty list means the family's PEFT default for `method`.
    """
    every = sites(config)
    if isinstance(targets, str):
        targets = [targets]
    targets = [t.strip() for t in targets if t and t.strip()]
    if not targets:
        default = DEFAULT_TARGETS.get(method, DEFAULT_TARGETS["lora"]).get(config.family)
        if default is None:
            raise LmforgeError(f"no default target modules for a {config.family} model; name them with --target-modules")
        targets = default
    if "all-linear" in targets:
        return every
    used: set[str] = set()
    chosen = []
    for site in every:
        parts = [p for p in site.parts if any(matches(p.path, t) for t in targets)]
        used.update(t for t in targets for p in parts if matches(p.path, t))
        if parts:
            chosen.append(Site(site.layer, site.module, parts))
    unknown = [t for t in targets if t not in used]
    if unknown:
        known = sorted({p.leaf for s in every for p in s.parts})
        raise LmforgeError(f"unknown target module(s) {', '.join(unknown)} for a {config.family} model "
                           f"(its linear modules: {', '.join(known)}, or all-linear)")
    return chosen


def find_part(config: ModelConfig, path: str) -> tuple[Site, Part] | None:
    """The site and part of a full Hugging Face module path, or None."""
    for site in sites(config):
        for part in site.parts:
            if part.path == path:
                return site, part
    return None


def peft_prefix(config: ModelConfig) -> str:
    """What PEFT puts before a module path in adapter weight names."""
    return "base_model.model."


def strip_peft_prefix(config: ModelConfig, key: str) -> str:
    """A PEFT adapter key without ``base_model.model.`` and the family's optional task-model prefix."""
    key = key.removeprefix("base_model.model.")
    optional = FAMILIES[config.family].optional_prefix
    if optional and key.startswith(optional):
        key = key[len(optional):]
    return key
