"""Attention and its neighbours in compiled C functions: packed variable-length sequences, the
decode step, a bf16 prefill's passes between products, and a bf16 head's cross-entropy.

`varlen_attention(qkv, offsets, ...)` computes softmax(q k^T / sqrt(d)) v for every
(sequence, head) pair of a packed batch, reading q, k and v straight from the rows of the
fused q/k/v product and writing each head's output into its columns of `out`: no padding,
no per-run calls, no head-major copies. The kernel (lmforge/model/kernels/cpu_ops.c)
is built on first use for this CPU (lmforge/io/native.py); where it cannot be built, or the
input is not what it takes (float32 on CPU, head size 16/32/48/64, no gradient wanted),
the function returns None and the model uses PyTorch's attention as before.

Where it pays: short sequences. PyTorch's CPU flash kernel spends several microseconds of
set-up per (sequence, head) pair, which is most of the attention time of an embedding
model reading 20-60-token sentences (docs/benchmarks.md, "Sentence embeddings").

`decode_attention(...)` is one batch-1 decode step of one layer: rotary on q and k, k and v
written into the KV cache, one query per head attending to the cache, in one call where
PyTorch takes some twenty operations (views, a concatenation for the rotation, cache
writes, the attention kernel's set-up), which is most of a small model's step.

`rms_norm(x, weight, eps)` normalizes a few rows (a decode step's) in one call; PyTorch's
CPU RMS norm runs about eight operations for it. `rms_norm_rows` does a prompt's rows, split
over the threads.

A bf16 prefill (lmforge/infer/bf16_prefill.py) has three more: `prefill_prepare` turns the
q/k/v product of a prompt into rotated bf16 q, k and v for the attention and writes k and v
into the float32 cache, in one pass; `silu_mul_bf16` is SwiGLU's activation on a bf16
product. Training with bf16 products has `cross_entropy_rows`: a vocabulary head's loss and
its gradient from bf16 logits, written over them (lmforge/train/fused_ce.py).
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import torch

from ..io import native

SOURCE = Path(__file__).parent / "kernels" / "cpu_ops.c"
NAME = "cpu_ops"
# Longest sequence sent to the kernel: its per-query work is O(T), with scores kept in a
# buffer of T floats; past a few hundred tokens PyTorch's tiled kernel is the better tool.
MAX_LENGTH = 512

_p, _i, _f, _l = ctypes.c_void_p, ctypes.c_int, ctypes.c_float, ctypes.c_long
SIGNATURES: native.Signatures = {
    "lmf_varlen_attention": (_i, [_p, _l, _p, _i, _i, _i, _i, _i, _f, _p, _l]),
    "lmf_decode_attention": (_i, [_p, _i, _i, _i, _p, _p, _p, _p, _l, _i, _f, _p]),
    "lmf_decode_attention_rows": (_i, [_p, _i, _l, _i, _i, _i, _p, _p, _l, _p, _p, _l, _l, _p, _f, _p]),
    "lmf_rms_norm": (None, [_p, _p, _i, _i, _f, _p]),
    "lmf_rms_norm_rows": (None, [_p, _p, _i, _i, _f, _p]),
    "lmf_prefill_prepare": (None, [_p, _i, _l, _i, _i, _i, _i, _i, _p, _p, _p, _p, _l, _l, _i, _p, _p, _p]),
    "lmf_silu_mul_bf16": (None, [_p, _l, _i, _l, _p]),
    "lmf_cross_entropy_rows": (_i, [_p, _i, _l, _i, _l, _p, _f, _p, _p]),
}
# Switch for comparisons (benchmarks/embed.py --pytorch-attention): False sends every call
# back to PyTorch's attention.
ENABLED = True


def _library():
    return native.load(NAME, SOURCE, signatures=SIGNATURES)


def threaded_library():
    """The library, for a kernel that splits its work over threads: None where it is not built, or
    where it lacks OpenMP while PyTorch runs several threads (one thread would lose to PyTorch's
    parallel kernels)."""
    lib = _library()
    if lib is None or (not native.has_openmp(lib) and torch.get_num_threads() > 1):
        return None
    return lib


def available() -> bool:
    """True when the kernels are built (or can be) and load."""
    return _library() is not None


def offsets_of(lengths: list[int]) -> torch.Tensor:
    out = torch.zeros(len(lengths) + 1, dtype=torch.int64)
    torch.cumsum(torch.tensor(lengths, dtype=torch.int64), 0, out=out[1:])
    return out


def varlen_attention(qkv: torch.Tensor, offsets: torch.Tensor, n_head: int, n_kv_head: int, head_dim: int,
                     causal: bool = False, out: torch.Tensor | None = None) -> torch.Tensor | None:
    """Attention of packed sequences, or None where the kernel does not apply.

    qkv [N, F] float32 on CPU with unit column stride: per row, `n_head` query heads, then
    `n_kv_head` key heads, then `n_kv_head` value heads, `head_dim` each (extra columns
    after them are ignored); offsets [B + 1] int64, sequence b = rows offsets[b]:offsets[b+1].
    Returns [N, n_head * head_dim] (written into `out` when given).
    """
    if (not ENABLED or qkv.device.type != "cpu" or qkv.dtype != torch.float32 or qkv.dim() != 2 or qkv.stride(1) != 1
            or head_dim % 16 or head_dim > 64 or n_head % n_kv_head
            or qkv.shape[1] < (n_head + 2 * n_kv_head) * head_dim
            or (torch.is_grad_enabled() and qkv.requires_grad)):
        return None
    offsets = offsets.to(dtype=torch.int64, device="cpu").contiguous()
    if offsets.numel() < 2 or int((offsets[1:] - offsets[:-1]).max()) > MAX_LENGTH:
        return None
    lib = threaded_library()
    if lib is None:
        return None
    n = qkv.shape[0]
    if out is None:
        out = qkv.new_empty(n, n_head * head_dim)
    elif out.shape != (n, n_head * head_dim) or out.stride(1) != 1 or out.dtype != torch.float32:
        return None
    code = lib.lmf_varlen_attention(qkv.data_ptr(), qkv.stride(0), offsets.data_ptr(), offsets.numel() - 1, n_head,
                                    n_kv_head, head_dim, int(causal), head_dim ** -0.5, out.data_ptr(), out.stride(0))
    return out if code == 0 else None


def decode_attention(qkv: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None, k_cache: torch.Tensor,
                     v_cache: torch.Tensor, pos: int, n_head: int, n_kv_head: int,
                     head_dim: int) -> torch.Tensor | None:
    """One decode step of one sequence, or None where the kernel does not apply.

    qkv: the new token's projected row ((n_head + 2 n_kv_head) * head_dim floats, contiguous);
    rope: (cos, sin) of its position, head_dim floats each, or None; k_cache / v_cache: this
    layer's cache of this sequence, [n_kv_head, max_len, head_dim] contiguous, written at `pos`.
    Returns [n_head * head_dim]: softmax(q k^T / sqrt(d)) v over keys 0..pos.
    """
    width = (n_head + 2 * n_kv_head) * head_dim
    if (not ENABLED or qkv.dtype != torch.float32 or qkv.device.type != "cpu" or qkv.numel() != width
            or not qkv.is_contiguous() or n_head % n_kv_head or head_dim % 2
            or (torch.is_grad_enabled() and qkv.requires_grad)):
        return None
    for c in (k_cache, v_cache):
        if (c.dtype != torch.float32 or c.dim() != 3 or not c.is_contiguous() or c.shape[0] != n_kv_head
                or c.shape[2] != head_dim or not 0 <= pos < c.shape[1]):
            return None
    cos = sin = None
    if rope is not None:
        cos, sin = rope
        if (cos.numel() != head_dim or sin.numel() != head_dim or cos.dtype != torch.float32
                or sin.dtype != torch.float32 or not cos.is_contiguous() or not sin.is_contiguous()):
            return None
    lib = _library()
    if lib is None:
        return None
    out = qkv.new_empty(n_head * head_dim)
    code = lib.lmf_decode_attention(qkv.data_ptr(), n_head, n_kv_head, head_dim, native.ptr(cos), native.ptr(sin),
                                    k_cache.data_ptr(), v_cache.data_ptr(), k_cache.stride(0), pos, head_dim ** -0.5,
                                    out.data_ptr())
    return out if code == 0 else None


def decode_attention_rows(qkv: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None, k_cache: torch.Tensor,
                          v_cache: torch.Tensor, start: int | torch.Tensor, n_head: int, n_kv_head: int,
                          head_dim: int) -> torch.Tensor | None:
    """`decode_attention` for a batch of B sequences, one new token each, row b at position
    start (an int for all rows, or a tensor [B] of per-row positions); None where it does not apply.

    qkv [B, 1, (n_head + 2 n_kv_head) head_dim]; rope: (cos, sin) [B or 1, ..., head_dim] for
    those positions, or None; k_cache / v_cache: this layer's cache rows [B, n_kv_head, max_len,
    head_dim] (each row's positions contiguous), written at each row's position. Row b attends
    to its keys 0..start[b] (what the per-row causal mask of a decode step allows). Returns
    [B, n_head * head_dim].
    """
    batch = qkv.shape[0]
    width = (n_head + 2 * n_kv_head) * head_dim
    if (not ENABLED or qkv.dtype != torch.float32 or qkv.device.type != "cpu" or qkv.dim() != 3
            or qkv.shape[1:] != (1, width) or qkv.stride(2) != 1 or n_head % n_kv_head or head_dim % 2
            or (torch.is_grad_enabled() and qkv.requires_grad)):
        return None
    for c in (k_cache, v_cache):
        if (c.dtype != torch.float32 or c.dim() != 4 or c.shape[0] != batch or c.shape[1] != n_kv_head
                or c.shape[3] != head_dim or c.stride(3) != 1 or c.stride(2) != head_dim
                or c.stride() != k_cache.stride()):
            return None
    if isinstance(start, int):
        positions = torch.full((batch,), start, dtype=torch.int32)
    else:
        positions = start.reshape(-1).to(torch.int32)
        if positions.numel() != batch:
            return None
    if batch and not (0 <= int(positions.min()) and int(positions.max()) < k_cache.shape[2]):
        return None
    cos = sin = None
    rope_stride = 0
    if rope is not None:
        cos, sin = (t.reshape(-1, head_dim) for t in rope)
        if (cos.dtype != torch.float32 or sin.dtype != torch.float32 or cos.shape[0] not in (1, batch)
                or sin.shape != cos.shape or not cos.is_contiguous() or not sin.is_contiguous()):
            return None
        rope_stride = head_dim if cos.shape[0] == batch else 0
    lib = _library()
    if lib is None:
        return None
    positions = positions.contiguous()
    out = qkv.new_empty(batch, n_head * head_dim)
    code = lib.lmf_decode_attention_rows(qkv.data_ptr(), batch, qkv.stride(0), n_head, n_kv_head, head_dim,
                                         native.ptr(cos), native.ptr(sin), rope_stride, k_cache.data_ptr(),
                                         v_cache.data_ptr(), k_cache.stride(0), k_cache.stride(1), positions.data_ptr(),
                                         head_dim ** -0.5, out.data_ptr())
    return out if code == 0 else None


# Rows above which `rms_norm` leaves the work to PyTorch (whose kernel uses every thread).
RMS_NORM_MAX_ROWS = 16


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor | None:
    """x / sqrt(mean(x^2) + eps) * weight over the last dimension for a few float32 rows, or None."""
    n = x.shape[-1]
    if (not ENABLED or x.dtype != torch.float32 or x.device.type != "cpu" or not x.is_contiguous()
            or x.numel() > RMS_NORM_MAX_ROWS * n or weight.dtype != torch.float32 or weight.numel() != n
            or not weight.is_contiguous() or (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))):
        return None
    lib = _library()
    if lib is None:
        return None
    out = torch.empty_like(x)
    lib.lmf_rms_norm(x.data_ptr(), weight.data_ptr(), x.numel() // n, n, eps, out.data_ptr())
    return out


def rms_norm_rows(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor | None:
    """`rms_norm` for many rows (a prompt's), split over the threads; None where it does not apply."""
    n = x.shape[-1]
    if (not ENABLED or x.dtype != torch.float32 or x.device.type != "cpu" or not x.is_contiguous() or x.numel() == 0
            or weight.dtype != torch.float32 or weight.numel() != n or not weight.is_contiguous()
            or (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))):
        return None
    lib = threaded_library()
    if lib is None:
        return None
    out = torch.empty_like(x)
    lib.lmf_rms_norm_rows(x.data_ptr(), weight.data_ptr(), x.numel() // n, n, eps, out.data_ptr())
    return out


def prefill_prepare(qkv: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None, k_cache: torch.Tensor | None,
                    v_cache: torch.Tensor | None, start: int, n_head: int, n_kv_head: int,
                    head_dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """A prompt's bf16 attention inputs from its q/k/v product, in one pass; None where it does not apply.

    qkv [B, L, (n_head + 2 n_kv_head) head_dim] float32 or bf16 (rows contiguous); rope: (cos, sin) of
    positions start..start+L-1 ([.., L, head_dim]) or None; k_cache / v_cache: this layer's
    float32 cache rows [B, n_kv_head, max_len, head_dim] (positions contiguous), written at
    start..start+L-1, or both None. Returns q [B, n_head, L, head_dim], k and v [B, n_kv_head, L,
    head_dim], bf16: rotated as `apply_rotary` rotates (up to float32 rounding), rounded to bf16
    as `.to(torch.bfloat16)` rounds.
    """
    batch, length, width = qkv.shape
    if (not ENABLED or qkv.dtype not in (torch.float32, torch.bfloat16) or qkv.device.type != "cpu"
            or qkv.stride(2) != 1 or qkv.stride(0) != length * qkv.stride(1) or width > 4096
            or width != (n_head + 2 * n_kv_head) * head_dim
            or head_dim % 2 or head_dim > 256 or n_head % n_kv_head or length == 0
            or (torch.is_grad_enabled() and qkv.requires_grad)):
        return None
    cos = sin = None
    if rope is not None:
        cos, sin = (t.reshape(-1, head_dim) for t in rope)
        if (cos.shape[0] != length or sin.shape != cos.shape or cos.dtype != torch.float32
                or sin.dtype != torch.float32 or not cos.is_contiguous() or not sin.is_contiguous()):
            return None
    if (k_cache is None) != (v_cache is None):
        return None
    if k_cache is not None:
        for c in (k_cache, v_cache):
            if (c.dtype != torch.float32 or c.dim() != 4 or c.shape[0] != batch or c.shape[1] != n_kv_head
                    or c.shape[3] != head_dim or c.stride(3) != 1 or c.stride(2) != head_dim
                    or c.stride() != k_cache.stride() or not 0 <= start <= c.shape[2] - length):
                return None
    lib = threaded_library()
    if lib is None:
        return None
    q = qkv.new_empty(batch, n_head, length, head_dim, dtype=torch.bfloat16)
    k = qkv.new_empty(batch, n_kv_head, length, head_dim, dtype=torch.bfloat16)
    v = torch.empty_like(k)
    lib.lmf_prefill_prepare(qkv.data_ptr(), int(qkv.dtype == torch.bfloat16), qkv.stride(1), batch, length, n_head, n_kv_head, head_dim,
                            native.ptr(cos), native.ptr(sin), native.ptr(k_cache), native.ptr(v_cache),
                            k_cache.stride(0) if k_cache is not None else 0,
                            k_cache.stride(1) if k_cache is not None else 0, start, q.data_ptr(), k.data_ptr(),
                            v.data_ptr())
    return q, k, v


def silu_mul_bf16(h: torch.Tensor) -> torch.Tensor | None:
    """SwiGLU's ``silu(gate) * up`` for a bf16 product h [..., 2n] (gate first), as bf16 [..., n]:
    one pass, computed in float32 and rounded once; None where it does not apply."""
    n = h.shape[-1] // 2
    if (not ENABLED or h.dtype != torch.bfloat16 or h.device.type != "cpu" or h.shape[-1] % 2 or h.numel() == 0
            or h.stride(-1) != 1 or not h.is_contiguous() or (torch.is_grad_enabled() and h.requires_grad)):
        return None
    lib = threaded_library()
    if lib is None:
        return None
    rows = h.numel() // h.shape[-1]
    out = h.new_empty(*h.shape[:-1], n)
    lib.lmf_silu_mul_bf16(h.data_ptr(), rows, n, h.shape[-1], out.data_ptr())
    return out


def cross_entropy_rows(logits: torch.Tensor, targets: torch.Tensor, scale: float,
                       grad: bool = True) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """Per-row cross-entropy of logits [rows, V] (float32 or bf16, rows contiguous) against
    targets [rows] (class ids), and with `grad` its gradient ``scale * (softmax - onehot)``
    written over the logits (which are not needed after it): (loss [rows] float32, the
    gradient or None). One compiled call with three passes over each row, where PyTorch's
    log-sum-exp and gradient took about eight; None where it does not apply."""
    if (not ENABLED or logits.dtype not in (torch.float32, torch.bfloat16) or logits.device.type != "cpu"
            or logits.dim() != 2 or logits.stride(1) != 1 or logits.shape[0] == 0 or targets.numel() != logits.shape[0]
            or targets.device.type != "cpu" or (torch.is_grad_enabled() and logits.requires_grad)):
        return None
    lib = threaded_library()
    if lib is None:
        return None
    rows, vocab = logits.shape
    targets = targets.reshape(-1).to(torch.int64).contiguous()
    loss = torch.empty(rows, dtype=torch.float32)
    bad = lib.lmf_cross_entropy_rows(logits.data_ptr(), int(logits.dtype == torch.bfloat16), rows, vocab,
                                     logits.stride(0), targets.data_ptr(), scale, loss.data_ptr(),
                                     logits.data_ptr() if grad else None)
    if bad:
        raise IndexError(f"a target is outside the {vocab} classes")
    return loss, logits if grad else None

