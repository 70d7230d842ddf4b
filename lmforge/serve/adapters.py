"""LoRA adapters for `lmforge serve --adapter NAME=PATH`: read, check against the served model, install.

An adapter directory is PEFT's layout (adapter_config.json + adapter_model.safetensors),
written by lmforge's fine-tuning (lmforge.tune.peft) or by Hugging Face peft. Everything a
user can get wrong is refused at startup with one message naming the adapter: a missing
directory or file, another method than LoRA/rsLoRA (IA3, prompt tuning, DoRA ...), a rank
below 1, options that change the computation beyond B A (layer patterns, extra trained
modules, biases), a base model other than the one served, and weights whose modules or
shapes the served model does not have.

Reading uses lmforge.tune.peft's reader and its map from Hugging Face module names to
slices of lmforge's fused projections; the inference side (lmforge/infer/adapters.py)
receives plain tensors per lmforge layer.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from ..errors import LmforgeError
from ..infer.adapters import AdapterBank, LoraWeights
from ..model.registry import DEFAULT_MODEL, ModelSpec
from .config import parse_adapter_flag

# PEFT options that must keep their neutral value for W x + s B A x to be the whole adapter.
NEUTRAL_OPTIONS = {"modules_to_save": (None, []), "layers_to_transform": (None, []), "rank_pattern": (None, {}),
                   "alpha_pattern": (None, {}), "use_dora": (None, False), "bias": (None, "none"),
                   "layer_replication": (None, []), "trainable_token_indices": (None, [], {})}


def same_base(declared: str | None, spec: ModelSpec) -> bool:
    """Whether an adapter's base_model_name_or_path names the served model.

    Accepted: no name; the served model's name or path; a path resolving to it; a name whose
    last component equals the served name's (``HuggingFaceTB/SmolLM2-135M-Instruct`` for the
    registered ``smollm2-135m-instruct``); "default model" (what fine-tuning writes when it
    started from the default model) when the default model is served.
    """
    if not declared:
        return True
    declared = str(declared)
    if declared == "default model":
        return spec.name == DEFAULT_MODEL
    if declared in (spec.name, str(spec.path)):
        return True
    with_path = Path(declared).expanduser()
    if with_path.exists() and with_path.resolve() == Path(spec.path).resolve():
        return True
    last = declared.rstrip("/").rsplit("/", 1)[-1].lower()
    served = {spec.name.rstrip("/").rsplit("/", 1)[-1].lower(), Path(spec.path).name.lower()}
    return last in served


def read_lora(name: str, directory: str | Path, model, spec: ModelSpec) -> LoraWeights:
    """The LoRA adapter in `directory`, checked against the served `model` (loaded from `spec`)."""
    from ..tune.peft.api import read_adapter
    from ..tune.peft.targets import find_part, strip_peft_prefix

    where = f"adapter {name!r} ({directory})"
    if not Path(directory).expanduser().is_dir():
        raise LmforgeError(f"{where}: no such directory")
    try:
        cfg, tensors = read_adapter(Path(directory).expanduser())
    except LmforgeError as exc:
        raise LmforgeError(f"{where}: {exc}") from None
    kind = cfg.get("peft_type")
    if kind != "LORA":
        raise LmforgeError(f"{where} is a {kind or 'untyped'} adapter; only LoRA and rsLoRA adapters can be served "
                           "beside the base (merge another method into the weights with `lmforge merge` and serve "
                           "the merged model)")
    for key, neutral in NEUTRAL_OPTIONS.items():
        if cfg.get(key) not in neutral:
            what = "DoRA" if key == "use_dora" else f"the option {key}={cfg[key]!r}"
            raise LmforgeError(f"{where} uses {what}, which serving does not support (LoRA and rsLoRA only)")
    base = cfg.get("base_model_name_or_path")
    if not same_base(base, spec):
        raise LmforgeError(f"{where} was trained for {base}, but this server serves {spec.name}")
    try:
        rank = int(cfg.get("r", 8))
        alpha = float(cfg.get("lora_alpha", 8))
    except (TypeError, ValueError):
        raise LmforgeError(f"{where}: r and lora_alpha must be numbers") from None
    if rank < 1:
        raise LmforgeError(f"{where} has rank r={rank}; a LoRA adapter needs r >= 1")
    scale = alpha / (math.sqrt(rank) if cfg.get("use_rslora") else rank)

    config = model.config
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        stripped = strip_peft_prefix(config, key)
        for suffix, which in ((".lora_A.weight", "A"), (".lora_B.weight", "B")):
            if stripped.endswith(suffix):
                pairs.setdefault(stripped.removesuffix(suffix), {})[which] = tensor
                break
        else:
            raise LmforgeError(f"{where}: unexpected weight {key} in a LoRA adapter")
    if not pairs:
        raise LmforgeError(f"{where} holds no LoRA weights")
    sites: dict[str, list] = {}
    for path, pair in sorted(pairs.items()):
        if set(pair) != {"A", "B"}:
            raise LmforgeError(f"{where}: {path} has lora_{'A' if 'A' not in pair else 'B'} missing")
        found = find_part(config, path)
        if found is None:
            raise LmforgeError(f"{where} adapts {path}, which the served {config.family} model does not have "
                               "(an adapter for another base model?)")
        site, part = found
        layer = model.get_submodule(site.name)
        a, b = pair["A"], pair["B"]
        if tuple(a.shape) != (rank, layer.in_features) or tuple(b.shape) != (part.size, rank):
            raise LmforgeError(f"{where}: {path} has A {tuple(a.shape)} and B {tuple(b.shape)}; the served model "
                               f"needs A ({rank}, {layer.in_features}) and B ({part.size}, {rank}) "
                               "(an adapter for another base model?)")
        sites.setdefault(site.name, []).append((part, a, b))
    layers = {}
    for site_name, parts in sites.items():
        parts.sort(key=lambda p: p[0].start)
        out = model.get_submodule(site_name).out_features
        stacked_a = torch.cat([a for _, a, _ in parts]).float()
        spread_b = torch.zeros(out, rank * len(parts))
        for i, (part, _, b) in enumerate(parts):
            spread_b[part.start:part.stop, i * rank:(i + 1) * rank] = b.float()
        layers[site_name] = (stacked_a, spread_b)
    return LoraWeights(name, scale, rank, layers, str(directory))


def install_adapters(model, spec: ModelSpec, flags: list[str]) -> AdapterBank | None:
    """Read every ``NAME=PATH`` of --adapter and install them on `model`; None when there are none."""
    if not flags:
        return None
    adapters = []
    seen: set[str] = set()
    for text in flags:
        name, path = parse_adapter_flag(text)
        if name in seen:
            raise LmforgeError(f"--adapter name {name!r} given twice")
        if name == spec.name:
            raise LmforgeError(f"adapter name {name!r} is the served model's own name")
        seen.add(name)
        adapters.append(read_lora(name, path, model, spec))
    return AdapterBank.install(model, adapters)
