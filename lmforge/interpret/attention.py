"""Attention probabilities per layer and head (X1).

lmforge's attention calls PyTorch's fused `scaled_dot_product_attention`, which never
forms the probability matrix. We recompute it from exactly what each layer's attention
receives (a pre-hook on `block.attn` sees the normalized input, the RoPE tables and the
mask) with `pattern_from_input` (lmforge/model/attention_pattern.py):

    P[h] = softmax(q_h k_{h // g}^T / sqrt(d) + mask),     g = n_head / n_kv_head

`pattern_output` multiplies P by v and applies the output projection; the tests check
that this reproduces the layer's real output, which pins every detail of the recomputation.
"""

from __future__ import annotations

import torch

from lmforge.model.attention_pattern import AttentionPattern, pattern_from_input, pattern_output

from .capture import hooked

__all__ = ["AttentionPattern", "attention_patterns", "pattern_from_input", "pattern_output"]


def attention_patterns(model, ids: torch.Tensor, layers: list[int] | None = None,
                       keep_outputs: bool = False) -> dict[int, AttentionPattern] | tuple[dict, dict]:
    """Layer -> `AttentionPattern` for one forward of `ids` [B, T] (default: every layer).

    With `keep_outputs`, also layer -> the attention module's real output [B, T, D], for
    checking the recomputation against it.
    """
    wanted = range(len(model.layers)) if layers is None else layers
    patterns: dict[int, AttentionPattern] = {}
    outputs: dict[int, torch.Tensor] = {}

    def before(index):
        def hook(module, args):
            x, rope, mask, cache = args[0], args[1], args[2], args[3]
            if cache is not None:
                raise ValueError("attention patterns are recomputed for a forward without a KV cache")
            patterns[index] = pattern_from_input(module, x, rope, mask)
        return hook

    def after(index):
        def hook(module, args, out):
            outputs[index] = out.detach()
        return hook

    registrations = [lambda i=i: model.layers[i].attn.register_forward_pre_hook(before(i)) for i in wanted]
    if keep_outputs:
        registrations += [lambda i=i: model.layers[i].attn.register_forward_hook(after(i)) for i in wanted]
    with hooked(registrations), torch.no_grad():
        model(ids)
    return (patterns, outputs) if keep_outputs else patterns
