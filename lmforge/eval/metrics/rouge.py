"""ROUGE-N, ROUGE-L and ROUGE-Lsum: recall-oriented overlap between a summary and references.

- ROUGE-N counts the n-grams two texts share (each n-gram at most as often as it occurs
  in both): recall = shared / n-grams of the reference, precision = shared / n-grams of
  the prediction, F1 their harmonic mean.
- ROUGE-L replaces the n-gram count by the length of the longest common subsequence
  (words in the same order, gaps allowed), so it rewards sentence-level word order
  without fixing n.
- ROUGE-Lsum is the summary-level variant: texts are split into sentences (one per line);
  for each reference sentence the union of its LCS matches with every predicted sentence
  is counted, each word at most as often as it occurs on both sides.

Words come from `text.words` (ROUGE-1.5.5 rules for English, CJK characters as words,
optional Porter stemming), so scores of English text equal those of Google's
`rouge-score` package (tested to 1e-9, with and without stemming). With several
references the one with the best F1 counts, per ROUGE type.

What ROUGE cannot measure: meaning. A paraphrase with other words scores low, a fluent
summary that negates the reference ("is" vs "is not") scores high, and nothing checks
that the summary is faithful to the source, coherent or grammatical. Scores are only
comparable with the same tokenization, stemming and sentence splitting.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Callable, Sequence

from ...errors import LmforgeError
from .text import split_sentences, words

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")


@dataclass(frozen=True)
class Score:
    precision: float
    recall: float
    fmeasure: float

    @classmethod
    def of(cls, precision: float, recall: float) -> Score:
        f = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
        return cls(precision, recall, f)


ZERO = Score(0.0, 0.0, 0.0)


def ngrams(tokens: Sequence[str], n: int) -> Counter:
    return Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))


def rouge_n(prediction: Sequence[str], reference: Sequence[str], n: int) -> Score:
    pred, ref = ngrams(prediction, n), ngrams(reference, n)
    shared = sum((pred & ref).values())
    return Score.of(shared / max(sum(pred.values()), 1), shared / max(sum(ref.values()), 1))


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence, one DP row at a time."""
    if len(b) > len(a):
        a, b = b, a
    row = [0] * (len(b) + 1)
    for x in a:
        diagonal = 0
        for j, y in enumerate(b, 1):
            above = row[j]
            row[j] = diagonal + 1 if x == y else max(above, row[j - 1])
            diagonal = above
    return row[-1]


def lcs_positions(reference: Sequence[str], candidate: Sequence[str]) -> list[int]:
    """Positions in `reference` of one longest common subsequence.

    Among several LCSs this picks the one the backtrack meets first when, on a tie, it
    drops a reference word before a candidate word; ROUGE-Lsum's union depends on the
    choice, and this is the one `rouge-score` makes.
    """
    rows, cols = len(reference), len(candidate)
    table = [[0] * (cols + 1) for _ in range(rows + 1)]
    for i in range(1, rows + 1):
        x, here, up = reference[i - 1], table[i], table[i - 1]
        for j in range(1, cols + 1):
            here[j] = up[j - 1] + 1 if x == candidate[j - 1] else max(up[j], here[j - 1])
    positions = []
    i, j = rows, cols
    while i and j:
        if reference[i - 1] == candidate[j - 1]:
            positions.append(i - 1)
            i, j = i - 1, j - 1
        elif table[i][j - 1] > table[i - 1][j]:
            j -= 1
        else:
            i -= 1
    return positions[::-1]


def rouge_l(prediction: Sequence[str], reference: Sequence[str]) -> Score:
    if not prediction or not reference:
        return ZERO
    common = lcs_length(prediction, reference)
    return Score.of(common / len(prediction), common / len(reference))


def rouge_lsum(prediction: Sequence[Sequence[str]], reference: Sequence[Sequence[str]]) -> Score:
    """Summary-level LCS over sentences (lists of words)."""
    n_pred, n_ref = sum(map(len, prediction)), sum(map(len, reference))
    if not n_pred or not n_ref:
        return ZERO
    left_pred = Counter(w for sentence in prediction for w in sentence)
    left_ref = Counter(w for sentence in reference for w in sentence)
    hits = 0
    for sentence in reference:
        union = sorted(set().union(*(lcs_positions(sentence, p) for p in prediction)))
        for word in (sentence[i] for i in union):
            if left_pred[word] > 0 and left_ref[word] > 0:  # never count a word more often than it occurs
                hits += 1
                left_pred[word] -= 1
                left_ref[word] -= 1
    return Score.of(hits / n_pred, hits / n_ref)


def _score_one(prediction: str, reference: str, types: Sequence[str], stem: bool, lang: str | None) -> dict[str, Score]:
    pred_words = words(prediction, lang, stem)
    ref_words = words(reference, lang, stem)
    out = {}
    for kind in types:
        if kind == "rougeL":
            out[kind] = rouge_l(pred_words, ref_words)
        elif kind == "rougeLsum":
            out[kind] = rouge_lsum([words(s, lang, stem) for s in split_sentences(prediction)],
                                   [words(s, lang, stem) for s in split_sentences(reference)])
        else:
            out[kind] = rouge_n(pred_words, ref_words, _order(kind))
    return out


def _order(kind: str) -> int:
    digits = kind.removeprefix("rouge")
    if not kind.startswith("rouge") or not digits.isdigit() or int(digits) < 1:
        raise LmforgeError(f"unknown ROUGE type {kind!r} (use rouge1, rouge2, ..., rougeL or rougeLsum)")
    return int(digits)


def rouge(
    prediction: str,
    references: str | Sequence[str],
    types: Sequence[str] = ROUGE_TYPES,
    use_stemmer: bool = False,
    lang: str | None = None,
) -> dict[str, Score]:
    """ROUGE scores of one prediction; with several references, the best F1 per type."""
    for kind in types:
        if kind not in ("rougeL", "rougeLsum"):
            _order(kind)
    refs = [references] if isinstance(references, str) else list(references)
    if not refs:
        raise LmforgeError("ROUGE needs at least one reference")
    per_ref = [_score_one(prediction, r, types, use_stemmer, lang) for r in refs]
    return {kind: max((s[kind] for s in per_ref), key=lambda s: s.fmeasure) for kind in types}


def rouge_corpus(
    predictions: Sequence[str],
    references: Sequence[str | Sequence[str]],
    types: Sequence[str] = ROUGE_TYPES,
    use_stemmer: bool = False,
    lang: str | None = None,
    progress: Callable[[int], None] | None = None,
) -> dict[str, Score]:
    """Mean precision, recall and F1 over prediction/reference pairs; `progress(1)` after each pair."""
    if len(predictions) != len(references):
        raise LmforgeError(f"{len(predictions)} predictions but {len(references)} references")
    if not predictions:
        raise LmforgeError("no predictions to score")
    scores = []
    for p, r in zip(predictions, references):
        scores.append(rouge(p, r, types, use_stemmer, lang))
        if progress is not None:
            progress(1)
    n = len(scores)
    return {kind: Score(sum(s[kind].precision for s in scores) / n, sum(s[kind].recall for s in scores) / n,
                        sum(s[kind].fmeasure for s in scores) / n) for kind in types}
