"""The server vector store: PostgreSQL with the pgvector extension.

    store = open_store("postgresql://user:password@host:5432/db", create=True)
    store = open_store("postgresql://user@host/db?schema=handbook")  # another index, same database

One index lives in one PostgreSQL schema (`lmforge` unless the URL's `schema` parameter
names another): tables `meta`, `documents` and `chunks`, the chunk's metadata as JSONB
(with a GIN index for filters) and its vector in a `vector(dim)` column with an HNSW index
for cosine distance. Interface, filter rule, scores and tie order are those of the SQLite
store: the same data gives the same exact results in both.

Approximate search is pgvector's HNSW index. pgvector applies a WHERE clause to the
candidates the index scan yields (`hnsw.ef_search` of them), so a selective filter can
leave fewer than k; when that happens the query runs again exactly (a scan of the rows
that pass the filter), so k results come back whenever k exist.
"""

from __future__ import annotations

import json
import re
import struct
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, Sequence
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import numpy as np

from ...errors import LmforgeError
from ..types import Chunk, Hit
from .base import (FORMAT_VERSION, Filters, VectorStore, check_chunks, check_filters, check_k, check_query,
                   check_vectors, rank_hits, utc_now)

SCHEMA_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")
TIE_ROWS = 16  # extra rows fetched so that near-ties at the k-th place are ordered as SQLite orders them
PAGE = 500
COLUMNS = "id, source, text, headings, line_start, line_end, metadata"


@dataclass
class HnswParams:
    """pgvector's HNSW settings: graph degree and build beam (fixed when the index is built),
    and the query beam (candidates per query; pgvector allows up to 1000)."""

    m: int = 16
    ef_construction: int = 64
    ef_search: int = 100

    def __post_init__(self) -> None:
        if not (2 <= self.m <= 100 and 4 <= self.ef_construction <= 1000 and 1 <= self.ef_search <= 1000
                and self.ef_construction >= 2 * self.m):
            raise LmforgeError(f"HnswParams out of pgvector's ranges (m 2-100, ef_construction 4-1000 and at "
                               f"least 2 m, ef_search 1-1000): {self}")


@dataclass
class Endpoint:
    """Where a URL points, for messages: never the password."""

    host: str
    port: str
    dbname: str

    def __str__(self) -> str:
        return f"{self.host}:{self.port}" + (f" (database {self.dbname})" if self.dbname else "")


def split_url(url: str) -> tuple[str, str, Endpoint, str | None]:
    """(URL for libpq without lmforge's `schema` parameter, schema, endpoint, password)."""
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    schema = "lmforge"
    kept = []
    for key, value in query:
        if key == "schema":
            schema = value
        else:
            kept.append((key, value))
    if not SCHEMA_NAME.match(schema):
        raise LmforgeError(f"schema {schema!r} in the PostgreSQL URL must be a lower-case SQL name "
                           f"(letters, digits, _)")
    params = dict(kept)
    try:
        port = params.get("port") or (str(parts.port) if parts.port else "5432")
    except ValueError:
        raise LmforgeError("the PostgreSQL URL has an invalid port") from None
    host = params.get("host") or parts.hostname or "localhost"
    dbname = params.get("dbname") or parts.path.lstrip("/") or (parts.username or "")
    clean = urlunsplit((parts.scheme, parts.netloc, parts.path, urlencode(kept), parts.fragment))
    return clean, schema, Endpoint(host, port, dbname), parts.password


class _Psycopg:
    """psycopg, imported on first use (it is the `rag` extra, not a core dependency)."""

    def __getattr__(self, name: str) -> Any:
        try:
            import psycopg
        except ImportError:
            raise LmforgeError("PostgreSQL stores need psycopg: pip install 'lmforge[rag]'") from None
        return getattr(psycopg, name)


pg = _Psycopg()


def _vector_dumper(oid: int) -> type:
    """A psycopg dumper sending float32 arrays in pgvector's binary format (dim, unused, floats)."""
    from psycopg.adapt import Dumper
    from psycopg.pq import Format

    class VectorDumper(Dumper):
        format = Format.BINARY

        def dump(self, obj: np.ndarray) -> bytes:
            array = np.asarray(obj, dtype=">f4")
            return struct.pack(">HH", array.size, 0) + array.tobytes()

    VectorDumper.oid = oid
    return VectorDumper


class PostgresStore(VectorStore):
    """A vector store in a PostgreSQL schema with pgvector; see the module docstring."""

    def __init__(self, url: str, *, create: bool = False, hnsw: HnswParams | None = None,
                 connect_timeout: int = 10) -> None:
        conninfo, self.schema, self.endpoint, password = split_url(url)
        self.location = f"postgresql://{self.endpoint}/{self.schema}"
        self.hnsw = hnsw or HnswParams()
        self._password = password
        self._lock = threading.RLock()
        self._in_run = 0
        try:
            self._conn = pg.connect(conninfo, autocommit=True, connect_timeout=connect_timeout)
        except pg.Error as exc:
            raise LmforgeError(f"cannot connect to PostgreSQL at {self.endpoint}: {self._reason(exc)}") from None
        try:
            with self._errors():
                self._setup(create)
        except BaseException:
            self._conn.close()
            raise

    # -- connection -----------------------------------------------------------------------
    def _reason(self, exc: BaseException) -> str:
        lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
        reason = lines[0] if lines else type(exc).__name__
        reason = reason.split(" failed: ")[-1]  # libpq prefixes "connection to server at ... failed: "
        if self._password:
            reason = reason.replace(self._password, "***")
        return reason

    @contextmanager
    def _errors(self) -> Iterator[None]:
        """A lost or refused connection becomes one LmforgeError naming the server."""
        try:
            yield
        except pg.OperationalError as exc:
            raise LmforgeError(f"PostgreSQL at {self.endpoint} failed: {self._reason(exc)}") from None

    @property
    def _db(self) -> Any:
        if self._conn is None or self._conn.closed:
            raise LmforgeError(f"the index {self.location} is closed")
        return self._conn

    def _setup(self, create: bool) -> None:
        conn = self._conn
        schema = self.schema
        exists = conn.execute("SELECT to_regclass(%s)", (f"{schema}.meta",)).fetchone()[0] is not None
        if not exists and not create:
            raise LmforgeError(f"no lmforge index in schema {schema} of PostgreSQL at {self.endpoint}: "
                               f"build one first (create=True)")
        if not exists:
            with conn.transaction():
                conn.execute("SELECT pg_advisory_xact_lock(hashtext('lmforge-create'))")
                try:
                    conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
                except pg.Error as exc:
                    raise LmforgeError(f"PostgreSQL at {self.endpoint} cannot enable pgvector "
                                       f"(CREATE EXTENSION vector): {self._reason(exc)}") from None
                for statement in (
                    f"CREATE SCHEMA IF NOT EXISTS {schema}",
                    f"CREATE TABLE IF NOT EXISTS {schema}.meta (key text PRIMARY KEY, value jsonb NOT NULL)",
                    f"CREATE TABLE IF NOT EXISTS {schema}.documents (source text PRIMARY KEY, digest text NOT NULL, "
                    f"chunks integer NOT NULL, indexed text NOT NULL)",
                    f"CREATE TABLE IF NOT EXISTS {schema}.chunks (id text PRIMARY KEY, source text NOT NULL, "
                    f"position integer NOT NULL, text text NOT NULL, headings jsonb NOT NULL, "
                    f"line_start integer NOT NULL, line_end integer NOT NULL, metadata jsonb NOT NULL, "
                    f"embedding vector NOT NULL)",
                    f"CREATE INDEX IF NOT EXISTS chunks_by_source ON {schema}.chunks (source, position)",
                    f"CREATE INDEX IF NOT EXISTS chunks_metadata ON {schema}.chunks USING gin (metadata jsonb_path_ops)",
                ):
                    conn.execute(statement)
                conn.execute(f"INSERT INTO {schema}.meta VALUES ('format_version', %s), ('created', %s) "
                             f"ON CONFLICT DO NOTHING", (json.dumps(FORMAT_VERSION), json.dumps(utc_now())))
        conn.execute(f"SET search_path TO {schema}, public")
        oid = conn.execute("SELECT oid FROM pg_type WHERE typname = 'vector'").fetchone()
        if oid is None:
            raise LmforgeError(f"PostgreSQL at {self.endpoint} has no pgvector extension in this database")
        conn.adapters.register_dumper(np.ndarray, _vector_dumper(oid[0]))
        version = self.meta.get("format_version")
        if version != FORMAT_VERSION:
            raise LmforgeError(f"{self.location} has index format {version}; this lmforge reads format "
                               f"{FORMAT_VERSION}: rebuild the index")

    # -- transactions ---------------------------------------------------------------------
    @contextmanager
    def indexing(self) -> Iterator[None]:
        with self._lock, self._errors():
            if self._in_run:
                self._in_run += 1
                try:
                    yield
                finally:
                    self._in_run -= 1
                return
            with self._db.transaction():
                # One writer per index at a time; readers are never blocked.
                self._db.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (f"lmforge-index:{self.schema}",))
                self._in_run = 1
                try:
                    yield
                finally:
                    self._in_run = 0

    @contextmanager
    def _write(self) -> Iterator[None]:
        """One write: a savepoint inside a run (a failed write leaves the run as it was), else a run."""
        with self._lock:
            if self._in_run:
                with self._errors(), self._db.transaction():
                    yield
            else:
                with self.indexing():
                    yield

    # -- metadata -------------------------------------------------------------------------
    @property
    def meta(self) -> dict[str, Any]:
        with self._lock, self._errors():
            return dict(self._db.execute("SELECT key, value FROM meta").fetchall())

    def _dim(self) -> int | None:
        row = self._db.execute("SELECT value FROM meta WHERE key = 'dim'").fetchone()
        return None if row is None else int(row[0])

    def set_meta(self, model_id: str, dim: int, **extra: Any) -> None:
        self._check_new_meta(self.meta, model_id, dim)
        values = {"model_id": model_id, "dim": int(dim), **extra}
        try:
            rows = [(key, json.dumps(value, ensure_ascii=False)) for key, value in values.items()]
        except (TypeError, ValueError) as exc:
            raise LmforgeError(f"index metadata must be JSON values: {exc}") from None
        with self._write():
            conn = self._db
            if self._dim() != int(dim):  # the column's type and its index follow the dimension
                conn.execute("DROP INDEX IF EXISTS chunks_embedding")
                conn.execute(f"ALTER TABLE chunks ALTER COLUMN embedding TYPE vector({int(dim)})")
                conn.execute(f"CREATE INDEX chunks_embedding ON chunks USING hnsw (embedding vector_cosine_ops) "
                             f"WITH (m = {self.hnsw.m}, ef_construction = {self.hnsw.ef_construction})")
            conn.cursor().executemany("INSERT INTO meta VALUES (%s, %s::jsonb) ON CONFLICT (key) DO UPDATE "
                                      "SET value = excluded.value", rows)

    # -- documents and chunks -------------------------------------------------------------
    def documents(self) -> dict[str, str]:
        with self._lock, self._errors():
            return dict(self._db.execute("SELECT source, digest FROM documents ORDER BY source COLLATE \"C\"").fetchall())

    def count(self) -> int:
        with self._lock, self._errors():
            return int(self._db.execute("SELECT count(*) FROM chunks").fetchone()[0])

    def replace_document(self, source: str, digest: str, chunks: list[Chunk], vectors: np.ndarray) -> None:
        check_chunks(source, chunks)
        with self._write():
            unit = check_vectors(vectors, len(chunks), self._dim())
            conn = self._db
            conn.execute("DELETE FROM chunks WHERE source = %s", (source,))
            conn.execute("DELETE FROM documents WHERE source = %s", (source,))
            conn.execute("INSERT INTO documents VALUES (%s, %s, %s, %s)", (source, str(digest), len(chunks), utc_now()))
            rows = []
            for position, chunk in enumerate(chunks):
                try:
                    metadata = json.dumps(chunk.metadata, ensure_ascii=False, sort_keys=True, allow_nan=False)
                except (TypeError, ValueError) as exc:
                    raise LmforgeError(f"metadata of chunk {chunk.id} ({source}) cannot be stored as JSON: "
                                       f"{exc}") from None
                rows.append((chunk.id, source, position, chunk.text, json.dumps(list(chunk.headings), ensure_ascii=False),
                             int(chunk.line_start), int(chunk.line_end), metadata, unit[position]))
            try:
                conn.cursor().executemany(
                    "INSERT INTO chunks (id, source, position, text, headings, line_start, line_end, metadata, "
                    "embedding) VALUES (%s, %s, %s, %s, %s::jsonb, %s, %s, %s::jsonb, %s)", rows)
            except pg.errors.UniqueViolation:
                raise LmforgeError(f"a chunk id of {source!r} is already used by another document") from None

    def delete_document(self, source: str) -> None:
        with self._write():
            self._db.execute("DELETE FROM chunks WHERE source = %s", (source,))
            self._db.execute("DELETE FROM documents WHERE source = %s", (source,))

    @staticmethod
    def _chunk(row: Sequence[Any]) -> Chunk:
        cid, source, text, headings, line_start, line_end, metadata = row[:7]
        return Chunk(source=source, text=text, headings=tuple(headings), line_start=line_start, line_end=line_end,
                     metadata=metadata, id=cid)

    def get(self, ids: Sequence[str]) -> list[Chunk]:
        ids = list(ids)
        with self._lock, self._errors():
            found = {row[0]: self._chunk(row) for row in
                     self._db.execute(f"SELECT {COLUMNS} FROM chunks WHERE id = ANY(%s)", (ids,)).fetchall()}
        return [found[i] for i in ids if i in found]

    def all_chunks(self) -> Iterator[Chunk]:
        """Every chunk by source and position, read in pages (a write between pages may show)."""
        after: tuple[str, int] = ("", -1)
        while True:
            with self._lock, self._errors():
                page = self._db.execute(
                    f"SELECT {COLUMNS}, position FROM chunks WHERE (source COLLATE \"C\", position) > (%s, %s) "
                    f"ORDER BY source COLLATE \"C\", position LIMIT {PAGE}", after).fetchall()
            if not page:
                return
            for row in page:
                yield self._chunk(row)
            after = (page[-1][1], page[-1][-1])

    # -- search ---------------------------------------------------------------------------
    def search(self, vector: Any, k: int = 10, filters: dict[str, Any] | None = None,
               exact: bool = False) -> list[Hit]:
        """The k most similar chunks passing `filters`: HNSW unless `exact`, exact when HNSW finds too few."""
        k = check_k(k)
        conditions = check_filters(filters)
        with self._lock, self._errors():
            query = check_query(vector, self._dim())
            where, params = self._filter_sql(conditions)
            limit = k + TIE_ROWS
            sql = (f"SELECT {COLUMNS}, embedding <=> %s AS distance FROM chunks WHERE {where} "
                   f"ORDER BY embedding <=> %s LIMIT {limit}")
            args = [query, *params, query]
            # Never prepared: a prepared statement keeps the plan it got under the settings of its
            # first runs, so exact queries would go on using the HNSW index (or the reverse).
            rows: list[Any] = []
            if not exact:
                with self._db.transaction():
                    self._db.execute(f"SET LOCAL hnsw.ef_search = {min(1000, max(self.hnsw.ef_search, limit))}")
                    rows = self._db.execute(sql, args, prepare=False).fetchall()
            if exact or len(rows) < k:
                with self._db.transaction():
                    self._db.execute("SET LOCAL enable_indexscan = off")  # a scan of every row: exact
                    rows = self._db.execute(sql, args, prepare=False).fetchall()
                    self._db.execute("SET LOCAL enable_indexscan = on")  # inside a run the setting would outlive us
        return rank_hits(((self._chunk(row), 1.0 - float(row[-1])) for row in rows), k)

    @staticmethod
    def _filter_sql(filters: Filters) -> tuple[str, list[Any]]:
        """A WHERE condition for `filters`: JSONB containment, as a value or as an item of a list value."""
        clauses: list[str] = []
        params: list[Any] = []
        for key, values in filters.items():
            if not values:
                clauses.append("false")
            elif key == "source":
                clauses.append("source = ANY(%s)")
                params.append(list(values))
            else:
                options = []
                for value in values:
                    options.append("metadata @> %s::jsonb OR metadata @> %s::jsonb")
                    params += [json.dumps({key: value}), json.dumps({key: [value]})]
                clauses.append(f"({' OR '.join(options)})")
        return " AND ".join(clauses) or "true", params

    # -- lifetime -------------------------------------------------------------------------
    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None
