"""Combining and reordering retrieval results: metadata filters, reciprocal rank fusion, MMR.

**Filters.** A filter is a mapping from a field to the value(s) wanted, e.g.
`{"source": "refunds.md"}` or `{"kind": ["markdown", "html"], "lang": "zh"}`. Every store
and BM25 give it the same meaning (the SQL stores translate it into their own WHERE):

* a key is `source` (the chunk's document), or else a key of `chunk.metadata`;
* a scalar value matches a field equal to it; a list (or tuple or set) matches a field
  equal to any of its values, so an empty list matches nothing;
* values compare as JSON values: a string never equals a number, `true` never equals 1;
  numbers compare by value (2 == 2.0);
* a field whose value is itself a list (`terms`, `zh_terms`) matches when any of its items
  matches;
* a chunk without the field does not match; all keys must match (AND); no filter, or an
  empty one, matches everything.

**Reciprocal rank fusion** (Cormack, Clarke and Büttcher, 2009) merges ranked lists whose
scores are not comparable (BM25 scores and cosine similarities): each list contributes
w / (k + rank) for each chunk it ranks (rank 1-based), and chunks are ordered by the sum.
With k = 60 a first place is worth 1/61 and a tenth place 1/70: agreement between lists
counts for more than a high place in one of them.

**Maximal marginal relevance** (Carbonell and Goldstein, 1998) picks k of n candidates one
at a time, each maximizing lambda * sim(query, d) - (1 - lambda) * max over already picked
s of sim(d, s): lambda = 1 is plain relevance order, lambda = 0 pure diversity. It keeps
five near-copies of one paragraph from filling the five slots of a prompt.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from numbers import Real
from typing import Any, Callable

from ..errors import LmforgeError
from .types import Chunk, Hit

Filters = Mapping[str, Any]
_CHUNK_FIELDS = ("source",)


def normalize_filters(filters: Filters | None) -> dict[str, tuple[Any, ...]]:
    """Each key with the tuple of values it accepts; a malformed filter is an `LmforgeError`."""
    if not filters:
        return {}
    if not isinstance(filters, Mapping):
        raise LmforgeError(f"a filter is a mapping of field names to values, not {type(filters).__name__}")
    out: dict[str, tuple[Any, ...]] = {}
    for key, value in filters.items():
        if not isinstance(key, str) or not key:
            raise LmforgeError(f"filter keys are field names (strings), not {key!r}")
        values = tuple(value) if isinstance(value, (list, tuple, set, frozenset)) else (value,)
        for item in values:
            if not (item is None or isinstance(item, (str, bool, Real))):
                raise LmforgeError(f"filter {key!r}: values are strings, numbers, booleans or null, "
                                   f"not {type(item).__name__}")
        out[key] = values
    return out


def _same(a: Any, b: Any) -> bool:
    """JSON equality: a bool only equals a bool, a number only a number, a string only a string."""
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    if isinstance(a, Real) and isinstance(b, Real):
        return a == b
    if isinstance(a, str) and isinstance(b, str):
        return a == b
    return a is None and b is None


def field_value(chunk: Chunk, key: str) -> tuple[bool, Any]:
    """(present, value) of a filter key on a chunk."""
    if key in _CHUNK_FIELDS:
        return True, getattr(chunk, key)
    if key in chunk.metadata:
        return True, chunk.metadata[key]
    return False, None


def matches(chunk: Chunk, filters: Filters | None) -> bool:
    """Whether `chunk` passes `filters` (see the module's description of their meaning)."""
    for key, wanted in normalize_filters(filters).items():
        present, value = field_value(chunk, key)
        if not present:
            return False
        have = value if isinstance(value, (list, tuple)) else (value,)
        if not any(_same(h, w) for h in have for w in wanted):
            return False
    return True


def make_filter(filters: Filters | None) -> Callable[[Chunk], bool]:
    """A predicate for `filters`, checked once (errors surface here, not per chunk)."""
    normalized = normalize_filters(filters)
    if not normalized:
        return lambda chunk: True
    return lambda chunk: matches(chunk, normalized)


def reciprocal_rank_fusion(results: Mapping[str, Sequence[Hit]] | Sequence[Sequence[Hit]], k: float = 60,
                           weights: Mapping[str, float] | Sequence[float] | None = None,
                           limit: int | None = None) -> list[Hit]:
    """Ranked lists of hits merged into one by reciprocal rank fusion.

    `results` maps a retriever's name ("dense", "bm25") to its hits, best first (a plain
    sequence of lists is named "0", "1", ...). Each fused hit's `ranks` holds its 1-based
    place in every list that found it (besides any ranks the input hits carried), and its
    score is sum of weight / (k + rank). Ties are broken by the best single rank, then by
    the order of the lists and places in them, then by chunk id, so the order is the same
    on every run. A chunk is identified by its id; a repeat within one list counts once.
    """
    if k < 0:
        raise LmforgeError(f"the RRF constant k must be zero or positive, not {k}")
    named = dict(results) if isinstance(results, Mapping) else {str(i): hits for i, hits in enumerate(results)}
    if weights is None:
        weight = {name: 1.0 for name in named}
    elif isinstance(weights, Mapping):
        unknown = sorted(set(weights) - set(named))
        if unknown:
            raise LmforgeError(f"weights name unknown result lists {unknown}; lists: {sorted(named)}")
        weight = {name: float(weights.get(name, 1.0)) for name in named}
    else:
        if len(weights) != len(named):
            raise LmforgeError(f"{len(weights)} weights for {len(named)} result lists")
        weight = {name: float(w) for name, w in zip(named, weights)}
    scores: dict[str, float] = {}
    chunks: dict[str, Chunk] = {}
    ranks: dict[str, dict[str, int]] = {}
    order: dict[str, tuple[int, int]] = {}  # (best rank, first list index, ...) for ties
    for list_index, (name, hits) in enumerate(named.items()):
        seen: set[str] = set()
        for place, hit in enumerate(hits, 1):
            key = hit.chunk.id
            if key in seen:
                continue
            seen.add(key)
            if key not in chunks:
                chunks[key], ranks[key], scores[key] = hit.chunk, dict(hit.ranks), 0.0
                order[key] = (place, list_index)
            else:
                for other, rank in hit.ranks.items():
                    ranks[key].setdefault(other, rank)
                order[key] = min(order[key], (place, list_index))
            ranks[key][name] = place
            scores[key] += weight[name] / (k + place)
    keys = sorted(scores, key=lambda key: (-scores[key], order[key], key))
    if limit is not None:
        keys = keys[:limit]
    return [Hit(chunk=chunks[key], score=scores[key], ranks=ranks[key]) for key in keys]


def maximal_marginal_relevance(query: Sequence[float], candidates: Sequence[Sequence[float]], k: int,
                               lambda_: float = 0.5, relevance: Sequence[float] | None = None) -> list[int]:
    """Indices of `k` candidates in MMR order (cosine similarity; ties go to the lower index).

    `relevance` replaces sim(query, candidate) where the candidates' relevance is known
    better than by the query vector (a reranker's or a fused score).
    """
    import numpy as np

    if not 0.0 <= lambda_ <= 1.0:
        raise LmforgeError(f"MMR lambda must be between 0 and 1, not {lambda_}")
    if k < 0:
        raise LmforgeError(f"MMR k must be zero or positive, not {k}")
    vectors = np.asarray(candidates, dtype=np.float64)
    if vectors.size == 0:
        return []
    if vectors.ndim != 2:
        raise LmforgeError(f"MMR candidates must be a list of vectors, got an array of shape {vectors.shape}")
    q = np.asarray(query, dtype=np.float64).reshape(-1)
    if q.shape[0] != vectors.shape[1]:
        raise LmforgeError(f"query vector has {q.shape[0]} dimensions, candidates {vectors.shape[1]}")

    def unit(x: Any) -> Any:
        norm = np.linalg.norm(x, axis=-1, keepdims=True)
        return x / np.where(norm == 0, 1.0, norm)

    vectors = unit(vectors)
    if relevance is None:
        rel = vectors @ unit(q)
    else:
        rel = np.asarray(relevance, dtype=np.float64).reshape(-1)
        if rel.shape[0] != vectors.shape[0]:
            raise LmforgeError(f"{rel.shape[0]} relevance scores for {vectors.shape[0]} candidates")
    similarity = vectors @ vectors.T
    n = vectors.shape[0]
    chosen: list[int] = []
    redundancy = np.full(n, -np.inf)  # max similarity to anything chosen so far
    available = np.ones(n, dtype=bool)
    for _ in range(min(k, n)):
        penalty = np.where(np.isfinite(redundancy), redundancy, 0.0)
        score = lambda_ * rel - (1.0 - lambda_) * penalty
        score = np.where(available, score, -np.inf)
        best = int(np.argmax(score))  # argmax returns the first of equal maxima
        chosen.append(best)
        available[best] = False
        redundancy = np.maximum(redundancy, similarity[best])
    return chosen


def mmr_hits(hits: Sequence[Hit], vectors: Sequence[Sequence[float]], query: Sequence[float], k: int,
             lambda_: float = 0.5, use_scores: bool = False) -> list[Hit]:
    """`hits` (with one vector each) reordered and cut to `k` by MMR; ranks gain {"mmr": place}.

    With `use_scores` the hits' own scores, scaled to [0, 1], are the relevance term
    instead of cosine similarity to `query` (for fused lists, whose scores are ranks).
    """
    if len(hits) != len(vectors):
        raise LmforgeError(f"{len(vectors)} vectors for {len(hits)} hits")
    relevance = None
    if use_scores and hits:
        scores = [h.score for h in hits]
        low, high = min(scores), max(scores)
        relevance = [(s - low) / (high - low) if high > low else 1.0 for s in scores]
    order = maximal_marginal_relevance(query, vectors, k, lambda_, relevance)
    return [Hit(chunk=hits[i].chunk, score=hits[i].score, ranks={**hits[i].ranks, "mmr": place})
            for place, i in enumerate(order, 1)]
