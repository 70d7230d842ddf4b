"""METEOR: unigram alignment with stemming, recall-weighted F-mean and a word-order penalty.

(Banerjee and Lavie, 2005; parameters of Lavie and Agarwal, 2007.) Words of the
prediction are aligned one-to-one to words of the reference in stages: first identical
words, then, among the words still free, words with the same Porter stem. Each stage
aligns as many words as possible and, among those alignments, picks one with the fewest
*chunks* (runs of aligned words that are adjacent and in the same order on both sides).
With m aligned words, a prediction of length h and a reference of length r:

    P = m / h,   R = m / r,   Fmean = P * R / (alpha * P + (1 - alpha) * R)
    penalty = gamma * (chunks / m) ** beta,   METEOR = Fmean * (1 - penalty)

with alpha = 0.9 (recall weighs nine times precision), beta = 3, gamma = 0.5. A perfect
match of m words still has one chunk, so it scores 1 - 0.5 / m^3, slightly below 1.

The fewest-chunks alignment is found by an exact search (dynamic programming over the
prediction with memoized reference choices); only the rare inputs that repeat many words
many times exhaust its budget and fall back to a greedy rule (continue the previous
chunk if possible, else the leftmost free word). Words are runs of letters and digits
(punctuation is ignored), lower-cased, CJK characters one word each; stemming applies
to English only.

What it does not include: the synonym stage (WordNet) and the paraphrase tables of
METEOR 1.5, so synonyms get no credit; NLTK's `meteor_score` needs the WordNet corpus,
which is not installed here (and NLTK aligns greedily, so with repeated words its chunk
count can be higher than the minimum found here). What METEOR cannot measure: meaning
beyond matching words and stems, factual correctness, and fluency beyond word order.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Callable, Sequence

from ...errors import LmforgeError
from .text import ENGLISH, UNICODE_WORD, porter_stem

SEARCH_BUDGET = 20_000  # memoized states per stage before the greedy fallback (about a second)


@dataclass(frozen=True)
class MeteorScore:
    score: float
    precision: float
    recall: float
    fmean: float
    penalty: float
    matches: int
    chunks: int


def meteor_words(text: str) -> list[str]:
    import unicodedata

    return UNICODE_WORD.findall(unicodedata.normalize("NFC", text.lower()))


def count_chunks(matches: dict[int, int]) -> int:
    """Runs of (i, j), (i+1, j+1), ... among the aligned pairs."""
    return sum(1 for i, j in matches.items() if matches.get(i - 1) != j - 1)


class _OverBudget(Exception):
    pass


def _align_stage(hyp_keys: Sequence[str], ref_keys: Sequence[str], fixed: dict[int, int],
                 budget: int) -> dict[int, int]:
    """New pairs (hyp -> ref) among free words with equal keys: most pairs, then most adjacencies."""
    taken = set(fixed.values())
    refs_of: dict[str, list[int]] = defaultdict(list)
    for j, key in enumerate(ref_keys):
        if j not in taken:
            refs_of[key].append(j)
    slots = [i for i, key in enumerate(hyp_keys) if i not in fixed and key in refs_of]
    if not slots:
        return {}
    hyp_count = Counter(hyp_keys[i] for i in slots)
    quota = {key: min(n, len(refs_of[key])) for key, n in hyp_count.items()}
    # occurrences of each key among slots[t:], and the keys that still occur there
    later = [Counter() for _ in range(len(slots) + 1)]
    for t in range(len(slots) - 1, -1, -1):
        later[t] = later[t + 1].copy()
        later[t][hyp_keys[slots[t]]] += 1

    def gain(i: int, j: int, prev: int | None) -> int:
        before = prev if prev is not None else fixed.get(i - 1)
        return int(before == j - 1) + int(fixed.get(i + 1) == j + 1)

    def options(t: int, used: frozenset, used_of: Counter) -> list[int | None]:
        key = hyp_keys[slots[t]]
        need = quota[key] - used_of[key]
        choices: list[int | None] = [j for j in refs_of[key] if j not in used] if need > 0 else []
        if later[t][key] > need:  # enough later occurrences remain to fill the quota
            choices.append(None)
        return choices

    memo: dict[tuple, tuple[int, int | None]] = {}

    def best(t: int, prev: int | None, used: frozenset, used_of: Counter) -> int:
        if t == len(slots):
            return 0
        i = slots[t]
        consecutive = t > 0 and slots[t - 1] == i - 1
        relevant = frozenset(j for j in used if later[t][ref_keys[j]])
        state = (t, prev if consecutive else None, relevant)
        hit = memo.get(state)
        if hit is not None:
            return hit[0]
        if len(memo) >= budget:
            raise _OverBudget
        top, pick = -1, None
        for j in options(t, used, used_of):
            if j is None:
                value = best(t + 1, None, used, used_of)
            else:
                key = ref_keys[j]
                used_of[key] += 1
                value = gain(i, j, prev if consecutive else None) + best(t + 1, j, used | {j}, used_of)
                used_of[key] -= 1
            if value > top:
                top, pick = value, j
        memo[state] = (top, pick)
        return top

    try:
        best(0, None, frozenset(), Counter())
    except (_OverBudget, RecursionError):
        return _greedy_stage(hyp_keys, slots, refs_of, quota, fixed)
    chosen: dict[int, int] = {}
    prev, used = None, frozenset()
    for t, i in enumerate(slots):
        consecutive = t > 0 and slots[t - 1] == i - 1
        relevant = frozenset(j for j in used if later[t][ref_keys[j]])
        pick = memo[(t, prev if consecutive else None, relevant)][1]
        if pick is not None:
            chosen[i] = pick
            used = used | {pick}
        prev = pick
    return chosen


def _greedy_stage(hyp_keys, slots, refs_of, quota, fixed) -> dict[int, int]:
    chosen: dict[int, int] = {}
    free = {key: list(js) for key, js in refs_of.items()}
    for i in slots:
        key = hyp_keys[i]
        if quota[key] == 0:
            continue
        before = chosen.get(i - 1, fixed.get(i - 1))
        j = before + 1 if before is not None and before + 1 in free[key] else free[key][0]
        free[key].remove(j)
        quota[key] -= 1
        chosen[i] = j
    return chosen


def align(prediction: Sequence[str], reference: Sequence[str], stages: Sequence[Callable[[str], str]],
          budget: int = SEARCH_BUDGET) -> dict[int, int]:
    """One-to-one alignment (prediction index -> reference index), stage by stage."""
    matches: dict[int, int] = {}
    for key in stages:
        matches.update(_align_stage([key(w) for w in prediction], [key(w) for w in reference], matches, budget))
    return matches


def meteor_tokens(prediction: Sequence[str], reference: Sequence[str], stem: bool = True,
                  alpha: float = 0.9, beta: float = 3.0, gamma: float = 0.5) -> MeteorScore:
    """METEOR of one tokenized prediction against one tokenized reference."""
    stages: list[Callable[[str], str]] = [str]
    if stem:
        stages.append(porter_stem)
    matches = align(prediction, reference, stages)
    m = len(matches)
    if m == 0:
        return MeteorScore(0.0, 0.0, 0.0, 0.0, 0.0, 0, 0)
    precision, recall = m / len(prediction), m / len(reference)
    fmean = precision * recall / (alpha * precision + (1 - alpha) * recall)
    chunks = count_chunks(matches)
    penalty = gamma * (chunks / m) ** beta
    return MeteorScore(fmean * (1 - penalty), precision, recall, fmean, penalty, m, chunks)


def meteor(prediction: str, references: str | Sequence[str], lang: str | None = None, **params) -> MeteorScore:
    """METEOR of one prediction; with several references, the best one counts."""
    refs = [references] if isinstance(references, str) else list(references)
    if not refs:
        raise LmforgeError("METEOR needs at least one reference")
    stem = params.pop("stem", lang in ENGLISH)
    words = meteor_words(prediction)
    return max((meteor_tokens(words, meteor_words(r), stem=stem, **params) for r in refs), key=lambda s: s.score)


def meteor_corpus(predictions: Sequence[str], references: Sequence[str | Sequence[str]],
                  lang: str | None = None, **params) -> float:
    """Mean sentence METEOR over the corpus."""
    if len(predictions) != len(references):
        raise LmforgeError(f"{len(predictions)} predictions but {len(references)} references")
    if not predictions:
        raise LmforgeError("no predictions to score")
    return sum(meteor(p, r, lang, **dict(params)).score for p, r in zip(predictions, references)) / len(predictions)
