"""The Kneser-Ney n-gram model: normalisation, hand-computed values, nltk where the definitions coincide."""

from __future__ import annotations

import math

import numpy as np
import pytest

from lmforge.errors import LmforgeError
from lmforge.model.ngram import NGramLM, modified_kn_discounts


def random_corpus(seed=0, vocab=20, n=30):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, size=rng.integers(1, 40)) for _ in range(n)]


@pytest.mark.parametrize("order", [1, 2, 3, 5])
def test_distributions_sum_to_one_for_seen_and_unseen_contexts(order):
    corpus = random_corpus()
    model = NGramLM(order, vocab_size=25).fit(corpus)
    contexts = [[], [3], list(corpus[0][:6]), [24, 24, 24, 24], [22, 3, 4], list(corpus[5][-4:])]
    for context in contexts:
        p = model.next_distribution(context)
        assert p.shape == (25,)
        assert p.min() > 0  # the uniform floor reaches ids never seen (20..24)
        assert abs(p.sum() - 1.0) < 1e-12
        for token in (0, 7, 24):
            assert model.logprob(context, token) == pytest.approx(math.log(p[token]), abs=1e-12)


def test_vectorised_scores_equal_one_query_at_a_time():
    corpus = random_corpus(1)
    model = NGramLM(4, vocab_size=25).fit(corpus[:20])
    held_out = corpus[25]
    fast = model.token_logprobs(held_out)
    slow = [model.logprob(list(held_out[:t]), int(held_out[t])) for t in range(1, len(held_out))]
    np.testing.assert_allclose(fast, slow, rtol=0, atol=1e-12)
    assert model.token_logprobs(held_out, first=0)[0] == pytest.approx(model.logprob([], int(held_out[0])))
    ppl = model.perplexity([held_out])
    assert ppl["tokens"] == len(held_out) - 1
    assert ppl["perplexity"] == pytest.approx(math.exp(-np.mean(slow)))


def test_hand_computed_bigram_values():
    # a=0 b=1 c=2, id 3 unused; one discount 0.5 everywhere.
    model = NGramLM(2, vocab_size=4, discounts=0.5).fit([[0, 1, 0, 2], [0, 1]])
    # Unigram continuation counts N1+(. w): a after b, b after a, c after a -> 1 each of 3 bigram types.
    # P1(w) = (1 - 0.5)/3 + (0.5 * 3 / 3) * 1/4 = 7/24 for a, b, c and 3/24 for the unused id.
    np.testing.assert_allclose(model.next_distribution([]), [7 / 24, 7 / 24, 7 / 24, 3 / 24], atol=1e-15)
    # After a: c(ab)=2, c(ac)=1, total 3, gamma = 0.5 * 2 / 3.
    np.testing.assert_allclose(model.next_distribution([0]), [7 / 72, 43 / 72, 19 / 72, 3 / 72], atol=1e-15)
    assert model.logprob([0], 1) == pytest.approx(math.log(43 / 72))
    # After b: c(ba)=1, gamma = 0.5.
    assert math.exp(model.logprob([1], 0)) == pytest.approx(0.5 + 0.5 * 7 / 24)
    # c never starts a bigram: its context hands everything to the unigram.
    np.testing.assert_allclose(model.next_distribution([2]), model.next_distribution([]))


def test_modified_discounts_from_count_of_counts():
    counts = np.array([1, 1, 1, 1, 2, 2, 3, 4, 9])  # n1=4 n2=2 n3=1 n4=1 -> Y = 4/8
    d1, d2, d3 = modified_kn_discounts(counts)
    assert (d1, d2, d3) == pytest.approx((1 - 2 * 0.5 * 2 / 4, 2 - 3 * 0.5 * 1 / 2, 3 - 4 * 0.5 * 1 / 1))
    model = NGramLM(3).fit(random_corpus(2, vocab=8, n=60))
    for (a, b, c) in model.describe()["discounts"]:
        assert 0 <= a <= 1 and 0 <= b <= 2 and 0 <= c <= 3


def test_continuation_counts_drive_the_lower_order():
    # "x" is frequent but always follows "s"; "y" is rare but follows many tokens.
    s, x, y = 0, 1, 2
    corpus = [[s, x]] * 10 + [[t, y] for t in (3, 4, 5, 6)]
    model = NGramLM(2, vocab_size=8, discounts=0.75).fit(corpus)
    unigram = model.next_distribution([])
    assert unigram[y] > unigram[x]  # a raw unigram would say the opposite (10 vs 4)
    after_unseen = model.next_distribution([7])
    assert after_unseen[y] > after_unseen[x]


def test_nltk_kneser_ney_interpolated_where_definitions_coincide():
    from nltk.lm import KneserNeyInterpolated
    from nltk.lm.preprocessing import padded_everygram_pipeline, pad_both_ends

    sentences = [["the", "cat", "sat"], ["the", "dog", "sat"], ["a", "cat", "ran"], ["the", "cat", "ran", "far"]]
    train, vocab = padded_everygram_pipeline(3, sentences)
    reference = KneserNeyInterpolated(3, discount=0.1)
    reference.fit(train, vocab)
    symbols = sorted({w for s in sentences for w in pad_both_ends(s, 3)})
    ids = {w: i for i, w in enumerate(symbols)}
    # nltk: one discount at orders 2 and 3, none at the unigram, which is not interpolated with a uniform
    # distribution; with the unigram discount at 0 the uniform term vanishes here too.
    model = NGramLM(3, vocab_size=len(symbols), discounts=[(0, 0, 0), (0.1,) * 3, (0.1,) * 3])
    model.fit([[ids[w] for w in pad_both_ends(s, 3)] for s in sentences])
    compared = 0
    for u in symbols:
        for v in symbols:
            if v == "<s>":
                continue
            ours = model.next_distribution([ids[u], ids[v]])
            for w in symbols:
                assert ours[ids[w]] == pytest.approx(reference.unmasked_score(w, (u, v)), abs=1e-12)
                compared += 1
    assert compared == len(symbols) ** 2 * (len(symbols) - 1)
    # Where they differ: after "<s>", nltk's back-off weight counts the distinct tokens seen after
    # "<s>" in raw bigrams (including "<s>" itself, from the padding), while its numerator uses
    # continuation counts, so its distribution there sums to more than one; ours counts the same
    # continuation types in both and stays normalised.
    nltk_total = sum(reference.unmasked_score(w, ("cat", "<s>")) for w in symbols)
    assert nltk_total > 1.0 + 1e-6
    assert model.next_distribution([ids["cat"], ids["<s>"]]).sum() == pytest.approx(1.0, abs=1e-12)


def test_save_load_round_trip(tmp_path):
    model = NGramLM(3, vocab_size=25).fit(random_corpus(3))
    path = model.save(tmp_path / "lm.safetensors")
    loaded = NGramLM.load(path)
    assert loaded.describe() == model.describe()
    seq = random_corpus(4)[0]
    np.testing.assert_array_equal(loaded.token_logprobs(seq), model.token_logprobs(seq))
    assert not list(tmp_path.glob(".*"))  # no temporary file left behind
    (tmp_path / "bad.safetensors").write_bytes(b"not a model")
    with pytest.raises(LmforgeError, match="cannot read"):
        NGramLM.load(tmp_path / "bad.safetensors")
    with pytest.raises(LmforgeError, match="no n-gram model"):
        NGramLM.load(tmp_path / "missing.safetensors")


def test_generation_follows_the_counts():
    model = NGramLM(3, vocab_size=6).fit([[0, 1, 2, 3, 4, 5] * 20])
    assert model.generate([0, 1], max_tokens=6, temperature=0) == [2, 3, 4, 5, 0, 1]
    sampled = model.generate([0], max_tokens=50, seed=1)
    assert len(sampled) == 50 and all(0 <= t < 6 for t in sampled)
    assert model.generate([0, 1], max_tokens=10, temperature=0, stop_ids=[4]) == [2, 3, 4]


def test_errors_a_user_can_cause():
    with pytest.raises(LmforgeError, match="at least 1"):
        NGramLM(0)
    with pytest.raises(LmforgeError, match="outside the vocabulary"):
        NGramLM(2, vocab_size=3).fit([[0, 5]])
    with pytest.raises(LmforgeError, match="not been fitted"):
        NGramLM(2).next_distribution([1])
    with pytest.raises(LmforgeError, match="non-empty"):
        NGramLM(2).fit([[]])
    with pytest.raises(LmforgeError, match="within"):
        NGramLM(2, discounts=1.5).fit([[0, 1, 2]])
