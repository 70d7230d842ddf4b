"""Attention probabilities recomputed from what an attention layer receives.

lmforge's attention calls PyTorch's fused `scaled_dot_product_attention`, which never
forms the probability matrix. Given the normalized input of `block.attn`, the RoPE tables
and the mask it was called with, `pattern_from_input` recomputes it: q and k from the
layer's own fused projection, rotated as the model rotates them, each query head paired
with the key head it shares under grouped-query attention, scaled by 1/sqrt(d), masked
(causal, or the model's sliding-window mask) and softmaxed:

    P[h] = softmax(q_h k_{h // g}^T / sqrt(d) + mask),     g = n_head / n_kv_head

`pattern_output` multiplies P by v and applies the output projection; tests check that this
reproduces the layer's real output. Users: attention maps (lmforge/interpret/attention.py)
and GPTQ's attention-weighted Hessian for the value rows (lmforge/infer/gptq.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .rope import apply_rotary


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
