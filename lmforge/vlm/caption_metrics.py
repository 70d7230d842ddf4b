"""Metrics of captioning and visual question answering (V5).

Captions: CIDEr-D (lmforge/eval/metrics/cider.py), BLEU-4 through sacrebleu (the eval
package's `bleu`, several references per caption) and a simplified METEOR. VQA: accuracy
after answer normalization, overall and per question type.

METEOR here reuses the eval package's alignment (the fewest-chunks one-to-one alignment of
lmforge/eval/metrics/meteor.py: exact words first, then stems) and its formula (recall-
weighted F-mean times a fragmentation penalty 1 - 0.5 (chunks / matches)^3), with one
change: stems come from `light_stem`, a few English suffix rules (plural -s/-es/-ies,
-ing, -ed), so it needs no NLTK. What it omits against METEOR 1.5: the full Porter stemmer,
the WordNet synonym stage, paraphrase tables, function-word weighting and the tuned
per-language parameters. On captions over a closed vocabulary of a few dozen words this
loses little (the only inflections are plurals), but its numbers are not comparable with
published METEOR scores.

VQA accuracy: the official VQA metric gives min(#annotators who gave the answer / 3, 1)
over ten human answers; generated scenes have exactly one correct answer, so accuracy is
exact match after the official normalization steps that matter here (lower case, no
punctuation, no articles, number words as digits).
"""

from __future__ import annotations

import re
from collections import defaultdict
from typing import Sequence

from lmforge.errors import LmforgeError

ARTICLES = {"a", "an", "the"}
NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
                "seven": "7", "eight": "8", "nine": "9", "ten": "10"}


def light_stem(word: str) -> str:
    """A few English suffix rules: circles -> circle, boxes -> box, berries -> berry, drawing -> draw."""
    if len(word) > 4 and word.endswith("ies"):
        return word[:-3] + "y"
    if len(word) > 4 and word.endswith(("sses", "xes", "zes", "ches", "shes")):
        return word[:-2]
    if len(word) > 3 and word.endswith("s") and not word.endswith(("ss", "us", "is")):
        return word[:-1]
    if len(word) > 5 and word.endswith("ing"):
        return word[:-3]
    if len(word) > 4 and word.endswith("ed"):
        return word[:-2]
    return word


def meteor_light(prediction: str, references: Sequence[str], alpha: float = 0.9, beta: float = 3.0,
                 gamma: float = 0.5) -> float:
    """Sentence METEOR (best reference) with exact and `light_stem` matching."""
    from lmforge.eval.metrics.meteor import align, count_chunks, meteor_words

    hyp = meteor_words(prediction)
    best = 0.0
    for reference in references:
        ref = meteor_words(reference)
        matches = align(hyp, ref, [str, light_stem])
        m = len(matches)
        if m == 0:
            continue
        precision, recall = m / len(hyp), m / len(ref)
        fmean = precision * recall / (alpha * precision + (1 - alpha) * recall)
        best = max(best, fmean * (1 - gamma * (count_chunks(matches) / m) ** beta))
    return best


def caption_scores(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, float]:
    """CIDEr-D, BLEU-4 (0-100, sacrebleu 13a, all references) and METEOR (light) of a caption set."""
    from lmforge.eval.metrics.cider import cider_d
    from lmforge.eval.metrics.sacre import bleu

    if len(predictions) != len(references):
        raise LmforgeError(f"{len(predictions)} captions but {len(references)} reference sets")
    cider = cider_d(predictions, references)
    b = bleu(predictions, [list(r) for r in references])
    meteor = sum(meteor_light(p, r) for p, r in zip(predictions, references)) / len(predictions)
    return {"cider_d": cider["score"], "bleu4": b["score"], "bleu_precisions": b["precisions"],
            "bleu_brevity_penalty": b["brevity_penalty"], "meteor_light": meteor, "n": len(predictions),
            "bleu_signature": b["signature"]}


def normalize_answer(text: str) -> str:
    words = re.findall(r"[a-z0-9]+", text.lower())
    return " ".join(NUMBER_WORDS.get(w, w) for w in words if w not in ARTICLES)


def vqa_accuracy(predictions: Sequence[str], answers: Sequence[str], types: Sequence[str]) -> dict[str, object]:
    """Exact-match accuracy after `normalize_answer`, overall and per question type."""
    if not (len(predictions) == len(answers) == len(types)):
        raise LmforgeError("predictions, answers and question types must have the same length")
    if not predictions:
        raise LmforgeError("no answers to score")
    per_type: dict[str, list[bool]] = defaultdict(list)
    for p, a, t in zip(predictions, answers, types):
        per_type[t].append(normalize_answer(p) == normalize_answer(a))
    hits = [h for v in per_type.values() for h in v]
    return {"accuracy": sum(hits) / len(hits), "n": len(hits),
            "by_type": {t: sum(v) / len(v) for t, v in sorted(per_type.items())},
            "count_by_type": {t: len(v) for t, v in sorted(per_type.items())}}


def pope_scores(predictions: Sequence[str], answers: Sequence[str]) -> dict[str, float]:
    """POPE-style hallucination scores (Li et al., 2023) of yes/no existence questions ("is there
    a blue circle?"): "yes" is the positive class, so precision falls when the model claims objects
    that are not there (hallucination) and recall when it misses real ones; the yes-ratio shows a
    bias towards agreeing."""
    if len(predictions) != len(answers):
        raise LmforgeError(f"{len(predictions)} predictions but {len(answers)} answers")
    if not predictions:
        raise LmforgeError("no existence questions to score")
    said = [normalize_answer(p) == "yes" for p in predictions]
    true = [normalize_answer(a) == "yes" for a in answers]
    tp = sum(s and t for s, t in zip(said, true))
    precision = tp / max(1, sum(said))
    recall = tp / max(1, sum(true))
    return {"accuracy": sum(s == t for s, t in zip(said, true)) / len(said), "precision": precision, "recall": recall,
            "f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
            "yes_ratio": sum(said) / len(said), "n": len(said)}
