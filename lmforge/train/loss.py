"""Training objectives on the one Transformer (P1): next-token cross-entropy.

`causal_lm_loss` is the loss every training path of lmforge calls (pretraining, and
later fine-tuning): position t predicts token t+1, and targets equal to
`IGNORE_INDEX` (-100, the Hugging Face convention) do not count, which is how SFT
keeps the loss on response tokens only.

For lmforge's `Transformer` the vocabulary projection and the cross-entropy run fused,
chunk by chunk, so the [tokens, vocab] logits are never kept (lmforge/train/fused_ce.py
explains why that is the expensive part of a small model's step). Any other module
that maps ids to logits goes through plain `F.cross_entropy`.

A mixture-of-experts model adds its routers' auxiliary losses (load balancing and z-loss,
weighted by its config's coefficients; see lmforge/model/moe.py) to the token loss while
it trains (train mode, autograd on); evaluation losses stay pure cross-entropy.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .fused_ce import linear_cross_entropy

IGNORE_INDEX = -100


def causal_lm_loss(model: torch.nn.Module, input_ids: torch.Tensor, labels: torch.Tensor | None = None,
                   reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of predicting ``labels[:, t+1]`` from ``input_ids[:, :t+1]``.

    ``labels`` defaults to ``input_ids`` (plain language modelling). ``reduction`` is
    "mean" (over counted targets) or "sum" (total nats, for perplexity and bits per byte).
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    targets = (input_ids if labels is None else labels)[:, 1:]
    head = getattr(model, "lm_head", None)
    if hasattr(model, "hidden_states") and isinstance(head, torch.nn.Linear) and head.bias is None:
        # The last position predicts nothing: drop it before the head, not after.
        hidden = model.hidden_states(input_ids)[:, :-1]
        loss = linear_cross_entropy(hidden.reshape(-1, hidden.shape[-1]), head.weight, targets.reshape(-1),
                                    ignore_index=IGNORE_INDEX, reduction=reduction)
        return with_router_loss(model, loss, targets, reduction)
    logits = model(input_ids)[:, :-1]
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction=reduction)
    return with_router_loss(model, loss, targets, reduction)


def with_router_loss(model: torch.nn.Module, loss: torch.Tensor, targets: torch.Tensor,
                     reduction: str) -> torch.Tensor:
    """``loss`` plus a training mixture of experts' weighted router losses from the forward that
    produced it (per counted target for a "sum" reduction, so the token mean sees it once)."""
    if not (model.training and torch.is_grad_enabled()):
        return loss
    router_losses = getattr(model, "router_losses", None)
    terms = router_losses() if callable(router_losses) else {}
    if not terms:
        return loss
    extra = terms["router_loss"].to(loss.dtype)
    if reduction == "sum":
        extra = extra * (targets != IGNORE_INDEX).sum()
    return loss + extra
