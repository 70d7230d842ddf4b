"""T5 span corruption: counts, structure, reconstruction and the span-length statistics."""

from __future__ import annotations

import numpy as np
import pytest

from lmforge.data.span_corruption import SpanCorruption, noise_mask, span_corrupt, t5_sentinels
from lmforge.errors import LmforgeError

EOS = 1
SENTINELS = t5_sentinels(1000, 100)


def _spans(mask: np.ndarray) -> list[int]:
    runs, current = [], 0
    for flag in mask:
        if flag:
            current += 1
        elif current:
            runs.append(current)
            current = 0
    return runs + ([current] if current else [])


def test_noise_counts_follow_t5s_rounding():
    rng = np.random.default_rng(0)
    for length in (10, 20, 57, 100, 512):
        mask = noise_mask(length, rng)
        noise = min(max(round(length * 0.15), 1), length - 1)
        assert int(mask.sum()) == noise
        assert len(_spans(mask)) == max(round(noise / 3), 1)
        assert not mask[0]  # the sequence starts with kept text


def test_input_and_target_rebuild_the_original_and_use_sentinels_in_order():
    config = SpanCorruption(SENTINELS, EOS)
    ids = list(range(10, 110))
    inputs, targets = span_corrupt(ids, np.random.default_rng(3), config)
    assert inputs[-1] == EOS and targets[-1] == EOS
    used = [t for t in inputs if t in SENTINELS]
    assert used == SENTINELS[:len(used)] == [t for t in targets if t in SENTINELS]
    assert len(used) == 5  # 15 noise tokens in spans of mean length 3
    # filling each sentinel of the input with the tokens after it in the target gives the text back
    fill, current = {}, None
    for t in targets[:-1]:
        if t in SENTINELS:
            current = t
            fill[t] = []
        else:
            fill[current].append(t)
    rebuilt = [x for t in inputs[:-1] for x in (fill[t] if t in SENTINELS else [t])]
    assert rebuilt == ids
    assert len(inputs) == 100 - 15 + 5 + 1 and len(targets) == 15 + 5 + 1


def test_a_small_hand_example():
    config = SpanCorruption([99, 98], EOS, noise_density=0.3, mean_span_length=1.5)
    inputs, targets = span_corrupt([11, 12, 13, 14, 15, 16, 17, 18, 19, 20], np.random.default_rng(0), config)
    # 3 noise tokens in 2 spans, so 2 sentinels; 7 kept tokens
    assert inputs.count(99) == 1 and inputs.count(98) == 1 and len(inputs) == 7 + 2 + 1
    assert targets[0] == 99 and len(targets) == 3 + 2 + 1


def test_mean_span_length_and_density_over_many_sequences():
    rng = np.random.default_rng(1)
    spans, noise, total = [], 0, 0
    for _ in range(300):
        mask = noise_mask(200, rng)
        spans += _spans(mask)
        noise += int(mask.sum())
        total += 200
    assert noise / total == pytest.approx(0.15)
    assert np.mean(spans) == pytest.approx(3.0, abs=0.05)
    assert min(spans) >= 1


def test_seeded_and_errors():
    config = SpanCorruption(SENTINELS, EOS)
    ids = list(range(50))
    assert span_corrupt(ids, np.random.default_rng(7), config) == config(ids, np.random.default_rng(7))
    assert noise_mask(2, np.random.default_rng(0)).tolist() == [False, True]
    with pytest.raises(LmforgeError, match="at least 2"):
        noise_mask(1, np.random.default_rng(0))
    with pytest.raises(LmforgeError, match="noise_density"):
        SpanCorruption(SENTINELS, EOS, noise_density=1.5)
    with pytest.raises(LmforgeError, match="sentinel"):
        span_corrupt(list(range(100)), np.random.default_rng(0), SpanCorruption([5], EOS))
