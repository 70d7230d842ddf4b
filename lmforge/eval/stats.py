"""Confidence intervals for evaluation results: Wilson score and percentile bootstrap.

An evaluation number without an interval hides how much it would move on another sample
of prompts or raters. Two tools cover most needs:

- `wilson_interval` for a proportion (a win rate, an accuracy). Unlike the textbook
  normal interval p +/- z*sqrt(p(1-p)/n), it stays inside [0, 1] and keeps close to its
  nominal coverage for small n and for p near 0 or 1.
- `bootstrap_interval` for anything else (a mean Likert score, a difference of means):
  resample the units with replacement, recompute the statistic, take percentiles.
  Seeded, so a report is reproducible.
"""

from __future__ import annotations

import math
import random
from statistics import NormalDist
from typing import Callable, Sequence


def z_value(confidence: float) -> float:
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be between 0 and 1, got {confidence}")
    return NormalDist().inv_cdf(0.5 + confidence / 2)


def wilson_interval(successes: float, n: float, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of successes/n; `successes` may be fractional (ties as halves)."""
    if n <= 0:
        return (math.nan, math.nan)
    z = z_value(confidence)
    p = successes / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    return (max(0.0, centre - half), min(1.0, centre + half))


def bootstrap_interval(
    values: Sequence[float],
    statistic: Callable[[Sequence[float]], float] = lambda v: sum(v) / len(v),
    confidence: float = 0.95,
    resamples: int = 2000,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap interval of `statistic` over `values` (resampled with replacement)."""
    if not values:
        return (math.nan, math.nan)
    rng = random.Random(seed)
    n = len(values)
    stats = sorted(statistic([values[rng.randrange(n)] for _ in range(n)]) for _ in range(resamples))
    tail = (1 - confidence) / 2
    low = stats[min(resamples - 1, max(0, int(math.floor(tail * resamples))))]
    high = stats[min(resamples - 1, max(0, int(math.ceil((1 - tail) * resamples)) - 1))]
    return (low, high)
