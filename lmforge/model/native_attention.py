"""Attention over packed variable-length sequences in one compiled C function.

`varlen_attention(qkv, offsets, ...)` computes softmax(q k^T / sqrt(d)) v for every
(sequence, head) pair of a packed batch, reading q, k and v straight from the rows of the
fused q/k/v product and writing each head's output into its columns of `out`: no padding,
no per-run calls, no head-major copies. The kernel (lmforge/model/kernels/varlen_attention.c)
is built on first use for this CPU (lmforge/io/native.py); where it cannot be built, or the
input is not what it takes (float32 on CPU, head size 16/32/48/64, no gradient wanted),
the function returns None and the model uses PyTorch's attention as before.

Where it pays: short sequences. PyTorch's CPU flash kernel spends several microseconds of
set-up per (sequence, head) pair, which is most of the attention time of an embedding
model reading 20-60-token sentences (docs/benchmarks.md, "Sentence embeddings").
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import torch

from ..io import native

SOURCE = Path(__file__).parent / "kernels" / "varlen_attention.c"
NAME = "varlen_attention"
# Longest sequence sent to the kernel: its per-query work is O(T), with scores kept in a
# buffer of T floats; past a few hundred tokens PyTorch's tiled kernel is the better tool.
MAX_LENGTH = 512

_fn = None
# Switch for comparisons (benchmarks/embed.py --pytorch-attention): False sends every call
# back to PyTorch's attention.
ENABLED = True


def _function():
    global _fn
    if _fn is None:
        lib = native.load(NAME, SOURCE)
        if lib is None:
            _fn = False
        else:
            f = lib.lmf_varlen_attention
            f.restype = ctypes.c_int
            f.argtypes = [ctypes.c_void_p, ctypes.c_long, ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                          ctypes.c_int, ctypes.c_int, ctypes.c_float, ctypes.c_void_p, ctypes.c_long]
            _fn = (f, native.has_openmp(lib))
    return _fn


def available() -> bool:
    """True when the kernel is built (or can be) and loads."""
    return bool(_function())


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
    fn = _function()
    if not fn:
        return None
    f, openmp = fn
    if not openmp and torch.get_num_threads() > 1:
        return None  # one thread here would lose to PyTorch's parallel kernel
    n = qkv.shape[0]
    if out is None:
        out = qkv.new_empty(n, n_head * head_dim)
    elif out.shape != (n, n_head * head_dim) or out.stride(1) != 1 or out.dtype != torch.float32:
        return None
    code = f(qkv.data_ptr(), qkv.stride(0), offsets.data_ptr(), offsets.numel() - 1, n_head, n_kv_head, head_dim,
             int(causal), head_dim ** -0.5, out.data_ptr(), out.stride(0))
    return out if code == 0 else None
