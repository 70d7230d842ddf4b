"""Products with int4 / int8 weights through lmforge's own C kernels, one row or a few.

lmforge/infer/kernels/quant_gemv.c multiplies activation rows by packed 4-bit or 8-bit
weights with integer dot products (each row rounded to int8 in groups of 32, AVX-512 VNNI),
reading each weight byte once for up to eight rows, and gives every row the result it gets
alone. `Int4Linear` and `Int8Linear` (lmforge/infer/quant_linear.py) call it for single-row
products (the whole of a batch-1 decode step), for the few rows of a batched decode step, and
(int8) for prompts; PyTorch's weight-only kernels do the rest. The library is built on first use for this CPU
(lmforge/io/native.py); without a compiler, without AVX-512 VNNI, or with
`LMFORGE_NATIVE=0`, `available()` is False and the PyTorch kernels do all the work.

Layouts (see the C file): `q4_pack` turns codes [N, K] in 0..15 with per-group scales s and
offsets z (w = q s + z, groups of 32) into rows of `q4_row_bytes(K)` bytes, K a multiple of
64; int8 weights are kept as codes + 128 (uint8) beside a float32 scale per row.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import torch

from ..io import native

SOURCE = Path(__file__).parent / "kernels" / "quant_gemv.c"
NAME = "quant_gemv"
GROUP = 32

_p, _i, _l = ctypes.c_void_p, ctypes.c_int, ctypes.c_long
SIGNATURES: native.Signatures = {
    "lmf_quant_gemv_supported": (_i, []),
    "lmf_q4_pack": (_i, [_p, _p, _p, _i, _i, _p]),
    "lmf_q4_gemv": (_i, [_p, _i, _i, _p, _p]),
    "lmf_q8_gemv": (_i, [_p, _p, _i, _i, _p, _p]),
    "lmf_q4_gemm_rows": (_i, [_p, _i, _i, _p, _l, _i, _p, _l]),
    "lmf_q8_gemm_rows": (_i, [_p, _p, _i, _i, _p, _l, _i, _p, _l]),
}
_vnni: bool | None = None  # whether the library was built with its AVX-512 VNNI code (asked once)
# Switch for comparisons (the "-torch" variants of benchmarks/decode_quant.py): False keeps
# every product on PyTorch's kernels.
ENABLED = True


def _library():
    global _vnni
    lib = native.load(NAME, SOURCE, signatures=SIGNATURES)
    if lib is None:
        return None
    if _vnni is None:
        _vnni = bool(lib.lmf_quant_gemv_supported())
    return lib if _vnni else None


def available() -> bool:
    """True when the kernels are built (or can be), load, and this CPU has AVX-512 VNNI."""
    return _library() is not None


def why_not() -> str | None:
    if available():
        return None
    return native.why_not(NAME) or "this CPU has no AVX-512 VNNI"


def usable(x: torch.Tensor, compute_dtype: torch.dtype, most_rows: int | None = None) -> bool:
    """float32 CPU rows (at most `most_rows` of them; None: any number) that the kernels may take
    (no gradient wanted), for a layer that computes in a rounded dtype (`compute_dtype=torch.float32`
    promises exact products, which the int8-rounded rows of these kernels are not)."""
    return (ENABLED and compute_dtype != torch.float32 and x.device.type == "cpu" and x.dtype == torch.float32
            and x.numel() > 0 and (most_rows is None or x.numel() <= most_rows * x.shape[-1])
            and not (torch.is_grad_enabled() and x.requires_grad) and available())


def q4_row_bytes(k: int) -> int:
    """Bytes of one packed row of k inputs (the C file's lmf_q4_row_bytes): 80 per four groups
    of 32, 40 for a last two."""
    return (k // 128) * 80 + ((k % 128) // 64) * 40


def q4_pack(codes: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor | None:
    """Packed rows [N, q4_row_bytes(K)] uint8 of w = q s + z, or None (no kernel, or K % 64)."""
    lib = _library()
    n, k = codes.shape
    if lib is None or k % 64:
        return None
    codes = codes.to(torch.uint8).contiguous()
    scales = scales.to(torch.float32).contiguous()
    offsets = offsets.to(torch.float32).contiguous()
    if tuple(scales.shape) != (n, k // GROUP) or tuple(offsets.shape) != (n, k // GROUP):
        raise ValueError(f"scales {tuple(scales.shape)} / offsets {tuple(offsets.shape)} do not fit {n} x {k} codes")
    out = torch.empty(n, q4_row_bytes(k), dtype=torch.uint8)
    if lib.lmf_q4_pack(codes.data_ptr(), scales.data_ptr(), offsets.data_ptr(), n, k, out.data_ptr()) != 0:
        return None
    return out


def q4_gemv(packed: torch.Tensor, x: torch.Tensor, out_features: int | None = None) -> torch.Tensor | None:
    """x [..., K] (one row) times the packed int4 rows: [..., N] float32, or None."""
    lib = _library()
    n, k = packed.shape[0], x.shape[-1]
    if lib is None or packed.shape[1] != q4_row_bytes(k):
        return None
    x1 = x.reshape(k).contiguous()
    y = torch.empty(n, dtype=torch.float32)
    if lib.lmf_q4_gemv(packed.data_ptr(), n, k, x1.data_ptr(), y.data_ptr()) != 0:
        return None
    if out_features is not None and out_features != n:
        y = y[:out_features]
    return y.view(*x.shape[:-1], y.shape[0])


def q4_gemm_rows(packed: torch.Tensor, x: torch.Tensor, out_features: int | None = None) -> torch.Tensor | None:
    """x [..., K] (any number of rows) times the packed int4 rows: [..., N] float32, each row equal
    to `q4_gemv` of that row alone (every weight row read once for up to eight rows); or None."""
    lib = _library()
    n, k = packed.shape[0], x.shape[-1]
    if lib is None or packed.shape[1] != q4_row_bytes(k):
        return None
    x2 = x.reshape(-1, k).contiguous()
    y = torch.empty(x2.shape[0], n, dtype=torch.float32)
    if lib.lmf_q4_gemm_rows(packed.data_ptr(), n, k, x2.data_ptr(), k, x2.shape[0], y.data_ptr(), n) != 0:
        return None
    if out_features is not None and out_features != n:
        y = y[:, :out_features]
    return y.reshape(*x.shape[:-1], y.shape[-1])


def q8_gemm_rows(codes_u8: torch.Tensor, scales: torch.Tensor, x: torch.Tensor) -> torch.Tensor | None:
    """x [..., K] (any number of rows) times int8 rows (codes + 128, float32 row scales): [..., N],
    each row equal to `q8_gemv` of that row alone; or None."""
    lib = _library()
    n, k = codes_u8.shape
    if lib is None or x.shape[-1] != k or k % 64:
        return None
    x2 = x.reshape(-1, k).contiguous()
    s = scales.to(torch.float32).contiguous()
    y = torch.empty(x2.shape[0], n, dtype=torch.float32)
    if lib.lmf_q8_gemm_rows(codes_u8.data_ptr(), s.data_ptr(), n, k, x2.data_ptr(), k, x2.shape[0], y.data_ptr(), n) != 0:
        return None
    return y.view(*x.shape[:-1], n)


def q8_codes(qweight: torch.Tensor) -> torch.Tensor:
    """int8 codes [N, K] -> the kernel's unsigned form, codes + 128."""
    return (qweight.to(torch.int16) + 128).to(torch.uint8).contiguous()


def q8_gemv(codes_u8: torch.Tensor, scales: torch.Tensor, x: torch.Tensor) -> torch.Tensor | None:
    """x [..., K] (one row) times int8 rows (codes + 128, a float32 scale per row): [..., N], or None."""
    lib = _library()
    n, k = codes_u8.shape
    if lib is None or x.shape[-1] != k or k % 64:
        return None
    x1 = x.reshape(k).contiguous()
    s = scales.to(torch.float32).contiguous()
    y = torch.empty(n, dtype=torch.float32)
    if lib.lmf_q8_gemv(codes_u8.data_ptr(), s.data_ptr(), n, k, x1.data_ptr(), y.data_ptr()) != 0:
        return None
    return y.view(*x.shape[:-1], n)

