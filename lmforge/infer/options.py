"""Option dataclasses of the inference layer's commands, kept free of PyTorch.

The command line is built from these fields (`lmforge --help` must stay fast), so this
module imports nothing heavy; the code that uses them lives beside it (prune.py).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import LmforgeError
from ..options import option

METHODS = ("magnitude", "wanda", "nm", "channels", "heads")


@dataclass
class PruneOptions:
    """What to prune and how much."""

    method: str = option("wanda", choices=METHODS,
                         help="magnitude | wanda (unstructured) | nm (n:m semi-structured) | channels (MLP) | "
                              "heads (KV head groups): the last two make a smaller dense model")
    sparsity: float = option(0.5, help="share of the weights (unstructured) or of the MLP channels / head groups "
                                       "(structured) to remove; n:m pruning removes n/m")
    n: int = option(2, help="n:m pruning: weights zeroed in every group of m")
    m: int = option(4, help="n:m pruning: group size along each row's inputs")
    calibration_tokens: int = option(4096, help="tokens of calibration text whose activations score the weights "
                                                "(wanda, nm, channels, heads)")

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise LmforgeError(f"unknown pruning method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.method != "nm" and not 0 <= self.sparsity < 1:
            raise LmforgeError(f"--sparsity must be in [0, 1), got {self.sparsity}")
        if self.method == "nm" and not 0 < self.n < self.m:
            raise LmforgeError(f"n:m pruning needs 0 < n < m, got {self.n}:{self.m}")
        if self.calibration_tokens < 1:
            raise LmforgeError("--calibration-tokens must be at least 1")

    @property
    def needs_calibration(self) -> bool:
        return self.method != "magnitude"
