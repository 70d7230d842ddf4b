"""Is an answer sentence supported by the passages it cites?

The decision, for one sentence against a set of passages, in three checks:

1. **Numbers**: every number the sentence states must appear in the passage that supports
   it. A plausible wrong sentence most often changes a figure ("45 MiB per token"), and
   meaning-level similarity barely notices a changed digit.
2. **Meaning**: the sentence is embedded and compared (cosine) with every window of one or
   two consecutive sentences of each passage; the best window is the candidate support.
3. **Words**: the share of the sentence's content words (stemmed, stopwords out) found in
   that passage. A paraphrase may use other words, so a high cosine alone is enough; a
   middling cosine needs the words too.

    supported = numbers_ok and (cos >= strong or (cos >= weak and coverage >= words))

The thresholds are calibrated on hand-labelled pairs (`lmforge/rag/data/groundedness_labels.jsonl`,
see `calibrate`) and checked on the pairs they were not fitted on. Groundedness of an answer
is then the share of its (non-trivial) sentences that are supported. This is a cheap judge
with known blind spots (a negation flips meaning but barely moves the cosine; support spread
over three sentences is missed), so it is reported beside retrieval metrics, not instead.

`CrossEncoderSupportChecker` makes the same decision with a cross-encoder trained for it
(`lmforge rag train-reranker`), which reads the sentence and the passage together.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence

import numpy as np

from .text import content_words, numbers, split_sentences, stem, strip_citations


class Embeds(Protocol):
    def encode(self, texts: Sequence[str], batch_size: int = 32, normalize: bool | None = None,
               progress=None) -> np.ndarray: ...


@dataclass(frozen=True)
class Thresholds:
    strong: float = 0.80  # cosine that counts as support by itself
    weak: float = 0.55  # cosine that counts with enough shared words
    words: float = 0.6  # share of the sentence's content words the passage must contain


@dataclass
class Support:
    sentence: str
    supported: bool
    passage: int  # index of the best passage (-1 when there is none)
    cosine: float
    coverage: float
    numbers_ok: bool
    score: float | None = None  # the cross-encoder's support logit (CrossEncoderSupportChecker only)


def _windows(passage: str) -> list[str]:
    sentences = split_sentences(passage) or [passage]
    windows = list(sentences)
    windows += [f"{a} {b}" for a, b in zip(sentences, sentences[1:])]
    return windows


def _coverage(sentence: str, passage: str) -> float:
    words = {stem(w) for w in content_words(sentence)}
    if not words:
        return 1.0
    present = {stem(w) for w in content_words(passage)}
    return len(words & present) / len(words)


class SupportChecker:
    """Decides support of sentences by passages with one embedder (see the module's docstring)."""

    def __init__(self, embedder: Embeds, thresholds: Thresholds | None = None) -> None:
        self.embedder = embedder
        self.thresholds = thresholds or Thresholds()
        self._cache: dict[str, np.ndarray] = {}

    def _vectors(self, texts: list[str]) -> np.ndarray:
        missing = [t for t in dict.fromkeys(texts) if t not in self._cache]
        if missing:
            for text, vector in zip(missing, self.embedder.encode(missing, normalize=True)):
                self._cache[text] = vector
        return np.stack([self._cache[t] for t in texts])

    def scores(self, sentence: str, passages: Sequence[str]) -> tuple[int, float, float, bool]:
        """(best passage, its cosine, word coverage, numbers ok) for `sentence` against `passages`."""
        if not passages:
            return -1, 0.0, 0.0, False
        windows, owner = [], []
        for i, passage in enumerate(passages):
            for window in _windows(passage):
                windows.append(window)
                owner.append(i)
        vectors = self._vectors([sentence] + windows)
        cosines = vectors[1:] @ vectors[0]
        wanted = numbers(sentence)
        best, best_key = -1, None
        for i, passage in enumerate(passages):
            cos = float(max(c for c, o in zip(cosines, owner) if o == i))
            ok = wanted <= numbers(passage)
            coverage = _coverage(sentence, passage)
            key = (ok, self._decide(cos, coverage, ok), cos)
            if best_key is None or key > best_key:
                best, best_key = i, key
                best_values = (cos, coverage, ok)
        return best, *best_values

    def _decide(self, cosine: float, coverage: float, numbers_ok: bool) -> bool:
        t = self.thresholds
        return numbers_ok and (cosine >= t.strong or (cosine >= t.weak and coverage >= t.words))

    def check(self, sentence: str, passages: Sequence[str]) -> Support:
        passage, cosine, coverage, ok = self.scores(sentence, passages)
        return Support(sentence, passage >= 0 and self._decide(cosine, coverage, ok), passage, cosine, coverage, ok)


class CrossEncoderSupportChecker:
    """Support decided by a cross-encoder that reads sentence and passage together (lmforge/rag/rerank.py).

    The model's ``supported`` output is a logit for "the passage states what the sentence
    says"; it sees a swapped word ("half" for "a quarter", "overestimates" for
    "underestimates") that barely moves an embedding's cosine. The number check stays in
    front of it, as in `SupportChecker`: a stated figure missing from the passage is never
    supported. `check` and `scores` have `SupportChecker`'s signatures, so answering and
    evaluation take either; the "cosine" they report is the sigmoid of the logit.

        supported = numbers_ok and logit >= threshold   (default: the model's stored threshold, else 0)
    """

    def __init__(self, model, threshold: float | None = None, check_numbers: bool = True) -> None:
        self.model = model
        self.threshold = float(model.info.get("support_threshold", 0.0)) if threshold is None else float(threshold)
        self.check_numbers = check_numbers
        self._cache: dict[tuple[str, str], float] = {}

    def logits(self, sentence: str, passages: Sequence[str]) -> list[float]:
        missing = [p for p in dict.fromkeys(passages) if (sentence, p) not in self._cache]
        if missing:
            scores = self.model.score([(sentence, p) for p in missing], "supported")
            for passage, score in zip(missing, scores):
                self._cache[(sentence, passage)] = float(score)
        return [self._cache[(sentence, p)] for p in passages]

    def scores(self, sentence: str, passages: Sequence[str]) -> tuple[int, float, float, bool]:
        """(best passage, sigmoid of its logit, word coverage, numbers ok), as `SupportChecker.scores`."""
        best, logit, ok = self._best(sentence, passages)
        if best < 0:
            return -1, 0.0, 0.0, False
        return best, float(1.0 / (1.0 + np.exp(-logit))), _coverage(sentence, passages[best]), ok

    def _best(self, sentence: str, passages: Sequence[str]) -> tuple[int, float, bool]:
        if not passages:
            return -1, float("-inf"), False
        wanted = numbers(sentence)
        keys = []
        for i, (passage, logit) in enumerate(zip(passages, self.logits(sentence, passages))):
            ok = not self.check_numbers or wanted <= numbers(passage)
            keys.append(((ok, logit), i))
        (ok, logit), best = max(keys)
        return best, logit, ok

    def check(self, sentence: str, passages: Sequence[str]) -> Support:
        best, logit, ok = self._best(sentence, passages)
        if best < 0:
            return Support(sentence, False, -1, 0.0, 0.0, False, None)
        supported = ok and logit >= self.threshold
        return Support(sentence, supported, best, float(1.0 / (1.0 + np.exp(-logit))),
                       _coverage(sentence, passages[best]), ok, logit)


def answer_sentences(text: str) -> list[str]:
    """The sentences of an answer worth checking: citation markers removed, fragments of fewer than
    three content words skipped (headings, "Sources:", a lone "Yes.")."""
    out = []
    for sentence in split_sentences(text):
        clean = strip_citations(sentence).strip(" -*#>")
        if len(content_words(clean)) >= 3:
            out.append(clean)
    return out


def groundedness(checker: SupportChecker | CrossEncoderSupportChecker, answer: str,
                 passages: Sequence[str]) -> tuple[float | None, list[Support]]:
    """The share of `answer`'s sentences supported by `passages`.

    None for an answer with no sentence to check (empty, a refusal, placeholders like "The [1]
    is a [2]."): such an answer is neither grounded nor not, and averages leave it out rather
    than count it as fully supported."""
    checks = [checker.check(s, passages) for s in answer_sentences(answer)]
    if not checks:
        return None, checks
    return sum(c.supported for c in checks) / len(checks), checks


def calibrate(checker: SupportChecker, pairs: Sequence[tuple[str, str, bool]]) -> tuple[Thresholds, float]:
    """The thresholds that classify (sentence, passage, supported) pairs best, and their accuracy.

    A grid search over the three thresholds: small, exhaustive and reproducible.
    """
    rows = []
    for sentence, passage, label in pairs:
        _, cos, cov, ok = checker.scores(sentence, [passage])
        rows.append((cos, cov, ok, label))
    best, best_acc = Thresholds(), -1.0
    for strong in np.arange(0.60, 0.96, 0.02):
        for weak in np.arange(0.30, strong + 1e-9, 0.05):
            for words in np.arange(0.3, 1.01, 0.1):
                t = Thresholds(float(strong), float(weak), float(words))
                acc = sum(
                    (ok and (cos >= t.strong or (cos >= t.weak and cov >= t.words))) == label
                    for cos, cov, ok, label in rows
                ) / len(rows)
                if acc > best_acc + 1e-12:
                    best, best_acc = t, acc
    return best, best_acc
