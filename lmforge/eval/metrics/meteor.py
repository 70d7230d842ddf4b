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
    # Reference words as bits; `ahead[t]`: bits of the keys that still occur in slots[t:]
    # (used words of other keys cannot matter any more, so they leave the memo key).
    key_bits = {key: sum(1 << j for j in refs_of[key]) for key in hyp_count}
    later = [Counter() for _ in range(len(slots) + 1)]
    ahead = [0] * (len(slots) + 1)
    for t in range(len(slots) - 1, -1, -1):
        later[t] = later[t + 1].copy()
        later[t][hyp_keys[slots[t]]] += 1
        ahead[t] = ahead[t + 1] | key_bits[hyp_keys[slots[t]]]
    memo: dict[tuple[int, int | None, int], tuple[int, int | None]] = {}

    def best(t: int, prev: int | None, used: int) -> int:
        """Most adjacencies reachable from slot t; `prev`: the pick of slot t-1 if it is hyp i-1."""
        if t == len(slots):
            return 0
        state = (t, prev, used & ahead[t])
        hit = memo.get(state)
        if hit is not None:
            return hit[0]
        if len(memo) >= budget:
            raise _OverBudget
        i, key = slots[t], hyp_keys[slots[t]]
        before = prev if prev is not None else fixed.get(i - 1)
        after = fixed.get(i + 1)
        follows = t + 1 < len(slots) and slots[t + 1] == i + 1
        need = quota[key] - (used & key_bits[key]).bit_count()
        top, pick = -1, None
        if need > 0:
            for j in refs_of[key]:
                if not used >> j & 1:
                    value = (before == j - 1) + (after == j + 1)
                    value += best(t + 1, j if follows else None, used | 1 << j)
                    if value > top:
                        top, pick = value, j
        if later[t][key] > need:  # enough later occurrences remain to fill the quota
            value = best(t + 1, None, used)
            if value > top:
                top, pick = value, None
        memo[state] = (top, pick)
        return top

    try:
        best(0, None, 0)
    except (_OverBudget, RecursionError):
        return _greedy_stage(hyp_keys, slots, refs_of, quota, fixed)
    chosen: dict[int, int] = {}
    prev, used = None, 0
    for t, i in enumerate(slots):
        pick = memo[(t, prev, used & ahead[t])][1]
        if pick is not None:
            chosen[i] = pick
            used |= 1 << pick
        prev = pick if pick is not None and t + 1 < len(slots) and slots[t + 1] == i + 1 else None
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
                  lang: str | None = None, progress: Callable[[int], None] | None = None, **params) -> float:
    """Mean sentence METEOR over the corpus; `progress(1)` after each pair."""
    if len(predictions) != len(references):
        raise LmforgeError(f"{len(predictions)} predictions but {len(references)} references")
    if not predictions:
        raise LmforgeError("no predictions to score")
    total = 0.0
    for p, r in zip(predictions, references):
        total += meteor(p, r, lang, **dict(params)).score
        if progress is not None:
            progress(1)
    return total / len(predictions)
