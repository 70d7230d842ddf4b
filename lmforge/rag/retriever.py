"""Hybrid retrieval: dense vectors and BM25 keywords fused by reciprocal rank, with a confidence.

Dense search (the embedder's cosine similarity, from the store's index) finds passages
that say the same thing in other words; BM25 finds the exact terms, names and numbers a
question uses, and, through the pages' Chinese titles and key terms, Chinese questions
about English pages. Reciprocal rank fusion merges the two lists by rank, so neither
score scale has to be calibrated against the other. An optional maximal-marginal-relevance
pass trades a little relevance for less repetition among the chunks given to the model.

**Confidence.** A question the knowledge base cannot answer still gets a nearest
neighbour. Two signals say whether that neighbour is an answer: the best dense cosine
(how close the closest passage's meaning is), and the BM25 *strength*, the best chunk's
BM25 score divided by the most the query's terms could score (every term matched, at its
IDF): near 1 when one chunk holds all the rare terms of the question, near 0 when the
question's words are unknown to the collection. The retrieval is confident when either
passes its threshold. The thresholds are calibrated on the labelled questions, separately
for English and for Chinese questions (`lmforge rag eval --calibrate`), and stored in the
index's metadata.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import LmforgeError
from .bm25 import BM25Index
from .config import RETRIEVAL_MODES as MODES
from .config import RetrieverOptions
from .fusion import mmr_hits, reciprocal_rank_fusion
from .text import is_chinese
from .types import Hit

LANGS = ("en", "zh")


def query_lang(query: str) -> str:
    """The language group whose thresholds judge `query`: "zh" for mostly-CJK text, else "en"."""
    return "zh" if is_chinese(query) else "en"


# Used when an index has not been calibrated: permissive values that refuse only questions
# far from everything (see `lmforge rag eval --calibrate` for measured ones).
DEFAULT_MIN_COSINE = 0.30
DEFAULT_MIN_STRENGTH = 0.25


@dataclass
class SearchLists:
    query_vector: np.ndarray
    dense: list[Hit]
    keyword: list[Hit]
    signals: dict[str, float]


@dataclass
class Retrieval:
    hits: list[Hit]
    confidence: float  # the larger of the two signals, each divided by its threshold (>= 1: confident)
    confident: bool
    signals: dict[str, float] = field(default_factory=dict)  # best dense cosine, BM25 strength
    seconds: float = 0.0


class Retriever:
    """Search over one store with one embedder (the one the store was built with)."""

    def __init__(self, store, embedder, options: RetrieverOptions | None = None) -> None:
        store.check_model(embedder.model_id)
        self.store = store
        self.embedder = embedder
        self.options = options or RetrieverOptions()
        self._bm25: BM25Index | None = None
        meta = store.meta
        # Thresholds per question language: an English embedder's cosine means little for a
        # Chinese question, so each language gets the pair calibrated on its own questions.
        self.thresholds: dict[str, tuple[float, float]] = {}
        for lang in LANGS:
            cos = self.options.min_cosine
            strength = self.options.min_strength
            cos = float(meta.get(f"min_cosine_{lang}", DEFAULT_MIN_COSINE)) if cos is None else cos
            strength = float(meta.get(f"min_strength_{lang}", DEFAULT_MIN_STRENGTH)) if strength is None else strength
            self.thresholds[lang] = (cos, strength)

    @property
    def bm25(self) -> BM25Index:
        """The keyword index, built in memory from the store's chunks on first use."""
        if self._bm25 is None:
            self._bm25 = BM25Index.build(self.store.all_chunks())
        return self._bm25

    def retrieve(self, query: str, k: int = 5, filters: dict[str, Any] | None = None,
                 mode: str | None = None) -> Retrieval:
        """The `k` best chunks for `query` and whether they are likely to answer it."""
        mode = mode or self.options.mode
        if mode not in MODES:
            raise LmforgeError(f"retrieval mode must be one of {', '.join(MODES)}, got {mode!r}")
        started = time.perf_counter()
        lists = self.search_lists(query, max(k, self.options.depth), filters)
        hits = self.combine(lists, mode, k, query_lang(query))
        return Retrieval(hits, *self.judge(lists.signals, query_lang(query)), lists.signals,
                         time.perf_counter() - started)

    def search_lists(self, query: str, depth: int, filters: dict[str, Any] | None = None) -> SearchLists:
        """Both ranked lists for `query` and the confidence signals (measured whatever the mode)."""
        query_vector = self.embedder.encode([query], normalize=True)[0]
        dense = self.store.search(query_vector, k=depth, filters=filters)
        terms = self.bm25.analyzer(query)
        keyword = self.bm25.search_terms(terms, k=depth, filters=filters)
        signals = {"cosine": dense[0].score if dense else 0.0,
                   "strength": self.strength(terms, keyword[0].score if keyword else 0.0)}
        return SearchLists(query_vector, dense, keyword, signals)

    def combine(self, lists: SearchLists, mode: str, k: int, lang: str = "en") -> list[Hit]:
        """The hits of one mode from the two lists: one of them, or their fusion (then MMR, when on).

        For a Chinese question the dense list counts `dense_weight_zh` (an English embedder
        places Chinese text poorly, while BM25 matches the pages' Chinese key terms exactly).
        """
        if mode == "dense":
            hits = lists.dense
        elif mode == "bm25":
            hits = lists.keyword
        else:
            weights = {"dense": self.options.dense_weight_zh if lang == "zh" else 1.0, "bm25": 1.0}
            hits = reciprocal_rank_fusion({"dense": lists.dense, "bm25": lists.keyword}, k=self.options.rrf_k,
                                          weights=weights)
        if self.options.mmr is not None and len(hits) > k:
            hits = self._diverse(hits[: max(k, self.options.depth)], lists.query_vector, k)
        return hits[:k]

    def judge(self, signals: dict[str, float], lang: str = "en") -> tuple[float, bool]:
        """(confidence, confident): each signal over its threshold, the larger counts; >= 1 is confident."""
        min_cosine, min_strength = self.thresholds[lang]
        confidence = max(signals["cosine"] / min_cosine if min_cosine > 0 else math.inf,
                         signals["strength"] / min_strength if min_strength > 0 else math.inf)
        return confidence, confidence >= 1.0

    def strength(self, terms: list[str], top_score: float) -> float:
        """`top_score` over the most `terms` could score in this collection (see the module's description)."""
        index = self.bm25
        n = len(index)
        if not terms or n == 0:
            return 0.0
        unseen = math.log1p((n + 0.5) / 0.5)  # a term in no chunk counts as the rarest possible
        total = 0.0
        for term in terms:
            posting = index._posting(term)
            total += (posting[2] if posting is not None else unseen) * (index.k1 + 1.0)
        return float(top_score / total) if total > 0 else 0.0

    def _diverse(self, hits: list[Hit], query_vector: np.ndarray, k: int) -> list[Hit]:
        vectors = self.embedder.encode([h.chunk.embed_text() for h in hits], normalize=True)
        return mmr_hits(hits, vectors, query_vector, k, lambda_=self.options.mmr, use_scores=True)
