"""4-bit NormalFloat (NF4) weights with block-wise absmax and double quantization (QLoRA).

NF4 (Dettmers et al., 2023) stores each weight as one of 16 values placed at quantiles
of a standard normal distribution, rescaled to [-1, 1] with an exact 0. Weights of a
trained network are roughly normal, so every code is used about equally often. A block
of 64 consecutive weights shares one scale, its absolute maximum (absmax): a weight w
becomes the index of the code nearest to w / absmax, 4 bits.

Double quantization compresses the scales themselves: the float32 absmax constants (32
bits per 64 weights = 0.5 bit per weight) minus their mean are stored as 8-bit integers,
one float32 scale per block of 256 of them (8/64 + 32/(64*256) = 0.127 bit per weight).
A weight then costs 4.127 bits (0.516 bytes) instead of 32.

`NF4Linear` keeps only the packed codes and the quantized scales; each forward
dequantizes the weight to the input's dtype (float32 on CPU), multiplies, and drops the
dequantized copy; its backward dequantizes again instead of keeping the full-precision
weight alive between forward and backward. The weight is frozen (QLoRA trains adapters
on top of it, see lmforge/tune/peft).

The 16 code values are bitsandbytes' published NF4 table (quantiles of N(0, 1) with the
positive and negative halves normalized separately so that both ends are exactly ±1).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

NF4_CODE = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)
BLOCK = 64
SCALE_BLOCK = 256


def _code(device) -> torch.Tensor:
    return torch.tensor(NF4_CODE, dtype=torch.float32, device=device)


def quantize_nf4(weight: torch.Tensor, block: int = BLOCK, double_quant: bool = True,
                 scale_block: int = SCALE_BLOCK) -> dict[str, torch.Tensor]:
    """Quantize any tensor to NF4: a dict of the packed codes, the scales and the shape.

    Keys: ``codes`` uint8 [ceil(n / 2)] (two 4-bit indices a byte, the first in the high
    nibble), ``shape``; with ``double_quant`` the scales are ``absmax_q`` int8 plus
    ``absmax_scale`` float32 [blocks / scale_block] and ``absmax_offset`` float32 [1],
    otherwise ``absmax`` float32 [blocks].
    """
    flat = weight.detach().reshape(-1).to(torch.float32)
    n = flat.numel()
    pad = (-n) % block
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    blocks = flat.view(-1, block)
    absmax = blocks.abs().amax(dim=1)
    normalized = blocks / absmax.clamp_min(torch.finfo(torch.float32).tiny)[:, None]
    code = _code(flat.device)
    # The nearest code value: a search among the 15 midpoints between neighbours.
    index = torch.bucketize(normalized.reshape(-1), (code[1:] + code[:-1]) / 2).to(torch.uint8)
    if index.numel() % 2:
        index = torch.cat([index, index.new_zeros(1)])
    packed = (index[0::2] << 4) | index[1::2]
    out = {"codes": packed, "shape": torch.tensor(list(weight.shape), dtype=torch.int64)}
    if double_quant:
        offset = absmax.mean()
        centred = absmax - offset
        pad2 = (-centred.numel()) % scale_block
        if pad2:
            centred = torch.cat([centred, centred.new_zeros(pad2)])
        groups = centred.view(-1, scale_block)
        scale = groups.abs().amax(dim=1).clamp_min(torch.finfo(torch.float32).tiny) / 127
        q = torch.round(groups / scale[:, None]).clamp(-127, 127).to(torch.int8)
        out.update(absmax_q=q.reshape(-1)[: absmax.numel()], absmax_scale=scale, absmax_offset=offset.reshape(1))
    else:
        out["absmax"] = absmax
    return out


def nf4_absmax(q: dict[str, torch.Tensor], scale_block: int = SCALE_BLOCK) -> torch.Tensor:
    """The per-block absmax constants (dequantized when double-quantized)."""
    if "absmax" in q:
        return q["absmax"]
    scales = q["absmax_scale"].repeat_interleave(scale_block)[: q["absmax_q"].numel()]
    return q["absmax_q"].to(torch.float32) * scales + q["absmax_offset"]


def dequantize_nf4(q: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32, block: int = BLOCK) -> torch.Tensor:
    """The tensor `quantize_nf4` approximated, in `dtype`."""
    shape = [int(s) for s in q["shape"]]
    n = 1
    for s in shape:
        n *= s
    packed = q["codes"]
    index = torch.stack([packed >> 4, packed & 0x0F], dim=1).reshape(-1).long()
    values = _code(packed.device)[index]
    values = values[: -(-n // block) * block].view(-1, block) * nf4_absmax(q)[:, None]
    return values.reshape(-1)[:n].view(shape).to(dtype)


def nf4_nbytes(q: dict[str, torch.Tensor]) -> int:
    """Bytes the quantized tensor occupies (codes and scales; the shape is negligible)."""
    return sum(t.numel() * t.element_size() for k, t in q.items() if k != "shape")


class _NF4Product(torch.autograd.Function):
    """x W^T with W dequantized in forward and again in backward (never kept between them)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, module: "NF4Linear") -> torch.Tensor:
        ctx.module = module
        return F.linear(x, module.dequantized(x.dtype))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad @ ctx.module.dequantized(grad.dtype), None


class NF4Linear(nn.Module):
    """A frozen linear layer whose weight is stored in NF4 (see the module docstring)."""

    def __init__(self, linear: nn.Linear, block: int = BLOCK, double_quant: bool = True) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.block = block
        for name, tensor in quantize_nf4(linear.weight, block, double_quant).items():
            self.register_buffer(name, tensor)
        self.bias = None
        if linear.bias is not None:
            self.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)

    def quantized_state(self) -> dict[str, torch.Tensor]:
        return {name: buf for name, buf in self.named_buffers(recurse=False)}

    def dequantized(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize_nf4(self.quantized_state(), dtype, self.block)

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized weight (a new tensor each time; read it for merging or inspection)."""
        return self.dequantized()

    @property
    def nbytes(self) -> int:
        return nf4_nbytes(self.quantized_state()) + (self.bias.numel() * self.bias.element_size() if self.bias is not None else 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            y = _NF4Product.apply(x, self)
        else:
            y = F.linear(x, self.dequantized(x.dtype))
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, nf4 block={self.block}"
