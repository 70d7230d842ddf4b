"""Has the traffic changed? Two tests on question embeddings: MMD and PSI over clusters.

The monitor keeps a *reference* (the questions of a period known to be fine, by default
the first ones it is fed) and a *sliding window* of the latest questions. Every
`check_every` new questions both tests compare the window with the reference:

- **MMD** (maximum mean discrepancy) with an RBF kernel k(x, y) = exp(-|x-y|^2 / (2 s^2)):
  the squared distance between the two samples' mean embeddings in the kernel's feature
  space, estimated without bias as

      MMD^2 = mean_{i!=j} k(x_i, x_j) + mean_{i!=j} k(y_i, y_j) - 2 mean_{i,j} k(x_i, y_j)

  The bandwidth s is the median pairwise distance of the pooled sample (the median
  heuristic). The p-value comes from a permutation test: shuffle the pooled sample's
  labels, recompute MMD^2, and count how often chance does at least as well.
- **PSI** (population stability index) over k-means clusters of the reference: fit k
  centroids on the reference, give each question the nearest one, and compare the two
  histograms: PSI = sum_c (w_c - r_c) ln(w_c / r_c). Readable per cluster (which kind of
  question grew) and cheap; the usual rule reads < 0.1 as stable and > 0.25 as a shift.

A test whose statistic crosses its threshold marks the state *drifting*; an *alert* (a
counter, a log line) fires when drifting starts and again only after `cooldown_seconds`,
so one lasting shift is one page, not one per check. The gauges always show the latest
values.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from collections import deque
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Callable, Sequence

import numpy as np

from ..errors import LmforgeError
from .config import DriftOptions

__all__ = ["DriftMonitor", "DriftOptions", "DriftState", "kmeans", "mmd_test", "psi"]

log = logging.getLogger("lmforge.monitor")


# ---- the statistics -------------------------------------------------------------------------

def _squared_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a.astype(np.float64, copy=False)
    b = b.astype(np.float64, copy=False)
    d = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * a @ b.T
    return np.maximum(d, 0.0)


def median_bandwidth(squared: np.ndarray) -> float:
    """The median heuristic: the median distance between distinct points (1.0 if all coincide)."""
    upper = squared[np.triu_indices(squared.shape[0], k=1)]
    positive = upper[upper > 0]
    return float(math.sqrt(np.median(positive))) if positive.size else 1.0


@dataclass
class MMDResult:
    mmd2: float  # unbiased estimate of the squared MMD (may be slightly negative by chance)
    p_value: float
    bandwidth: float


def mmd_test(x: np.ndarray, y: np.ndarray, permutations: int = 200, seed: int = 0,
             bandwidth: float | None = None) -> MMDResult:
    """Two-sample test of `x` [n, d] against `y` [m, d]: unbiased MMD^2 with an RBF kernel and
    its permutation p-value, (1 + #{shuffled >= observed}) / (1 + permutations)."""
    x, y = np.asarray(x), np.asarray(y)
    n, m = len(x), len(y)
    if n < 2 or m < 2:
        raise LmforgeError("the MMD test needs at least 2 points in each sample")
    pooled = np.concatenate([x, y])
    squared = _squared_distances(pooled, pooled)
    s = bandwidth if bandwidth is not None else median_bandwidth(squared)
    kernel = np.exp(-squared / (2.0 * s * s))
    np.fill_diagonal(kernel, 0.0)  # the unbiased estimate leaves the i == j terms out
    total = kernel.sum()

    def statistic(members: np.ndarray) -> np.ndarray:
        """MMD^2 for each row of `members` [b, n+m] (1.0 marks the first sample)."""
        projected = members @ kernel
        within_x = (projected * members).sum(1)
        across = (projected * (1.0 - members)).sum(1)
        within_y = total - within_x - 2.0 * across
        return within_x / (n * (n - 1)) + within_y / (m * (m - 1)) - 2.0 * across / (n * m)

    observed_members = np.zeros((1, n + m))
    observed_members[0, :n] = 1.0
    observed = float(statistic(observed_members)[0])
    rng = np.random.default_rng(seed)
    exceed = 0
    for start in range(0, permutations, 64):
        rows = min(64, permutations - start)
        members = np.zeros((rows, n + m))
        for r in range(rows):
            members[r, rng.permutation(n + m)[:n]] = 1.0
        exceed += int((statistic(members) >= observed - 1e-12).sum())
    return MMDResult(observed, (1 + exceed) / (1 + permutations), s)


def kmeans(points: np.ndarray, k: int, seed: int = 0, iterations: int = 50) -> np.ndarray:
    """k centroids [k, d] by Lloyd's algorithm from a k-means++ start."""
    points = np.asarray(points, dtype=np.float64)
    if not 1 <= k <= len(points):
        raise LmforgeError(f"k-means needs 1 <= k <= {len(points)} points, got k={k}")
    rng = np.random.default_rng(seed)
    centroids = [points[rng.integers(len(points))]]
    nearest = _squared_distances(points, np.array(centroids))[:, 0]
    for _ in range(1, k):  # k-means++: the next centre far from those chosen, with odds by squared distance
        total = nearest.sum()
        index = rng.choice(len(points), p=nearest / total) if total > 0 else rng.integers(len(points))
        centroids.append(points[index])
        nearest = np.minimum(nearest, _squared_distances(points, points[index][None])[:, 0])
    centres = np.array(centroids)
    for _ in range(iterations):
        labels = _squared_distances(points, centres).argmin(1)
        moved = centres.copy()
        for c in range(k):
            members = points[labels == c]
            if len(members):
                moved[c] = members.mean(0)
        if np.allclose(moved, centres):
            break
        centres = moved
    return centres


def assign(points: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    return _squared_distances(np.asarray(points), centroids).argmin(1)


def psi(reference: Sequence[float], current: Sequence[float], epsilon: float = 1e-4) -> float:
    """Population stability index of two histograms (counts or shares), empty bins floored at `epsilon`."""
    r = np.asarray(reference, dtype=np.float64)
    c = np.asarray(current, dtype=np.float64)
    if r.shape != c.shape or r.sum() <= 0 or c.sum() <= 0:
        raise LmforgeError("PSI needs two non-empty histograms over the same bins")
    r = np.maximum(r / r.sum(), epsilon)
    c = np.maximum(c / c.sum(), epsilon)
    return float(((c - r) * np.log(c / r)).sum())


# ---- the monitor ----------------------------------------------------------------------------

@dataclass
class DriftState:
    """The latest comparison of the window with the reference."""

    checks: int = 0
    seen: int = 0  # questions fed since the reference was set
    window: int = 0  # questions in the window now
    mmd2: float | None = None
    mmd_p_value: float | None = None
    bandwidth: float | None = None
    psi: float | None = None
    reference_shares: list[float] = field(default_factory=list)  # per cluster
    window_shares: list[float] = field(default_factory=list)
    drifting: dict[str, bool] = field(default_factory=lambda: {"mmd": False, "psi": False})
    alerts: dict[str, int] = field(default_factory=lambda: {"mmd": 0, "psi": 0})  # alerts fired so far
    alerted_now: list[str] = field(default_factory=list)  # tests whose alert fired at the latest check
    seconds: float | None = None  # time the latest check took

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class DriftMonitor:
    """Feed questions (`feed(texts)`) or vectors (`feed_vectors`), read `state`.

    Embedding is the slow part: call `feed` off the event loop (a thread), never inside
    an async route. `embed(texts) -> [n, d]` turns texts into vectors (default: `options.embedding_model`,
    loaded on first use). With a Prometheus `registry`, the latest statistics are gauges
    (`lmforge_drift_mmd_p_value`, `lmforge_drift_psi`, `lmforge_drift_alert{test}`) and the
    alerts a counter (`lmforge_drift_alerts_total{test}`). `clock` is for tests.
    """

    TESTS = ("mmd", "psi")

    def __init__(self, options: DriftOptions | None = None, embed: Callable[[list[str]], np.ndarray] | None = None,
                 registry=None, clock: Callable[[], float] = time.monotonic) -> None:
        self.options = options or DriftOptions()
        self._embed = embed
        self.clock = clock
        self.reference: np.ndarray | None = None
        self.centroids: np.ndarray | None = None
        self._reference_counts: np.ndarray | None = None
        self._pending_reference: list[np.ndarray] = []
        self.window: deque[np.ndarray] = deque(maxlen=self.options.window)
        self._since_check = 0
        self._last_alert: dict[str, float] = {}
        self.state = DriftState()
        self._lock = threading.RLock()  # feeding from several request threads: one check at a time
        self._gauges = None
        if registry is not None:
            self.register(registry)

    # -------------------------------------------------------------- prometheus
    def register(self, registry) -> None:
        """Put the monitor's gauges and alert counter on a Prometheus `registry`."""
        from prometheus_client import Counter, Gauge

        self._gauges = {
            "p": Gauge("lmforge_drift_mmd_p_value", "Permutation p-value of the MMD test, window vs reference",
                       registry=registry),
            "mmd2": Gauge("lmforge_drift_mmd2", "Unbiased squared MMD of the window vs the reference",
                          registry=registry),
            "psi": Gauge("lmforge_drift_psi", "PSI over the reference's k-means clusters, window vs reference",
                         registry=registry),
            "alert": Gauge("lmforge_drift_alert", "1 while a drift test is past its threshold", ["test"],
                           registry=registry),
            "alerts": Counter("lmforge_drift_alerts", "Drift alerts fired (after the cool-down)", ["test"],
                              registry=registry),
        }
        for test in self.TESTS:
            self._gauges["alert"].labels(test).set(0)
            self._gauges["alerts"].labels(test)

    # -------------------------------------------------------------- feeding
    def embed(self, texts: Sequence[str]) -> np.ndarray:
        if self._embed is None:
            from ..rag.embedder import load_embedder

            embedder = load_embedder(self.options.embedding_model)
            self._embed = lambda batch: embedder.encode(list(batch), normalize=True)
        return np.asarray(self._embed(list(texts)), dtype=np.float32)

    def set_reference(self, vectors: np.ndarray) -> None:
        """Make `vectors` [n, d] the reference (fits the PSI clusters) and empty the window."""
        with self._lock:
            self._set_reference(np.asarray(vectors, dtype=np.float32))

    def _set_reference(self, vectors: np.ndarray) -> None:
        if vectors.ndim != 2 or len(vectors) < max(4, self.options.clusters):
            raise LmforgeError(f"the drift reference needs at least {max(4, self.options.clusters)} vectors, "
                               f"got {len(vectors)}")
        self.reference = vectors
        self.centroids = kmeans(vectors, self.options.clusters, seed=self.options.seed)
        self._reference_counts = np.bincount(assign(vectors, self.centroids), minlength=self.options.clusters)
        self.window.clear()
        self._since_check = 0
        self.state = DriftState(reference_shares=(self._reference_counts / len(vectors)).round(4).tolist())

    def set_reference_texts(self, texts: Sequence[str]) -> None:
        self.set_reference(self.embed(texts))

    def feed(self, texts: Sequence[str]) -> DriftState | None:
        """Add questions; returns the new state when a check ran, else None."""
        texts = [t for t in texts if isinstance(t, str) and t.strip()]
        return self.feed_vectors(self.embed(texts)) if texts else None

    def feed_vectors(self, vectors: np.ndarray) -> DriftState | None:
        with self._lock:
            return self._feed_vectors(np.asarray(vectors, dtype=np.float32))

    def _feed_vectors(self, vectors: np.ndarray) -> DriftState | None:
        checked = None
        for vector in vectors:
            if self.reference is None:
                self._pending_reference.append(vector)
                if len(self._pending_reference) >= self.options.reference_size:
                    self._set_reference(np.stack(self._pending_reference))
                    self._pending_reference = []
                continue
            self.window.append(vector)
            self.state.seen += 1
            self._since_check += 1
            if len(self.window) == self.window.maxlen and self._since_check >= self.options.check_every:
                checked = self._check()
        return checked

    # -------------------------------------------------------------- testing
    def check(self) -> DriftState:
        """Compare the window with the reference now (both tests); alerts fire here."""
        with self._lock:
            return self._check()

    def _check(self) -> DriftState:
        if self.reference is None or len(self.window) < 2:
            raise LmforgeError("no drift check before a reference and a window of at least 2 questions")
        started = time.perf_counter()
        current = np.stack(self.window)
        # A new state object per check: one returned earlier keeps describing its own check.
        s = self.state = replace(self.state, drifting=dict(self.state.drifting), alerts=dict(self.state.alerts),
                                 alerted_now=[])
        o = self.options
        result = mmd_test(self.reference, current, o.permutations, seed=o.seed + s.checks)
        counts = np.bincount(assign(current, self.centroids), minlength=o.clusters)
        s.psi = psi(self._reference_counts, counts)
        s.mmd2, s.mmd_p_value, s.bandwidth = result.mmd2, result.p_value, result.bandwidth
        s.window_shares = (counts / len(current)).round(4).tolist()
        s.window = len(current)
        s.checks += 1
        self._since_check = 0
        s.drifting = {"mmd": result.p_value < o.mmd_alpha, "psi": s.psi > o.psi_threshold}
        now = self.clock()
        for test in self.TESTS:
            last = self._last_alert.get(test)
            if s.drifting[test] and (last is None or now - last >= o.cooldown_seconds):
                self._last_alert[test] = now
                s.alerts[test] += 1
                s.alerted_now.append(test)
                log.warning(json.dumps({"drift_alert": test, "mmd2": round(s.mmd2, 6), "p_value": s.mmd_p_value,
                                        "psi": round(s.psi, 4), "window": s.window, "check": s.checks}))
        s.seconds = time.perf_counter() - started
        if self._gauges is not None:
            g = self._gauges
            g["p"].set(s.mmd_p_value)
            g["mmd2"].set(s.mmd2)
            g["psi"].set(s.psi)
            for test in self.TESTS:
                g["alert"].labels(test).set(1 if s.drifting[test] else 0)
            for test in s.alerted_now:
                g["alerts"].labels(test).inc()
        return s
