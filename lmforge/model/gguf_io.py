"""Read GGUF files (llama.cpp's single-file format) into lmforge's `Transformer`.

A GGUF file holds key/value metadata (architecture, shapes, tokenizer) and tensors that
may be block-quantized (Q4_0, Q4_1, Q8_0, K-quants ...). The `gguf` package parses the
file and dequantizes blocks to float32; this module maps llama.cpp's tensor names onto
lmforge's and undoes one quirk: llama.cpp's converter permutes the rows of q and k of
Llama-architecture models so that RoPE can rotate adjacent pairs; lmforge (like Hugging
Face) rotates the two halves, so the rows are permuted back.

Mixtral-style mixtures of experts are llama.cpp's "llama" architecture with
`llama.expert_count` / `llama.expert_used_count`; each block then holds the router
(ffn_gate_inp) and the experts either stacked (ffn_gate_exps / ffn_up_exps / ffn_down_exps,
[E, F, D] and [E, D, F]) or, in older files, one matrix per expert (ffn_gate.{e}, ...).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..errors import LmforgeError
from ..io.gguf_file import GGUFFile
from .config import ModelConfig

# llama.cpp tensor name (after "blk.{i}.") -> lmforge name (after "layers.{i}.")
_LAYER_NAMES = {
    "attn_norm.weight": "attn_norm.weight",
    "attn_norm.bias": "attn_norm.bias",
    "attn_output.weight": "attn.out.weight",
    "attn_output.bias": "attn.out.bias",
    "attn_qkv.weight": "attn.qkv.weight",
    "attn_qkv.bias": "attn.qkv.bias",
    "ffn_norm.weight": "mlp_norm.weight",
    "ffn_norm.bias": "mlp_norm.bias",
    "ffn_down.weight": "mlp.proj.weight",
    "ffn_down.bias": "mlp.proj.bias",
}
_FUSED = {  # lmforge fused matrix -> llama.cpp parts, in row order
    "attn.qkv": ("attn_q", "attn_k", "attn_v"),
    "mlp.fc": ("ffn_gate", "ffn_up"),
}
_TOP_NAMES = {
    "token_embd.weight": "embed.weight",
    "position_embd.weight": "pos_embed.weight",
    "output_norm.weight": "norm.weight",
    "output_norm.bias": "norm.bias",
    "output.weight": "lm_head.weight",
}
SUPPORTED_ARCHS = ("llama", "mistral", "qwen2", "gpt2")


def open_gguf(path: str | Path) -> GGUFFile:
    """Parse a GGUF container; every failure is one clear `LmforgeError`."""
    return GGUFFile(path)


def config_from_gguf(reader: GGUFFile) -> ModelConfig:
    meta = reader.metadata
    arch = meta.get("general.architecture")
    if arch not in SUPPORTED_ARCHS:
        raise LmforgeError(f"unsupported GGUF architecture {arch!r} (supported: {', '.join(SUPPORTED_ARCHS)})")

    def get(key: str, default: Any = None) -> Any:
        value = meta.get(f"{arch}.{key}", default)
        if value is None:
            raise LmforgeError(f"GGUF metadata lacks {arch}.{key}")
        return value

    tensor_names = {t.name for t in reader.tensors}
    n_embd, n_head = int(get("embedding_length")), int(get("attention.head_count"))
    if "token_embd.weight" not in tensor_names:
        raise LmforgeError("GGUF file has no token_embd.weight tensor")
    vocab = reader.tensor("token_embd.weight").shape[0]  # the embedding rows are the truth
    common = dict(
        vocab_size=int(vocab),
        n_layer=int(get("block_count")),
        n_embd=n_embd,
        n_head=n_head,
        intermediate_size=int(get("feed_forward_length")),
        max_position_embeddings=int(get("context_length")),
        tie_word_embeddings="output.weight" not in tensor_names,
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
        eos_token_id=meta.get("tokenizer.ggml.eos_token_id"),
        pad_token_id=meta.get("tokenizer.ggml.padding_token_id"),
    )
    if arch == "gpt2":
        return ModelConfig(
            family="gpt2", norm="layernorm", norm_eps=float(get("attention.layer_norm_epsilon", 1e-5)),
            mlp="gelu", position="learned", qkv_bias=True, out_bias=True, mlp_bias=True, **common,
        )
    scaling = None
    scaling_type = meta.get(f"{arch}.rope.scaling.type")
    if scaling_type == "linear":
        scaling = {"rope_type": "linear", "factor": float(get("rope.scaling.factor"))}
    elif scaling_type not in (None, "none"):
        raise LmforgeError(f"unsupported GGUF rope scaling {scaling_type!r}")
    if "rope_freqs.weight" in tensor_names:
        if scaling is not None:
            raise LmforgeError("GGUF file has both rope scaling metadata and a rope_freqs tensor")
        factors = reader.tensor("rope_freqs.weight").to_numpy().reshape(-1)
        scaling = {"rope_type": "factors", "factors": [float(f) for f in factors]}
    window = meta.get(f"{arch}.attention.sliding_window")
    experts = int(meta.get(f"{arch}.expert_count") or 0)
    moe = {}
    if experts:
        moe = dict(num_experts=experts, experts_per_token=int(get("expert_used_count")))
    family = "qwen2" if arch == "qwen2" else ("mistral" if window else "llama")
    return ModelConfig(
        family="mixtral" if experts else family,
        **moe,
        n_kv_head=int(get("attention.head_count_kv", n_head)),
        head_dim=int(meta.get(f"{arch}.attention.key_length", n_embd // n_head)),
        norm="rmsnorm",
        norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)),
        mlp="swiglu",
        position="rope",
        rope_theta=float(get("rope.freq_base", 10000.0)),
        rope_scaling=scaling,
        qkv_bias="blk.0.attn_q.bias" in tensor_names,
        out_bias="blk.0.attn_output.bias" in tensor_names,
        sliding_window=int(window) if window else None,
        **common,
    )


def _unpermute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row permutation (interleaved pairs -> rotate-half halves)."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def state_from_gguf(reader: GGUFFile, config: ModelConfig, progress=None) -> dict[str, torch.Tensor]:
    arch = reader.metadata.get("general.architecture")
    raw: dict[str, torch.Tensor] = {}
    tensors = reader.tensors
    for n, tensor in enumerate(tensors):
        try:
            raw[tensor.name] = torch.from_numpy(tensor.to_numpy())
        except (NotImplementedError, ValueError) as exc:
            raise LmforgeError(f"cannot dequantize GGUF tensor {tensor.name} ({tensor.qtype.name}): {exc}") from None
        if progress is not None:
            progress(n + 1, len(tensors))
    state: dict[str, torch.Tensor] = {}
    for name, ours in _TOP_NAMES.items():
        if name in raw:
            state[ours] = raw.pop(name)
    for i in range(config.n_layer):
        prefix = f"blk.{i}."
        if arch in ("llama", "mistral"):
            for part, heads in (("attn_q", config.n_head), ("attn_k", config.n_kv_head)):
                if prefix + part + ".weight" in raw:
                    raw[prefix + part + ".weight"] = _unpermute(raw[prefix + part + ".weight"], heads)
        for theirs, ours in _LAYER_NAMES.items():
            if prefix + theirs in raw:
                state[f"layers.{i}.{ours}"] = raw.pop(prefix + theirs)
        if arch == "gpt2" and prefix + "ffn_up.weight" in raw:
            state[f"layers.{i}.mlp.fc.weight"] = raw.pop(prefix + "ffn_up.weight")
            if prefix + "ffn_up.bias" in raw:
                state[f"layers.{i}.mlp.fc.bias"] = raw.pop(prefix + "ffn_up.bias")
        for fused, parts in _FUSED.items():
            for kind in ("weight", "bias"):
                pieces = [raw.pop(f"{prefix}{p}.{kind}", None) for p in parts]
                if all(p is not None for p in pieces):
                    state[f"layers.{i}.{fused}.{kind}"] = torch.cat(pieces, dim=0)
                elif any(p is not None for p in pieces):
                    raise LmforgeError(f"GGUF file has only some of {', '.join(prefix + p for p in parts)}")
        if config.num_experts:
            state.update(_experts_from_gguf(raw, prefix, f"layers.{i}.mlp.", config.num_experts))
    raw.pop("rope_freqs.weight", None)  # already folded into config.rope_scaling
    leftover = list(raw)
    if leftover:
        raise LmforgeError(f"GGUF file has tensors lmforge does not understand: {', '.join(leftover[:5])}")
    return state


def _experts_from_gguf(raw: dict[str, torch.Tensor], prefix: str, ours: str, n_experts: int) -> dict[str, torch.Tensor]:
    """One block's router and experts (stacked or per-expert tensors) as lmforge's router / w_in / w_out."""
    router = raw.pop(prefix + "ffn_gate_inp.weight", None)
    if router is None:
        raise LmforgeError(f"GGUF mixture-of-experts file lacks {prefix}ffn_gate_inp.weight")
    stacked = [raw.pop(f"{prefix}ffn_{p}_exps.weight", None) for p in ("gate", "up", "down")]
    if any(t is None for t in stacked):
        per_expert = [[raw.pop(f"{prefix}ffn_{p}.{e}.weight", None) for e in range(n_experts)]
                      for p in ("gate", "up", "down")]
        if any(t is None for part in per_expert for t in part):
            raise LmforgeError(f"GGUF mixture-of-experts file lacks the experts of {prefix.rstrip('.')}")
        stacked = [torch.stack(part) for part in per_expert]
    gate, up, down = stacked
    return {ours + "router.weight": router, ours + "w_in": torch.cat([gate, up], dim=1).contiguous(),
            ours + "w_out": down.contiguous()}


def load_gguf_model(path: str | Path, dtype: torch.dtype = torch.float32, device="cpu", reader=None, progress=None):
    from .checkpoint import build_model

    reader = reader if reader is not None else open_gguf(path)
    config = config_from_gguf(reader)
    return build_model(config, state_from_gguf(reader, config, progress), dtype, device)
