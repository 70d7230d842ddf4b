"""One LoRA'd linear layer's training step as a single autograd function (float32, CPU).

Plain autograd runs a LoRA layer as five recorded ops: the frozen product x W^T, the
small products z = x A^T and z B^T, a scaling and an add, plus the cat/pad ops that lay
a fused layer's A and B matrices out (layers.py). Its backward then scales the incoming
gradient again, runs g W and (g s B) A separately and sums them in a third pass, and
splits the stacked gradients back into parts. Every one of those passes reads or writes
a [tokens, features] tensor.

`lora_linear` computes the same values with fewer passes over the activations:

    forward   z = x A^T                              [tokens, n r]   (A stacked over parts)
              y = x W^T + b;  y += z (s B)^T          in place, a rank-n r update of y
    backward  gz = g (s B)                            [tokens, n r]
              dx = g W;  dx += gz A                   in place
              dA_i = gz_i^T x,  dB_i = s g_i^T z_i    per part, the small weight gradients

The in-place rank-n r updates (`addmm_`, a GEMM with beta = 1) read and write the big
output once; plain autograd writes the adapter's [tokens, out] result as a tensor of its
own, adds it to y in another pass, scales the gradient in a third and sums two input
gradients in a fourth. We also tried oneDNN's "add" post-op (the small product adding
the base output as it writes, `_linear_pointwise.binary`); it cost more CPU time than
the in-place update on one core (fc of the default model: 7.5-9.0 ms vs 6.7-7.7 ms,
the bare base product 6.3-6.4 ms). The function saves only x and z for the backward,
computes no base weight gradient (W is frozen), and returns the adapter gradients part
by part, so no cat/pad/split bookkeeping appears in the autograd graph.

The frozen W is a constant while training, so it can be kept in the layout its products
want: oneDNN's blocked copy of W for the forward and of W^T for the input gradient
(lmforge/train/frozen_weights.py), made once and remade only when the weight changes
(merge, load). Without them oneDNN re-lays the plain weight at every call; for the
transposed view the input gradient reads, that cost 10-15% of the default model's
largest products on one core of a shared Xeon (docs/benchmarks.md). The price is
memory: two more copies of every adapted frozen weight, so it is opt-in
(`PeftOptions.pack_frozen`, `--peft.pack-frozen true`; `PACK_FROZEN = False` turns it off
for every layer). Values equal plain autograd's up to float summation order (tests/test_peft_speed_paths.py).
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from lmforge.model import onednn
from lmforge.train import frozen_weights

# Switches, for comparing paths (a layer packs only when its `pack_frozen` is set too).
ENABLED = True
PACK_FROZEN = True


@functools.cache
def available() -> bool:
    """oneDNN's linear op runs on packed weights here, with correct values (plain weights: onednn.available)."""
    if not onednn.available():
        return False
    try:
        g = torch.Generator().manual_seed(0)
        x, w = torch.randn(5, 16, generator=g), torch.randn(24, 16, generator=g)
        with torch.no_grad():
            packed = torch.ops.mkldnn._reorder_linear_weight(w)
            packed_t = torch.ops.mkldnn._reorder_linear_weight(w.t().contiguous())
            op = torch.ops.mkldnn._linear_pointwise
            forward, backward = op(x, packed, None, "none", [], ""), op(x @ w.t(), packed_t, None, "none", [], "")
        return (torch.allclose(forward, x @ w.t(), rtol=1e-5, atol=1e-5)
                and torch.allclose(backward, (x @ w.t()) @ w, rtol=1e-4, atol=1e-4))
    except (AttributeError, RuntimeError, NotImplementedError):
        return False


def usable(layer: nn.Module, x: torch.Tensor) -> bool:
    """The fused path applies: a training forward (train mode, autograd on), float32 on CPU, a
    frozen plain nn.Linear base (a quantized base has its own dequantizing products)."""
    base = getattr(layer, "base", None)
    return (ENABLED and layer.training and torch.is_grad_enabled() and isinstance(base, nn.Linear) and x.numel() > 0
            and not base.weight.requires_grad and (base.bias is None or not base.bias.requires_grad)
            and onednn.usable(x, base.weight) and available())


def _spread(blocks: list[torch.Tensor], starts: list[int], stops: list[int], out: int, r: int) -> torch.Tensor:
    """[out, n r]: block i in rows starts[i]..stops[i] and columns i r .. (i + 1) r, zero elsewhere."""
    if len(blocks) == 1 and starts[0] == 0 and stops[0] == out:
        return blocks[0]
    full = blocks[0].new_zeros(out, len(blocks) * r)
    for i, (b, lo, hi) in enumerate(zip(blocks, starts, stops)):
        full[lo:hi, i * r:(i + 1) * r] = b
    return full


class _LoraLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, frozen, layout, scaling, *adapters):
        # frozen: (W for the forward product, W^T for the input gradient, bias), constants that
        # autograd need not track; adapters: A_1..A_n, then B_1..B_n; layout: (starts, stops, out, r)
        weight, weight_t, bias = frozen
        starts, stops, out, r = layout
        n = len(starts)
        a_list, b_list = adapters[:n], adapters[n:]
        op = torch.ops.mkldnn._linear_pointwise
        a = torch.cat(a_list) if n > 1 else a_list[0]
        b_scaled = _spread(list(b_list), starts, stops, out, r) * scaling
        z = onednn.mm_nt(x, a)
        # y = x W^T + b, then the rank-n r update z (s B)^T summed into it in place: the
        # adapter adds one read-modify-write of y, not a tensor of its own plus an add.
        y = op(x, weight, bias, "none", [], "").addmm_(z, b_scaled.t())
        ctx.save_for_backward(x, z, a, b_scaled)
        ctx.weight_t, ctx.layout, ctx.scaling = weight_t, layout, scaling
        return y

    @staticmethod
    def backward(ctx, grad):
        x, z, a, b_scaled = ctx.saved_tensors
        starts, stops, out, r = ctx.layout
        n = len(starts)
        grad = grad.contiguous()
        op = torch.ops.mkldnn._linear_pointwise
        gz = onednn.mm_nt(grad, b_scaled.t())  # [tokens, n r] = g (s B)
        grad_x = None
        if ctx.needs_input_grad[0]:  # g W + gz A, the low-rank part summed into g W in place
            grad_x = op(grad, ctx.weight_t, None, "none", [], "").addmm_(gz, a)
        grad_a = onednn.weight_grad(gz, x)  # [n r, in]; part i is rows i r .. (i + 1) r
        grads_a = [grad_a[i * r:(i + 1) * r] for i in range(n)] if n > 1 else [grad_a]
        # dB_i = s g_i^T z_i is block i of s g^T z [out, n r]: one product over the whole
        # gradient instead of a copy of each part's columns of g (the off-diagonal blocks
        # it also computes cost n r / out of a base product; the copies cost more).
        grad_b = onednn.weight_grad(grad, z).mul_(ctx.scaling)
        grads_b = [grad_b[starts[i]:stops[i], i * r:(i + 1) * r] for i in range(n)]
        return (grad_x, None, None, None, *grads_a, *grads_b)


def lora_linear(layer, x: torch.Tensor) -> torch.Tensor:
    """`LoraLinear.forward` for an unmerged layer without dropout on the fused path (see `usable`)."""
    base = layer.base
    if PACK_FROZEN and getattr(layer, "pack_frozen", False):
        weight, weight_t = frozen_weights.packed(base.weight), frozen_weights.packed(base.weight, transposed=True)
    else:
        weight, weight_t = base.weight, base.weight.t()
    parts = layer.parts
    layout = (tuple(p.start for p in parts), tuple(p.stop for p in parts), layer.out_features, layer.r)
    adapters = [layer.lora_A[p.leaf] for p in parts] + [layer.lora_B[p.leaf] for p in parts]
    flat = x.reshape(-1, x.shape[-1]).contiguous()
    bias = None if base.bias is None else base.bias.detach()
    y = _LoraLinear.apply(flat, (weight, weight_t, bias), layout, layer.scaling, *adapters)
    return y.view(*x.shape[:-1], layer.out_features)
