"""Text metrics (E2): ROUGE equals rouge-score, BLEU/chrF equal sacrebleu, METEOR by hand, CJK."""

from __future__ import annotations

import inspect
import random
import re
from pathlib import Path

import pytest

from lmforge.errors import LmforgeError
from lmforge.eval.metrics import compute_metrics
from lmforge.eval.metrics.meteor import meteor, meteor_corpus, meteor_tokens, meteor_words
from lmforge.eval.metrics.rouge import rouge, rouge_corpus
from lmforge.eval.metrics.sacre import bleu, chrf
from lmforge.eval.metrics.text import words

ROOT = Path(__file__).resolve().parents[1]
ROUGE_TYPES = ["rouge1", "rouge2", "rouge3", "rougeL", "rougeLsum"]
SWAPS = {"license": "licence", "work": "works", "use": "using", "software": "program", "the": "a",
         "shall": "will", "any": "every", "file": "files", "returns": "returned", "object": "objects",
         "contributor": "contributors", "including": "includes", "provided": "providing", "data": "dataset"}


def real_sentences() -> list[str]:
    """Sentences of real English: the Apache license of this repository and standard library docstrings."""
    import argparse
    import collections
    import functools
    import json
    import pathlib
    import subprocess
    import textwrap

    text = (ROOT / "LICENSE").read_text(encoding="utf-8")
    for module in (json, collections, functools, textwrap, argparse, subprocess, pathlib, random):
        text += "\n" + (inspect.getdoc(module) or "")
        for name, member in sorted(vars(module).items()):
            if not name.startswith("_") and callable(member) and getattr(member, "__module__", "") == module.__name__:
                text += "\n" + (inspect.getdoc(member) or "")
    flat = re.sub(r"\s+", " ", text)
    return [s.strip() for s in re.split(r"(?<=[.;:])\s+", flat) if 6 <= len(s.split()) <= 60]


def edit(sentence: str, rng: random.Random) -> str:
    """A paraphrase-like edit: drop, repeat, swap, substitute or inflect some words."""
    tokens = sentence.split()
    for _ in range(rng.randint(1, 5)):
        i = rng.randrange(len(tokens))
        op = rng.choice(["drop", "repeat", "swap", "substitute", "inflect", "case"])
        if op == "drop" and len(tokens) > 3:
            del tokens[i]
        elif op == "repeat":
            tokens.insert(i, tokens[i])
        elif op == "swap" and i + 1 < len(tokens):
            tokens[i], tokens[i + 1] = tokens[i + 1], tokens[i]
        elif op == "substitute":
            word = tokens[i].lower().strip(".,;:()\"'")
            tokens[i] = SWAPS.get(word, rng.choice(["Software", "Licensor", "value", "returned", "running"]))
        elif op == "inflect":
            tokens[i] = tokens[i] + rng.choice(["s", "ing", "ed", "ly", "ation"])
        else:
            tokens[i] = tokens[i].upper()
    return " ".join(tokens)


@pytest.fixture(scope="module")
def pairs() -> list[tuple[str, str]]:
    rng = random.Random(1234)
    sentences = real_sentences()
    assert len(sentences) > 150
    out = [(edit(s, rng), s) for s in sentences[:160]]
    for _ in range(40):  # multi-sentence summaries, one sentence per line, for ROUGE-Lsum
        start = rng.randrange(len(sentences) - 6)
        reference = sentences[start : start + rng.randint(2, 5)]
        prediction = [edit(s, rng) for s in reference if rng.random() < 0.8] or [edit(reference[0], rng)]
        rng.shuffle(prediction)
        if rng.random() < 0.5:
            prediction.append(rng.choice(sentences))
        out.append(("\n".join(prediction), "\n".join(reference)))
    out += [("", "the reference"), ("the prediction", ""), ("...", "!!!"), ("same words here", "same words here")]
    return out


@pytest.mark.parametrize("use_stemmer", [False, True])
def test_rouge_equals_rouge_score(pairs, use_stemmer):
    from rouge_score import rouge_scorer

    reference_scorer = rouge_scorer.RougeScorer(ROUGE_TYPES, use_stemmer=use_stemmer)
    worst = 0.0
    for prediction, reference in pairs:
        theirs = reference_scorer.score(reference, prediction)
        ours = rouge(prediction, reference, ROUGE_TYPES, use_stemmer=use_stemmer)
        for kind in ROUGE_TYPES:
            for field in ("precision", "recall", "fmeasure"):
                worst = max(worst, abs(getattr(ours[kind], field) - getattr(theirs[kind], field)))
    assert worst < 1e-9
    assert sum(rouge(p, r)["rouge2"].fmeasure > 0 for p, r in pairs) > 150  # the pairs overlap partly


def test_rouge_multi_reference_takes_the_best_f(pairs):
    from rouge_score import rouge_scorer

    reference_scorer = rouge_scorer.RougeScorer(ROUGE_TYPES, use_stemmer=True)
    for k in range(0, 60, 3):
        prediction, refs = pairs[k][0], [pairs[k + 1][1], pairs[k][1], pairs[k + 2][1]]
        theirs = reference_scorer.score_multi(refs, prediction)
        ours = rouge(prediction, refs, ROUGE_TYPES, use_stemmer=True)
        for kind in ROUGE_TYPES:
            assert ours[kind].fmeasure == pytest.approx(theirs[kind].fmeasure, abs=1e-12)
            assert ours[kind].precision == pytest.approx(theirs[kind].precision, abs=1e-12)


def test_rouge_cjk_counts_characters():
    from rouge_score import rouge_scorer

    prediction, reference = "猫坐在垫子上", "猫坐在地毯上"
    assert rouge_scorer.RougeScorer(["rouge1"]).score(reference, prediction)["rouge1"].fmeasure == 0.0
    scores = rouge(prediction, reference, ["rouge1", "rouge2", "rougeL"])
    # 猫 坐 在 上 shared of 6 characters each; bigrams 猫坐 坐在 shared of 5; LCS 猫坐在上 = 4.
    assert scores["rouge1"].fmeasure == pytest.approx(4 / 6)
    assert scores["rouge2"].fmeasure == pytest.approx(2 / 5)
    assert scores["rougeL"].fmeasure == pytest.approx(4 / 6)
    assert words("GPU 训练 model", lang="zh") == ["gpu", "训", "练", "model"]
    assert words("東京タワーへ行く") == ["東", "京", "タ", "ワ", "ー", "へ", "行", "く"]
    assert words("한국어 문장") == ["한", "국", "어", "문", "장"]
    # Other scripts keep whole words when a language is given.
    assert words("Größe Äpfel, привет мир", lang="de") == ["größe", "äpfel", "привет", "мир"]
    ru = rouge("привет мир", "привет всем", ["rouge1"], lang="ru")["rouge1"]
    assert ru.fmeasure == pytest.approx(0.5)


def test_rouge_corpus_is_the_mean(pairs):
    preds, refs = [p for p, _ in pairs[:20]], [r for _, r in pairs[:20]]
    corpus = rouge_corpus(preds, refs, ["rouge1", "rougeL"])
    each = [rouge(p, r, ["rouge1", "rougeL"]) for p, r in zip(preds, refs)]
    assert corpus["rougeL"].recall == pytest.approx(sum(s["rougeL"].recall for s in each) / 20)
    with pytest.raises(LmforgeError):
        rouge_corpus(preds, refs[:3])
    with pytest.raises(LmforgeError):
        rouge("a", "b", ["rouge0"])


def test_bleu_and_chrf_are_sacrebleu(pairs):
    import sacrebleu

    preds = [p.replace("\n", " ") for p, _ in pairs[:100]]
    refs = [r.replace("\n", " ") for _, r in pairs[:100]]
    alt = [r.upper() if i % 3 else None for i, r in enumerate(refs)]
    expected = sacrebleu.corpus_bleu(preds, [refs])
    ours = bleu(preds, refs)
    assert ours["score"] == pytest.approx(expected.score, abs=1e-12)
    assert ours["precisions"] == pytest.approx(expected.precisions)
    assert ours["signature"].startswith("nrefs:1|case:mixed|eff:no|tok:13a")
    # Variable numbers of references per segment.
    multi = [[r] if a is None else [r, a] for r, a in zip(refs, alt)]
    assert bleu(preds, multi)["score"] == pytest.approx(sacrebleu.corpus_bleu(preds, [refs, alt]).score, abs=1e-12)
    assert chrf(preds, refs)["score"] == pytest.approx(sacrebleu.corpus_chrf(preds, [refs]).score, abs=1e-12)
    assert chrf(preds, refs, word_order=2)["score"] == pytest.approx(
        sacrebleu.corpus_chrf(preds, [refs], word_order=2).score, abs=1e-12)
    zh_pred, zh_ref = ["猫坐在垫子上。"], ["猫坐在地毯上。"]
    assert bleu(zh_pred, zh_ref, lang="zh")["score"] == pytest.approx(
        sacrebleu.corpus_bleu(zh_pred, [zh_ref], tokenize="zh").score)
    assert bleu(zh_pred, zh_ref, lang="zh")["score"] > bleu(zh_pred, zh_ref)["score"] == 0.0
    with pytest.raises(LmforgeError):
        bleu(preds, refs[:5])


def test_meteor_hand_computed():
    # Identical: m = 6, one chunk. Fmean = 1, penalty = 0.5 * (1/6)^3.
    s = meteor("the cat sat on the mat", "the cat sat on the mat")
    assert (s.matches, s.chunks) == (6, 1)
    assert s.score == pytest.approx(1 - 0.5 / 216)
    # Reordered: best alignment "on the mat" | "sat" | "the cat" = 3 chunks; penalty 0.5 * 0.5^3.
    s = meteor("on the mat sat the cat", "the cat sat on the mat")
    assert (s.matches, s.chunks) == (6, 3)
    assert s.score == pytest.approx(0.9375)
    # Stems: the=the exactly, cats~cat and running~runs by Porter stem; were/was do not match.
    # m = 3 of 4 words each side: P = R = 0.75, Fmean = 0.75; chunks "the cats" | "running" = 2.
    s = meteor("the cats were running", "the cat was runs")
    assert (s.matches, s.chunks) == (3, 2)
    assert s.fmean == pytest.approx(0.75)
    assert s.score == pytest.approx(0.75 * (1 - 0.5 * (2 / 3) ** 3))
    assert meteor("the cats were running", "the cat was runs", stem=False).matches == 1
    # Repeated words: aligning the first "the" to the second keeps two 2-word chunks: 3 chunks, not 4.
    s = meteor("the cat and the dog", "the dog and the cat")
    assert (s.matches, s.chunks) == (5, 3)
    assert s.score == pytest.approx(1 - 0.5 * 0.6**3)
    # Unequal lengths: m = 2, P = 2/2, R = 2/4; Fmean = P R / (0.9 P + 0.1 R) = 0.5 / 0.95.
    s = meteor("quick fox", "the quick brown fox")
    assert (s.matches, s.chunks) == (2, 2)
    assert s.fmean == pytest.approx(0.5 / 0.95)
    assert s.score == pytest.approx(0.5 / 0.95 * (1 - 0.5))
    assert meteor("nothing in common", "totally different words").score == 0.0
    # Several references: the best counts.
    assert meteor("quick fox", ["a slow dog", "quick fox"]).score == pytest.approx(1 - 0.5 / 8)


def test_meteor_equals_nltk_without_synonyms_where_alignment_is_unambiguous(pairs):
    """NLTK's meteor_score needs WordNet (not installed); with an empty synonym source it
    is exact + stem METEOR, and agrees with ours wherever no word repeats (its greedy
    alignment is then optimal too)."""
    from nltk.translate.meteor_score import meteor_score

    class NoSynonyms:
        def synsets(self, *args, **kwargs):
            return []

    compared = 0
    for prediction, reference in pairs[:160]:
        hyp, ref = meteor_words(prediction), meteor_words(reference)
        if not hyp or not ref or len(set(hyp)) < len(hyp) or len(set(ref)) < len(ref):
            continue
        ours = meteor_tokens(hyp, ref).score
        theirs = meteor_score([ref], hyp, wordnet=NoSynonyms())
        assert ours == pytest.approx(theirs, abs=1e-12)
        compared += 1
    assert compared >= 20


def test_meteor_search_budget_falls_back_quickly():
    import time

    prediction = " ".join(["the a of the and to the in the of a"] * 8)
    reference = " ".join(["of the the a and the in to a of the"] * 8)
    started = time.perf_counter()
    s = meteor(prediction, reference)
    assert s.matches == 88 and 1 <= s.chunks <= 88
    assert time.perf_counter() - started < 10


def test_compute_metrics_all(pairs):
    preds, refs = [p for p, _ in pairs[:30]], [r for _, r in pairs[:30]]
    seen = []
    out = compute_metrics(preds, refs, progress=lambda done, total: seen.append((done, total)))
    assert set(out) == {"bleu", "chrf", "rouge", "meteor"}
    assert seen[-1] == (60, 60) and len(seen) == 60  # one step per segment for ROUGE and for METEOR
    assert 0 < out["bleu"]["score"] < 100 and 0 < out["chrf"]["score"] < 100
    assert 0 < out["rouge"]["rougeL"]["f"] < 1 and 0 < out["meteor"]["score"] < 1
    assert out["meteor"]["score"] == pytest.approx(meteor_corpus(preds, refs))
    zh = compute_metrics(["猫坐在垫子上"], ["猫坐在地毯上"], lang="zh")
    assert zh["rouge"]["rouge1"]["f"] == pytest.approx(4 / 6) and zh["meteor"]["score"] > 0
    with pytest.raises(LmforgeError, match="unknown metric"):
        compute_metrics(preds, refs, ["bleurt"])


def test_meteor_alignment_is_optimal_against_brute_force():
    """Most matches, then fewest chunks: the search equals exhaustive enumeration on small inputs."""
    from lmforge.eval.metrics.meteor import _align_stage, count_chunks

    def exhaustive(h, r):
        best = None

        def walk(i, used, pairs):
            nonlocal best
            if i == len(h):
                key = (-len(pairs), count_chunks(pairs))
                best = key if best is None or key < best else best
                return
            walk(i + 1, used, pairs)
            for j, word in enumerate(r):
                if j not in used and word == h[i]:
                    walk(i + 1, used | {j}, {**pairs, i: j})

        walk(0, frozenset(), {})
        return best

    rng = random.Random(7)
    for _ in range(400):
        alphabet = "abcd"[: rng.randint(1, 4)]
        h = [rng.choice(alphabet) for _ in range(rng.randint(1, 7))]
        r = [rng.choice(alphabet) for _ in range(rng.randint(1, 7))]
        found = _align_stage(h, r, {}, 10**6)
        assert (-len(found), count_chunks(found)) == exhaustive(h, r), (h, r)
