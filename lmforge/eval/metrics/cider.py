"""CIDEr-D: consensus-based image description evaluation (Vedantam et al., 2015).

A caption is good when it says what most of the human references say, and the words that
matter are the ones that are specific to this image. CIDEr weighs every n-gram (n = 1..4)
by TF-IDF, where the "documents" are the images: an n-gram that appears in the references
of every image ("a", "there are") gets weight log(N / N) = 0, one that appears in the
references of few images gets a large weight. For a candidate c and a reference r:

    g_n(s)[w] = count of n-gram w in s * log(N / max(1, df(w)))   (df: images whose refs contain w)
    sim_n(c, r) = sum_w min(g_n(c)[w], g_n(r)[w]) * g_n(r)[w] / (|g_n(c)| * |g_n(r)|)
                  * exp(-(len(c) - len(r))^2 / (2 * sigma^2))
    CIDEr-D(c) = 10 * mean_r mean_n sim_n(c, r)

The "-D" variant (the one the COCO leaderboard reports) adds the two defences against
gaming: the candidate's counts are clipped at the reference's (the min, so repeating a
good word does not pay), and a Gaussian penalty (sigma = 6) on the length difference. The
x10 puts scores on the scale people quote (a perfect, very specific caption of an image
whose references all agree scores around 10; good COCO models score about 1.1-1.4).

Inputs are lower-cased and split into runs of letters and digits (the COCO toolkit runs
the PTB tokenizer and drops punctuation, close to this on plain English). The document
frequencies come from the references of the evaluated set itself, as in the toolkit, so a
score depends on the set it is computed over: compare scores only on the same set.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from typing import Sequence

from ...errors import LmforgeError

WORD = re.compile(r"[a-z0-9]+")
SIGMA = 6.0


def cider_words(text: str) -> list[str]:
    return WORD.findall(text.lower())


def _ngrams(words: list[str], n_max: int) -> list[Counter]:
    return [Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1)) for n in range(1, n_max + 1)]


def _vectors(counts: list[Counter], idf: dict[tuple[str, ...], float]) -> tuple[list[dict], list[float]]:
    vecs, norms = [], []
    for grams in counts:
        vec = {g: tf * idf.get(g, 0.0) for g, tf in grams.items()}
        vecs.append(vec)
        norms.append(math.sqrt(sum(v * v for v in vec.values())))
    return vecs, norms


def cider_d(predictions: Sequence[str], references: Sequence[Sequence[str]], n: int = 4,
            sigma: float = SIGMA) -> dict[str, object]:
    """Corpus CIDEr-D (the mean over images) and the per-image scores."""
    if len(predictions) != len(references):
        raise LmforgeError(f"{len(predictions)} predictions but {len(references)} reference sets")
    if not predictions:
        raise LmforgeError("no predictions to score")
    if any(not refs for refs in references):
        raise LmforgeError("every prediction needs at least one reference")
    ref_words = [[cider_words(r) for r in refs] for refs in references]
    ref_counts = [[_ngrams(w, n) for w in refs] for refs in ref_words]
    df: Counter = Counter()
    for refs in ref_counts:
        df.update({g for counts in refs for grams in counts for g in grams})
    log_n = math.log(float(len(references)))
    idf = {g: log_n - math.log(max(1.0, c)) for g, c in df.items()}
    scores = []
    for prediction, refs, counts in zip(predictions, ref_words, ref_counts):
        words = cider_words(prediction)
        hyp_vec, hyp_norm = _vectors(_ngrams(words, n), idf)
        total = 0.0
        for ref, ref_grams in zip(refs, counts):
            ref_vec, ref_norm = _vectors(ref_grams, idf)
            penalty = math.exp(-((len(words) - len(ref)) ** 2) / (2 * sigma ** 2))
            per_n = 0.0
            for k in range(n):
                if hyp_norm[k] == 0 or ref_norm[k] == 0:
                    continue
                dot = sum(min(v, ref_vec[k][g]) * ref_vec[k][g] for g, v in hyp_vec[k].items() if g in ref_vec[k])
                per_n += dot / (hyp_norm[k] * ref_norm[k]) * penalty
            total += per_n / n
        scores.append(10.0 * total / len(refs))
    return {"score": sum(scores) / len(scores), "per_item": scores, "n": n, "sigma": sigma}
