"""The monitor's settings: plain dataclasses whose fields are also the command-line flags.

Kept apart from the code that uses them so that building the `lmforge monitor` parser
imports no numpy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import LmforgeError
from ..options import option

METRICS = ("exact", "contains", "rougeL")


@dataclass
class DriftOptions:
    """How the drift monitor compares the latest questions with its reference."""

    window: int = option(200, help="questions in the sliding window compared with the reference")
    reference_size: int = option(200, help="questions that make the reference (the first ones fed, unless given)")
    check_every: int = option(50, help="test again after this many new questions")
    permutations: int = option(200, help="label shuffles for the MMD p-value")
    mmd_alpha: float = option(0.01, help="MMD alert when the permutation p-value is below this")
    clusters: int = option(8, help="k-means clusters of the reference that PSI compares")
    psi_threshold: float = option(0.25, help="PSI alert above this (0.1-0.25 is read as a moderate shift)")
    cooldown_seconds: float = option(600.0, help="after an alert, no new alert of the same test for this long")
    embedding_model: str = option("all-minilm-l6-v2", help="the sentence-embedding model for the questions")
    seed: int = option(0, help="seed of k-means and of the permutations")

    def __post_init__(self) -> None:
        for name in ("window", "reference_size", "check_every", "permutations", "clusters"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise LmforgeError(f"drift {name.replace('_', '-')} must be a positive integer, not {value!r}")
        if self.window < 4 or self.reference_size < 4:
            raise LmforgeError("drift window and reference need at least 4 questions each")
        if self.clusters > self.reference_size:
            raise LmforgeError(f"{self.clusters} clusters need at least as many reference questions "
                               f"(reference-size is {self.reference_size})")
        if not 0.0 < self.mmd_alpha < 1.0:
            raise LmforgeError(f"mmd-alpha must be between 0 and 1, not {self.mmd_alpha}")
        if 1.0 / (self.permutations + 1) >= self.mmd_alpha:
            raise LmforgeError(f"with {self.permutations} permutations the smallest MMD p-value is "
                               f"1/{self.permutations + 1}, never below mmd-alpha {self.mmd_alpha}: "
                               f"use at least {math.ceil(1 / self.mmd_alpha)} permutations")
        if self.psi_threshold <= 0 or self.cooldown_seconds < 0:
            raise LmforgeError("psi-threshold must be positive and cooldown-seconds not negative")


@dataclass
class GoldenOptions:
    """How a golden set is answered and scored, and what counts as a regression."""

    metric: str = option("contains", choices=METRICS, help="default metric for items with `expected`")
    pass_score: float = option(0.5, help="an item passes at this score or more")
    item_tolerance: float = option(0.2, help="an item also regresses when its score falls by more than this")
    confidence: float = option(0.95, help="confidence of the paired bootstrap interval of the mean change")
    resamples: int = option(2000, help="bootstrap resamples (and sign-flip permutations)")
    max_tokens: int = option(128, help="most tokens per answer")
    batch_size: int = option(8, help="questions a local model answers together (one scheduler batch)")
    temperature: float = option(0.0, help="sampling temperature (0: greedy, so reruns agree)")
    seed: int = option(0, help="seed of the bootstrap and of sampling")

    def __post_init__(self) -> None:
        if self.metric not in METRICS:
            raise LmforgeError(f"unknown golden metric {self.metric!r} (choose from {', '.join(METRICS)})")
        if not 0.0 <= self.pass_score <= 1.0 or not 0.0 <= self.item_tolerance <= 1.0:
            raise LmforgeError("pass-score and item-tolerance must be between 0 and 1")
        if not 0.0 < self.confidence < 1.0:
            raise LmforgeError(f"confidence must be between 0 and 1, not {self.confidence}")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise LmforgeError(f"batch-size must be a positive integer, not {self.batch_size!r}")
        if self.resamples < 100:
            raise LmforgeError("resamples must be at least 100")
