"""A whole decoder layer of a batch-1 decode step in one compiled call, and the float32
matrix-vector product it uses (lmforge/infer/kernels/decode_layer.c).

Between the matrix products of a decode step a layer runs some forty small operations (norms,
views, rotary, cache writes, attention set-up, SiLU, residual adds), each a few microseconds of
Python and PyTorch bookkeeping; on a 135M-parameter model that is a third of the step. The C
file does the layer's whole step with the kernels of lmforge/model/kernels/cpu_ops.c (norm,
decode attention) and either lmforge's int4 products (quant_gemv.c, `q4_decode_layer`) or its
float32 ones (`f32_decode_layer`, `f32_gemv`), which read row-major or column-major weights as
lmforge/infer/layout.py stores them. The float32 layer runs in one OpenMP parallel region: the
products are split over the threads with a barrier after each, everything else runs on one.

Built on first use for this CPU (lmforge/io/native.py); without a compiler `available()` is
False and the modules keep their PyTorch / NumPy paths. `threads` arguments are explicit:
during a decode step PyTorch is set to one thread (lmforge/infer/layout.py,
`torch_threads_for`) while these kernels use the machine's.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import torch

from ..io import native
from ..model.kv_cache import KVCache
from ..model.transformer import MLP, Block, RMSNorm
from . import quant_kernels

SOURCE = Path(__file__).parent / "kernels" / "decode_layer.c"
INCLUDES = (quant_kernels.SOURCE, Path(__file__).parents[1] / "model" / "kernels" / "cpu_ops.c")
NAME = "decode_layer"

_p, _i, _f, _l = ctypes.c_void_p, ctypes.c_int, ctypes.c_float, ctypes.c_long
SIGNATURES: native.Signatures = {
    "lmf_q4_decode_layer": (_i, [_p, _i, _p, _p, _f, _p, _p, _p, _p, _p, _i, _i, _i, _i, _p, _p, _p, _p, _l, _i, _p]),
    "lmf_f32_decode_layer": (_i, [_p, _i, _p, _p, _f, _p, _i, _p, _p, _i, _p, _i, _p, _i, _i, _i, _i, _i, _p, _p, _p,
                                  _p, _l, _i, _p, _i]),
    "lmf_f32_gemv": (_i, [_p, _i, _i, _i, _p, _p, _p, _i]),
}


def _library():
    return native.load(NAME, SOURCE, INCLUDES, signatures=SIGNATURES)


def available() -> bool:
    return _library() is not None


def layout_of(w: torch.Tensor) -> int | None:
    """0 for a row-major [n, k] float32 weight, 1 for a column-major one (its transpose
    contiguous), None for anything else."""
    if w.dtype != torch.float32 or w.dim() != 2 or w.device.type != "cpu":
        return None
    if w.is_contiguous():
        return 0
    if w.t().is_contiguous():
        return 1
    return None


def f32_gemv(w: torch.Tensor, x: torch.Tensor, bias: torch.Tensor | None, threads: int) -> torch.Tensor | None:
    """x [..., k] (one row) @ w^T (+ bias) with w [n, k] float32 row- or column-major: [..., n], or None."""
    lib = _library()
    n, k = w.shape
    cm = layout_of(w)
    if lib is None or cm is None or x.shape[-1] != k or x.dtype != torch.float32:
        return None
    x1 = x.reshape(k).contiguous()
    y = torch.empty(n, dtype=torch.float32)
    lib.lmf_f32_gemv(w.data_ptr(), cm, n, k, x1.data_ptr(), native.ptr(bias), y.data_ptr(), threads)
    return y.view(*x.shape[:-1], n)


def _scratch(d: int, n_head: int, n_kv_head: int, head_dim: int, inter: int) -> torch.Tensor:
    return torch.empty(2 * d + (2 * n_head + 2 * n_kv_head) * head_dim + 3 * inter)


def q4_decode_layer(x: torch.Tensor, attn_norm: torch.Tensor, mlp_norm: torch.Tensor, eps: float,
                    qkv: torch.Tensor, qkv_bias: torch.Tensor | None, out: torch.Tensor, fc: torch.Tensor,
                    proj: torch.Tensor, inter: int, n_head: int, n_kv_head: int, head_dim: int,
                    rope: tuple[torch.Tensor, torch.Tensor] | None, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    pos: int) -> torch.Tensor | None:
    """x + attention + MLP of one pre-norm SwiGLU layer for one token, every product on the
    packed int4 rows given (qkv, out, fc, proj from `quant_kernels.q4_pack`), or None where it
    does not apply.

    x: the residual stream row (d float32); norms' weights [d]; rope (cos, sin) [head_dim] or
    None; k_cache / v_cache: this layer's cache of the sequence [n_kv_head, max_len, head_dim],
    written at `pos`. Returns a new row; x is not changed.
    """
    lib = _library()
    d = x.shape[-1]
    if (lib is None or not quant_kernels.available() or d % 64 or inter % 64 or (n_head * head_dim) % 64
            or not 0 <= pos < k_cache.shape[1]):
        return None
    cos, sin = rope if rope is not None else (None, None)
    y = x.reshape(d).clone()
    scratch = _scratch(d, n_head, n_kv_head, head_dim, inter)
    code = lib.lmf_q4_decode_layer(y.data_ptr(), d, attn_norm.data_ptr(), mlp_norm.data_ptr(), eps, qkv.data_ptr(),
                                   native.ptr(qkv_bias), out.data_ptr(), fc.data_ptr(), proj.data_ptr(), inter, n_head,
                                   n_kv_head, head_dim, native.ptr(cos), native.ptr(sin), k_cache.data_ptr(),
                                   v_cache.data_ptr(), k_cache.stride(0), pos, scratch.data_ptr())
    return y.view(x.shape) if code == 0 else None


def f32_decode_layer(x: torch.Tensor, attn_norm: torch.Tensor, mlp_norm: torch.Tensor, eps: float,
                     qkv: torch.Tensor, qkv_bias: torch.Tensor | None, out: torch.Tensor, fc: torch.Tensor,
                     proj: torch.Tensor, n_head: int, n_kv_head: int, head_dim: int,
                     rope: tuple[torch.Tensor, torch.Tensor] | None, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     pos: int, threads: int) -> torch.Tensor | None:
    """`q4_decode_layer` with float32 weights [n, k], each row- or column-major; None where it
    does not apply."""
    lib = _library()
    d = x.shape[-1]
    layouts = [layout_of(w) for w in (qkv, out, fc, proj)]
    if lib is None or any(v is None for v in layouts) or not 0 <= pos < k_cache.shape[1]:
        return None
    inter = proj.shape[1]
    cos, sin = rope if rope is not None else (None, None)
    y = x.reshape(d).clone()
    scratch = _scratch(d, n_head, n_kv_head, head_dim, inter)
    code = lib.lmf_f32_decode_layer(y.data_ptr(), d, attn_norm.data_ptr(), mlp_norm.data_ptr(), eps, qkv.data_ptr(),
                                    layouts[0], native.ptr(qkv_bias), out.data_ptr(), layouts[1], fc.data_ptr(),
                                    layouts[2], proj.data_ptr(), layouts[3], inter, n_head, n_kv_head, head_dim,
                                    native.ptr(cos), native.ptr(sin), k_cache.data_ptr(), v_cache.data_ptr(),
                                    k_cache.stride(0), pos, scratch.data_ptr(), threads)
    return y.view(x.shape) if code == 0 else None


class CompiledDecodeBlock(Block):
    """A pre-norm `Block` whose batch-1 decode step may run as one compiled call: subclasses say
    how in `_decode_step` (None: not this block, not now); every other call, and every step
    they decline, runs `Block.forward` unchanged."""

    def forward(self, x, rope, mask, cache, layer, start, end):
        if (x.shape[0] == 1 and x.shape[1] == 1 and mask is None and isinstance(start, int) and end == start + 1
                and isinstance(cache, KVCache) and x.dtype == torch.float32 and x.device.type == "cpu"
                and not (torch.is_grad_enabled() and x.requires_grad) and self._fits(rope, cache)):
            y = self._decode_step(x, rope, cache, layer, start)
            if y is not None:
                return y
        return super().forward(x, rope, mask, cache, layer, start, end)

    def _fits(self, rope, cache: KVCache) -> bool:
        """The layer shape the compiled layers take: RMS norms with weights and one eps, a SwiGLU
        MLP without biases after the q/k/v product, a float32 [layers, batch, heads, len, dim]
        cache, rotary tables of one head's width (or none)."""
        attn, mlp, n1, n2 = self.attn, self.mlp, self.attn_norm, self.mlp_norm
        return (isinstance(mlp, MLP) and mlp.swiglu and type(n1) is RMSNorm and type(n2) is RMSNorm
                and n1.weight is not None and n2.weight is not None and n1.eps is not None and n1.eps == n2.eps
                and attn.out.bias is None and mlp.fc.bias is None and mlp.proj.bias is None
                and cache.k.dim() == 5 and cache.k.dtype == torch.float32
                and (rope is None or (rope[0].numel() == attn.head_dim and rope[0].dtype == torch.float32)))

    def _decode_step(self, x, rope, cache: KVCache, layer: int, pos: int) -> torch.Tensor | None:
        raise NotImplementedError
