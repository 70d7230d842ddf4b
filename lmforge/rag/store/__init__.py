"""Vector stores: chunks, their embedding vectors and a nearest-neighbour index.

    store = open_store("index.sqlite", create=True)       # embedded, one file, no server
    store = open_store("postgresql://user@host/db")       # PostgreSQL with pgvector

Both implement `VectorStore` (see `base`). The SQLite store searches with lmforge's own
IVF index (`ann`) above `IvfParams.exact_below` vectors and exactly below; the
PostgreSQL store uses pgvector's HNSW index.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ...errors import LmforgeError
from .base import VectorStore

__all__ = ["VectorStore", "open_store", "is_postgres_url"]


def is_postgres_url(location: str | Path) -> bool:
    return isinstance(location, str) and location.split("://", 1)[0].lower() in ("postgresql", "postgres")


def open_store(location: str | Path, *, create: bool = False, **options: Any) -> VectorStore:
    """The store at `location`: a file path (SQLite) or a ``postgresql://`` URL.

    `create=True` makes a new, empty index when none exists there (an existing one is
    opened as it is). Options go to the backend: ``ann_params=IvfParams(...)`` for SQLite,
    ``hnsw=HnswParams(...)`` for PostgreSQL.
    """
    if is_postgres_url(location):
        from .postgres import PostgresStore

        allowed = {"hnsw", "connect_timeout"}
        backend = PostgresStore
    else:
        from .sqlite import SqliteStore

        allowed = {"ann_params", "busy_timeout"}
        backend = SqliteStore
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise LmforgeError(f"{backend.__name__} has no option {', '.join(unknown)} "
                           f"(it takes {', '.join(sorted(allowed))})")
    if isinstance(location, str) and "://" in location and not is_postgres_url(location):
        raise LmforgeError(f"unknown index location {location.split('://', 1)[0]}://: give a file path "
                           f"or a postgresql:// URL")
    return backend(location, create=create, **options)
