"""The adapter modules: each wraps one frozen lmforge linear layer (or the whole model).

`LoraLinear` and `IA3Linear` act on Hugging Face modules that are *slices* of a fused
lmforge projection (see targets.py): LoRA adds scale * B_i A_i x to the rows of part i,
(IA)3 multiplies them by a learned vector. LoRA computes every part in two products,
whatever the number of parts: one with the A matrices stacked ([n r, in]), one with the
B matrices laid out block-diagonally in the rows of their parts ([out, n r]). Three
separate LoRA modules on q_proj, k_proj and v_proj (what PEFT runs on a Hugging Face
Llama) cost six small products and three base products; here it is one base product and
two small ones.

In training (float32 on CPU, a frozen plain base, no dropout) `LoraLinear` runs as one
autograd function instead (lora_kernel.py): same values, fewer passes over activations.

The wrapped layer stays reachable as ``.base`` and its ``weight``/``bias`` read through,
so code that inspects weights keeps working.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.model.onednn import linear as fast_linear
from lmforge.model.onednn import project

from . import lora_kernel
from .targets import Part


def base_forward(base: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The frozen layer's output; a plain nn.Linear takes the model's training kernels."""
    if isinstance(base, nn.Linear):
        return project(base, x)
    return base(x)


def dequantized_linear(layer: nn.Module) -> nn.Linear:
    """A plain nn.Linear holding a quantized layer's weight in float32 (frozen, like the original)."""
    out = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None,
                    device=layer.weight.device)
    out.weight.data.copy_(layer.weight)
    if layer.bias is not None:
        out.bias.data.copy_(layer.bias)
    out.requires_grad_(False)
    return out


class _Wrapped(nn.Module):
    def __init__(self, base: nn.Module, parts: list[Part]) -> None:
        super().__init__()
        self.base = base
        self.parts = sorted(parts, key=lambda p: p.start)
        self.in_features, self.out_features = base.in_features, base.out_features

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    def _spread(self, blocks: list[torch.Tensor], fill: float, width: int | None = None) -> torch.Tensor:
        """Rows of every part's block placed at its rows of the full output, `fill` in the rows between."""
        pieces, row = [], 0
        ref = blocks[0]
        cols = ref.shape[1] if width is None else width
        for part, block in zip(self.parts, blocks):
            if part.start > row:
                pieces.append(ref.new_full((part.start - row, cols), fill))
            pieces.append(block)
            row = part.stop
        if row < self.out_features:
            pieces.append(ref.new_full((self.out_features - row, cols), fill))
        return torch.cat(pieces) if len(pieces) > 1 else pieces[0]


class LoraLinear(_Wrapped):
    """y = W x + b + scale * B A dropout(x) on the rows of each targeted part.

    A_i [r, in] starts Kaiming-uniform and B_i [rows_i, r] at zero (PEFT's default), so the
    adapted model starts equal to the base. scale = alpha / r, or alpha / sqrt(r) (rsLoRA).
    One dropout mask serves all parts of a fused layer (PEFT draws one per module).
    """

    def __init__(self, base: nn.Module, parts: list[Part], r: int, alpha: float, dropout: float = 0.0,
                 rslora: bool = False, pack_frozen: bool = False) -> None:
        super().__init__(base, parts)
        self.r = r
        self.pack_frozen = pack_frozen  # lora_kernel.py: packed frozen weights while training
        self.scaling = alpha / (math.sqrt(r) if rslora else r)
        if isinstance(base, nn.Linear):
            dtype, device = base.weight.dtype, base.weight.device
        else:  # a quantized base: adapters in float32
            dtype, device = torch.float32, next(base.buffers()).device
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        for p in self.parts:
            a = torch.empty(r, self.in_features, dtype=dtype, device=device)
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
            self.lora_A[p.leaf] = nn.Parameter(a)
            self.lora_B[p.leaf] = nn.Parameter(torch.zeros(p.size, r, dtype=dtype, device=device))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False

    def stacked_a(self) -> torch.Tensor:
        mats = [self.lora_A[p.leaf] for p in self.parts]
        return torch.cat(mats) if len(mats) > 1 else mats[0]

    def spread_b(self) -> torch.Tensor:
        """[out, n r]: B_i in part i's rows and columns i r .. (i + 1) r, zero elsewhere."""
        n, r = len(self.parts), self.r
        blocks = []
        for i, p in enumerate(self.parts):
            b = self.lora_B[p.leaf]
            if n > 1:
                b = F.pad(b, (i * r, (n - 1 - i) * r))
            blocks.append(b)
        return self._spread(blocks, 0.0)

    def delta_weight(self) -> torch.Tensor:
        """scale * B A in the rows of each part: [out, in]."""
        return (self.spread_b() @ self.stacked_a()) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.merged and isinstance(self.dropout, nn.Identity) and lora_kernel.usable(self, x):
            return lora_kernel.lora_linear(self, x)  # training: one autograd function (lora_kernel.py)
        y = base_forward(self.base, x)
        if self.merged:
            return y
        z = fast_linear(self.dropout(x), self.stacked_a())
        return torch.add(y, fast_linear(z, self.spread_b()), alpha=self.scaling)

    @torch.no_grad()
    def merge(self) -> None:
        if not isinstance(self.base, nn.Linear):
            self.base = dequantized_linear(self.base)  # merging leaves a quantized base in full precision
        if not self.merged:
            self.base.weight.add_(self.delta_weight().to(self.base.weight.dtype))
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self.base.weight.sub_(self.delta_weight().to(self.base.weight.dtype))
            self.merged = False

    def extra_repr(self) -> str:
        return f"parts={[p.leaf for p in self.parts]}, r={self.r}, scaling={self.scaling:g}"


class IA3Linear(_Wrapped):
    """(IA)3: the output rows of each targeted part times a learned vector l (init 1), or,
    for a feed-forward output projection, its input times l: W (l * x)."""

    def __init__(self, base: nn.Module, parts: list[Part], feedforward: bool) -> None:
        super().__init__(base, parts)
        self.feedforward = feedforward
        ref = base.weight
        self.ia3_l = nn.ParameterDict()
        for p in self.parts:
            shape = (1, self.in_features) if feedforward else (p.size, 1)
            self.ia3_l[p.leaf] = nn.Parameter(torch.ones(shape, dtype=ref.dtype, device=ref.device))
        self.merged = False

    def scale_vector(self) -> torch.Tensor:
        if self.feedforward:
            return self.ia3_l[self.parts[0].leaf].reshape(-1)
        return self._spread([self.ia3_l[p.leaf] for p in self.parts], 1.0).reshape(-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return base_forward(self.base, x)
        if self.feedforward:
            return base_forward(self.base, x * self.scale_vector())
        return base_forward(self.base, x) * self.scale_vector()

    @torch.no_grad()
    def _rescale_base(self, inverse: bool) -> None:
        """Multiply the base weight (and bias, on outputs) by the scale vector, or divide by it."""
        s = self.scale_vector().to(self.base.weight.dtype)
        apply = torch.Tensor.div_ if inverse else torch.Tensor.mul_  # a division undoes the product more exactly than a reciprocal
        if self.feedforward:
            apply(self.base.weight, s[None, :])
        else:
            apply(self.base.weight, s[:, None])
            if self.base.bias is not None:
                apply(self.base.bias, s)

    def merge(self) -> None:
        if not self.merged:
            self._rescale_base(inverse=False)
            self.merged = True

    def unmerge(self) -> None:
        if self.merged:
            self._rescale_base(inverse=True)
            self.merged = False


class BottleneckAdapter(nn.Module):
    """y + up(relu(down(y))) after a sublayer's output projection (Houlsby et al., 2019;
    Pfeiffer et al., 2021): a small residual MLP of width `size`, its up-projection zero at
    the start so the model starts equal to the base."""

    def __init__(self, base: nn.Module, size: int) -> None:
        super().__init__()
        self.base = base
        dim = base.out_features
        ref = base.weight
        self.in_features, self.out_features = base.in_features, dim
        self.down = nn.Linear(dim, size, dtype=ref.dtype, device=ref.device)
        self.up = nn.Linear(size, dim, dtype=ref.dtype, device=ref.device)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = base_forward(self.base, x)
        return y + self.up(F.relu(self.down(y)))
