"""The guard classifiers' settings (recipe sections), apart from the code so that reading a
recipe or building the command line imports no numerical library."""

from __future__ import annotations

from dataclasses import dataclass

from lmforge.errors import LmforgeError

FEATURES = ("both", "embedding", "hashing")


@dataclass
class FeatureSpec:
    kind: str = "both"  # both (embedding and hashing side by side) | embedding | hashing
    model: str = "all-minilm-l6-v2"  # embedding: a registered name or a sentence-transformers directory
    buckets: int = 4096  # hashing: feature dimension
    ngram_min: int = 3  # hashing: character n-gram lengths
    ngram_max: int = 5
    batch_size: int = 32

    def validate(self) -> None:
        if self.kind not in FEATURES:
            raise LmforgeError(f"features must be one of {', '.join(FEATURES)}, got {self.kind!r}")
        if self.buckets < 16 or not 1 <= self.ngram_min <= self.ngram_max:
            raise LmforgeError("hashing features need buckets >= 16 and 1 <= ngram_min <= ngram_max")


@dataclass
class HeadSpec:
    epochs: int = 300  # full-batch steps
    lr: float = 0.02
    weight_decay: float = 0.1
    balanced: bool = True  # class weights n / (C n_c)
    seed: int = 0
