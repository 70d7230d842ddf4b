"""BLEU and chrF through sacrebleu, the reference implementation, with lmforge's input shapes.

sacrebleu is used as is: its tokenizers, smoothing and signatures are what makes BLEU
numbers comparable between papers, so lmforge does not reimplement them. This module only
accepts one-or-many references per prediction, picks a tokenizer for the target language
and returns plain dicts (with sacrebleu's signature string, which says exactly how the
score was computed and belongs next to any reported number).

BLEU (Papineni et al., 2002): geometric mean of clipped 1- to 4-gram precisions over the
whole corpus, times a brevity penalty for outputs shorter than the references; 0-100.
What it cannot measure: meaning and adequacy beyond surface n-grams (a correct paraphrase
is punished, a fluent but wrong sentence with the right words is rewarded), fluency
beyond 4-grams, and anything at the level of a single sentence reliably (it is a corpus
statistic; per-sentence BLEU is noisy and needs smoothing). Scores depend on the
tokenizer: compare only numbers with the same signature.

chrF (Popovic, 2015): F-score (beta=2, recall weighted) of character 1- to 6-grams,
optionally plus word 1- and 2-grams (chrF++, `word_order=2`). Robust to morphology and
needs no word segmentation, which makes it the better default for CJK and for highly
inflected languages. What it cannot measure: meaning (synonyms with different spelling
get no credit), word order beyond short n-grams, factual correctness.
"""

from __future__ import annotations

from typing import Any, Sequence

from ...errors import LmforgeError

# sacrebleu's tokenizer per target language; Japanese and Korean morphological tokenizers
# need MeCab, so they fall back to one token per character.
BLEU_TOKENIZE = {"zh": "zh", "ja": "char", "ko": "char"}


def _import_sacrebleu():
    try:
        import sacrebleu
    except ImportError:
        raise LmforgeError("BLEU and chrF need sacrebleu (pip install 'lmforge[eval]')") from None
    return sacrebleu


def reference_streams(references: Sequence[str | Sequence[str]], n_predictions: int) -> list[list[str | None]]:
    """Per-prediction reference lists -> sacrebleu's one-stream-per-reference-slot layout."""
    if len(references) != n_predictions:
        raise LmforgeError(f"{n_predictions} predictions but {len(references)} references")
    if n_predictions == 0:
        raise LmforgeError("no predictions to score")
    per_item = [[r] if isinstance(r, str) else list(r) for r in references]
    if any(not refs for refs in per_item):
        raise LmforgeError("every prediction needs at least one reference")
    width = max(map(len, per_item))
    # A missing reference is None, which sacrebleu skips (variable numbers of references).
    return [[refs[k] if k < len(refs) else None for refs in per_item] for k in range(width)]


def bleu(
    predictions: Sequence[str],
    references: Sequence[str | Sequence[str]],
    lang: str | None = None,
    tokenize: str | None = None,
    lowercase: bool = False,
) -> dict[str, Any]:
    """Corpus BLEU (0-100) with its n-gram precisions, brevity penalty and signature."""
    sacrebleu = _import_sacrebleu()
    streams = reference_streams(references, len(predictions))
    tokenize = tokenize or BLEU_TOKENIZE.get((lang or "").lower(), "13a")
    try:
        metric = sacrebleu.metrics.BLEU(tokenize=tokenize, lowercase=lowercase)
    except Exception as exc:  # unknown tokenizer name, missing MeCab, ...
        raise LmforgeError(f"sacrebleu cannot use tokenize={tokenize!r}: {exc}") from None
    result = metric.corpus_score(list(predictions), streams)
    return {"score": result.score, "precisions": list(result.precisions), "brevity_penalty": result.bp,
            "sys_len": result.sys_len, "ref_len": result.ref_len, "signature": str(metric.get_signature())}


def chrf(
    predictions: Sequence[str],
    references: Sequence[str | Sequence[str]],
    word_order: int = 0,
) -> dict[str, Any]:
    """Corpus chrF (0-100); `word_order=2` gives chrF++."""
    sacrebleu = _import_sacrebleu()
    streams = reference_streams(references, len(predictions))
    metric = sacrebleu.metrics.CHRF(word_order=word_order)
    result = metric.corpus_score(list(predictions), streams)
    return {"score": result.score, "signature": str(metric.get_signature())}
