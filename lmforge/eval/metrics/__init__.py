"""Reference-based text metrics (E2): BLEU, chrF, ROUGE, METEOR.

`compute_metrics` scores a list of predictions against one or more references each and
returns one flat dict per metric. BLEU and chrF come from sacrebleu (`sacre.py`); ROUGE
(`rouge.py`) and METEOR (`meteor.py`) are lmforge's own code; `text.py` holds the word
splitting they share (CJK characters are words of their own).

All of them compare surface forms with references: none can tell whether an answer is
true, helpful or safe, and all of them punish a correct answer worded differently from
the references. Use them for tasks with constrained outputs (translation,
summarization) and alongside human or model judgements, not instead of them.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

from ...errors import LmforgeError

METRICS = ("bleu", "chrf", "rouge", "meteor")


def compute_metrics(
    predictions: Sequence[str],
    references: Sequence[str | Sequence[str]],
    metrics: Sequence[str] = METRICS,
    lang: str | None = None,
    stem: bool = True,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, dict[str, Any]]:
    """Corpus-level scores: {"bleu": {...}, "chrf": {...}, "rouge": {...}, "meteor": {...}}.

    BLEU and chrF are on sacrebleu's 0-100 scale; ROUGE (mean P/R/F per type) and METEOR
    (mean of sentence scores) on 0-1. `lang` picks CJK-aware tokenization ("zh", "ja",
    "ko") and turns English stemming off for other languages. `progress(done, total)` counts
    the segments scored by ROUGE and METEOR, the two that take time on large sets.
    """
    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise LmforgeError(f"unknown metric(s) {', '.join(unknown)} (choose from {', '.join(METRICS)})")
    if len(predictions) != len(references):
        raise LmforgeError(f"{len(predictions)} predictions but {len(references)} references")
    if not predictions:
        raise LmforgeError("no predictions to score")
    english = lang in (None, "", "en")
    out: dict[str, dict[str, Any]] = {}
    total = len(predictions) * sum(name in ("rouge", "meteor") for name in metrics)
    done = 0

    def step(n: int) -> None:
        nonlocal done
        done += n
        if progress is not None:
            progress(done, total)

    for name in metrics:
        if name == "bleu":
            from .sacre import bleu

            out[name] = bleu(predictions, references, lang=lang)
        elif name == "chrf":
            from .sacre import chrf

            out[name] = chrf(predictions, references)
        elif name == "rouge":
            from .rouge import rouge_corpus

            scores = rouge_corpus(predictions, references, use_stemmer=stem and english, lang=lang, progress=step)
            out[name] = {kind: {"precision": s.precision, "recall": s.recall, "f": s.fmeasure}
                         for kind, s in scores.items()}
        else:
            from .meteor import meteor_corpus

            out[name] = {"score": meteor_corpus(predictions, references, lang=lang, progress=step,
                                                 stem=stem and english)}
    return out
