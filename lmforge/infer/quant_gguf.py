"""A GGUF model loaded with its linear layers kept quantized (lmforge/infer/quant_linear.py).

lmforge/model/gguf_io.py dequantizes every tensor to float32 (4 bytes a weight). Here each
linear tensor goes from its GGUF blocks straight into a quantized module, one tensor at a
time; the largest float intermediate is one tensor's codes (a byte a weight), never a
float copy of the model.

GGUF blocks run along a row (a matrix's input features), 32 weights each:

    Q4_0  d (f16) | 16 bytes of 4-bit q       w = (q - 8) d           -> s = d, z = 0
    Q4_1  d (f16) | m (f16) | 16 bytes of q   w = q d + m             -> s = d, z = m + 8 d
    Q8_0  d (f16) | 32 x int8 q               w = q d

(byte j of the 16 holds q[j] in its low nibble and q[j + 16] in its high nibble.) The int4
module's group-wise form w = (q - 8) s + z with groups of 32 holds Q4_0 and Q4_1 exactly,
so a Q4_1 file's codes are the module's codes; so is Q4_K (6-bit scales and mins per
32 weights inside super-blocks of 256: s = d sc, z = 8 d sc - dmin m). PyTorch has no kernel for Q8_0's per-block
scales; its blocks become one int8 scale per row (w = round(q d / s) s), a second rounding.
Other tensor types (F32, F16, other K-quants ...) are dequantized one tensor at a time and
rounded to nearest in the requested form.

Llama-architecture q/k rows are permuted back into lmforge's rotate-half order (gguf_io's
`_unpermute`); the permutation moves whole rows, so it moves codes, scales and zeros alike.
Fused matrices (q/k/v, gate/up) are the parts' rows stacked.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..errors import LmforgeError
from ..model.config import ModelConfig
from ..model.gguf_io import _unpermute, config_from_gguf, open_gguf
from .quant_linear import BITS, Int4Linear, Int8Linear, fuse_quantized_blocks, quantize_int4, quantize_int8

GROUP = 32
# lmforge linear (after "layers.{i}.") -> llama.cpp parts (after "blk.{i}."), stacked by rows
_LINEARS = {
    "attn.qkv": ("attn_q", "attn_k", "attn_v"),
    "attn.out": ("attn_output",),
    "mlp.fc": ("ffn_gate", "ffn_up"),
    "mlp.proj": ("ffn_down",),
}
_GPT2_LINEARS = {"attn.qkv": ("attn_qkv",), "attn.out": ("attn_output",), "mlp.fc": ("ffn_up",),
                 "mlp.proj": ("ffn_down",)}


def _qtype_name(tensor) -> str:
    return getattr(tensor.qtype, "name", str(tensor.qtype))


def _f16(blocks: np.ndarray, at: int) -> np.ndarray:
    """The float16 at byte `at` of every block, as float32."""
    return np.ascontiguousarray(blocks[..., at:at + 2]).view(np.float16)[..., 0].astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """16 bytes a block -> 32 codes: low nibbles are elements 0..15, high nibbles 16..31."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def int4_blocks(tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A Q4_0 / Q4_1 matrix [N, K] -> codes [N, K] (0..15), scales and zeros [N, K / 32], exactly
    w = (q - 8) s + z."""
    n, k = tensor.shape
    kind = _qtype_name(tensor)
    size = {"Q4_0": 18, "Q4_1": 20}[kind]
    blocks = np.asarray(tensor.raw).reshape(n, k // GROUP, size)
    d = _f16(blocks, 0)
    if kind == "Q4_0":
        codes, zeros = _nibbles(blocks[..., 2:]), np.zeros_like(d)
    else:
        codes, zeros = _nibbles(blocks[..., 4:]), _f16(blocks, 2) + 8 * d
    return torch.from_numpy(codes.reshape(n, k)), torch.from_numpy(d), torch.from_numpy(zeros)


def q4_k_blocks(tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A Q4_K matrix [N, K] -> codes [N, K], scales and zeros [N, K / 32], exactly.

    A Q4_K super-block of 256 weights is d (f16) | dmin (f16) | 12 bytes of eight 6-bit
    scales and eight 6-bit mins | 128 bytes of codes; sub-block j (32 weights) is
    w = d sc_j q - dmin m_j, i.e. s = d sc_j and z = 8 d sc_j - dmin m_j. Each 32-byte run
    of codes holds sub-block 2i in its low nibbles and 2i + 1 in its high nibbles.
    """
    n, k = tensor.shape
    blocks = np.asarray(tensor.raw).reshape(n, k // 256, 144)
    d, dmin = _f16(blocks, 0)[..., None], _f16(blocks, 2)[..., None]
    packed = blocks[..., 4:16].astype(np.uint8)
    low, high = packed[..., 0:4], packed[..., 4:8]
    extra = packed[..., 8:12]
    sc = np.concatenate([low & 63, (extra & 0x0F) | ((low >> 6) << 4)], axis=-1)
    mins = np.concatenate([high & 63, (extra >> 4) | ((high >> 6) << 4)], axis=-1)
    qs = blocks[..., 16:].reshape(n, k // 256, 4, 32)
    codes = np.stack([qs & 0x0F, qs >> 4], axis=3).reshape(n, k)  # [.., chunk i, low/high, 32]
    scales = (d * sc.astype(np.float32)).reshape(n, k // GROUP)
    zeros = (8 * d * sc.astype(np.float32) - dmin * mins.astype(np.float32)).reshape(n, k // GROUP)
    return torch.from_numpy(codes), torch.from_numpy(scales), torch.from_numpy(zeros)


def q8_0_blocks(tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A Q8_0 matrix [N, K] -> int8 codes [N, K] and block scales [N, K / 32]: w = q d."""
    n, k = tensor.shape
    blocks = np.asarray(tensor.raw).reshape(n, k // GROUP, 34)
    codes = np.ascontiguousarray(blocks[..., 2:]).view(np.int8).reshape(n, k)
    return torch.from_numpy(codes), torch.from_numpy(_f16(blocks, 0))


def _dequantized(tensor) -> torch.Tensor:
    try:
        return torch.from_numpy(tensor.to_numpy())
    except (NotImplementedError, ValueError) as exc:
        raise LmforgeError(f"cannot dequantize GGUF tensor {tensor.name} ({_qtype_name(tensor)}): {exc}") from None


def _int4_parts(tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Codes/scales/zeros of one GGUF matrix: exact for Q4_0/Q4_1, rounded to nearest otherwise."""
    if _qtype_name(tensor) in ("Q4_0", "Q4_1"):
        return int4_blocks(tensor)
    if _qtype_name(tensor) == "Q4_K":
        return q4_k_blocks(tensor)
    return quantize_int4(_dequantized(tensor).to(torch.float32), GROUP)


def _int8_parts(tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 codes and one scale per row of one GGUF matrix (Q8_0 blocks rescaled per row)."""
    if _qtype_name(tensor) == "Q8_0":
        codes, d = q8_0_blocks(tensor)
        w = (codes.to(torch.float32).view(codes.shape[0], -1, GROUP) * d[..., None]).view(codes.shape)
        return quantize_int8(w)
    return quantize_int8(_dequantized(tensor).to(torch.float32))


def _linear_from_parts(tensors: list, permute: list[int | None], bits: int, bias: torch.Tensor | None,
                       compute_dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """One quantized module from the row-stacked GGUF matrices `tensors` (q/k rows unpermuted)."""
    if bits == 4:
        parts = []
        for tensor, heads in zip(tensors, permute):
            codes, scales, zeros = _int4_parts(tensor)
            if heads:
                codes, scales, zeros = (_unpermute(t, heads) for t in (codes, scales, zeros))
            parts.append((codes, scales, zeros))
        codes, scales, zeros = (torch.cat([p[i] for p in parts]) for i in range(3))
        return Int4Linear.from_codes(codes, scales, zeros, GROUP, bias, compute_dtype)
    parts = []
    for tensor, heads in zip(tensors, permute):
        codes, scales = _int8_parts(tensor)
        if heads:
            codes, scales = _unpermute(codes, heads), _unpermute(scales, heads)
        parts.append((codes, scales))
    return Int8Linear.from_codes(torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]), bias,
                                 compute_dtype)


def _bias(reader, names: set[str], parts: list[str], heads: list[int | None]) -> torch.Tensor | None:
    """The stacked biases of `parts` (None when the file has none; an error when it has only some)."""
    present = [p in names for p in parts]
    if not any(present):
        return None
    if not all(present):
        raise LmforgeError(f"GGUF file has only some of the biases {', '.join(parts)}")
    pieces = [_dequantized(reader.tensor(p)) for p in parts]
    return torch.cat([_unpermute(t, h) if h else t for t, h in zip(pieces, heads)])


def load_gguf_quantized(path: str | Path, bits: int = 4, head_bits: int | None = 8, progress=None, reader=None,
                        compute_dtype: torch.dtype = torch.bfloat16):
    """A `Transformer` from a GGUF file with every block linear as an `Int4Linear` (bits 4) or
    `Int8Linear` (bits 8), built tensor by tensor from the file's blocks; norms, biases and the
    embedding table are float32. `head_bits` 8 / 4 quantizes the vocabulary head (a tied head
    gets its own quantized copy of the embedding), None keeps it float32.
    `compute_dtype` float32 gives the exact (slow) products; `progress(done, total)` is called
    per linear layer built.
    """
    from ..model.transformer import Transformer

    if bits not in BITS or (head_bits is not None and head_bits not in BITS):
        raise LmforgeError(f"kept-quantized loading supports {' or '.join(map(str, BITS))} bits, got {bits} "
                           f"(head {head_bits})")
    reader = reader if reader is not None else open_gguf(path)
    config: ModelConfig = config_from_gguf(reader)
    if config.num_experts:
        raise LmforgeError("kept-quantized loading supports dense models; load this mixture of experts with "
                           "--weights float")
    arch = reader.metadata.get("general.architecture")
    names = {t.name for t in reader.tensors}
    linears = _GPT2_LINEARS if arch == "gpt2" else _LINEARS
    total = config.n_layer * len(linears) + 1
    done = 0
    with torch.device("meta"):
        model = Transformer(config)
    state: dict[str, torch.Tensor] = {}
    for i in range(config.n_layer):
        block = model.layers[i]
        for ours, parts in linears.items():
            theirs = [f"blk.{i}.{p}.weight" for p in parts]
            absent = [n for n in theirs if n not in names]
            if absent:
                raise LmforgeError(f"GGUF file lacks {', '.join(absent)}")
            heads: list[int | None] = [None] * len(parts)
            if arch in ("llama", "mistral") and ours == "attn.qkv":
                heads = [config.n_head, config.n_kv_head, None]
            tensors = [reader.tensor(n) for n in theirs]
            bias = _bias(reader, names, [n[: -len("weight")] + "bias" for n in theirs], heads)
            parent, attr = ours.split(".")
            setattr(getattr(block, parent), attr, _linear_from_parts(tensors, heads, bits, bias, compute_dtype))
            done += 1
            if progress is not None:
                progress(done, total)
        for theirs, ours in (("attn_norm", "attn_norm"), ("ffn_norm", "mlp_norm")):
            for kind in ("weight", "bias"):
                name = f"blk.{i}.{theirs}.{kind}"
                if name in names:
                    state[f"layers.{i}.{ours}.{kind}"] = _dequantized(reader.tensor(name))
    for theirs, ours in (("token_embd.weight", "embed.weight"), ("position_embd.weight", "pos_embed.weight"),
                         ("output_norm.weight", "norm.weight"), ("output_norm.bias", "norm.bias")):
        if theirs in names:
            state[ours] = _dequantized(reader.tensor(theirs))
    head_tensor = reader.tensor("output.weight") if "output.weight" in names else reader.tensor("token_embd.weight")
    if head_bits is not None:
        model.lm_head = _linear_from_parts([head_tensor], [None], head_bits, None, compute_dtype)
    elif not config.tie_word_embeddings:
        state["lm_head.weight"] = _dequantized(head_tensor)
    done += 1
    if progress is not None:
        progress(done, total)

    expected = {k for k, v in model.state_dict().items() if v.is_meta}
    if config.tie_word_embeddings and head_bits is None:
        expected.discard("lm_head.weight")
    missing = expected - set(state)
    if missing:
        raise LmforgeError(f"GGUF file lacks tensors for {', '.join(sorted(missing)[:5])}")
    model.load_state_dict({k: v.to(torch.float32) for k, v in state.items()}, strict=False, assign=True)
    if config.tie_word_embeddings and head_bits is None:
        model.lm_head.weight = model.embed.weight
    if model.rope is not None:
        model.rope.to("cpu")
    return fuse_quantized_blocks(model).eval()


WEIGHT_FORMATS = {"float": None, "q4": 4, "q8": 8}


def weight_bits(weights: str) -> int | None:
    """`--weights` value -> bits of the block linears (None: float)."""
    if weights not in WEIGHT_FORMATS:
        raise LmforgeError(f"unknown --weights {weights!r}; choose one of {', '.join(WEIGHT_FORMATS)}")
    return WEIGHT_FORMATS[weights]


def load_quantized_model(spec, weights: str, device, dtype: torch.dtype = torch.float32, progress=None,
                         prepare=None, head_bits: int | None = 8):
    """The model of a resolved spec with quantized linears (`weights` "q4" or "q8").

    A GGUF file is read tensor by tensor into the quantized modules (its Q4_0/Q4_1 blocks
    kept exactly for "q4"); anything else (a Hugging Face directory, or a model that
    `prepare` changes first, e.g. merging an adapter) is loaded in float32 and rounded to
    nearest. The float parts stay float32 and the kernels are CPU ones.
    """
    from ..model.loading import load_model
    from .quant_linear import quantize_model

    bits = weight_bits(weights)
    if torch.device(device).type != "cpu":
        raise LmforgeError(f"--weights {weights} runs on CPU only (PyTorch's weight-only kernels); "
                           "use --device cpu or --weights float")
    if dtype != torch.float32:
        raise LmforgeError(f"--weights {weights} keeps norms, embeddings and activations in float32; "
                           "drop --dtype (or use --weights float)")
    if spec.format == "gguf" and prepare is None:
        return load_gguf_quantized(spec.path, bits, head_bits, progress=progress)
    net = load_model(spec, torch.float32, "cpu", progress=progress)
    if prepare is not None:
        net = prepare(net).eval()
    return quantize_model(net, bits, GROUP, head_bits)
