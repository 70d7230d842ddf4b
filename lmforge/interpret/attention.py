"""Attention probabilities per layer and head (X1).

lmforge's attention calls PyTorch's fused `scaled_dot_product_attention`, which never
forms the probability matrix. We recompute it from exactly what each layer's attention
receives (a pre-hook on `block.attn` sees the normalized input, the RoPE tables and the
mask): q and k from the layer's own fused projection, rotated as the model rotates them,
each query head paired with the key head it shares under grouped-query attention, scaled
by 1/sqrt(d), masked (causal, or the model's sliding-window mask) and softmaxed:

    P[h] = softmax(q_h k_{h // g}^T / sqrt(d) + mask),     g = n_head / n_kv_head

`pattern_output` multiplies P by v and applies the output projection; the tests check
that this reproduces the layer's real output, which pins every detail above.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lmforge.model.rope import apply_rotary

from .capture import hooked


@dataclass
class AttentionPattern:
    """One layer's attention: probabilities [B, n_head, T, T] (query rows, key columns) and the
    values [B, n_head, T, head_dim] each head reads (a shared KV head repeated per query head)."""

    probs: torch.Tensor
    values: torch.Tensor


def pattern_from_input(attn, x: torch.Tensor, rope, mask: torch.Tensor | None) -> AttentionPattern:
    """Recompute `attn`'s probabilities for its input `x` [B, T, D] (float32, whatever the model's dtype)."""
    batch, length, _ = x.shape
    n_head, n_kv, head_dim = attn.n_head, attn.n_kv_head, attn.head_dim
    weight, bias = attn.qkv.weight.float(), None if attn.qkv.bias is None else attn.qkv.bias.float()
    qkv = F.linear(x.float(), weight, bias)
    heads = qkv.view(batch, length, n_head + 2 * n_kv, head_dim).transpose(1, 2)
    q, k, v = heads.split((n_head, n_kv, n_kv), dim=1)
    if rope is not None:
        cos, sin = rope[0].float(), rope[1].float()
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    group = n_head // n_kv
    k = k.repeat_interleave(group, dim=1)  # query head h reads KV head h // group (as SDPA's enable_gqa does)
    v = v.repeat_interleave(group, dim=1)
    scores = torch.matmul(q, k.transpose(-1, -2)) * head_dim ** -0.5
    if mask is not None:
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, float("-inf"))
        else:
            scores = scores + mask.float()
    elif attn.causal and length > 1:
        causal = torch.ones(length, length, dtype=torch.bool, device=x.device).tril()
        scores = scores.masked_fill(~causal, float("-inf"))
    return AttentionPattern(scores.softmax(-1), v)


def pattern_output(attn, pattern: AttentionPattern) -> torch.Tensor:
    """P v through the layer's output projection: [B, T, D], what the attention layer returns."""
    mixed = torch.matmul(pattern.probs, pattern.values)  # [B, H, T, d]
    batch, _, length, _ = mixed.shape
    weight, bias = attn.out.weight.float(), None if attn.out.bias is None else attn.out.bias.float()
    return F.linear(mixed.transpose(1, 2).reshape(batch, length, attn.q_size), weight, bias)


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
