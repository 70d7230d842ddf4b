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


QUANTIZE_METHODS = ("rtn", "gptq", "awq")
QUANTIZE_BITS = (4, 8)


@dataclass
class QuantizeOptions:
    """How `lmforge quantize` rounds a model's weights onto a GGUF block grid (lmforge/infer/quantize.py)."""

    out: str = option(help="the GGUF file to write (.gguf)")
    method: str = option("gptq", choices=QUANTIZE_METHODS,
                         help="rtn (round to nearest) | gptq (Hessian-aware error feedback) | awq "
                              "(activation-aware channel scales folded into the model, then round to nearest)")
    bits: int = option(4, help="4: the block linears in Q4_0 (the vocabulary head in Q8_0); 8: everything in Q8_0")
    overwrite: bool = option(False, help="replace OUT if it exists")
    tokenizer: bool = option(True, help="write the tokenizer into the file's metadata (--no-tokenizer: weights only)")
    calibration: str = option("wiki", help="gptq/awq calibration text: a corpus name (wiki, news) or a file; "
                                           "its training side (the documents a held-out perplexity leaves out)")
    calibration_sequences: int = option(32, help="calibration rows (gptq, awq)")
    calibration_length: int = option(512, help="tokens per calibration row")
    damp: float = option(0.01, help="gptq: share of the Hessian's mean diagonal added to its diagonal")
    block_size: int = option(128, help="gptq: columns per lazy batch of error updates (a multiple of 32)")
    act_order: bool = option(False, help="gptq: quantize the columns in order of decreasing Hessian diagonal "
                                         "(the block scales stay those of the file's blocks of 32)")
    awq_grid: int = option(20, help="awq: alpha values tried per layer group (alpha = 0, 1/N, ..., (N-1)/N; "
                                    "0 is plain rounding)")

    def __post_init__(self) -> None:
        if self.method not in QUANTIZE_METHODS:
            raise LmforgeError(f"unknown quantization method {self.method!r}; choose one of "
                               f"{', '.join(QUANTIZE_METHODS)}")
        if self.bits not in QUANTIZE_BITS:
            raise LmforgeError(f"--bits {self.bits} has no GGUF block type here; use 4 (Q4_0) or 8 (Q8_0)")
        if not str(self.out).lower().endswith(".gguf"):
            raise LmforgeError(f"{self.out}: the output is a GGUF file, its name ends in .gguf")
        for name in ("calibration_sequences", "calibration_length", "awq_grid"):
            if getattr(self, name) < 1:
                raise LmforgeError(f"--{name.replace('_', '-')} must be at least 1")
        if not 0 <= self.damp < 1:
            raise LmforgeError(f"--damp must be in [0, 1), got {self.damp}")
        if self.block_size < 32 or self.block_size % 32:
            raise LmforgeError(f"--block-size must be a positive multiple of 32, got {self.block_size}")

    @property
    def needs_calibration(self) -> bool:
        return self.method != "rtn"
