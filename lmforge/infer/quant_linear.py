"""Linear layers whose weights stay quantized: int4 group-wise and int8 per-channel, CPU kernels.

A batch-1 decode step reads every weight once to multiply it by one activation row, so
its speed is set by how many bytes the weights take: float32 costs 4 bytes a weight,
int8 one, int4 half a byte plus a scale (and a zero) per group. These modules keep only
the small form and hand it to PyTorch's CPU weight-only kernels, which dequantize inside
the product, a tile at a time, so no float copy of the weight ever exists:

* `Int4Linear`: 4-bit codes q in 0..15, one (scale s, zero z) pair per group of
  `group_size` consecutive inputs of a row; w = (q - 8) s + z. Stored in the layout of
  `aten._convert_weight_to_int4pack_for_cpu`, multiplied by
  `aten._weight_int4pack_mm_for_cpu`. GGUF's Q4_0 (w = (q - 8) d) and Q4_1 (w = q d + m)
  blocks of 32 are this form exactly: s = d and z = 0, or z = m + 8 d.
* `Int8Linear`: int8 codes and one scale per output row (w = q s), multiplied by
  `aten._weight_int8pack_mm`.

Both kernels are fast only with bfloat16 activations (measured on the default model's
shapes: with float32 activations they run a reference loop 10-30x slower than float32's
own product, with float16 ones slower still), and they take scales in the activations'
dtype. So the modules multiply in `compute_dtype` (bfloat16 by default): the input row is
rounded to bfloat16, the product accumulates in float32 inside the kernel and comes back
as bfloat16, and the module returns float32 again, so the residual stream, norms,
attention and the KV cache stay float32. `compute_dtype=torch.float32` gives the exact
values (x @ dequant(W)^T up to float rounding; the tests check the packing that way) at
the slow kernel's speed.

`quantize_model` swaps a loaded `Transformer`'s linear layers for these modules in place
(from float weights, round to nearest); lmforge/infer/quant_gguf.py builds them straight
from a GGUF file's blocks. The model's forward, the scheduler and the server run
unchanged: only the modules' class differs, as with lmforge/infer/layout.py's
`BlasLinear`.

Where the CPU has AVX-512 VNNI, products of float32 rows go through lmforge's own integer
kernels instead (lmforge/infer/quant_kernels.py: activations rounded to int8 in groups of 32,
finer than bfloat16): int8 weights at any row count, int4 ones up to `INT4_KERNEL_ROWS` rows.
Each row's result there is the same whatever rows it is batched with (products of more rows,
on PyTorch's kernel, are not).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import LmforgeError
from ..io import hugepages, native
from ..model.kv_cache import KVCache
from ..model.transformer import MLP, Block, Transformer
from . import decode_kernels, quant_kernels

INT4_ROW_MULTIPLE = 16  # the int4 packing wants a multiple of 16 output rows; others are padded
# Products of up to this many float32 rows take lmforge's int4 kernel (quant_kernels), more take
# PyTorch's: on the default model's four layer shapes (2 threads, AVX-512 VNNI) lmforge's was
# 0.15 / 0.70 / 1.43 ms at 2 / 16 / 32 rows against 0.24 / 0.74 / 1.41, and behind from 64 rows.
# int8 weights take lmforge's kernel at any row count (the vocabulary head at 16 rows 5.9 ms
# against 11.8, at 512 rows 214 against 405).
INT4_KERNEL_ROWS = 32
BITS = (4, 8)


def int4_kernels_available() -> bool:
    return hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu") and hasattr(
        torch.ops.aten, "_convert_weight_to_int4pack_for_cpu")


def _check_cpu(t: torch.Tensor, what: str) -> None:
    if t.device.type != "cpu":
        raise LmforgeError(f"{what} runs on CPU only (PyTorch's weight-only kernels); load the model with --device cpu")


class _KernelCopy(nn.Module):
    """A quantized linear layer that also keeps the copy of its weights lmforge's single-row
    kernels read (lmforge/infer/quant_kernels.py): `_native` is None until made, False where
    the kernels do not apply. The layer's constructor makes it from the float scales it was
    given; a state dict loaded into the layer, a move or a conversion drops it, and the next
    use makes it again from the buffers (`_copy_from_buffers`)."""

    _native = None

    def kernel_copy(self):
        """The copy (made now if it is not there), or None where the kernels do not apply."""
        if self._native is None:
            self._keep(self._copy_from_buffers())
        return None if self._native is False else self._native

    def _keep(self, made) -> None:
        self._native = False if made is None else made

    def _copy_from_buffers(self):
        raise NotImplementedError

    def _apply(self, fn, *args, **kwargs):
        self._native = None
        return super()._apply(fn, *args, **kwargs)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Only a state dict with entries for this layer changes its buffers. (A model loaded in
        # pieces, as a GGUF file's float tensors after its quantized layers, keeps the copies
        # made at construction: remaking them from the packed buffers costs ~0.6 s a layer.)
        if any(key.startswith(prefix) for key in state_dict):
            self._native = None
        return super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class Int4Linear(_KernelCopy):
    """y = x W^T + b with W stored as 4-bit codes and per-group (scale, zero): w = (q - 8) s + z.

    Buffers: `packed` (the kernel's uint8 layout of codes [N', K]), `scale_zeros`
    [K / group, N', 2] in `compute_dtype`, where N' is `out_features` rounded up to a
    multiple of 16 (padded rows are zero and cut from the result). `bias` stays float32.
    """

    def __init__(self, in_features: int, out_features: int, group_size: int = 32, bias: bool = False,
                 compute_dtype: torch.dtype = torch.bfloat16) -> None:
        super().__init__()
        if in_features % group_size:
            raise LmforgeError(f"int4 weights need input features ({in_features}) divisible by the group "
                               f"size ({group_size})")
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        self.compute_dtype = compute_dtype
        rows = -(-out_features // INT4_ROW_MULTIPLE) * INT4_ROW_MULTIPLE
        self.register_buffer("packed", torch.empty(rows, in_features // 2, dtype=torch.uint8))
        self.register_buffer("scale_zeros", torch.empty(in_features // group_size, rows, 2, dtype=compute_dtype))
        self.bias = nn.Parameter(torch.zeros(out_features), requires_grad=False) if bias else None

    # -- building -------------------------------------------------------------------------
    @classmethod
    def from_codes(cls, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int = 32,
                   bias: torch.Tensor | None = None, compute_dtype: torch.dtype = torch.bfloat16) -> "Int4Linear":
        """From codes [N, K] (integers 0..15) and per-group scales/zeros [N, K / group]: w = (q - 8) s + z."""
        out_features, in_features = codes.shape
        module = cls(in_features, out_features, group_size, bias is not None, compute_dtype)
        module.set_codes(codes, scales, zeros)
        if bias is not None:
            module.bias.data.copy_(bias.detach().to(torch.float32))
        return module

    def set_codes(self, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> None:
        n, k = self.out_features, self.in_features
        groups = k // self.group_size
        if tuple(codes.shape) != (n, k) or tuple(scales.shape) != (n, groups) or tuple(zeros.shape) != (n, groups):
            raise ValueError(f"codes {tuple(codes.shape)} / scales {tuple(scales.shape)} / zeros "
                             f"{tuple(zeros.shape)} do not fit a {n} x {k} int4 matrix of groups of {self.group_size}")
        rows = self.packed.shape[0]
        full = torch.full((rows, k), 8, dtype=torch.int32)  # padded rows: code 8, scale 0, zero 0 -> w = 0
        full[:n] = codes.to(torch.int32)
        sz = torch.zeros(groups, rows, 2, dtype=torch.float32)
        sz[:, :n, 0] = scales.to(torch.float32).t()
        sz[:, :n, 1] = zeros.to(torch.float32).t()
        self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(full, 1)
        self.scale_zeros = sz.to(self.compute_dtype).contiguous()
        # the single-row kernels' copy from the float scales (a GGUF file's float16 d and m stay
        # exact; the PyTorch kernel's copy is rounded to `compute_dtype`)
        self._keep(self._pack_for_kernel(codes, scales.to(torch.float32), zeros.to(torch.float32)))

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int = 32,
                    compute_dtype: torch.dtype = torch.bfloat16) -> "Int4Linear":
        """Round to nearest, asymmetric per group (min/max: GGUF Q4_1's rule)."""
        codes, scales, zeros = quantize_int4(linear.weight.detach().to(torch.float32), group_size)
        return cls.from_codes(codes, scales, zeros, group_size, linear.bias, compute_dtype)

    # -- reading --------------------------------------------------------------------------
    def codes(self) -> torch.Tensor:
        """The 4-bit codes [N, K] (unpacked by multiplying the identity: exact, small matrices only)."""
        eye = torch.eye(self.in_features, dtype=torch.float32)
        rows = self.packed.shape[0]
        ones = torch.zeros(self.in_features // self.group_size, rows, 2)
        ones[..., 0] = 1.0
        q = torch.ops.aten._weight_int4pack_mm_for_cpu(eye, self.packed, self.group_size, ones)
        return (q.t()[: self.out_features] + 8).round().to(torch.uint8)

    def dequantized(self) -> torch.Tensor:
        """W as float32 [N, K], exactly as the kernel sees it (its scales in `compute_dtype`)."""
        sz = self.scale_zeros.to(torch.float32)[:, : self.out_features]
        s = sz[..., 0].t().repeat_interleave(self.group_size, 1)
        z = sz[..., 1].t().repeat_interleave(self.group_size, 1)
        return (self.codes().to(torch.float32) - 8) * s + z

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized weight (a new float32 tensor each time; for inspection and merging)."""
        return self.dequantized()

    @property
    def nbytes(self) -> int:
        extra = self.bias.numel() * 4 if self.bias is not None else 0
        return self.packed.numel() + self.scale_zeros.numel() * self.scale_zeros.element_size() + extra

    @property
    def native_nbytes(self) -> int:
        """Bytes of the single-row kernel's copy of the weights (0 when there is none)."""
        return self._native.numel() if isinstance(self._native, torch.Tensor) else 0

    def _pack_for_kernel(self, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor | None:
        """w = (q - 8) s + z = q s + (z - 8 s) in the kernel's layout; None where it does not apply."""
        if self.group_size != quant_kernels.GROUP or not quant_kernels.available():
            return None
        return quant_kernels.q4_pack(codes, scales, zeros - 8 * scales)

    def _copy_from_buffers(self) -> torch.Tensor | None:
        sz = self.scale_zeros.to(torch.float32)[:, : self.out_features]
        return self._pack_for_kernel(self.codes(), sz[..., 0].t(), sz[..., 1].t())

    # -- product --------------------------------------------------------------------------
    def product(self, x: torch.Tensor) -> torch.Tensor:
        """x W^T in `compute_dtype` (no bias, no cast back): [..., out_features]. Up to
        `INT4_KERNEL_ROWS` float32 rows go through lmforge's own kernel where it applies and come
        back in float32."""
        _check_cpu(x, "an int4 linear layer")
        if quant_kernels.usable(x, self.compute_dtype, INT4_KERNEL_ROWS) and (packed := self.kernel_copy()) is not None:
            y = quant_kernels.q4_gemm_rows(packed, x, self.out_features)
            if y is not None:
                return y
        lead, k = x.shape[:-1], x.shape[-1]
        x2 = x.reshape(-1, k)
        if x2.dtype != self.compute_dtype:
            x2 = x2.to(self.compute_dtype)
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.packed, self.group_size, self.scale_zeros)
        if y.shape[-1] != self.out_features:
            y = y[:, : self.out_features]
        return y.view(*lead, self.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.product(x).to(x.dtype)
        return y if self.bias is None else y.add_(self.bias.to(y.dtype))

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, int4 group={self.group_size}, "
                f"compute={str(self.compute_dtype).replace('torch.', '')}")


class Int8Linear(_KernelCopy):
    """y = x W^T + b with W stored as int8 codes and one scale per output row: w = q s."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False,
                 compute_dtype: torch.dtype = torch.bfloat16) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.compute_dtype = compute_dtype
        self.register_buffer("qweight", torch.empty(out_features, in_features, dtype=torch.int8))
        self.register_buffer("scales", torch.zeros(out_features, dtype=compute_dtype))
        self.bias = nn.Parameter(torch.zeros(out_features), requires_grad=False) if bias else None

    @classmethod
    def from_codes(cls, codes: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None = None,
                   compute_dtype: torch.dtype = torch.bfloat16) -> "Int8Linear":
        module = cls(codes.shape[1], codes.shape[0], bias is not None, compute_dtype)
        module.qweight = codes.to(torch.int8).contiguous()
        module.scales = scales.to(compute_dtype).contiguous()
        # the single-row kernels' copy, with the float scales as given (the buffer keeps them in `compute_dtype`)
        module._keep(module._copy_for_kernel(scales.to(torch.float32)))
        if bias is not None:
            module.bias.data.copy_(bias.detach().to(torch.float32))
        return module

    @classmethod
    def from_linear(cls, linear: nn.Linear, compute_dtype: torch.dtype = torch.bfloat16) -> "Int8Linear":
        """Round to nearest, symmetric per output row (scale = max|w| / 127)."""
        codes, scales = quantize_int8(linear.weight.detach().to(torch.float32))
        return cls.from_codes(codes, scales, linear.bias, compute_dtype)

    def dequantized(self) -> torch.Tensor:
        return self.qweight.to(torch.float32) * self.scales.to(torch.float32)[:, None]

    @property
    def weight(self) -> torch.Tensor:
        return self.dequantized()

    @property
    def nbytes(self) -> int:
        extra = self.bias.numel() * 4 if self.bias is not None else 0
        return self.qweight.numel() + self.scales.numel() * self.scales.element_size() + extra

    @property
    def native_nbytes(self) -> int:
        return self._native[0].numel() + self._native[1].numel() * 4 if isinstance(self._native, tuple) else 0

    def _copy_for_kernel(self, scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(codes + 128, float32 row scales) for the single-row kernel; None where it does not apply."""
        if self.in_features % 64 or not quant_kernels.available():
            return None
        return quant_kernels.q8_codes(self.qweight), scales.contiguous()

    def _copy_from_buffers(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        return self._copy_for_kernel(self.scales.to(torch.float32))

    def product(self, x: torch.Tensor) -> torch.Tensor:
        """x W^T in `compute_dtype` (no bias, no cast back): [..., out_features]. float32 rows go
        through lmforge's own kernel where it applies and come back in float32."""
        _check_cpu(x, "an int8 linear layer")
        if quant_kernels.usable(x, self.compute_dtype) and (weights := self.kernel_copy()) is not None:
            y = quant_kernels.q8_gemm_rows(weights[0], weights[1], x)
            if y is not None:
                return y
        lead, k = x.shape[:-1], x.shape[-1]
        x2 = x.reshape(-1, k)
        if x2.dtype != self.compute_dtype:
            x2 = x2.to(self.compute_dtype)
        return torch.ops.aten._weight_int8pack_mm(x2, self.qweight, self.scales).view(*lead, self.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.product(x).to(x.dtype)
        return y if self.bias is None else y.add_(self.bias.to(y.dtype))

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, int8 per-channel, "
                f"compute={str(self.compute_dtype).replace('torch.', '')}")


QUANTIZED_LINEARS = (Int4Linear, Int8Linear)


class QuantizedSwiGLU(MLP):
    """A SwiGLU `MLP` whose two products are quantized: gate/up, SiLU and the product stay in
    the kernels' `compute_dtype`, so the activations are cast once on the way in and once on
    the way out instead of twice per product (and the element-wise pass reads half the bytes).
    Anything else (a bias, training, other layer types) runs `MLP.forward` unchanged."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fc, proj = self.fc, self.proj
        if not (self.swiglu and isinstance(fc, QUANTIZED_LINEARS) and isinstance(proj, QUANTIZED_LINEARS)
                and fc.bias is None and proj.bias is None and fc.compute_dtype == proj.compute_dtype
                and not (torch.is_grad_enabled() and x.requires_grad)):
            return super().forward(x)
        gate, up = fc.product(x).chunk(2, dim=-1)
        return proj.product(F.silu(gate).mul_(up)).to(x.dtype)


class QuantizedDecoderBlock(decode_kernels.CompiledDecodeBlock):
    """A pre-norm `Block` whose batch-1 decode step, when its four products are int4 with
    lmforge's own kernels, runs as one compiled call (lmforge/infer/kernels/decode_layer.c):
    the same norms, products, rotary, cache write, attention and SwiGLU, without the Python
    and PyTorch bookkeeping between them. Everything else runs `Block.forward` unchanged."""

    def _decode_step(self, x, rope, cache: KVCache, layer: int, pos: int) -> torch.Tensor | None:
        attn, mlp = self.attn, self.mlp
        linears = (attn.qkv, attn.out, mlp.fc, mlp.proj)
        if (not quant_kernels.ENABLED or not all(type(m) is Int4Linear for m in linears)
                or any(m.compute_dtype == torch.float32 for m in linears)):
            return None
        packed = [m.kernel_copy() for m in linears]
        if any(p is None for p in packed):
            return None
        return decode_kernels.q4_decode_layer(x, self.attn_norm.weight, self.mlp_norm.weight, self.attn_norm.eps,
                                              packed[0], attn.qkv.bias, packed[1], packed[2], packed[3],
                                              mlp.proj.in_features, attn.n_head, attn.n_kv_head, attn.head_dim,
                                              rope, cache.k[layer, 0], cache.v[layer, 0], pos)


class QuantizedDecodeStep(decode_kernels.CompiledDecodeStep):
    """The whole batch-1 decode step of a model whose layers are all `QuantizedDecoderBlock`s with
    int4 products on lmforge's kernels, as one compiled call (`decode_kernels.q4_decode_model`;
    see `CompiledDecodeStep`). The head may be int4, int8 or float32 (row-major, no bias)."""

    block_type = QuantizedDecoderBlock

    def _block_ok(self, block, linears) -> bool:
        return (quant_kernels.ENABLED and all(type(m) is Int4Linear and m.compute_dtype != torch.float32
                                              for m in linears))

    def _head_ok(self, head) -> bool:
        if head.bias is not None:
            return False
        if type(head) in (Int4Linear, Int8Linear):
            return head.compute_dtype != torch.float32
        return isinstance(head, nn.Linear) and head.weight.dtype == torch.float32 and head.weight.is_contiguous()

    def _layer(self, block, linears, track):
        for m in linears:
            m.kernel_copy()  # made now if it is not there
        packed = [track(m, "_native", "__dict__") for m in linears]
        if any(not isinstance(p, torch.Tensor) for p in packed):
            return None
        bias = track(linears[0], "bias") if linears[0].bias is not None else None
        return decode_kernels.Q4Layer(block.attn_norm.weight.data_ptr(), block.mlp_norm.weight.data_ptr(),
                                      native.ptr(bias), *(p.data_ptr() for p in packed))

    def _head_args(self, head, track):
        if type(head) in (Int4Linear, Int8Linear):
            head.kernel_copy()
            made = track(head, "_native", "__dict__")
            if type(head) is Int4Linear:
                return (4, made, None, head.out_features) if isinstance(made, torch.Tensor) else None
            return (8, made[0], made[1], head.out_features) if isinstance(made, tuple) else None
        w = track(head, "weight")
        return (32, w, None, head.out_features)

    def _run(self, plan, x, rope, cache, pos):
        if not quant_kernels.ENABLED:
            return None
        bits, head, scale, vocab = plan["head"]
        return decode_kernels.q4_decode_model(self._common_args(plan, x, rope, cache, pos), bits, head, scale, vocab)

    # A batched step of up to this many rows is one compiled call (`lmf_q4_decode_rows_model`),
    # each row's logits those of its step alone.
    max_rows = 16

    def _run_rows(self, plan, x, rope, cache, positions):
        if not quant_kernels.ENABLED:
            return None
        bits, head, scale, vocab = plan["head"]
        return decode_kernels.q4_decode_rows_model(plan, x.contiguous(), rope, cache, positions, bits, head, scale,
                                                   vocab)


def fuse_quantized_blocks(model: nn.Module) -> nn.Module:
    """Give every plain SwiGLU `MLP` of `model` the `QuantizedSwiGLU` forward and every pre-norm
    `Block` the `QuantizedDecoderBlock` one (their classes only change; both fall back to the
    plain forward wherever their conditions do not hold), a language model's batch-1 decode step
    the `QuantizedDecodeStep`, and the kernels' weight copies 2 MiB pages where the system has them
    (lmforge/io/hugepages.py)."""
    for module in model.modules():
        if type(module) is MLP:
            module.__class__ = QuantizedSwiGLU
        elif type(module) is Block:
            module.__class__ = QuantizedDecoderBlock
        if isinstance(module, Transformer) and module.lm_head is not None:
            module.decode_step = QuantizedDecodeStep()
    copies = []
    for module in model.modules():  # (the copies made so far; a copy remade later stays where it is)
        made = module.__dict__.get("_native") if isinstance(module, _KernelCopy) else None
        copies += list(made) if isinstance(made, tuple) else [made] if isinstance(made, torch.Tensor) else []
    hugepages.move_to_huge_pages(copies)
    return model


# -- round to nearest -------------------------------------------------------------------------

def quantize_int4(w: torch.Tensor, group_size: int = 32) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric round to nearest per group: codes [N, K] in 0..15, scales and zeros [N, K / group]
    for w ~ (q - 8) s + z (the group's minimum maps to code 0, its maximum to code 15)."""
    n, k = w.shape
    g = w.reshape(n, k // group_size, group_size)
    lo, hi = g.amin(-1), g.amax(-1)
    scale = (hi - lo) / 15
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    codes = torch.round((g - lo[..., None]) / safe[..., None]).clamp_(0, 15).to(torch.uint8).reshape(n, k)
    return codes, scale, lo + 8 * scale


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric round to nearest per output row: codes int8 [N, K] in -127..127 and scales [N]."""
    scale = w.abs().amax(1) / 127
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    return torch.round(w / safe[:, None]).clamp_(-127, 127).to(torch.int8), scale


def quantized_linear(linear: nn.Linear, bits: int, group_size: int = 32,
                     compute_dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """`linear` as an `Int4Linear` (bits 4) or `Int8Linear` (bits 8)."""
    if bits == 4:
        return Int4Linear.from_linear(linear, group_size, compute_dtype)
    if bits == 8:
        return Int8Linear.from_linear(linear, compute_dtype)
    raise LmforgeError(f"weight-only quantization supports {' or '.join(map(str, BITS))} bits, got {bits}")


def _block_linears(model: nn.Module) -> list[tuple[str, nn.Module, str]]:
    """(qualified name, parent, attribute) of each linear layer inside the model's blocks."""
    found = []
    for name, module in model.named_modules():
        for attr, child in module.named_children():
            full = f"{name}.{attr}" if name else attr
            if isinstance(child, nn.Linear) and full.startswith("layers."):
                found.append((full, module, attr))
    return found


def plain_float_linears(model: nn.Module) -> None:
    """Linear layers left in float32 go back to `nn.Linear`'s own kernel.

    lmforge/infer/layout.py may route single-row products through NumPy's BLAS, and the
    scheduler then runs PyTorch on one thread during a batch-1 step; the quantized
    kernels are PyTorch's and want all of its threads.
    """
    from .layout import BlasLinear

    for module in model.modules():
        if isinstance(module, BlasLinear):
            module.__class__ = nn.Linear
            module.__dict__.pop("_packed", None)


def quantize_model(model: nn.Module, bits: int = 4, group_size: int = 32, head_bits: int | None = 8,
                   compute_dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """Swap the linear layers of `model`'s blocks (and with `head_bits`, its vocabulary head) for
    quantized ones, in place; returns `model`.

    `head_bits`: 8 (int8 per row: the head is the largest matrix and the logits' precision
    matters most), 4, or None to keep the head in float32. A tied head keeps the embedding
    table float32 for the lookup and quantizes a copy for the product. Layers whose shape
    the int4 packing cannot take (input features not a multiple of `group_size`) stay float32.
    """
    if bits not in BITS or (head_bits is not None and head_bits not in BITS):
        raise LmforgeError(f"weight-only quantization supports {' or '.join(map(str, BITS))} bits, "
                           f"got {bits} (head {head_bits})")
    _check_cpu(next(model.parameters()), "weight-only quantization")
    if bits == 4 and not int4_kernels_available():
        raise LmforgeError(f"this PyTorch ({torch.__version__}) lacks the CPU int4 weight-only kernels")
    plain_float_linears(model)
    with torch.no_grad():
        for _, parent, attr in _block_linears(model):
            linear = getattr(parent, attr)
            if bits == 4 and linear.in_features % group_size:
                continue
            setattr(parent, attr, quantized_linear(linear, bits, group_size, compute_dtype))
        head = getattr(model, "lm_head", None)
        if head_bits is not None and isinstance(head, nn.Linear) and not (
                head_bits == 4 and head.in_features % group_size):
            model.lm_head = quantized_linear(head, head_bits, group_size, compute_dtype)
    return fuse_quantized_blocks(model)


def quantized_nbytes(model: nn.Module) -> dict[str, int]:
    """Bytes of the quantized layers' storage and of the float parameters left (tied counted once)."""
    quant = sum(m.nbytes for m in model.modules() if isinstance(m, QUANTIZED_LINEARS))
    seen, floats = set(), 0
    for m in model.modules():
        if isinstance(m, QUANTIZED_LINEARS):
            continue
        for p in m.parameters(recurse=False):
            if id(p) not in seen:
                seen.add(id(p))
                floats += p.numel() * p.element_size()
    return {"quantized": quant, "float": floats, "total": quant + floats}


def dequantized_copy(module: nn.Module) -> nn.Linear:
    """An `nn.Linear` holding a quantized module's weights as float32 (the reference it approximates)."""
    linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
    with torch.no_grad():
        linear.weight.copy_(module.dequantized())
        if module.bias is not None:
            linear.bias.copy_(module.bias)
    return linear


def dequantize_model(model: nn.Module) -> nn.Module:
    """Replace every quantized linear of `model` by its float32 equivalent, in place (a reference model)."""
    for name, module in list(model.named_modules()):
        if type(module) is QuantizedSwiGLU:
            module.__class__ = MLP
        for attr, child in list(module.named_children()):
            if isinstance(child, QUANTIZED_LINEARS):
                setattr(module, attr, dequantized_copy(child))
    return model


def reference_product(x: torch.Tensor, module: nn.Module) -> torch.Tensor:
    """x @ dequant(W)^T + b in float32 (what the quantized module computes, without its rounding)."""
    return F.linear(x.to(torch.float32), module.dequantized(), module.bias)
