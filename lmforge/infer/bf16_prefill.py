"""bf16 products for prefill, float32 weights and kernels for decode, on CPUs with bf16 units.

A prefill pushes all of a prompt's tokens through every weight matrix at once: many rows
per product, so it is bound by arithmetic, and a CPU with AMX or AVX512-BF16 does that
arithmetic several times faster in bf16 (lmforge/model/precision.py). A decode step has
one row (a few in a batch): it is bound by reading the weights, and there the float32
matrix-vector kernels of lmforge/infer/layout.py measured faster than bf16 ones. So the
phase is told apart by the number of rows a product gets, per call, with no change to the
model or the scheduler: `Bf16PrefillLinear` sends products of at least `min_rows` rows
through a bf16 copy of its weight and returns float32, and leaves smaller ones to
`BlasLinear`'s float32 kernels. The bf16 copy is kept in oneDNN's blocked layout
(`packed_bf16_weight`) where that layout is the faster one for the weight's shape, else
plain row-major (`packed_pays` times both once per shape: on an AMX Xeon the blocked copy
won for the default model's 3072 x 576 feed-forward input, 1.13 against 1.27-1.41 ms at
512 rows, and lost for the 576-row outputs, 0.95 against 0.67 ms for the down projection).
Both sum in float32; where the two timings are close (the 960 x 576 q/k/v product) the
choice can differ from one process to the next, and with it the last bits of that product.

Only the matrix products are rounded: the inputs to bf16 (8 bits of mantissa), the sums
are float32 inside oneDNN, and the result is rounded to bf16 once before it is widened
back. The prompt's attention is the other arithmetic-bound part (a third of a 512-token
prefill in float32 on an AMX Xeon): `Attention.attend` runs it on bf16 q, k and v
(PyTorch's flash kernel, float32 softmax sums) for prompts of at least `min_rows` tokens.
Between the products the activations stay bf16 where the next step reads bf16: the q/k/v
product's result goes to one compiled pass (lmforge/model/cpu_ops.py `prefill_prepare`)
that rotates q and k, writes k and v into the float32 cache and makes the bf16 copies the
attention reads (PyTorch took a dozen operations for it, ~3 ms a layer against 0.2 ms);
the attention's bf16 result goes to the output product; the feed-forward's first product
feeds SwiGLU's one-pass bf16 kernel (`silu_mul_bf16`) and the second product. Norms, the
residual stream and the KV cache stay float32, so the cache a bf16 prefill writes is the
one decode reads, with no conversion.

Only generation takes the path: the scheduler turns it on around its prefill and decode
work (`generation_products()`, a per-thread switch). Everything that measures a model
(prompt log-probabilities for `echo`/`logprobs`, `lmforge eval perplexity`, scoring jobs
that run on the scheduler's thread between steps) calls the same layers with the switch
off and gets float32 products, so a likelihood does not depend on whether the CPU has
bf16 units (bf16 products moved the default model's log-likelihoods by up to 0.27 nats).

The price is memory: the bf16 copies (half the float32 weights' bytes, made on first use,
remade when a weight changes, never saved) live beside the float32 weights. Products
smaller than `min_weight_elements` (tiny test models) stay float32: for them the casts
cost more than the products save.
"""

from __future__ import annotations

import functools
import statistics
import time

import torch
from torch import nn

from lmforge.model.onednn import bf16_weight, generation_products, generation_products_on
from lmforge.model.transformer import MLP, Attention

from .layout import BlasLinear

__all__ = ["Bf16PrefillLinear", "bf16_copy_bytes", "generation_products", "packed_bf16_supported", "packed_pays",
           "prepare_bf16_copies", "use_bf16_prefill", "uses_bf16_prefill"]


class Bf16PrefillLinear(BlasLinear):
    """`BlasLinear` whose inference products of `min_rows` rows or more run in bf16."""

    min_rows = 32
    min_weight_elements = 1 << 17
    # Set on a feed-forward's first product (`use_bf16_prefill`): its bf16 result is returned
    # as bf16, so the activation and the second product read half the bytes and skip two casts.
    bf16_output = False
    reads_bf16 = True  # takes bf16 inputs (the model's MLP passes its bf16 activation on)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        rows = x.numel() // x.shape[-1] if x.numel() else 0
        if (rows < self.min_rows or not generation_products_on() or w.numel() < self.min_weight_elements
                or x.device.type != "cpu"
                or x.dtype not in (torch.float32, torch.bfloat16) or w.dtype != torch.float32
                or (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad))):
            return super().forward(x.float() if x.dtype == torch.bfloat16 else x)
        xb = x.reshape(rows, x.shape[-1]).to(torch.bfloat16)
        with torch.autocast("cpu", enabled=False):
            if self.uses_packed():
                y = torch.ops.mkldnn._linear_pointwise(xb, self.packed_bf16_weight(), None, "none", [], "")
            else:
                y = torch.mm(xb, bf16_weight(w).t())
        if self.bf16_output:
            y = y.view(*x.shape[:-1], w.shape[0])
            return y + self.bias.to(torch.bfloat16) if self.bias is not None else y
        y = y.float().view(*x.shape[:-1], w.shape[0])
        return y.add_(self.bias) if self.bias is not None else y

    def float32_rows(self) -> int:
        return min(super().float32_rows(), self.min_rows - 1)

    def uses_packed(self) -> bool:
        """Whether this layer's bf16 copy is oneDNN's blocked one (`packed_pays` for its shape)."""
        return packed_bf16_supported() and packed_pays(*self.weight.shape)

    def packed_bf16_weight(self) -> torch.Tensor:
        """oneDNN's blocked bf16 copy of the weight (the layout its bf16 kernels read fastest:
        about 1.0-1.5x plain bf16 `torch.mm` at prefill shapes), remade if the weight changed."""
        w = self.weight
        key = (w.data_ptr(), w._version)
        cached = self.__dict__.get("_packed_bf16")
        if cached is None or cached[0] != key:
            self.__dict__.pop("_packed_bf16", None)  # free the old copy before making the new one
            with torch.inference_mode(False), torch.no_grad():
                cached = (key, torch.ops.mkldnn._reorder_linear_weight(w.detach().to(torch.bfloat16)))
            self.__dict__["_packed_bf16"] = cached
        return cached[1]


@functools.cache
def packed_bf16_supported() -> bool:
    """Whether oneDNN's linear op takes a packed bf16 weight here and gets bf16 `mm`'s values."""
    try:
        g = torch.Generator().manual_seed(0)
        x, w = torch.randn(4, 8, generator=g).bfloat16(), torch.randn(6, 8, generator=g).bfloat16()
        with torch.no_grad():
            out = torch.ops.mkldnn._linear_pointwise(x, torch.ops.mkldnn._reorder_linear_weight(w), None, "none", [], "")
        return bool(torch.allclose(out.float(), torch.mm(x, w.t()).float(), rtol=1e-2, atol=1e-2))
    except (AttributeError, RuntimeError, NotImplementedError):
        return False


@functools.cache
def packed_pays(n_out: int, n_in: int, rows: int = 512, trials: int = 7) -> bool:
    """Whether oneDNN's blocked bf16 weight multiplies `rows` rows faster than a plain row-major
    one (`torch.mm` on its transposed view) for an [n_out, n_in] weight: the median of
    `trials` alternating timings of each, on random values, once per shape and process."""
    if not packed_bf16_supported():
        return False
    g = torch.Generator().manual_seed(0)
    with torch.inference_mode(), torch.autocast("cpu", enabled=False):
        x = torch.randn(rows, n_in, generator=g).bfloat16()
        w = torch.randn(n_out, n_in, generator=g).bfloat16()
        packed = torch.ops.mkldnn._reorder_linear_weight(w)
        ways = {"packed": lambda: torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], ""),
                "plain": lambda: torch.mm(x, w.t())}
        seconds: dict[str, list[float]] = {name: [] for name in ways}
        for trial in range(trials + 1):
            for name, run in ways.items():
                start = time.perf_counter()
                run()
                if trial:  # the first round warms up
                    seconds[name].append(time.perf_counter() - start)
    return statistics.median(seconds["packed"]) < statistics.median(seconds["plain"])


def use_bf16_prefill(model: nn.Module, min_rows: int | None = None) -> nn.Module:
    """Give every plain linear layer of `model` the bf16 prefill path (in place; parameters,
    names and state_dict unchanged). `min_rows`: the fewest rows a product needs to take it."""
    for module in model.modules():
        if type(module) in (nn.Linear, BlasLinear, Bf16PrefillLinear):
            if type(module) is nn.Linear:
                module.numpy_rows, module.onednn = False, False  # plain F.linear below min_rows
            module.__class__ = Bf16PrefillLinear
            if min_rows is not None:
                module.min_rows = min_rows
    for module in model.modules():
        if isinstance(module, MLP) and isinstance(module.fc, Bf16PrefillLinear):
            module.fc.bf16_output = True
        elif isinstance(module, Attention):
            # A prompt's attention is arithmetic too: in bf16 from as many tokens as a product needs,
            # reading the q/k/v product's bf16 result (Attention.attend widens it where it cannot).
            module.bf16_min_length = Bf16PrefillLinear.min_rows if min_rows is None else min_rows
            if isinstance(module.qkv, Bf16PrefillLinear):
                module.qkv.bf16_output = True
    return model


def uses_bf16_prefill(model: nn.Module) -> bool:
    return any(isinstance(m, Bf16PrefillLinear) for m in model.modules())


def bf16_copy_bytes(model: nn.Module) -> int:
    """Bytes the bf16 weight copies take once made (one per layer that can take the path)."""
    return sum(m.weight.numel() * 2 for m in model.modules()
               if isinstance(m, Bf16PrefillLinear) and m.weight.numel() >= m.min_weight_elements)


def prepare_bf16_copies(model: nn.Module) -> None:
    """Make the bf16 copies now (before the first request), rather than in the first prefill."""
    with torch.inference_mode():
        for m in model.modules():
            if isinstance(m, Bf16PrefillLinear) and m.weight.numel() >= m.min_weight_elements:
                m.packed_bf16_weight() if m.uses_packed() else bf16_weight(m.weight)

