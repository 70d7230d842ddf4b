"""Mixture-of-experts feed-forward (M7): a router sends each token to k of E SwiGLU experts.

`MoE` replaces the dense `MLP` of a block when `ModelConfig.num_experts > 0`. For each
token x the router computes p = softmax(W_r x) over the E experts, keeps the k largest
probabilities, renormalizes them to sum to 1 (Mixtral's rule) and returns
sum_i w_i * expert_i(x). Only k experts run per token, so a model holds E times the
feed-forward parameters of a dense model but spends about k times its compute.

Dispatch is grouped, not per token: the N*k (token, expert) assignments are sorted by
expert, each expert runs once on the rows sent to it, and the weighted results are added
back into their tokens with one `index_add_`. The only Python loop is over experts.

Capacity (optional, off by default): with `capacity_factor` c an expert takes at most
ceil(c * N * k / E) assignments in a forward; later ones are dropped (that token's other
expert, and the residual connection around the block, still carry it). Switch Transformer
uses this to give every expert a fixed-size buffer on accelerators; with c = None nothing is
dropped, which is what Mixtral inference does and what parity with transformers needs.

Auxiliary losses read the router logits each `MoE` keeps from its last forward:
- load balancing (Switch, eq. 4-6; Mixtral's form in transformers): E * sum_e f_e * P_e,
  f_e the fraction of the k*N assignments that went to expert e, P_e the mean router
  probability of e; both are pooled over all layers. f is a count (no gradient) and P
  carries the gradient, pushing probability away from overloaded experts. It equals k
  when routing is uniform and approaches E as tokens collapse onto one expert.
  `ModelConfig.router_aux_per_layer` balances each layer on its own instead of the pool.
- router z-loss (ST-MoE): mean over tokens of logsumexp(logits)^2, which keeps router
  logits small so the softmax stays in a numerically comfortable range.

Router statistics: every forward adds the tokens each expert received to
`MoE.tokens_per_expert` (a plain tensor, not saved with the weights);
`Transformer.expert_load()` collects them per layer for plots.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig


class MoE(nn.Module):
    """Top-k routed SwiGLU experts. Weights: `router` [E, D], `w_in` [E, 2F, D] (each expert's
    gate rows then up rows, like `MLP.fc`), `w_out` [E, D, F]."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        if config.mlp != "swiglu":
            raise ValueError("mixture-of-experts layers use SwiGLU experts (mlp='swiglu')")
        self.num_experts, self.top_k = config.num_experts, config.experts_per_token
        self.hidden, self.width = config.n_embd, config.intermediate_size
        self.capacity_factor = config.capacity_factor
        self.jitter = config.router_jitter_noise
        self.router = nn.Linear(self.hidden, self.num_experts, bias=False)
        self.w_in = nn.Parameter(torch.empty(self.num_experts, 2 * self.width, self.hidden))
        self.w_out = nn.Parameter(torch.empty(self.num_experts, self.hidden, self.width))
        nn.init.normal_(self.w_in, std=0.02)
        nn.init.normal_(self.w_out, std=0.02)
        self.router_logits: torch.Tensor | None = None  # [N, E] of the last forward
        self.tokens_per_expert = torch.zeros(self.num_experts, dtype=torch.long, device="cpu")
        self.dropped = 0  # assignments dropped for capacity since the last reset

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Router logits [N, E], renormalized top-k weights [N, k] and expert ids [N, k] for x [N, D]."""
        logits = self.router(x)
        probs = logits.float().softmax(-1)
        weights, experts = probs.topk(self.top_k, dim=-1)
        weights = weights / weights.sum(-1, keepdim=True)
        return logits, weights.to(x.dtype), experts

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, self.hidden)
        if self.training and self.jitter > 0:
            x = x * torch.empty_like(x).uniform_(1.0 - self.jitter, 1.0 + self.jitter)
        logits, weights, experts = self.route(x)
        self.router_logits = logits
        n = x.shape[0]
        expert_of = experts.reshape(-1)  # [N*k] assignments, token-major
        order = expert_of.argsort(stable=True)  # grouped by expert, tokens in order within a group
        counts = torch.bincount(expert_of, minlength=self.num_experts)
        token_of = order // self.top_k
        weight_of = weights.reshape(-1)[order]
        if self.capacity_factor is not None:
            capacity = math.ceil(self.capacity_factor * n * self.top_k / self.num_experts)
            first = torch.cumsum(counts, 0) - counts
            rank = torch.arange(order.numel(), device=x.device) - first.repeat_interleave(counts)
            keep = rank < capacity
            self.dropped += int((~keep).sum())
            token_of, weight_of = token_of[keep], weight_of[keep]
            counts = counts.clamp(max=capacity)
        self.tokens_per_expert += counts.detach().to(self.tokens_per_expert.device)
        rows = x.index_select(0, token_of)
        outputs = []
        for e, chunk in enumerate(rows.split(counts.tolist())):
            if chunk.shape[0] == 0:
                continue
            gate, up = F.linear(chunk, self.w_in[e]).chunk(2, dim=-1)
            outputs.append(F.linear(F.silu(gate) * up, self.w_out[e]))
        out = torch.zeros_like(x)
        if outputs:
            y = torch.cat(outputs) * weight_of.unsqueeze(-1)
            out.index_add_(0, token_of, y)
        return out.view(shape)

    def reset_statistics(self) -> None:
        self.tokens_per_expert = torch.zeros(self.num_experts, dtype=torch.long, device="cpu")
        self.dropped = 0


def load_balancing_loss(router_logits: list[torch.Tensor], top_k: int, per_layer: bool = False) -> torch.Tensor:
    """E * sum_e f_e * P_e: f the fractions of assignments, P the mean router probabilities.

    Pooled (the default, the form transformers' Mixtral uses): f and P are averaged over all
    the given layers' logits [N, E] before the product. Its value is k when routing is uniform;
    but layers that collapse onto *different* experts average out into a balanced-looking
    pool, so it can miss per-layer collapse. `per_layer` computes the loss of each layer on its
    own and averages them (Switch Transformer's form, up to the sum over layers), which
    penalizes every unbalanced layer.
    """
    if per_layer:
        return torch.stack([load_balancing_loss([logits], top_k) for logits in router_logits]).mean()
    num_experts = router_logits[0].shape[-1]
    counts = torch.zeros(num_experts, device=router_logits[0].device)
    prob_sum = torch.zeros(num_experts, device=router_logits[0].device)
    rows = 0
    for logits in router_logits:
        probs = logits.float().softmax(-1)
        chosen = probs.topk(top_k, dim=-1).indices
        counts = counts + torch.bincount(chosen.reshape(-1), minlength=num_experts).float()
        prob_sum = prob_sum + probs.sum(0)
        rows += probs.shape[0]
    return num_experts * torch.sum((counts / rows) * (prob_sum / rows))


def router_z_loss(router_logits: list[torch.Tensor]) -> torch.Tensor:
    """Mean over layers and tokens of logsumexp(router logits)^2 (ST-MoE)."""
    return torch.stack([torch.logsumexp(logits.float(), -1).square().mean() for logits in router_logits]).mean()
