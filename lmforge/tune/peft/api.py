"""apply_peft, save/load in PEFT's format, merge/unmerge, parameter counts (see the package docstring)."""

from __future__ import annotations

import contextlib
import dataclasses
import json
from pathlib import Path

import torch
from torch import nn

from lmforge.errors import LmforgeError
from lmforge.io.atomic import atomic_path, write_json_atomic

from .options import METHODS, PeftOptions
from .layers import BottleneckAdapter, IA3Linear, LoraLinear
from .targets import DEFAULT_FEEDFORWARD, Part, Site, find_part, matches, select, sites, strip_peft_prefix
from .virtual import VirtualTokenModel

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PEFT_TYPES = {"lora": "LORA", "qlora": "LORA", "ia3": "IA3", "prompt": "PROMPT_TUNING", "prefix": "PREFIX_TUNING",
              "bottleneck": "LMFORGE_BOTTLENECK", "bitfit": "LMFORGE_BITFIT"}


# ---- applying ------------------------------------------------------------------------------

def _check(options: PeftOptions) -> None:
    if options.method not in METHODS:
        raise LmforgeError(f"unknown PEFT method {options.method!r} (choose from {', '.join(METHODS)})")
    if options.method in ("lora", "qlora"):
        if options.r < 1:
            raise LmforgeError(f"LoRA rank must be at least 1, got r={options.r}")
        if not 0 <= options.dropout < 1:
            raise LmforgeError(f"LoRA dropout must be in [0, 1), got {options.dropout}")
    if options.method in ("prompt", "prefix") and options.num_virtual_tokens < 1:
        raise LmforgeError(f"num_virtual_tokens must be at least 1, got {options.num_virtual_tokens}")
    if options.method == "bottleneck" and options.bottleneck_size < 1:
        raise LmforgeError(f"bottleneck_size must be at least 1, got {options.bottleneck_size}")
    if options.method == "qlora" and (options.quant_block < 2 or options.quant_block % 2):
        raise LmforgeError(f"quant_block must be an even number of weights, got {options.quant_block}")


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


def _base_model(model: nn.Module) -> nn.Module:
    return model.model if isinstance(model, VirtualTokenModel) else model


def adapter_options(model: nn.Module) -> PeftOptions | None:
    """The options an adapted model was made with (None: no adapter)."""
    return getattr(model, "peft_options", None)


def apply_peft(model: nn.Module, options: PeftOptions) -> nn.Module:
    """Freeze `model` and add the adapter `options` describe (see the package docstring)."""
    _check(options)
    if options.method == "none":
        return model
    if adapter_options(model) is not None:
        raise LmforgeError("this model already has an adapter; merge_and_unload it or start from the base")
    seeded = torch.random.fork_rng(devices=[]) if options.seed is not None else contextlib.nullcontext()
    with seeded:
        if options.seed is not None:
            torch.manual_seed(options.seed)
        model.requires_grad_(False)
        config = model.config
        method = options.method
        if method in ("lora", "qlora"):
            chosen = select(config, options.target_modules, "lora")
            if method == "qlora":
                from lmforge.infer.nf4 import NF4Linear

                for site in sites(config):
                    _set_module(model, site.name, NF4Linear(model.get_submodule(site.name), options.quant_block,
                                                            options.double_quant))
            for site in chosen:
                _set_module(model, site.name, LoraLinear(model.get_submodule(site.name), site.parts, options.r,
                                                         options.alpha, options.dropout, options.rslora,
                                                         pack_frozen=options.pack_frozen))
        elif method == "ia3":
            _apply_ia3(model, options)
        elif method == "bottleneck":
            modules = ("attn.out", "mlp.proj") if options.bottleneck_style == "houlsby" else ("mlp.proj",)
            for i in range(config.n_layer):
                for m in modules:
                    name = f"layers.{i}.{m}"
                    _set_module(model, name, BottleneckAdapter(model.get_submodule(name), options.bottleneck_size))
        elif method == "bitfit":
            _apply_bitfit(model)
        else:
            model = VirtualTokenModel(model, method, options.num_virtual_tokens)
    model.peft_options = dataclasses.replace(options)
    return model


def _apply_ia3(model: nn.Module, options: PeftOptions) -> None:
    config = model.config
    chosen = select(config, options.target_modules, "ia3")
    feedforward = [t for t in options.feedforward_modules if t != "none"] if options.feedforward_modules else [
        t for t in DEFAULT_FEEDFORWARD.get(config.family, []) if any(matches(p.path, t) for s in chosen for p in s.parts)]
    for site in chosen:
        ff = [p for p in site.parts if any(matches(p.path, t) for t in feedforward)]
        if ff and (len(ff) != len(site.parts) or len(sites_of(config, site)) != 1):
            raise LmforgeError(f"(IA)3 feed-forward module {ff[0].leaf} is one slice of the fused lmforge layer "
                               f"{site.module}, whose input it shares; only unfused layers can scale their input")
        _set_module(model, site.name, IA3Linear(model.get_submodule(site.name), site.parts, bool(ff)))
    options.feedforward_modules = sorted({p.leaf for s in chosen for p in s.parts
                                          if any(matches(p.path, t) for t in feedforward)})


def sites_of(config, site: Site) -> list[Part]:
    """Every part (targeted or not) of the lmforge layer `site` names."""
    return next(s.parts for s in sites(config) if s.name == site.name)


def _apply_bitfit(model: nn.Module) -> None:
    """Every bias trainable. A Llama model has none; it gets zero biases on every linear layer
    (Hugging Face's attention_bias / mlp_bias express them, so the result still saves)."""
    config = model.config
    if config.family == "llama":
        for site in sites(config):
            layer = model.get_submodule(site.name)
            if layer.bias is None:
                layer.bias = nn.Parameter(torch.zeros(layer.out_features, dtype=layer.weight.dtype,
                                                      device=layer.weight.device))
        config.qkv_bias = config.out_bias = config.mlp_bias = True
    biases = [p for name, p in model.named_parameters() if name.endswith(".bias")]
    if not biases:
        raise LmforgeError(f"this {config.family} model has no biases for BitFit to train")
    for p in biases:
        p.requires_grad_(True)


# ---- counting ------------------------------------------------------------------------------

def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters, shared ones counted once; NF4 weights count as parameters."""
    seen, trainable, total = set(), 0, 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    for module in model.modules():
        if hasattr(module, "codes") and hasattr(module, "in_features"):
            total += module.in_features * module.out_features
    return trainable, total


def memory_report(model: nn.Module) -> str:
    """Trainable and total parameters, and the bytes of weights, gradients and AdamW states."""
    trainable, total = trainable_parameters(model)
    seen, weights, grads = set(), 0, 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            weights += p.numel() * p.element_size()
            grads += p.numel() * p.element_size() if p.requires_grad else 0
    quantized = sum(m.nbytes - (m.bias.numel() * m.bias.element_size() if m.bias is not None else 0)
                    for m in model.modules() if hasattr(m, "codes") and hasattr(m, "nbytes"))
    mib = 1 / 2 ** 20
    return (f"trainable {trainable:,} of {total:,} parameters ({100 * trainable / max(total, 1):.3f}%); "
            f"weights {(weights + quantized) * mib:.1f} MiB"
            + (f" (NF4 {quantized * mib:.1f} MiB)" if quantized else "")
            + f", gradients {grads * mib:.1f} MiB, AdamW states {2 * grads * mib:.1f} MiB")


# ---- merging -------------------------------------------------------------------------------

def _mergeable(model: nn.Module) -> list[nn.Module]:
    options = adapter_options(model)
    if options is None:
        raise LmforgeError("this model has no adapter to merge")
    if options.method in ("prompt", "prefix", "bottleneck"):
        raise LmforgeError(f"a {options.method} adapter adds computation of its own; it cannot be merged into the weights")
    return [m for m in model.modules() if isinstance(m, (LoraLinear, IA3Linear))]


def merge(model: nn.Module) -> nn.Module:
    """Fold LoRA (W[rows] += scale B A) or (IA)3 (W[rows] *= l) into the base weights; a QLoRA
    base is dequantized to float32 first. BitFit's biases are part of the model already."""
    for m in _mergeable(model):
        m.merge()
    return model


def unmerge(model: nn.Module) -> nn.Module:
    """Undo `merge` (subtract / divide again; exact up to float rounding)."""
    for m in _mergeable(model):
        m.unmerge()
    return model


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Merge and replace every adapter module by its base layer: a plain Transformer."""
    merge(model)
    for name, m in list(model.named_modules()):
        if isinstance(m, (LoraLinear, IA3Linear)):
            _set_module(model, name, m.base)
    del model.peft_options
    return model


# ---- saving --------------------------------------------------------------------------------

def _target_names(config, parts: list[Part]) -> list[str]:
    """Leaf names where every module with that leaf is targeted, full paths otherwise."""
    chosen = {p.path for p in parts}
    every: dict[str, list[str]] = {}
    for s in sites(config):
        for p in s.parts:
            every.setdefault(p.leaf, []).append(p.path)
    names = []
    for leaf, paths in sorted(every.items()):
        hit = [p for p in paths if p in chosen]
        if hit and len(hit) == len(paths) and all(not x.endswith("." + leaf) or x in chosen
                                                   for x in chosen if x.rsplit(".", 1)[-1] == leaf):
            names.append(leaf)
        else:
            names += hit
    return names


def _task_type(config) -> str:
    return "CAUSAL_LM" if config.lm_head else "FEATURE_EXTRACTION"


def adapter_state(model: nn.Module) -> tuple[dict, dict[str, torch.Tensor]]:
    """(adapter_config.json contents, weights by saved name) of an adapted model."""
    options = adapter_options(model)
    if options is None:
        raise LmforgeError("this model has no adapter to save (apply_peft or load_adapter first)")
    base = _base_model(model)
    config = base.config
    method = options.method
    cfg: dict = {"peft_type": PEFT_TYPES[method], "task_type": _task_type(config), "inference_mode": True,
                 "revision": None}
    tensors: dict[str, torch.Tensor] = {}
    prefix = "base_model.model."
    if method in ("lora", "qlora"):
        layers = [m for m in base.modules() if isinstance(m, LoraLinear)]
        if any(m.merged for m in layers):
            raise LmforgeError("the adapter is merged into the weights; unmerge(model) before saving it")
        for m in layers:
            for p in m.parts:
                tensors[f"{prefix}{p.path}.lora_A.weight"] = m.lora_A[p.leaf]
                tensors[f"{prefix}{p.path}.lora_B.weight"] = m.lora_B[p.leaf]
        cfg.update(r=options.r, lora_alpha=options.alpha, lora_dropout=options.dropout, use_rslora=options.rslora,
                   target_modules=_target_names(config, [p for m in layers for p in m.parts]), bias="none",
                   fan_in_fan_out=config.family == "gpt2", init_lora_weights=True, modules_to_save=None,
                   layers_to_transform=None, rank_pattern={}, alpha_pattern={}, use_dora=False)
    elif method == "ia3":
        layers = [m for m in base.modules() if isinstance(m, IA3Linear)]
        if any(m.merged for m in layers):
            raise LmforgeError("the adapter is merged into the weights; unmerge(model) before saving it")
        for m in layers:
            for p in m.parts:
                tensors[f"{prefix}{p.path}.ia3_l"] = m.ia3_l[p.leaf]
        cfg.update(target_modules=_target_names(config, [p for m in layers for p in m.parts]),
                   feedforward_modules=list(options.feedforward_modules), fan_in_fan_out=config.family == "gpt2",
                   init_ia3_weights=True, modules_to_save=None)
    elif method in ("prompt", "prefix"):
        tensors["prompt_embeddings"] = model.prompt
        cfg.update(num_virtual_tokens=options.num_virtual_tokens, num_transformer_submodules=1,
                   num_layers=config.n_layer)
        if method == "prompt":
            cfg.update(token_dim=config.n_embd, num_attention_heads=config.n_head, prompt_tuning_init="RANDOM")
        else:
            cfg.update(token_dim=config.kv_size, num_attention_heads=config.n_kv_head,
                       encoder_hidden_size=config.kv_size, prefix_projection=False)
    elif method == "bottleneck":
        for name, m in base.named_modules():
            if isinstance(m, BottleneckAdapter):
                for pname, p in list(m.down.named_parameters()) + list(m.up.named_parameters()):
                    part = "down" if any(p is q for q in m.down.parameters()) else "up"
                    tensors[f"{name}.{part}.{pname}"] = p
        cfg.update(lmforge_format=1, bottleneck_size=options.bottleneck_size,
                   bottleneck_style=options.bottleneck_style, note="lmforge-only adapter (no PEFT equivalent)")
    elif method == "bitfit":
        for name, p in base.named_parameters():
            if name.endswith(".bias"):
                tensors[name] = p
        cfg.update(lmforge_format=1, note="lmforge-only adapter: every bias of the model (zero where the base had none)")
    return cfg, {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}


def save_adapter(model: nn.Module, directory: str | Path, base_model_name_or_path: str | None = None) -> Path:
    """Write adapter_config.json and adapter_model.safetensors into `directory` (each atomically)."""
    from safetensors.torch import save_file

    cfg, tensors = adapter_state(model)
    cfg["base_model_name_or_path"] = str(base_model_name_or_path) if base_model_name_or_path else None
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    with atomic_path(directory / WEIGHTS_NAME) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt"})
    write_json_atomic(directory / CONFIG_NAME, cfg)
    return directory


# ---- loading -------------------------------------------------------------------------------

def read_adapter(directory: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    directory = Path(directory)
    path = directory / CONFIG_NAME
    if not path.is_file():
        raise LmforgeError(f"{directory} has no {CONFIG_NAME} (not an adapter directory)")
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise LmforgeError(f"{path} is not valid JSON: {exc}") from None
    weights = directory / WEIGHTS_NAME
    if not weights.is_file():
        extra = " (adapter_model.bin is a pickle; lmforge reads safetensors only)" if (directory / "adapter_model.bin").exists() else ""
        raise LmforgeError(f"{directory} has no {WEIGHTS_NAME}{extra}")
    try:
        return cfg, load_file(str(weights))
    except (SafetensorError, OSError) as exc:
        raise LmforgeError(f"cannot read {weights}: {exc}") from None


def _options_from_config(cfg: dict, config, tensors: dict[str, torch.Tensor], qlora: bool) -> PeftOptions:
    peft_type = cfg.get("peft_type")
    methods = {v: k for k, v in PEFT_TYPES.items() if k != "qlora"}
    if peft_type not in methods:
        raise LmforgeError(f"unsupported adapter type {peft_type!r} (lmforge reads {', '.join(sorted(methods))})")
    method = methods[peft_type]
    if method in ("lora", "ia3"):
        for key, fine in (("modules_to_save", (None, [])), ("layers_to_transform", (None, [])),
                          ("rank_pattern", (None, {})), ("alpha_pattern", (None, {})), ("use_dora", (None, False)),
                          ("bias", (None, "none")), ("layer_replication", (None, []))):
            if cfg.get(key) not in fine:
                raise LmforgeError(f"unsupported {peft_type} option {key}={cfg[key]!r} in the adapter config")
        suffix = ".ia3_l" if method == "ia3" else (".lora_A.weight", ".lora_B.weight")
        paths = set()
        for key in tensors:
            if not key.endswith(suffix):
                raise LmforgeError(f"unsupported weight {key} in a {peft_type} adapter")
            path = strip_peft_prefix(config, key).removesuffix(".ia3_l").removesuffix(".lora_A.weight").removesuffix(".lora_B.weight")
            if find_part(config, path) is None:
                raise LmforgeError(f"the adapter adapts {path}, which this {config.family} model does not have "
                                   "(an adapter for another base model?)")
            paths.add(path)
        options = PeftOptions(method="qlora" if qlora and method == "lora" else method, target_modules=sorted(paths))
        if method == "lora":
            options.r, options.alpha = int(cfg.get("r", 8)), float(cfg.get("lora_alpha", 8))
            options.dropout, options.rslora = float(cfg.get("lora_dropout", 0.0)), bool(cfg.get("use_rslora", False))
        else:
            ff = cfg.get("feedforward_modules") or []
            options.feedforward_modules = [ff] if isinstance(ff, str) else list(ff)
            options.feedforward_modules = [t for t in options.feedforward_modules
                                           if any(matches(p, t) for p in paths)] or ["none"]
        return options
    if method in ("prompt", "prefix"):
        if int(cfg.get("num_transformer_submodules") or 1) != 1:
            raise LmforgeError("encoder-decoder prompt adapters (num_transformer_submodules=2) are not supported")
        return PeftOptions(method=method, num_virtual_tokens=int(cfg["num_virtual_tokens"]))
    if method == "bottleneck":
        return PeftOptions(method=method, bottleneck_size=int(cfg["bottleneck_size"]),
                           bottleneck_style=cfg.get("bottleneck_style", "houlsby"))
    return PeftOptions(method=method)


def _saved_names(model: nn.Module, cfg: dict) -> dict[str, torch.Tensor]:
    """Saved name -> the live parameter it fills, for the model's adapter."""
    _, tensors = adapter_state(model)
    base = _base_model(model)
    method = model.peft_options.method
    live: dict[str, torch.Tensor] = {}
    if method in ("lora", "qlora", "ia3"):
        for name, m in base.named_modules():
            if isinstance(m, LoraLinear):
                for p in m.parts:
                    live[f"{p.path}.lora_A.weight"] = m.lora_A[p.leaf]
                    live[f"{p.path}.lora_B.weight"] = m.lora_B[p.leaf]
            elif isinstance(m, IA3Linear):
                for p in m.parts:
                    live[f"{p.path}.ia3_l"] = m.ia3_l[p.leaf]
    elif method in ("prompt", "prefix"):
        live["prompt_embeddings"] = model.prompt
    else:
        params = dict(base.named_parameters())
        live = {k: params[k] for k in tensors}
    return live


def load_adapter(model: nn.Module, directory: str | Path, base_model_name_or_path: str | None = None,
                 qlora: bool = False, options: PeftOptions | None = None) -> nn.Module:
    """Apply the adapter saved in `directory` (by lmforge or PEFT) to the base `model` and load its weights.

    With `base_model_name_or_path`, an adapter whose config names a different base is refused.
    `qlora` loads a LoRA adapter on an NF4-quantized base. Returns the adapted model.
    """
    cfg, tensors = read_adapter(directory)
    base_name = cfg.get("base_model_name_or_path")
    if base_model_name_or_path and base_name and str(base_name) != str(base_model_name_or_path):
        same = Path(str(base_name)).expanduser().resolve() == Path(str(base_model_name_or_path)).expanduser().resolve()
        if not same:
            raise LmforgeError(f"{directory} is an adapter for {base_name}, not {base_model_name_or_path} "
                               "(load it on its own base, or skip this check)")
    config = _base_model(model).config
    if options is None:
        options = _options_from_config(cfg, config, tensors, qlora)
    model = apply_peft(model, options)
    live = _saved_names(model, cfg)
    if cfg.get("peft_type") in ("LORA", "IA3"):
        tensors = {strip_peft_prefix(config, k): v for k, v in tensors.items()}
    missing = sorted(set(live) - set(tensors))
    unexpected = sorted(set(tensors) - set(live))
    if missing or unexpected:
        raise LmforgeError(f"adapter weights do not match the adapter config: missing {missing[:3]}, unexpected {unexpected[:3]}")
    with torch.no_grad():
        for name, target in live.items():
            tensor = tensors[name]
            if tuple(tensor.shape) != tuple(target.shape):
                raise LmforgeError(f"adapter weight {name} has shape {tuple(tensor.shape)}, this model needs "
                                   f"{tuple(target.shape)} (an adapter for another base model?)")
            target.copy_(tensor.to(target.dtype))
    return model
