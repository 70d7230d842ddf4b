"""Token attributions for one predicted token (X2): gradient x input, integrated gradients, occlusion.

The explained quantity is f(e) = the logit of a target token at the last position (or,
given a contrast token, the difference logit(target) - logit(contrast), which asks "why
this answer rather than that one"), as a function of the prompt's token embeddings e [T, D] (positions, blocks and head are the
model's own; `replaced_embeddings` feeds chosen embeddings through the real forward).

- Gradient x input: a_t = sum_d e_td * df/de_td, a first-order (Taylor) share per token.
- Integrated gradients (Sundararajan et al., 2017): with a baseline b (zero embeddings or
  the pad token's), a_t = sum_d (e_td - b_td) * integral_0^1 df/de_td(b + a (e - b)) da,
  the integral taken by a quadrature rule over `steps` points. Completeness: the
  attributions add up to f(e) - f(b) exactly for the exact integral; with a quadrature
  the gap shrinks as steps grow (as 1/steps for left/right sums, 1/steps^2 for the
  midpoint and trapezoid rules on a smooth path). `completeness_error` reports it.
- Occlusion: a_t = f(e) - f(e with token t's embedding replaced by the baseline's).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .capture import check_language_model, replaced_embeddings


@dataclass
class Attribution:
    """Per-token scores [T] for `target` from one method; for integrated gradients also the
    two ends of the path and how far the sum of the scores is from their difference."""

    method: str
    scores: torch.Tensor
    target: int
    score: float  # f(input): the target's logit at the last position
    baseline_score: float | None = None
    steps: int | None = None
    rule: str | None = None
    contrast: int | None = None  # f is logit(target) - logit(contrast) when set

    @property
    def completeness_error(self) -> float | None:
        """|sum of attributions - (f(input) - f(baseline))| (integrated gradients only)."""
        if self.baseline_score is None or self.method != "integrated_gradients":
            return None
        return abs(float(self.scores.sum()) - (self.score - self.baseline_score))


def target_logits(model, ids: torch.Tensor, embeddings: torch.Tensor, target: int,
                  contrast: int | None = None) -> torch.Tensor:
    """f for a batch of embeddings [B, T, D] of the prompt `ids` [1, T]: the target's logits [B]
    (minus the contrast token's, when given)."""
    batch = embeddings.shape[0]
    with replaced_embeddings(model, embeddings):
        logits = model(ids.expand(batch, -1), last_only=True)
    chosen = logits[:, 0, target]
    if contrast is not None:
        chosen = chosen - logits[:, 0, contrast]
    return chosen.float() if chosen.dtype in (torch.float16, torch.bfloat16) else chosen


def token_embeddings(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.embed(ids).detach()


def baseline_embeddings(model, ids: torch.Tensor, kind: str = "zero", pad_id: int | None = None,
                        keep_first: bool = False) -> torch.Tensor:
    """The attribution baseline [1, T, D]: zeros, or the pad token's embedding at every position.

    `keep_first` leaves the first token's own embedding in the baseline (it then gets no
    attribution). Models route much of their attention to the first position (an
    "attention sink", with very large activations there); moving that token along the
    path drives the whole network through a sharp transition, which a quadrature of a few
    dozen points cannot follow (see the handbook's measurements).
    """
    x = token_embeddings(model, ids)
    if kind == "zero":
        base = torch.zeros_like(x)
    elif kind == "pad":
        if pad_id is None:
            raise ValueError("a pad baseline needs the id of a pad (or end-of-text) token")
        base = token_embeddings(model, torch.tensor([[pad_id]], device=ids.device)).expand_as(x).clone()
    else:
        raise ValueError(f"unknown baseline {kind!r} (zero or pad)")
    if keep_first:
        base[:, 0] = x[:, 0]
    return base


def quadrature(steps: int, rule: str = "trapezoid") -> tuple[torch.Tensor, torch.Tensor]:
    """Points a_k in [0, 1] and weights w_k with sum_k w_k g(a_k) ~ integral_0^1 g(a) da."""
    if steps < 1:
        raise ValueError("integrated gradients needs at least one step")
    k = torch.arange(steps, dtype=torch.float64)
    if rule == "left":
        return k / steps, torch.full((steps,), 1.0 / steps, dtype=torch.float64)
    if rule == "right":
        return (k + 1) / steps, torch.full((steps,), 1.0 / steps, dtype=torch.float64)
    if rule == "midpoint":
        return (k + 0.5) / steps, torch.full((steps,), 1.0 / steps, dtype=torch.float64)
    if rule == "trapezoid":
        alphas = torch.arange(steps + 1, dtype=torch.float64) / steps
        weights = torch.full((steps + 1,), 1.0 / steps, dtype=torch.float64)
        weights[0] = weights[-1] = 0.5 / steps
        return alphas, weights
    raise ValueError(f"unknown quadrature rule {rule!r} (trapezoid, midpoint, left or right)")


def gradient_x_input(model, ids: torch.Tensor, target: int, contrast: int | None = None) -> Attribution:
    check_language_model(model)
    x = token_embeddings(model, ids).requires_grad_(True)
    with torch.enable_grad():
        f = target_logits(model, ids, x, target, contrast)
        (grad,) = torch.autograd.grad(f.sum(), x)
    scores = (grad * x.detach()).sum(-1)[0].float()
    return Attribution("gradient_x_input", scores, target, float(f.detach()), contrast=contrast)


def integrated_gradients(model, ids: torch.Tensor, target: int, steps: int = 32, rule: str = "trapezoid",
                         baseline: torch.Tensor | None = None, batch_size: int = 16, progress=None,
                         contrast: int | None = None) -> Attribution:
    """Integrated gradients of the target's logit with respect to the prompt's embeddings.

    The path points run through the model `batch_size` at a time; `progress(done, total)`
    is called after each batch.
    """
    check_language_model(model)
    x = token_embeddings(model, ids)
    base = torch.zeros_like(x) if baseline is None else baseline.to(x)
    alphas, weights = quadrature(steps, rule)
    delta = x - base
    summed = torch.zeros_like(x, dtype=torch.float64)
    for first in range(0, len(alphas), batch_size):
        a = alphas[first:first + batch_size].to(x.device)
        w = weights[first:first + batch_size].to(x.device)
        points = (base + a.to(x.dtype)[:, None, None] * delta).requires_grad_(True)
        with torch.enable_grad():
            f = target_logits(model, ids, points, target, contrast)
            (grad,) = torch.autograd.grad(f.sum(), points)
        summed += (w[:, None, None] * grad.double()).sum(0, keepdim=True)
        if progress is not None:
            progress(min(first + batch_size, len(alphas)), len(alphas))
    scores = (delta.double() * summed).sum(-1)[0].float()
    with torch.no_grad():
        ends = target_logits(model, ids, torch.cat([x, base]), target, contrast)
    return Attribution("integrated_gradients", scores, target, float(ends[0]), float(ends[1]), steps, rule, contrast)


def occlusion(model, ids: torch.Tensor, target: int, baseline: torch.Tensor | None = None,
              contrast: int | None = None) -> Attribution:
    """How much the target's logit drops when each token's embedding is replaced by the baseline's."""
    check_language_model(model)
    x = token_embeddings(model, ids)
    base = torch.zeros_like(x) if baseline is None else baseline.to(x)
    length = x.shape[1]
    occluded = x.expand(length, -1, -1).clone()
    rows = torch.arange(length)
    occluded[rows, rows] = base[0]
    with torch.no_grad():
        f = target_logits(model, ids, torch.cat([x, occluded]), target, contrast)
    return Attribution("occlusion", f[0] - f[1:], target, float(f[0]), None, contrast=contrast)
