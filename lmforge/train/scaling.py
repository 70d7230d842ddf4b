"""Fit scaling laws to (N, D, loss) points from small runs (P8).

Two laws, both in the form Hoffmann et al. (2022) used:

    L(N, D) = E + A / N^alpha + B / D^beta        (parameters N, training tokens D)
    L(N)    = E + A / N^alpha                     (D large or fixed; Kaplan-style)

The fit works like theirs: parametrise A = exp(a), B = exp(b), E = exp(e), so every
constant stays positive; compare log L with the log of the prediction (written as a
log-sum-exp, which is stable); use a Huber loss so one diverged run does not drag the
fit; minimise with L-BFGS from a grid of starting points and keep the best. Only torch
is needed (no scipy). A sweep calls `fit_scaling_law(points)` and then
`plot_scaling(points, fit, path)`.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence


@dataclass
class ScalingFit:
    """Fitted constants; `A`/`alpha` describe parameters, `B`/`beta` tokens (None in the N-only law)."""

    E: float
    A: float
    alpha: float
    B: float | None = None
    beta: float | None = None
    objective: float = 0.0
    n_points: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def predict(self, n_params: float, tokens: float | None = None) -> float:
        loss = self.E + self.A / n_params**self.alpha
        if self.B is not None:
            if tokens is None:
                raise ValueError("this law depends on tokens too; pass tokens")
            loss += self.B / tokens**self.beta
        return loss

    def compute_optimal(self, flops: float) -> dict[str, float]:
        """N and D minimising L(N, D) under C = 6 N D (needs the two-variable law)."""
        if self.B is None:
            raise ValueError("compute-optimal allocation needs the L(N, D) law")
        a, b = self.alpha, self.beta
        g = (a * self.A / (b * self.B)) ** (1 / (a + b))
        n = g * (flops / 6) ** (b / (a + b))
        return {"params": n, "tokens": flops / 6 / n}

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "extra"} | self.extra


def _points(points: Iterable[Any], need_tokens: bool) -> tuple[list[float], list[float], list[float]]:
    ns, ds, ls = [], [], []
    for p in points:
        if isinstance(p, dict):
            n, d, loss = p.get("params", p.get("N")), p.get("tokens", p.get("D")), p.get("loss")
        else:
            n, d, loss = (p[0], None, p[1]) if len(p) == 2 else p
        if n is None or loss is None or (need_tokens and d is None):
            raise ValueError(f"a point needs params{', tokens' if need_tokens else ''} and loss, got {p!r}")
        if n <= 0 or loss <= 0 or (d is not None and d <= 0) or not math.isfinite(loss):
            raise ValueError(f"params, tokens and loss must be positive and finite, got {p!r}")
        ns.append(float(n)), ds.append(float(d) if d is not None else 1.0), ls.append(float(loss))
    return ns, ds, ls


def fit_scaling_law(points: Sequence[Any], with_tokens: bool | None = None, huber_delta: float = 1e-3,
                    steps: int = 500) -> ScalingFit:
    """Fit L(N, D) (points with tokens) or L(N) to points given as (N, D, loss), (N, loss) or dicts."""
    import torch

    points = list(points)
    if with_tokens is None:
        with_tokens = all((isinstance(p, dict) and p.get("tokens", p.get("D")) is not None)
                          or (not isinstance(p, dict) and len(p) == 3) for p in points)
    ns, ds, ls = _points(points, with_tokens)
    n_free = 5 if with_tokens else 3
    if len(ns) < n_free:
        raise ValueError(f"fitting {'L(N, D)' if with_tokens else 'L(N)'} needs at least {n_free} points, got {len(ns)}")
    log_n = torch.tensor(ns, dtype=torch.float64).log()
    log_d = torch.tensor(ds, dtype=torch.float64).log()
    log_l = torch.tensor(ls, dtype=torch.float64).log()

    def objective(theta: torch.Tensor) -> torch.Tensor:
        terms = [theta[0] - theta[1] * log_n, theta[2].expand_as(log_n)]  # log(A/N^alpha), log E
        if with_tokens:
            terms.append(theta[3] - theta[4] * log_d)
        pred = torch.logsumexp(torch.stack(terms), dim=0)
        return torch.nn.functional.huber_loss(pred, log_l, delta=huber_delta, reduction="sum")

    # Starting grid in the spirit of Hoffmann et al.: a, b over [0, 25], alpha, beta over [0, 2], e over [-1, 1.5].
    grid_a = (0.0, 5.0, 10.0, 15.0, 20.0, 25.0)
    grid_alpha = (0.1, 0.3, 0.5, 1.0, 2.0)
    grid_e = (-1.0, 0.5, 1.5)
    if with_tokens:
        starts = [(a, al, e, b, be) for a, al, e in itertools.product(grid_a, grid_alpha, grid_e)
                  for b, be in itertools.product(grid_a, grid_alpha)]
    else:
        starts = list(itertools.product(grid_a, grid_alpha, grid_e))
    # Score every start cheaply, refine the most promising ones with L-BFGS.
    with torch.no_grad():
        scored = sorted(starts, key=lambda s: float(objective(torch.tensor(s, dtype=torch.float64))))
    best_theta, best_value = None, math.inf
    for start in scored[:6]:
        theta = torch.tensor(start, dtype=torch.float64, requires_grad=True)
        opt = torch.optim.LBFGS([theta], lr=1, max_iter=steps, tolerance_grad=1e-20, tolerance_change=1e-24,
                                history_size=20, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            value = objective(theta)
            value.backward()
            return value

        opt.step(closure)
        with torch.no_grad():
            value = float(objective(theta))
        if math.isfinite(value) and value < best_value:
            best_theta, best_value = theta.detach().clone(), value
    if best_theta is None:
        raise ValueError("the scaling-law fit did not converge from any starting point")
    t = best_theta.tolist()
    fit = ScalingFit(E=math.exp(t[2]), A=math.exp(t[0]), alpha=t[1], objective=best_value, n_points=len(ns))
    if with_tokens:
        fit.B, fit.beta = math.exp(t[3]), t[4]
    return fit


def plot_scaling(points: Sequence[Any], fit: ScalingFit, path: str, title: str = "scaling law") -> str:
    """Loss against N (one colour per token count when the law has D) with the fitted curves, as a PNG."""
    from lmforge.io.plots import pyplot

    plt = pyplot()
    if plt is None:
        raise ValueError("plotting needs matplotlib (pip install matplotlib)")
    ns, ds, ls = _points(points, fit.B is not None)
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    groups = sorted(set(ds)) if fit.B is not None else [None]
    lo, hi = min(ns), max(ns)
    grid = [lo * (hi / lo) ** (i / 99) for i in range(100)] if hi > lo else [lo]
    for i, d in enumerate(groups):
        colour = f"C{i % 10}"
        xs = [n for n, dd in zip(ns, ds) if d is None or dd == d]
        ys = [loss for loss, dd in zip(ls, ds) if d is None or dd == d]
        label = f"D={d:.3g}" if d is not None else "runs"
        ax.scatter(xs, ys, color=colour, label=label, s=18)
        ax.plot(grid, [fit.predict(n, d) for n in grid], color=colour, linewidth=1)
    ax.set_xscale("log")
    ax.set_xlabel("parameters N")
    ax.set_ylabel("loss (nats/token)")
    law = f"E={fit.E:.3g} A={fit.A:.3g} alpha={fit.alpha:.3g}"
    if fit.B is not None:
        law += f" B={fit.B:.3g} beta={fit.beta:.3g}"
    ax.set_title(f"{title}\n{law}", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    from pathlib import Path

    out = Path(path)
    tmp = out.with_name(out.name + ".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(out)
    return str(out)
