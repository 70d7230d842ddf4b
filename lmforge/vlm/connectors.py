"""Connectors (V3): how an image encoder's output reaches a language model.

An image encoder gives patch states [B, N, D_img]; a language model works on token
states [B, T, D_lm]. Four designs bridge them:

- `MLPProjector` (LLaVA): a two-layer MLP maps each patch state to the LM width, and the
  results are put in front of the text as N extra "visual tokens". Simple and strong; the
  cost is N more tokens in every forward.
- `CrossAttention`: text states (queries) attend to the patch states (keys, values); the
  sequence length does not grow, but the LM needs new layers.
- `GatedCrossAttention` (Flamingo): cross-attention and an MLP whose outputs are
  multiplied by tanh(alpha) with alpha learned and initialized at 0, inserted between
  frozen LM blocks. At initialization the gates are closed, so the LM computes exactly
  what it did before and training opens them gradually.
- `QueryResampler` (BLIP-2's Q-Former idea, Flamingo's Perceiver resampler): K learned
  query vectors cross-attend to the patch states and become K visual tokens, however
  many patches the image had: a fixed, small budget of tokens for the LM.

These are the building blocks, tested for their defining properties (tests/test_vlm.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class MLPProjector(nn.Module):
    """[B, N, d_in] -> [B, N, d_out]: Linear, GELU, Linear (LLaVA-1.5's projector)."""

    def __init__(self, d_in: int, d_out: int, hidden: int | None = None) -> None:
        super().__init__()
        hidden = hidden or d_out
        self.fc1, self.fc2 = nn.Linear(d_in, hidden), nn.Linear(hidden, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class CrossAttention(nn.Module):
    """Queries from ``x`` [B, T, d], keys and values from ``context`` [B, N, d_ctx]: [B, T, d]."""

    def __init__(self, d: int, d_context: int, heads: int) -> None:
        super().__init__()
        if d % heads:
            raise ValueError(f"width {d} is not a multiple of {heads} heads")
        self.heads = heads
        self.q = nn.Linear(d, d)
        self.kv = nn.Linear(d_context, 2 * d)
        self.out = nn.Linear(d, d)

    def forward(self, x: torch.Tensor, context: torch.Tensor, context_mask: torch.Tensor | None = None) -> torch.Tensor:
        b, t, d = x.shape
        n = context.shape[1]
        q = self.q(x).view(b, t, self.heads, d // self.heads).transpose(1, 2)
        k, v = self.kv(context).view(b, n, 2, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        mask = None if context_mask is None else context_mask.bool().view(b, 1, 1, n)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.out(y.transpose(1, 2).reshape(b, t, d))


class GatedCrossAttention(nn.Module):
    """Flamingo's gated block: x + tanh(a) * xattn(LN(x), ctx), then + tanh(b) * mlp(LN(x)); a = b = 0 at init."""

    def __init__(self, d: int, d_context: int, heads: int) -> None:
        super().__init__()
        self.attn_norm, self.mlp_norm = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = CrossAttention(d, d_context, heads)
        self.mlp = MLPProjector(d, d, 4 * d)
        self.attn_gate = nn.Parameter(torch.zeros(()))
        self.mlp_gate = nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor, context: torch.Tensor, context_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + torch.tanh(self.attn_gate) * self.attn(self.attn_norm(x), context, context_mask)
        return x + torch.tanh(self.mlp_gate) * self.mlp(self.mlp_norm(x))


class QueryResampler(nn.Module):
    """``queries`` learned vectors read the patch states through cross-attention: [B, N, d_ctx] -> [B, queries, d]."""

    def __init__(self, d: int, d_context: int, heads: int, queries: int = 8, layers: int = 1) -> None:
        super().__init__()
        self.queries = nn.Parameter(torch.randn(1, queries, d) * 0.02)
        self.blocks = nn.ModuleList(GatedCrossAttention(d, d_context, heads) for _ in range(layers))
        for block in self.blocks:  # the queries start empty: their gates must be open to learn anything
            nn.init.ones_(block.attn_gate)
            nn.init.ones_(block.mlp_gate)
        self.norm = nn.LayerNorm(d)

    def forward(self, context: torch.Tensor, context_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = self.queries.expand(len(context), -1, -1)
        for block in self.blocks:
            x = block(x, context, context_mask)
        return self.norm(x)
