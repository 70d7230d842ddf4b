"""Checkpoint I/O in the Hugging Face layout: config.json + safetensors (single or sharded).

Only safetensors are read: they hold tensors and nothing executable, unlike pickles.
Saving writes into a temporary sibling directory and renames it into place, so an
interrupted save never leaves a half-written checkpoint behind.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..errors import LmforgeError
from ..io.atomic import atomic_directory
from .config import ModelConfig
from .families import config_from_hf, hf_config_from, hf_to_lmforge, lmforge_to_hf
from .transformer import Transformer

SHARD_INDEX = "model.safetensors.index.json"


def read_hf_config(directory: Path) -> ModelConfig:
    path = directory / "config.json"
    if not path.is_file():
        raise LmforgeError(f"{directory} has no config.json (not a Hugging Face model directory)")
    try:
        hf = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise LmforgeError(f"{path} is not valid JSON: {exc}") from None
    return config_from_hf(hf)


def read_safetensors(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    index = directory / SHARD_INDEX
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (directory / "model.safetensors").is_file():
        shards = ["model.safetensors"]
    else:
        shards = sorted(p.name for p in directory.glob("*.safetensors"))
    if not shards:
        raise LmforgeError(f"{directory} has no .safetensors weights")
    state: dict[str, torch.Tensor] = {}
    for shard in shards:
        try:
            state.update(load_file(directory / shard))
        except (SafetensorError, OSError) as exc:
            raise LmforgeError(f"cannot read {directory / shard}: {exc}") from None
    return state


def build_model(config: ModelConfig, state: dict[str, torch.Tensor], dtype: torch.dtype, device="cpu") -> Transformer:
    """A `Transformer` holding exactly `state` (lmforge names), without random init work."""
    with torch.device("meta"):
        model = Transformer(config)
    expected = set(model.state_dict())
    if config.tie_word_embeddings:
        expected.discard("lm_head.weight")
        state = {k: v for k, v in state.items() if k != "lm_head.weight"}
    missing, unexpected = expected - set(state), set(state) - expected
    if missing or unexpected:
        details = []
        if missing:
            details.append("missing " + ", ".join(sorted(missing)[:5]))
        if unexpected:
            details.append("unexpected " + ", ".join(sorted(unexpected)[:5]))
        raise LmforgeError("checkpoint does not match its config: " + "; ".join(details))
    for name, tensor in state.items():
        want = model.get_parameter(name).shape
        if tuple(tensor.shape) != tuple(want):
            raise LmforgeError(f"weight {name} has shape {tuple(tensor.shape)}, config expects {tuple(want)}")
    state = {k: v.to(device=device, dtype=dtype) for k, v in state.items()}
    model.load_state_dict(state, strict=False, assign=True)
    if config.tie_word_embeddings and model.lm_head is not None:
        model.lm_head.weight = model.embed.weight
    if model.rope is not None:
        model.rope.to(device)
    return model.eval()


def load_hf_model(directory: str | Path, dtype: torch.dtype = torch.float32, device="cpu") -> Transformer:
    directory = Path(directory)
    config = read_hf_config(directory)
    state = hf_to_lmforge(config, read_safetensors(directory))
    return build_model(config, state, dtype, device)


def write_hf_files(config: ModelConfig, state: dict[str, torch.Tensor], directory: Path, tokenizer=None) -> None:
    """Write config.json, generation_config.json, model.safetensors (and the tokenizer) into
    the existing `directory`, from an lmforge-named state dict. Callers stage and rename."""
    from safetensors.torch import save_file

    hf_state = lmforge_to_hf(config, {k: v.detach().to("cpu") for k, v in state.items()})
    dtype = next(iter(hf_state.values())).dtype
    save_file(hf_state, directory / "model.safetensors", metadata={"format": "pt"})
    hf_config = hf_config_from(config)
    hf_config["torch_dtype"] = str(dtype).removeprefix("torch.")
    (directory / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n", encoding="utf-8")
    generation = {k: getattr(config, k) for k in ("bos_token_id", "eos_token_id", "pad_token_id") if getattr(config, k) is not None}
    (directory / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n", encoding="utf-8")
    if tokenizer is not None:
        tokenizer.save(directory)


def save_hf_model(model: Transformer, directory: str | Path, tokenizer=None, overwrite: bool = False) -> Path:
    """Write `model` (and `tokenizer`, if given) as a Hugging Face directory, atomically."""
    target = Path(directory)
    if target.exists() and not overwrite:
        raise LmforgeError(f"{target} already exists (choose another path or remove it)")
    with atomic_directory(target) as staging:
        write_hf_files(model.config, model.state_dict(), staging, tokenizer)
    return target
