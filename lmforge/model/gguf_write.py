"""Write an lmforge model (and its tokenizer) as a GGUF file, in F32, F16, Q8_0 or Q4_0.

The inverse of gguf_io.py: lmforge names become llama.cpp's (``blk.{i}.attn_q.weight`` ...),
fused matrices are split back into their parts (q/k/v, gate/up), and for the Llama
architecture the q and k rows are permuted into llama.cpp's interleaved-pair RoPE order.
The container is written with the `gguf` package's `GGUFWriter`; the quantization is
lmforge's own (`quantize_q8_0`, `quantize_q4_0`), following the block layouts GGUF defines:

    Q8_0  blocks of 32 weights: d (float16) | 32 x int8 q          34 bytes, 8.5 bits/weight
          d = max|x| / 127, q = round(x / d), x ~ d * q
    Q4_0  blocks of 32 weights: d (float16) | 16 bytes of 4-bit q  18 bytes, 4.5 bits/weight
          m = the value of largest magnitude (with its sign), d = m / -8,
          q = min(15, floor(x / d + 8.5)) in 0..15, x ~ d * (q - 8);
          byte j holds q[j] in its low nibble and q[j + 16] in its high nibble

Blocks run along each row (the innermost GGUF dimension, a matrix's input features), so a
quantized matrix needs rows whose length is a multiple of 32; llama.cpp's converter falls
back to F16 for any that is not, and so does this writer. Vectors (norms, biases) stay
F32, as in llama.cpp's files.

Mixtral-style mixtures of experts are llama.cpp's "llama" architecture with
``llama.expert_count`` / ``llama.expert_used_count``; each block holds its router
(``ffn_gate_inp``, kept float32 as llama.cpp's quantizer keeps it) and its experts stacked
into three 3-D tensors (``ffn_gate_exps`` / ``ffn_up_exps`` [E, F, D], ``ffn_down_exps``
[E, D, F]), which gguf_io.py reads back.

Tokenizer: byte-level BPE vocabularies are stored as llama.cpp expects them
(``tokenizer.ggml.model = "gpt2"``, tokens, token types, merges, the pre-tokenizer's
name, special ids, add-BOS/EOS flags, chat template). The pre-tokenizer name is found by
matching the tokenizer's pre-tokenizer against the splitters lmforge knows by name.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import LmforgeError
from ..io.atomic import atomic_path
from .config import ModelConfig

BLOCK = 32  # weights per Q8_0 / Q4_0 block
TYPES = ("f32", "f16", "q8_0", "q4_0")
# token types (llama.cpp's llama_token_type)
_NORMAL, _CONTROL, _USER_DEFINED, _UNUSED = 1, 3, 4, 5


def _round_half_away(x: np.ndarray) -> np.ndarray:
    """C's roundf (llama.cpp's rounding), not numpy's round-half-to-even."""
    return np.sign(x) * np.floor(np.abs(x) + 0.5)


def quantize_q8_0(x: np.ndarray) -> np.ndarray:
    """float rows [..., n] (n a multiple of 32) -> Q8_0 bytes [..., n / 32 * 34]."""
    x = np.asarray(x, dtype=np.float32)
    if x.shape[-1] % BLOCK:
        raise ValueError(f"Q8_0 needs rows of a multiple of {BLOCK} values, got {x.shape[-1]}")
    blocks = x.reshape(-1, BLOCK)
    d = np.abs(blocks).max(axis=1, keepdims=True) / 127.0
    with np.errstate(divide="ignore"):
        inv = np.where(d == 0, 0.0, 1.0 / d).astype(np.float32)
    q = _round_half_away(blocks * inv).astype(np.int8)
    out = np.concatenate([d.astype(np.float16).view(np.uint8), q.view(np.uint8)], axis=1)
    return out.reshape(*x.shape[:-1], x.shape[-1] // BLOCK * 34)


def quantize_q4_0(x: np.ndarray) -> np.ndarray:
    """float rows [..., n] (n a multiple of 32) -> Q4_0 bytes [..., n / 32 * 18]."""
    x = np.asarray(x, dtype=np.float32)
    if x.shape[-1] % BLOCK:
        raise ValueError(f"Q4_0 needs rows of a multiple of {BLOCK} values, got {x.shape[-1]}")
    blocks = x.reshape(-1, BLOCK)
    pick = np.abs(blocks).argmax(axis=1)
    signed_max = np.take_along_axis(blocks, pick[:, None], axis=1)
    d = signed_max / -8.0
    with np.errstate(divide="ignore"):
        inv = np.where(d == 0, 0.0, 1.0 / d).astype(np.float32)
    q = np.minimum(15, np.floor(blocks * inv + 8.5)).astype(np.uint8)  # >= 0.5 before the floor: never negative
    packed = q[:, :16] | (q[:, 16:] << 4)
    out = np.concatenate([d.astype(np.float16).view(np.uint8), packed], axis=1)
    return out.reshape(*x.shape[:-1], x.shape[-1] // BLOCK * 18)


def dequantize_q8_0(data: np.ndarray) -> np.ndarray:
    blocks = np.asarray(data, np.uint8).reshape(-1, 34)
    d = blocks[:, :2].copy().view(np.float16).astype(np.float32)
    return (d * blocks[:, 2:].copy().view(np.int8).astype(np.float32)).reshape(*data.shape[:-1], -1)


def dequantize_q4_0(data: np.ndarray) -> np.ndarray:
    blocks = np.asarray(data, np.uint8).reshape(-1, 18)
    d = blocks[:, :2].copy().view(np.float16).astype(np.float32)
    q = np.concatenate([blocks[:, 2:] & 0x0F, blocks[:, 2:] >> 4], axis=1).astype(np.float32)
    return (d * (q - 8.0)).reshape(*data.shape[:-1], -1)


def gguf_architecture(config: ModelConfig) -> str:
    """llama.cpp's architecture name for a config, or an error saying why it has none."""
    if not config.causal or not config.lm_head or config.norm_position != "pre" or config.type_vocab_size:
        raise LmforgeError("GGUF export covers causal decoders (GPT-2, Llama, Mistral, Qwen2 layouts); "
                           "this model is an encoder")
    if config.position == "learned":
        if config.norm != "layernorm" or config.mlp != "gelu" or config.gelu_approximate != "tanh":
            raise LmforgeError("a learned-position model is written as GGUF's gpt2 architecture, which needs "
                               "LayerNorm and a tanh-GELU MLP")
        if not (config.qkv_bias and config.out_bias and config.mlp_bias):
            raise LmforgeError("GGUF's gpt2 architecture has biases on every projection; this model lacks some")
        return "gpt2"
    if config.norm != "rmsnorm" or config.mlp != "swiglu" or config.mlp_bias:
        raise LmforgeError("a rotary model is written as GGUF's llama or qwen2 architecture, which need RMSNorm "
                           "and a bias-free SwiGLU MLP")
    return "qwen2" if config.qkv_bias and config.family == "qwen2" else "llama"


def _permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """lmforge's rotate-half q/k rows -> llama.cpp's interleaved pairs (gguf_io._unpermute undoes it)."""
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def gguf_tensors(config: ModelConfig, state: dict[str, torch.Tensor], arch: str) -> dict[str, torch.Tensor]:
    """lmforge-named float tensors -> llama.cpp-named ones (in llama.cpp's usual order)."""
    s = {k: v.detach().to("cpu", torch.float32) for k, v in state.items()}
    out = {"token_embd.weight": s["embed.weight"]}
    if arch == "gpt2":
        out["position_embd.weight"] = s["pos_embed.weight"]
    for i in range(config.n_layer):
        p, b = f"layers.{i}.", f"blk.{i}."
        out[b + "attn_norm.weight"] = s[p + "attn_norm.weight"]
        if p + "attn_norm.bias" in s:
            out[b + "attn_norm.bias"] = s[p + "attn_norm.bias"]
        if arch == "gpt2":
            out[b + "attn_qkv.weight"] = s[p + "attn.qkv.weight"]
            out[b + "attn_qkv.bias"] = s[p + "attn.qkv.bias"]
        else:
            sizes = (config.q_size, config.kv_size, config.kv_size)
            for kind in ("weight", "bias"):
                if p + "attn.qkv." + kind not in s:
                    continue
                q, k, v = s[p + "attn.qkv." + kind].split(sizes, dim=0)
                if arch == "llama":
                    q, k = _permute(q, config.n_head), _permute(k, config.n_kv_head)
                out[b + "attn_q." + kind], out[b + "attn_k." + kind], out[b + "attn_v." + kind] = q, k, v
        out[b + "attn_output.weight"] = s[p + "attn.out.weight"]
        if p + "attn.out.bias" in s:
            out[b + "attn_output.bias"] = s[p + "attn.out.bias"]
        out[b + "ffn_norm.weight"] = s[p + "mlp_norm.weight"]
        if p + "mlp_norm.bias" in s:
            out[b + "ffn_norm.bias"] = s[p + "mlp_norm.bias"]
        if config.num_experts:  # llama.cpp's Mixtral layout: the router, then every expert stacked
            out[b + "ffn_gate_inp.weight"] = s[p + "mlp.router.weight"]
            out[b + "ffn_gate_exps.weight"], out[b + "ffn_up_exps.weight"] = s[p + "mlp.w_in"].chunk(2, dim=1)
            out[b + "ffn_down_exps.weight"] = s[p + "mlp.w_out"]
            continue
        if arch == "gpt2":
            out[b + "ffn_up.weight"] = s[p + "mlp.fc.weight"]
            out[b + "ffn_up.bias"] = s[p + "mlp.fc.bias"]
        else:
            out[b + "ffn_gate.weight"], out[b + "ffn_up.weight"] = s[p + "mlp.fc.weight"].chunk(2, dim=0)
        out[b + "ffn_down.weight"] = s[p + "mlp.proj.weight"]
        if p + "mlp.proj.bias" in s:
            out[b + "ffn_down.bias"] = s[p + "mlp.proj.bias"]
    out["output_norm.weight"] = s["norm.weight"]
    if "norm.bias" in s:
        out["output_norm.bias"] = s["norm.bias"]
    if not config.tie_word_embeddings:
        out["output.weight"] = s["lm_head.weight"]
    return out


def _rope_factors(config: ModelConfig) -> np.ndarray | None:
    """Per-pair frequency divisors for scalings GGUF stores as a rope_freqs tensor (llama3, factors)."""
    from .rope import inverse_frequencies

    kind = (config.rope_scaling or {}).get("rope_type", (config.rope_scaling or {}).get("type"))
    if kind not in ("llama3", "factors"):
        return None
    plain = inverse_frequencies(config.head_dim, config.rope_theta, None)
    scaled = inverse_frequencies(config.head_dim, config.rope_theta, config.rope_scaling)
    return (plain / scaled).numpy().astype(np.float32)


def _pre_tokenizer_name(tokenizer) -> str:
    """The ``tokenizer.ggml.pre`` name whose splitter equals this tokenizer's pre-tokenizer."""
    from ..tokenizer.formats.gguf import _pre_tokenizer
    from ..tokenizer.pretokenize import GGUF_PRE_TOKENIZERS

    ours = tokenizer.pre_tokenizer.to_dict() if tokenizer.pre_tokenizer is not None else None
    ignore = bool(getattr(tokenizer.model, "ignore_merges", False))
    preferred = ["gpt-2", "smollm", "llama-bpe", "qwen2", "default"]
    for name in preferred + sorted(set(GGUF_PRE_TOKENIZERS) - set(preferred)):
        theirs, theirs_ignore = _pre_tokenizer(name)
        if theirs.to_dict() == ours and theirs_ignore == ignore:
            return name
    raise LmforgeError("the tokenizer's pre-tokenizer matches none that GGUF names (tokenizer.ggml.pre); "
                       "write the model without its tokenizer")


def tokenizer_metadata(tokenizer, vocab_rows: int) -> dict[str, object]:
    """llama.cpp's tokenizer.ggml.* keys for a byte-level BPE tokenizer, padded to the embedding rows."""
    model = tokenizer.model
    merges = getattr(model, "merges", None)
    if not merges and getattr(model, "pair_priority", None):
        raise LmforgeError("GGUF export writes byte-level BPE tokenizers (merges); this one is "
                           "SentencePiece-style (scores): write the model without its tokenizer")
    if tokenizer.vocab_size > vocab_rows:
        raise LmforgeError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model only {vocab_rows} "
                           "embedding rows")
    special = {t.id: t for t in tokenizer.added_tokens}
    tokens, types = [], []
    for i in range(vocab_rows):
        token = tokenizer.id_to_token(i) if i < tokenizer.vocab_size else None
        if token is None:
            # llama.cpp needs one token per embedding row; its converter pads with unused ones.
            tokens.append(f"[PAD{i}]")
            types.append(_UNUSED)
        else:
            tokens.append(token)
            types.append((_CONTROL if special[i].special else _USER_DEFINED) if i in special else _NORMAL)
    meta: dict[str, object] = {
        "model": "gpt2", "pre": _pre_tokenizer_name(tokenizer), "tokens": tokens, "types": types,
        "merges": [f"{a} {b}" for a, b in merges or []],
        "add_bos": bool(tokenizer.add_bos_token), "add_eos": bool(tokenizer.add_eos_token),
        "chat_template": tokenizer.chat_template,
    }
    for key, token in (("bos", tokenizer.bos_token), ("eos", tokenizer.eos_token), ("unk", tokenizer.unk_token),
                       ("pad", tokenizer.pad_token)):
        meta[key] = tokenizer.token_to_id(token) if token is not None else None
    return meta


@dataclass
class GGUFExport:
    path: Path
    qtype: str
    tensors: int
    quantized: int  # tensors stored in the requested quantized type
    fallback_f16: int  # matrices whose rows do not split into blocks (kept F16)
    nbytes: int


def _encode(array: np.ndarray, qtype: str):
    """(data, GGML type) for one float32 tensor written as `qtype`."""
    import gguf

    T = gguf.GGMLQuantizationType
    if array.ndim < 2 or qtype == "f32":
        return np.ascontiguousarray(array, dtype=np.float32), T.F32
    if qtype == "f16" or array.shape[-1] % BLOCK:
        return array.astype(np.float16), T.F16
    if qtype == "q8_0":
        return quantize_q8_0(array), T.Q8_0
    return quantize_q4_0(array), T.Q4_0


def write_gguf(model, path: str | os.PathLike[str], qtype: str = "f16", tokenizer=None, name: str | None = None,
               overwrite: bool = False, progress=None, pure: bool = False,
               encoded: dict[str, tuple[np.ndarray, int]] | None = None) -> GGUFExport:
    """Write `model` (an lmforge `Transformer`) and optionally its tokenizer to one GGUF file, atomically.

    For Q4_0 the vocabulary head (``output.weight``, or the tied ``token_embd.weight``) is stored
    as Q8_0, as llama.cpp's quantizer keeps it at a higher precision (Q6_K there): every logit
    passes through it, and 4-bit errors in it move the logits most. `pure` stores it in `qtype`
    like every other matrix.

    `encoded` maps GGUF tensor names to blocks already quantized elsewhere (bytes, GGML type),
    written as given instead of being rounded here: lmforge/infer/quantize.py's GPTQ and AWQ
    choose their own block scales and codes.
    """
    import gguf

    qtype = qtype.lower()
    if qtype not in TYPES:
        raise LmforgeError(f"unknown GGUF type {qtype!r} (use {', '.join(TYPES)})")
    path = Path(path)
    if path.exists() and not overwrite:
        raise LmforgeError(f"{path} already exists (choose another path or pass --overwrite)")
    if path.suffix.lower() != ".gguf":
        raise LmforgeError(f"{path}: a GGUF file name ends in .gguf")
    config = model.config
    arch = gguf_architecture(config)
    tok_meta = tokenizer_metadata(tokenizer, config.vocab_size) if tokenizer is not None else None
    tensors = gguf_tensors(config, model.state_dict(), arch)
    factors = _rope_factors(config) if arch != "gpt2" else None
    if factors is not None:
        tensors["rope_freqs.weight"] = torch.from_numpy(factors)
    scaling = config.rope_scaling or {}
    kind = scaling.get("rope_type", scaling.get("type"))
    if arch != "gpt2" and kind not in (None, "default", "linear", "llama3", "factors"):
        raise LmforgeError(f"rope scaling {kind!r} has no GGUF spelling")
    path.parent.mkdir(parents=True, exist_ok=True)
    counts = {"quantized": 0, "fallback": 0}
    with atomic_path(path) as tmp:
        w = gguf.GGUFWriter(str(tmp), arch)
        w.add_name(name or f"lmforge {config.family}")
        file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                     "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}[qtype]
        w.add_file_type(int(file_type))
        if qtype.startswith("q"):
            w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        w.add_block_count(config.n_layer)
        w.add_context_length(config.max_position_embeddings)
        w.add_embedding_length(config.n_embd)
        w.add_feed_forward_length(config.intermediate_size)
        if config.num_experts:
            w.add_expert_count(config.num_experts)
            w.add_expert_used_count(config.experts_per_token)
        w.add_head_count(config.n_head)
        if arch == "gpt2":
            w.add_layer_norm_eps(config.norm_eps)
        else:
            w.add_head_count_kv(config.n_kv_head)
            w.add_layer_norm_rms_eps(config.norm_eps)
            w.add_rope_freq_base(config.rope_theta)
            w.add_rope_dimension_count(config.head_dim)
            w.add_vocab_size(config.vocab_size)
            if config.head_dim != config.n_embd // config.n_head:
                w.add_key_length(config.head_dim)
                w.add_value_length(config.head_dim)
            if kind == "linear":
                w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
                w.add_rope_scaling_factor(float(scaling["factor"]))
            if config.sliding_window is not None:
                w.add_sliding_window(config.sliding_window)
        if tok_meta is not None:
            w.add_tokenizer_model(tok_meta["model"])
            w.add_tokenizer_pre(tok_meta["pre"])
            w.add_token_list(tok_meta["tokens"])
            w.add_token_types(tok_meta["types"])
            w.add_token_merges(tok_meta["merges"])
            for key, adder in (("bos", w.add_bos_token_id), ("eos", w.add_eos_token_id),
                               ("unk", w.add_unk_token_id), ("pad", w.add_pad_token_id)):
                if tok_meta[key] is not None:
                    adder(int(tok_meta[key]))
            w.add_add_bos_token(tok_meta["add_bos"])
            w.add_add_eos_token(tok_meta["add_eos"])
            if tok_meta["chat_template"]:
                w.add_chat_template(tok_meta["chat_template"])
        else:
            for key, value in (("bos", config.bos_token_id), ("eos", config.eos_token_id), ("pad", config.pad_token_id)):
                if isinstance(value, list):
                    value = value[0] if value else None
                if value is not None:
                    getattr(w, f"add_{key}_token_id")(int(value))
        head = "token_embd.weight" if config.tie_word_embeddings else "output.weight"
        for n, (tensor_name, tensor) in enumerate(tensors.items()):
            wanted = "q8_0" if qtype == "q4_0" and tensor_name == head and not pure else qtype
            if tensor_name.endswith("ffn_gate_inp.weight"):
                wanted = "f32"  # the router stays float32, as llama.cpp's quantizer keeps it
            if encoded is not None and tensor_name in encoded:
                data, ggml_type = encoded[tensor_name]
            else:
                data, ggml_type = _encode(tensor.numpy(), wanted)
            if ggml_type in (gguf.GGMLQuantizationType.Q8_0, gguf.GGMLQuantizationType.Q4_0):
                counts["quantized"] += 1  # (a Q4_0 file's Q8_0 head included)
            elif qtype.startswith("q") and tensor.dim() >= 2 and wanted != "f32":
                counts["fallback"] += 1
            w.add_tensor(tensor_name, data, raw_dtype=ggml_type)
            if progress is not None:
                progress(n + 1, len(tensors))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    return GGUFExport(path, qtype, len(tensors), counts["quantized"], counts["fallback"], path.stat().st_size)
