"""D3: exact and MinHash-LSH near-duplicate detection, with planted duplicates in real news text."""

from __future__ import annotations

import random

import numpy as np
import pytest

from lmforge.data.corpora import load_source
from lmforge.data.dedup import (ExactDeduplicator, MinHasher, NearDuplicateIndex, ParagraphDeduplicator,
                                candidate_probability, choose_bands, find_near_duplicates, jaccard, shingles)


@pytest.fixture(scope="module")
def news() -> list[str]:
    docs = [d.text for d in load_source("news")]
    # The corpus has a few real duplicates; keep one text of each so that ground truth is ours.
    repeats = find_near_duplicates(docs, threshold=0.5)
    return [t for i, t in enumerate(docs) if i not in repeats]


def _edit(text: str, rng: random.Random, replace_share: float) -> str:
    words = text.split()
    for i in rng.sample(range(len(words)), max(1, int(replace_share * len(words)))):
        words[i] = rng.choice(["river", "council", "market", "season", "report", "engine"])
    return " ".join(words) + " The story was updated later that day."


def test_planted_near_duplicates_precision_and_recall(news):
    rng = random.Random(0)
    originals = [t for t in news if len(t.split()) >= 150][:150]
    corpus = list(originals)
    source = {}  # index of a planted variant -> the original it was made from
    # Light edits (clear duplicates), edits near the threshold, and heavy edits (not duplicates).
    for k, share in [(k, 0.01) for k in range(40)] + [(k, 0.02) for k in range(40, 70)] + \
                    [(k, 0.25) for k in range(70, 100)]:
        source[len(corpus)] = k
        corpus.append(_edit(originals[k], rng, share))
    threshold = 0.8
    true_j = {i: jaccard(shingles(corpus[i]), shingles(originals[k])) for i, k in source.items()}
    # Scored: clear duplicates (J >= 0.85) and clear non-duplicates (J < 0.75). Pairs in
    # between sit within the MinHash estimate's noise of the threshold; reported, not scored.
    clear = {i for i, j in true_j.items() if j >= 0.85}
    unclear = {i for i, j in true_j.items() if 0.75 <= j < 0.85}
    assert len(clear) >= 40 and max(j for i, j in true_j.items() if source[i] >= 70) < 0.6

    found = find_near_duplicates(corpus, threshold=threshold)
    flagged = set(found)
    scored = flagged - unclear
    precision = len(scored & clear) / len(scored)
    recall = len(flagged & clear) / len(clear)
    print(f"planted near duplicates: precision {precision:.3f}, recall {recall:.3f} on {len(clear)} clear "
          f"duplicates and {len(source) - len(clear) - len(unclear)} non-duplicates; "
          f"{len(flagged & unclear)}/{len(unclear)} flagged in the 0.75-0.85 band")
    assert precision >= 0.95 and recall >= 0.95
    assert all(found[i] == source[i] for i in flagged & clear)  # matched to the right original


def test_minhash_estimates_jaccard(news):
    hasher = MinHasher(num_perm=256, seed=3)
    a, b = news[0], " ".join(news[0].split()[: len(news[0].split()) * 2 // 3]) + " " + news[1]
    true = jaccard(shingles(a), shingles(b))
    est = MinHasher.estimate_jaccard(hasher.signature(a), hasher.signature(b))
    assert abs(est - true) < 0.08  # standard error sqrt(J(1-J)/256) is about 0.03
    assert np.array_equal(hasher.signature(a), MinHasher(num_perm=256, seed=3).signature(a))  # reproducible


def test_banding_math():
    # P(candidate) = 1 - (1 - s^r)^b: a hand-computed point and the S-curve's shape.
    assert candidate_probability(0.8, 20, 5) == pytest.approx(1 - (1 - 0.8**5) ** 20)
    assert candidate_probability(0.5, 20, 5) < 0.5 < candidate_probability(0.7, 20, 5)
    bands, rows = choose_bands(128, 0.8)
    assert bands * rows <= 128
    assert (1 / bands) ** (1 / rows) == pytest.approx(0.8, abs=0.08)  # curve's knee near the threshold
    low_b, low_r = choose_bands(128, 0.3)
    assert low_r < rows  # a lower threshold needs fewer rows per band


def test_exact_dedup_ignores_case_punctuation_and_spacing():
    d = ExactDeduplicator()
    assert not d.seen("Hello, World!\n\nThis is a test.")
    assert d.seen("hello world this   is a TEST")
    assert not d.seen("hello world this is another test")
    assert d.duplicates == 1


def test_near_index_keeps_first_and_reports_it():
    index = NearDuplicateIndex(threshold=0.7, num_perm=64)
    base = "the quick brown fox jumps over the lazy dog near the river bank on a sunny day " * 3
    assert index.check("a", base) is None
    assert index.check("b", base.replace("sunny", "rainy", 1)) == "a"
    assert index.check("c", "completely different words about markets and prices today in the city") is None


def test_paragraph_dedup_removes_repeated_paragraphs_across_documents():
    notice = "This article was produced by the newsroom and may be republished with credit to the source."
    p = ParagraphDeduplicator(min_words=8)
    first = p.filter(f"Rain fell across the region for the third day running, flooding roads.\n\n{notice}")
    second = p.filter(f"Markets rose on Tuesday after a week of losses in the mining sector.\n\n{notice}")
    assert notice in first and notice not in second
    assert "Markets rose" in second and p.paragraphs_removed == 1
