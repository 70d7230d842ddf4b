"""Sampling: each truncation keeps exactly the tokens it should; penalties and seeds behave."""

from __future__ import annotations

import math

import pytest
import torch

from lmforge.errors import LmforgeError
from lmforge.infer.sampling import SamplingParams, apply_repetition_penalty, draw, sample_next, truncate

# probabilities 0.5, 0.25, 0.15, 0.07, 0.03 (as logits)
PROBS = torch.tensor([0.5, 0.25, 0.15, 0.07, 0.03])
LOGITS = PROBS.log()


def kept(logits: torch.Tensor) -> list[int]:
    return torch.nonzero(torch.isfinite(logits)).flatten().tolist()


def test_top_k_keeps_k_most_likely():
    assert kept(truncate(LOGITS, top_k=2, top_p=1.0, min_p=0.0)) == [0, 1]
    assert kept(truncate(LOGITS, top_k=0, top_p=1.0, min_p=0.0)) == [0, 1, 2, 3, 4]


@pytest.mark.parametrize(
    "top_p, expected",
    [(0.5, [0]), (0.6, [0, 1]), (0.75, [0, 1]), (0.76, [0, 1, 2]), (0.9, [0, 1, 2]), (0.95, [0, 1, 2, 3]), (0.01, [0])],
)
def test_top_p_keeps_smallest_set_reaching_mass(top_p, expected):
    assert kept(truncate(LOGITS, top_k=0, top_p=top_p, min_p=0.0)) == expected


def test_top_p_is_order_independent():
    perm = torch.tensor([3, 0, 4, 2, 1])
    out = truncate(LOGITS[perm], top_k=0, top_p=0.76, min_p=0.0)
    assert sorted(perm[kept(out)].tolist()) == [0, 1, 2]


def test_min_p_is_relative_to_top_probability():
    # threshold 0.3 * 0.5 = 0.15: keeps 0.5, 0.25, 0.15
    assert kept(truncate(LOGITS, top_k=0, top_p=1.0, min_p=0.3)) == [0, 1, 2]
    assert kept(truncate(LOGITS, top_k=0, top_p=1.0, min_p=0.31)) == [0, 1]


def test_repetition_penalty_divides_positive_and_multiplies_negative():
    logits = torch.tensor([2.0, -1.0, 0.5, 3.0])
    out = apply_repetition_penalty(logits, torch.tensor([0, 1, 1]), 2.0)
    assert out.tolist() == [1.0, -2.0, 0.5, 3.0]


def test_greedy_ignores_seed_and_temperature_scaling():
    p = SamplingParams(temperature=0)
    assert sample_next(LOGITS, p, torch.empty(0, dtype=torch.long), None) == 0


def test_sampling_frequencies_follow_temperature():
    """At temperature 1 draws follow the distribution; at 0.5 they sharpen to p^2 normalised."""
    draws = 4000
    for temperature, target in ((1.0, PROBS), (0.5, PROBS**2 / (PROBS**2).sum())):
        p = SamplingParams(temperature=temperature, seed=0)
        g = p.make_generator()
        counts = torch.zeros(5)
        for _ in range(draws):
            counts[sample_next(LOGITS, p, torch.empty(0, dtype=torch.long), g)] += 1
        freq = counts / draws
        # 4 standard errors of a binomial proportion at the largest p.
        assert (freq - target).abs().max() < 4 * math.sqrt(0.25 / draws)


def test_draw_never_picks_zero_probability_tokens_and_matches_frequencies():
    probs = torch.tensor([0.0, 0.2, 0.0, 0.0, 0.5, 0.3, 0.0])
    g = torch.Generator().manual_seed(5)
    counts = torch.zeros(7)
    draws = 4000
    for _ in range(draws):
        counts[draw(probs, g)] += 1
    assert counts[[0, 2, 3, 6]].sum() == 0
    assert (counts / draws - probs).abs().max() < 4 * math.sqrt(0.25 / draws)
    # A distribution whose mass sits only on the last token.
    assert draw(torch.tensor([0.0, 0.0, 1.0]), g) == 2


def test_seed_reproducible():
    p = SamplingParams(temperature=1.0, seed=123)
    a = [sample_next(LOGITS, p, torch.empty(0, dtype=torch.long), g) for g in [p.make_generator()] for _ in range(50)]
    b = [sample_next(LOGITS, p, torch.empty(0, dtype=torch.long), g) for g in [p.make_generator()] for _ in range(50)]
    assert a == b


@pytest.mark.parametrize(
    "kwargs", [dict(max_tokens=0), dict(temperature=-0.1), dict(top_p=1.5), dict(min_p=2), dict(top_k=-1),
               dict(repetition_penalty=0), dict(stop=[""])],
)
def test_invalid_params_rejected(kwargs):
    with pytest.raises(LmforgeError):
        SamplingParams(**kwargs)


def test_stop_string_as_single_string():
    assert SamplingParams(stop="\n").stop == ["\n"]


def test_presence_and_frequency_penalties_are_additive():
    from lmforge.infer.sampling import apply_presence_frequency

    logits = torch.tensor([1.0, 1.0, 1.0])
    counts = torch.tensor([0, 1, 3])
    out = apply_presence_frequency(logits, counts, presence=0.5, frequency=0.25)
    assert out.tolist() == [1.0, 1.0 - 0.5 - 0.25, 1.0 - 0.5 - 0.75]


def test_top_p_smaller_than_float32_keeps_the_top_token():
    """Found by fuzzing the server: top_p=1e-110 is 0 in float32 and must not mask everything."""
    out = truncate(LOGITS, top_k=0, top_p=1e-110, min_p=0.0)
    assert kept(out) == [0]


def test_greedy_takes_the_largest_finite_logit_around_nan_and_inf():
    """The greedy shortcut (one arg-max) agrees with the full path where NaN and +inf appear."""
    params = SamplingParams(temperature=0)
    empty = torch.empty(0, dtype=torch.long)
    cases = {
        (0.5, 2.0, -1.0, 1.0): 1,
        (0.5, float("nan"), 3.0, 1.0): 2,  # NaN is impossible, not the largest
        (0.5, float("inf"), 3.0, float("inf")): 1,  # +inf becomes the largest float: the first wins
        (float("nan"), float("inf"), 3.0, 1.0): 1,
    }
    for row, expected in cases.items():
        assert sample_next(torch.tensor(row), params, empty, None) == expected
    penalized = SamplingParams(temperature=0, repetition_penalty=2.0)
    assert sample_next(torch.tensor((0.5, 2.0, 1.5, 1.0)), penalized, torch.tensor([1]), None) == 2


def _one_by_one(logits: torch.Tensor, params: SamplingParams, generator) -> int:
    """The pipeline of the module docstring written out for one row: penalties (none here), the
    clean-up, temperature, truncation, a draw."""
    from lmforge.infer.sampling import penalized_logits, sampling_distribution

    cleaned = penalized_logits(logits, params, torch.empty(0, dtype=torch.long))
    if params.greedy:
        return int(cleaned.argmax())
    return draw(sampling_distribution(cleaned, params), generator)


def test_rows_sampled_together_take_each_rows_own_token_and_draw():
    """`sample_rows` (several rows in a few batched passes) chooses exactly the token each row's own
    pipeline chooses from the same generator state, leaves its generator in the same state, and
    hands back (None) the rows it must not take: truncations, penalties, NaN or +inf logits."""
    from lmforge.infer.sampling import sample_rows

    torch.manual_seed(0)
    vocab, same, given_back = 5000, 0, 0
    for trial in range(40):
        rows = 2 + trial % 7
        logits = torch.randn(rows, vocab) * (1 + trial % 5) * 2
        logits[0, :50] = float("-inf")  # masked tokens stay impossible
        if trial % 3 == 0:
            logits[-1, 7] = float("nan")
        if trial % 4 == 0:
            logits[rows // 2, 3] = float("inf")
        temperatures = [0.0, 0.3, 0.7, 1.0, 1.5, 1e-3]
        params = [SamplingParams(temperature=temperatures[(trial + i) % 6], seed=100 * trial + i,
                                 top_k=5 if (trial + i) % 11 == 0 else 0) for i in range(rows)]
        together = [p.make_generator() for p in params]
        alone = [p.make_generator() for p in params]
        picked = sample_rows(logits, params, together)
        for i, p in enumerate(params):
            if picked[i] is None:
                given_back += 1
                scaled = logits[i].max() if p.greedy else logits[i].max() / p.temperature
                assert p.top_k or not torch.isfinite(scaled)
                continue
            assert picked[i] == _one_by_one(logits[i], p, alone[i])
            assert logits[i, picked[i]] > float("-inf")
            same += 1
            if together[i] is not None:
                assert torch.equal(torch.rand(4, generator=together[i]), torch.rand(4, generator=alone[i]))
    assert same > 150 and given_back > 10


def test_choose_rows_equals_each_states_choose():
    """The scheduler's batched choice (DecodeState.choose_rows) against `choose` row by row, with
    greedy, sampled, truncated, penalized and log-prob rows in one batch."""
    from lmforge.infer.request import DecodeState

    torch.manual_seed(1)
    vocab = 300
    settings = [dict(temperature=0.0), dict(temperature=0.8, seed=1), dict(temperature=1.2, seed=2, logprobs=3),
                dict(temperature=0.9, seed=3, top_p=0.9), dict(temperature=0.7, seed=4, repetition_penalty=1.3),
                dict(temperature=0.0, logprobs=0), dict(temperature=0.6, seed=5)]

    def states() -> list[DecodeState]:
        return [DecodeState([5, 6, 7], SamplingParams(max_tokens=8, **kw), 8, None, [], "cpu", vocab)
                for kw in settings]

    batched, single = states(), states()
    for _ in range(6):
        logits = torch.randn(len(settings), vocab) * 3
        tokens = DecodeState.choose_rows(batched, logits)
        assert tokens == [s.choose(logits[i]) for i, s in enumerate(single)]
        for a, b, t in zip(batched, single, tokens):
            assert a._pending_logprobs == b._pending_logprobs
            a.append(t)
            b.append(t)
