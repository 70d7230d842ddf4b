"""The vector store interface that every backend (SQLite, PostgreSQL) implements.

A store holds documents (a source and the digest of its content, for incremental
re-indexing), their chunks, one embedding vector per chunk, and the metadata that says
which embedding model made the vectors. It answers nearest-neighbour queries by cosine
similarity, with optional metadata filters, exactly or through an approximate index.

The checks and conversions both backends share live here, so that the two answer the
same inputs with the same values and the same error messages.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from contextlib import contextmanager
from datetime import datetime, timezone
from typing import Any, Iterable, Iterator, Sequence

import numpy as np

from ...errors import LmforgeError
from ..types import Chunk, Hit

FORMAT_VERSION = 1
# Metadata keys a filter may name: they become JSON paths in SQL, so only plain names pass.
FILTER_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]{0,63}$")
FilterValue = str | int | float | bool | None
Filters = dict[str, list[FilterValue]]


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def normalize_rows(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (float32); an all-zero row stays zero."""
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return (vectors / np.where(norms > 0, norms, 1.0)).astype(np.float32, copy=False)


def check_vectors(vectors: Any, n: int, dim: int | None, what: str = "vectors") -> np.ndarray:
    """`vectors` as a float32 (n, dim) array with unit rows, or one clear error."""
    if dim is None:
        raise LmforgeError("the index has no embedding model yet: call set_meta(model_id=..., dim=...) first")
    array = np.asarray(vectors, dtype=np.float32)
    if array.ndim == 1 and n == 1:
        array = array[None, :]
    if array.ndim != 2 or array.shape != (n, dim):
        raise LmforgeError(f"{what} must have shape ({n}, {dim}) (one {dim}-d vector per chunk), "
                           f"got {tuple(array.shape)}")
    if not np.isfinite(array).all():
        raise LmforgeError(f"{what} contain NaN or infinite values")
    zero = np.flatnonzero(~array.any(axis=1))
    if zero.size:
        raise LmforgeError(f"{what}: row {int(zero[0])} is all zeros (an empty chunk?); it has no direction to "
                           f"compare by cosine")
    return normalize_rows(array)


def check_query(vector: Any, dim: int | None) -> np.ndarray:
    """A query as a unit float32 vector of the index's dimension."""
    if dim is None:
        raise LmforgeError("the index is empty: it has no embedding model or vectors yet")
    array = np.asarray(vector, dtype=np.float32)
    if array.ndim == 2 and array.shape[0] == 1:
        array = array[0]
    if array.shape != (dim,):
        raise LmforgeError(f"the query vector must have {dim} dimensions, got shape {tuple(array.shape)}")
    if not np.isfinite(array).all():
        raise LmforgeError("the query vector contains NaN or infinite values")
    if not array.any():
        raise LmforgeError("the query vector is all zeros: it has no direction to compare by cosine")
    return normalize_rows(array[None, :])[0]


def check_filters(filters: dict[str, Any] | None) -> Filters:
    """Filters as key -> accepted values (any-of); `{}` for none.

    A value that is a list or tuple means any of its items. A chunk matches a key when its
    metadata value equals one of the accepted values, or, if its value is a list, when that
    list contains one of them. `source` names the chunk's document. Keys are combined with AND.
    """
    if not filters:
        return {}
    if not isinstance(filters, dict):
        raise LmforgeError(f"filters must be a dict of metadata key -> value, got {type(filters).__name__}")
    out: Filters = {}
    for key, value in filters.items():
        if not isinstance(key, str) or not FILTER_KEY.match(key):
            raise LmforgeError(f"filter key {key!r} is not a plain metadata name (letters, digits, _ and -)")
        values = list(value) if isinstance(value, (list, tuple, set, frozenset)) else [value]
        for item in values:
            if item is not None and not isinstance(item, (str, int, float, bool)):
                raise LmforgeError(f"filter {key!r}: values must be strings, numbers, booleans or None, "
                                   f"got {type(item).__name__}")
        if key == "source" and not all(isinstance(item, str) for item in values):
            raise LmforgeError("filter 'source': values must be strings (document paths)")
        out[key] = values
    return out


def check_chunks(source: str, chunks: Sequence[Chunk]) -> None:
    if not isinstance(source, str) or not source:
        raise LmforgeError("a document needs a non-empty source name")
    seen: set[str] = set()
    for chunk in chunks:
        if chunk.source != source:
            raise LmforgeError(f"chunk {chunk.id} belongs to {chunk.source!r}, not to document {source!r}")
        if chunk.id in seen:
            raise LmforgeError(f"document {source!r} has two chunks with id {chunk.id} "
                               f"(same headings and text): ids must be unique")
        seen.add(chunk.id)


def metadata_matches(metadata: dict[str, Any], source: str, filters: Filters) -> bool:
    """The filter rule of `check_filters`, in Python (for tests and small in-memory checks)."""
    for key, accepted in filters.items():
        value = source if key == "source" else metadata.get(key, _MISSING)
        if value is _MISSING:
            return False
        items = value if isinstance(value, list) else [value]
        if not any(_same_json_value(item, want) for item in items for want in accepted):
            return False
    return True


_MISSING = object()


def _same_json_value(a: Any, b: Any) -> bool:
    """Equality as JSON sees it: booleans are not numbers, 1 equals 1.0."""
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    return a == b


# Scores this close count as tied: float32 dot products of identical vectors can differ in the
# last bits with their place in memory, and each backend sums in its own order.
TIE_TOLERANCE = 1e-6


def rank_hits(candidates: Iterable[tuple[Chunk, float]], k: int) -> list[Hit]:
    """The best `k` of (chunk, score) candidates as hits: by score, ties (within
    `TIE_TOLERANCE`) by chunk id, so that every backend orders equal vectors the same way."""
    ordered = sorted(candidates, key=lambda item: -item[1])
    ranked: list[tuple[Chunk, float]] = []
    group: list[tuple[Chunk, float]] = []
    for item in ordered:
        if group and group[0][1] - item[1] > TIE_TOLERANCE:
            ranked += sorted(group, key=lambda c: c[0].id)
            group = []
        group.append(item)
    ranked += sorted(group, key=lambda c: c[0].id)
    return [Hit(chunk=chunk, score=float(score), ranks={"dense": rank})
            for rank, (chunk, score) in enumerate(ranked[:k], 1)]


class VectorStore(ABC):
    """Chunks, their vectors and the index over them, in one place.

    Vectors are stored L2-normalized, so cosine similarity is a dot product. Every write
    is atomic: a document's old chunks and new chunks never coexist; `indexing()` extends
    that to a whole run of writes.
    """

    location: str

    # -- metadata -------------------------------------------------------------------------
    @property
    @abstractmethod
    def meta(self) -> dict[str, Any]:
        """`model_id`, `dim`, `created`, `format_version` and any extras given to `set_meta`."""

    @abstractmethod
    def set_meta(self, model_id: str, dim: int, **extra: Any) -> None:
        """Record the embedding model (and extras). Changing the model of a non-empty index is an error."""

    def check_model(self, model_id: str) -> None:
        """An error if the index was built with another embedding model."""
        built = self.meta.get("model_id")
        if built is not None and built != model_id:
            raise LmforgeError(f"index was built with embedding model {built}, not {model_id}: "
                               f"rebuild the index or query it with {built}")

    def _check_new_meta(self, current: dict[str, Any], model_id: str, dim: int) -> None:
        if not isinstance(model_id, str) or not model_id:
            raise LmforgeError("set_meta needs the embedding model's name (model_id)")
        if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or dim <= 0:
            raise LmforgeError(f"set_meta needs a positive vector dimension, got {dim!r}")
        old_model, old_dim = current.get("model_id"), current.get("dim")
        if (old_model, old_dim) not in ((None, None), (model_id, dim)) and self.count() > 0:
            raise LmforgeError(f"index was built with embedding model {old_model} ({old_dim}-d); it cannot "
                               f"switch to {model_id} ({dim}-d) while it holds chunks: rebuild it")

    # -- documents and chunks -------------------------------------------------------------
    @abstractmethod
    def documents(self) -> dict[str, str]:
        """source -> content digest of every indexed document."""

    @abstractmethod
    def replace_document(self, source: str, digest: str, chunks: list[Chunk], vectors: np.ndarray) -> None:
        """The document's old chunks go and `chunks` (with one vector each) come, atomically."""

    @abstractmethod
    def delete_document(self, source: str) -> None:
        """The document and its chunks go (nothing happens if it is not indexed)."""

    @abstractmethod
    def count(self) -> int:
        """The number of chunks."""

    @abstractmethod
    def get(self, ids: Sequence[str]) -> list[Chunk]:
        """The chunks with these ids, in the order asked; ids not in the index are left out."""

    @abstractmethod
    def all_chunks(self) -> Iterator[Chunk]:
        """Every chunk, by document and position in it."""

    @abstractmethod
    @contextmanager
    def indexing(self) -> Iterator[None]:
        """Group writes: all of them are committed at the end of the block, or none are."""

    # -- search ---------------------------------------------------------------------------
    @abstractmethod
    def search(self, vector: Any, k: int = 10, filters: dict[str, Any] | None = None,
               exact: bool = False) -> list[Hit]:
        """The k chunks most similar to `vector` (cosine) that pass `filters`, best first."""

    # -- lifetime -------------------------------------------------------------------------
    @abstractmethod
    def close(self) -> None:
        """Release the connection; the store cannot be used afterwards."""

    def __enter__(self) -> VectorStore:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.location!r})"


def check_k(k: int) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise LmforgeError(f"k must be a positive number of results, got {k!r}")
    return int(k)
