"""T5's span-corruption objective (P1) as a data transform: text ids -> (encoder input, decoder target).

A causal LM predicts every next token; BERT masks single tokens. T5 instead drops *spans*:
about 15% of the tokens (``noise_density``), grouped in spans of mean length 3
(``mean_span_length``), are cut out of the input, each span replaced by one sentinel token;
the target lists each sentinel followed by the tokens it hides, then EOS::

    ids:     The  quick brown fox  jumps over the  lazy dog
    input:   The  <X>   fox  jumps over  <Y>  dog  </s>
    target:  <X>  quick brown <Y>  the   lazy </s>

Both sides are much shorter than with masked LM (no loss on the ~85% of kept tokens, and the
hidden tokens appear once), which made it the cheapest objective in the T5 paper's comparison.

How the spans are placed (as in T5): the number of noise tokens is round(length x density),
kept between 1 and length - 1; the number of spans is round(noise / mean_span_length), at
least 1. The noise tokens and the kept tokens are each cut into that many non-empty runs at
uniformly random places, and the runs alternate kept, noise, kept, noise, ... so the sequence
always starts with kept text and every span is separated from the next.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from lmforge.errors import LmforgeError


@dataclass
class SpanCorruption:
    """The objective's settings: sentinel ids in the order they are used (T5: <extra_id_0>,
    <extra_id_1>, ... which are the highest ids counting down) and the EOS id."""

    sentinel_ids: Sequence[int]
    eos_id: int
    noise_density: float = 0.15
    mean_span_length: float = 3.0

    def __post_init__(self) -> None:
        if not 0.0 < self.noise_density < 1.0:
            raise LmforgeError(f"noise_density must be in (0, 1), got {self.noise_density}")
        if self.mean_span_length < 1.0:
            raise LmforgeError(f"mean_span_length must be at least 1, got {self.mean_span_length}")
        if not self.sentinel_ids:
            raise LmforgeError("span corruption needs at least one sentinel token id")

    def __call__(self, ids: Sequence[int], rng: np.random.Generator) -> tuple[list[int], list[int]]:
        return span_corrupt(ids, rng, self)


def _random_segmentation(total: int, parts: int, rng: np.random.Generator) -> np.ndarray:
    """`total` items cut into `parts` non-empty runs at uniformly random cut points: the run lengths."""
    cuts = np.sort(rng.choice(np.arange(1, total), size=parts - 1, replace=False)) if parts > 1 else np.array([], int)
    return np.diff(np.concatenate([[0], cuts, [total]]))


def noise_mask(length: int, rng: np.random.Generator, noise_density: float = 0.15,
               mean_span_length: float = 3.0) -> np.ndarray:
    """Boolean [length]: True where a token is cut out (see the module docstring)."""
    if length < 2:
        raise LmforgeError("span corruption needs sequences of at least 2 tokens")
    noise = min(max(int(round(length * noise_density)), 1), length - 1)
    spans = max(int(round(noise / mean_span_length)), 1)
    spans = min(spans, noise, length - noise)  # every run non-empty
    noise_runs = _random_segmentation(noise, spans, rng)
    kept_runs = _random_segmentation(length - noise, spans, rng)
    mask = np.zeros(length, dtype=bool)
    position = 0
    for kept, hidden in zip(kept_runs, noise_runs):
        position += int(kept)
        mask[position:position + int(hidden)] = True
        position += int(hidden)
    return mask


def span_corrupt(ids: Sequence[int], rng: np.random.Generator, config: SpanCorruption) -> tuple[list[int], list[int]]:
    """(input ids, target ids) of one sequence; both end in EOS."""
    mask = noise_mask(len(ids), rng, config.noise_density, config.mean_span_length)
    inputs: list[int] = []
    targets: list[int] = []
    span = -1
    for i, token in enumerate(ids):
        if mask[i]:
            if i == 0 or not mask[i - 1]:
                span += 1
                if span >= len(config.sentinel_ids):
                    raise LmforgeError(f"{span + 1} spans need more than the {len(config.sentinel_ids)} sentinel ids")
                inputs.append(config.sentinel_ids[span])
                targets.append(config.sentinel_ids[span])
            targets.append(int(token))
        else:
            inputs.append(int(token))
    return inputs + [config.eos_id], targets + [config.eos_id]


def t5_sentinels(vocab_size: int, count: int = 100) -> list[int]:
    """T5's sentinel ids: <extra_id_0> is the last id of the vocabulary, <extra_id_1> the one before, ..."""
    return [vocab_size - 1 - i for i in range(count)]
