"""An approximate nearest-neighbour index in NumPy: IVF-flat over spherical k-means.

The vectors are split into `nlist` lists by k-means: each vector goes to the list of its
most similar centroid. A query compares itself with the centroids, then scores only the
vectors of its `nprobe` most similar lists, exactly. Lists keep full float32 vectors
("flat": no compression), so the scores are exact and the only error is a neighbour that
sits in a list the query did not probe.

Why IVF and not HNSW here: its whole state is the centroids and one list number per
vector, so it persists as one small blob plus a column, new vectors join by a single
nearest-centroid lookup (no graph to repair), deletions need nothing, metadata filters
become a mask over the probed lists, and a query is a handful of dense matrix-vector
products, which NumPy does at full speed (a graph walk is a loop of tiny steps that
Python would make slow).

All vectors are unit length, so cosine similarity is the dot product, and k-means is
spherical: centroids are re-normalized means, vectors are assigned by largest dot product.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from ...errors import LmforgeError
from ...io.progress import Progress

ASSIGN_BATCH = 8192  # rows per matrix product when assigning: bounds memory at batch x nlist floats


@dataclass
class IvfParams:
    """How the store indexes and searches its vectors.

    Below `exact_below` vectors every search is exact (brute force): at that size a query
    costs about a millisecond in NumPy, and no index has to be trained or kept current.
    """

    exact_below: int = 20_000  # fewer vectors: exact search, no index
    nlist: int = 0  # lists; 0: about 2 * sqrt(n) at training time
    nprobe: int = 0  # lists probed per query; 0: nlist / 8, at least 8
    iterations: int = 12  # k-means iterations (it stops earlier once the assignment settles)
    sample_per_list: int = 64  # k-means trains on at most nlist * this many vectors
    seed: int = 0
    # Retraining: when the collection has grown or shrunk by this factor since training, or when
    # at least `drift_min_fraction` new vectors sit clearly further from their centroids than
    # the training vectors did (mean similarity lower by `drift_tolerance`).
    resize_factor: float = 2.0
    drift_tolerance: float = 0.05
    drift_min_fraction: float = 0.05

    def __post_init__(self) -> None:
        for name in ("exact_below", "nlist", "nprobe", "iterations", "sample_per_list"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise LmforgeError(f"IvfParams.{name} must be a non-negative integer, got {value!r}")
        if self.iterations < 1 or self.sample_per_list < 1:
            raise LmforgeError("IvfParams.iterations and sample_per_list must be at least 1")
        if self.resize_factor <= 1:
            raise LmforgeError(f"IvfParams.resize_factor must be above 1, got {self.resize_factor}")

    def lists_for(self, n: int) -> int:
        nlist = self.nlist or int(round(2 * math.sqrt(n)))
        return max(1, min(nlist, n))

    def probes_for(self, nlist: int) -> int:
        return max(1, min(nlist, self.nprobe or max(8, nlist // 8)))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> IvfParams:
        known = {name for name in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass
class IvfState:
    """What the index remembers about its training, to decide when to train again."""

    nlist: int = 0
    trained_n: int = 0  # vectors in the collection at training time
    train_similarity: float = 0.0  # their mean similarity to their own centroid
    added: int = 0  # vectors assigned since training
    added_similarity: float = 0.0  # sum of their similarities to their centroid
    removed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> IvfState:
        known = {name for name in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in known})

    def record_added(self, similarities: np.ndarray) -> None:
        self.added += int(similarities.size)
        self.added_similarity += float(similarities.sum(dtype=np.float64))


def retrain_reason(state: IvfState | None, n: int, params: IvfParams) -> str | None:
    """Why the index should be (re)trained now, or None when it is good as it is."""
    if n < params.exact_below or n == 0:
        return None  # searched exactly: no index needed
    if state is None or state.nlist == 0:
        return f"{n:,} vectors reach the exact-search limit of {params.exact_below:,}"
    if n > state.trained_n * params.resize_factor or n * params.resize_factor < state.trained_n:
        return f"the collection went from {state.trained_n:,} to {n:,} vectors since training"
    if params.nlist and params.nlist != state.nlist:
        return f"nlist changed from {state.nlist} to {params.nlist}"
    if state.added >= max(1, params.drift_min_fraction * state.trained_n):
        drift = state.train_similarity - state.added_similarity / state.added
        if drift > params.drift_tolerance:
            return (f"{state.added:,} new vectors fit the lists worse than the training vectors "
                    f"(mean similarity to their centroid {drift:.3f} lower)")
    return None


def assign(vectors: np.ndarray, centroids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(list of each vector, its similarity to that list's centroid)."""
    n = vectors.shape[0]
    labels = np.empty(n, dtype=np.int64)
    sims = np.empty(n, dtype=np.float32)
    for start in range(0, n, ASSIGN_BATCH):
        block = vectors[start:start + ASSIGN_BATCH] @ centroids.T
        labels[start:start + ASSIGN_BATCH] = best = block.argmax(axis=1)
        sims[start:start + ASSIGN_BATCH] = block[np.arange(block.shape[0]), best]
    return labels, sims


def _unit(rows: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    return (rows / np.where(norms > 0, norms, 1.0)).astype(np.float32)


def _seed_centroids(vectors: np.ndarray, nlist: int, rng: np.random.Generator) -> np.ndarray:
    """k-means++ seeds (each next seed drawn with probability growing with its squared distance
    from the seeds so far), on a subsample of at most 8 vectors per list to keep it cheap.

    Random seeds often put two seeds in one natural cluster and none in another, and
    k-means then stays in that local minimum; spreading the seeds avoids most of that.
    """
    m = min(vectors.shape[0], max(nlist * 8, 1024))
    pool = vectors[rng.choice(vectors.shape[0], m, replace=False)] if m < vectors.shape[0] else vectors
    picked = [int(rng.integers(pool.shape[0]))]
    distance = np.maximum(0.0, 2.0 - 2.0 * (pool @ pool[picked[0]]))  # squared distance of unit vectors
    for _ in range(1, nlist):
        total = float(distance.sum())
        nxt = int(rng.choice(pool.shape[0], p=distance / total)) if total > 0 else int(rng.integers(pool.shape[0]))
        picked.append(nxt)
        np.minimum(distance, np.maximum(0.0, 2.0 - 2.0 * (pool @ pool[nxt])), out=distance)
    return pool[picked].copy()


def train_centroids(vectors: np.ndarray, nlist: int, params: IvfParams, *,
                    progress: Progress | None = None) -> np.ndarray:
    """Spherical k-means on a sample of `vectors` (unit rows): `nlist` unit centroids.

    Starts from k-means++ seeds; a list that runs empty takes over half of the largest
    list (its centroid nudged apart from the big one's), as faiss does, so no list is
    wasted.
    """
    rng = np.random.default_rng(params.seed)
    n = vectors.shape[0]
    nlist = max(1, min(nlist, n))
    sample_size = min(n, nlist * params.sample_per_list)
    sample = vectors[np.sort(rng.choice(n, sample_size, replace=False))] if sample_size < n else vectors
    centroids = _seed_centroids(sample, nlist, rng)
    previous = None
    for iteration in range(params.iterations):
        labels, _ = assign(sample, centroids)
        order = np.argsort(labels, kind="stable")
        counts = np.bincount(labels, minlength=nlist)
        starts = np.concatenate(([0], np.cumsum(counts)[:-1]))
        nonempty = counts > 0
        sums = np.zeros_like(centroids)
        sums[nonempty] = np.add.reduceat(sample[order], starts[nonempty], axis=0)
        centroids = _unit(sums)
        for empty in np.flatnonzero(~nonempty):
            big = int(counts.argmax())
            if counts[big] < 2:
                break
            noise = rng.standard_normal(centroids.shape[1]).astype(np.float32) * 1e-3
            centroids[empty] = centroids[big] + noise
            centroids[big] = centroids[big] - noise
            centroids[[empty, big]] = _unit(centroids[[empty, big]])
            counts[empty] = counts[big] // 2
            counts[big] -= counts[empty]
        if progress is not None:
            progress.update(iteration + 1, info=f"{nlist} lists")
        if previous is not None and np.array_equal(previous, labels):
            break  # the assignment no longer changes: converged
        previous = labels
    return centroids


@dataclass
class IvfIndex:
    """Vectors grouped by list for search: list `i` is rows `offsets[i]:offsets[i+1]` of `vectors`.

    `positions[j]` is the caller's index of row `j` (the order the vectors came in), so
    results are reported in the caller's numbering.
    """

    centroids: np.ndarray  # (nlist, dim)
    vectors: np.ndarray  # (n, dim), grouped by list
    positions: np.ndarray  # (n,) caller's index of each row
    offsets: np.ndarray  # (nlist + 1,)
    _bounds: list[int] = field(init=False, repr=False)  # offsets as Python ints: cheaper to index in a loop

    def __post_init__(self) -> None:
        self._bounds = self.offsets.tolist()

    @classmethod
    def build(cls, centroids: np.ndarray, vectors: np.ndarray, labels: np.ndarray) -> IvfIndex:
        order = np.argsort(labels, kind="stable")
        counts = np.bincount(labels, minlength=centroids.shape[0])
        offsets = np.concatenate(([0], np.cumsum(counts))).astype(np.int64)
        return cls(centroids=centroids, vectors=np.ascontiguousarray(vectors[order]), positions=order,
                   offsets=offsets)

    @property
    def nlist(self) -> int:
        return self.centroids.shape[0]

    def search(self, query: np.ndarray, k: int, nprobe: int, allowed: np.ndarray | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
        """(caller positions, scores) of the best candidates found, best first.

        Probes the `nprobe` lists nearest the query; if those hold fewer than `k` vectors that
        `allowed` (a boolean mask in the caller's numbering) lets through, it goes on to the
        next-nearest lists until it has `k` or has probed them all. Returns at least `k`
        candidates when that many exist, plus any tied with the k-th.
        """
        nprobe = max(1, nprobe)
        order = np.argsort(-(self.centroids @ query), kind="stable")
        mask = None if allowed is None else allowed[self.positions]
        parts: list[np.ndarray] = []  # scores of the probed rows (those `allowed`)
        firsts: list[int] = []  # each part's first row, when the part is a whole list
        picks: list[np.ndarray] = []  # or its rows, when a mask thinned it
        have = probed = 0
        while probed < self.nlist:
            for list_id in order[probed:probed + nprobe].tolist():
                start, end = self._bounds[list_id], self._bounds[list_id + 1]
                if start == end:
                    continue
                scores = self.vectors[start:end] @ query
                if mask is not None:
                    kept = np.flatnonzero(mask[start:end])
                    if kept.size == 0:
                        continue
                    scores = scores[kept]
                    picks.append(kept + start)
                else:
                    firsts.append(start)
                parts.append(scores)
                have += scores.size
            probed += nprobe
            if have >= k:
                break
        if not parts:
            return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.float32)
        scores = np.concatenate(parts)
        best = top_k(scores, k)
        if mask is not None:
            rows = np.concatenate(picks)[best]
        else:  # row of a concatenated index: its part's first row plus the offset into the part
            bounds = np.cumsum([0] + [p.size for p in parts])
            part = np.searchsorted(bounds, best, side="right") - 1
            rows = np.asarray(firsts)[part] + (best - bounds[part])
        return self.positions[rows], scores[best]


def top_k(scores: np.ndarray, k: int, tie: float = 1e-6) -> np.ndarray:
    """Indices of the k largest scores, best first, plus every index within `tie` of the k-th.

    Near-ties are kept so that the caller can break them by a stable key (the chunk id) and
    two stores holding the same vectors return the same order.
    """
    n = scores.size
    if n <= k:
        picked = np.arange(n)
    else:
        picked = np.argpartition(-scores, k - 1)[:k]
        kth = scores[picked].min()
        picked = np.flatnonzero(scores >= kth - tie)
    return picked[np.argsort(-scores[picked], kind="stable")]


def exact_search(vectors: np.ndarray, query: np.ndarray, k: int, subset: np.ndarray | None = None
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Brute force: (positions, scores) of the k best rows (of `subset` when given), ties kept."""
    if subset is None:
        scores = vectors @ query
        best = top_k(scores, k)
        return best, scores[best]
    scores = vectors[subset] @ query
    best = top_k(scores, k)
    return subset[best], scores[best]
