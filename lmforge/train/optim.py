"""Optimizers and parameter groups (P2).

AdamW applies weight decay directly to the weights (``w -= lr * wd * w``), separately
from the adaptive gradient step; Adam with L2 regularization instead adds ``wd * w`` to
the gradient, so the decay is divided by the same per-weight second-moment estimate as
the gradient and weights with large gradients are barely regularized. Both are here so
the difference can be measured.

Decay is a prior that weights should be small. It makes no sense for the gains of
RMSNorm/LayerNorm (their neutral value is 1, not 0) or for biases, so one-dimensional
parameters form a no-decay group. Embedding tables decay by default.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def parameter_groups(model: nn.Module, weight_decay: float, decay_embeddings: bool = True) -> list[dict[str, Any]]:
    """Two groups: matrices (decayed) and norms/biases (not). Tied parameters appear once."""
    embedding_weights = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, no_decay, seen = [], [], set()
    decay_names, no_decay_names = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        skip = p.ndim < 2 or (not decay_embeddings and id(p) in embedding_weights)
        (no_decay if skip else decay).append(p)
        (no_decay_names if skip else decay_names).append(name)
    return [
        {"params": decay, "weight_decay": weight_decay, "names": decay_names},
        {"params": no_decay, "weight_decay": 0.0, "names": no_decay_names},
    ]


def build_optimizer(model: nn.Module, name: str = "adamw", lr: float = 1e-3, betas=(0.9, 0.95), eps: float = 1e-8,
                    weight_decay: float = 0.1, decay_embeddings: bool = True, fused: bool = True) -> torch.optim.Optimizer:
    """AdamW or Adam + L2 over `parameter_groups`.

    ``fused`` runs the whole update as one kernel per parameter group (reading each weight,
    gradient and moment once) instead of a series of element-wise passes; it is used for
    plain and DDP training. Sharded (FSDP) parameters take the multi-tensor path.
    """
    groups = parameter_groups(model, weight_decay, decay_embeddings)
    for g in groups:
        del g["names"]
    groups = [g for g in groups if g["params"]]
    impl = {"fused": True} if fused else {"foreach": True}
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps, **impl)
    if name == "adam_l2":
        return torch.optim.Adam(groups, lr=lr, betas=tuple(betas), eps=eps, **impl)
    raise ValueError(f"unknown optimizer {name!r}: use adamw or adam_l2")
