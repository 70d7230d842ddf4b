"""The embedded vector store: one SQLite file holding chunks, vectors and the IVF index.

Tables:

- `meta` (key, JSON value): embedding model, dimension, creation time, format version, extras.
- `documents` (source, digest, chunk count, time indexed).
- `chunks` (row, id, source, position, text, headings JSON, line range, metadata JSON).
- `vectors` (row of the chunk, IVF list, float32 BLOB): apart from the text so that loading
  all vectors reads no text pages.
- `ann` (key, value): the IVF centroids, the index's training state and parameters, and a
  generation number that every committed write bumps.

The file is in WAL mode: readers (threads or processes) never wait for a writer and see
the last committed index; one writer at a time. A write run is one transaction, so an
interrupted run (exception, Ctrl-C, the process killed) leaves the previous index as it
was. Searches run in memory: the vectors are read once (grouped by IVF list) and read
again only when the generation number says another write was committed.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from ...errors import LmforgeError
from ...io.progress import Progress
from ..types import Chunk, Hit
from . import ann
from .base import (FORMAT_VERSION, Filters, VectorStore, check_chunks, check_filters, check_k, check_query,
                   check_vectors, rank_hits, utc_now)

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS documents (
    source TEXT PRIMARY KEY, digest TEXT NOT NULL, chunks INTEGER NOT NULL, indexed TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS chunks (
    row INTEGER PRIMARY KEY, id TEXT NOT NULL UNIQUE, source TEXT NOT NULL, position INTEGER NOT NULL,
    text TEXT NOT NULL, headings TEXT NOT NULL, line_start INTEGER NOT NULL, line_end INTEGER NOT NULL,
    metadata TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS chunks_by_source ON chunks (source, position);
CREATE TABLE IF NOT EXISTS vectors (row INTEGER PRIMARY KEY, list INTEGER, vector BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS ann (key TEXT PRIMARY KEY, value BLOB NOT NULL);
"""
CHUNK_COLUMNS = "c.row, c.id, c.source, c.text, c.headings, c.line_start, c.line_end, c.metadata"
BUSY_TIMEOUT_S = 60.0  # how long a writer waits for another process's write run to finish
PAGE = 500  # rows per query when reading chunks in pages
FILTER_CACHE = 64  # filters whose passing chunks are remembered per committed generation
LOAD_PROGRESS_FROM = 200_000  # vectors: smaller loads take about a second and draw no progress line


def chunk_from_row(row: Sequence[Any]) -> Chunk:
    _, cid, source, text, headings, line_start, line_end, metadata = row
    return Chunk(source=source, text=text, headings=tuple(json.loads(headings)), line_start=line_start,
                 line_end=line_end, metadata=json.loads(metadata), id=cid)


def metadata_json(chunk: Chunk) -> str:
    try:
        return json.dumps(chunk.metadata, ensure_ascii=False, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise LmforgeError(f"metadata of chunk {chunk.id} ({chunk.source}) cannot be stored as JSON: {exc}") from None


def filter_sql(filters: Filters) -> tuple[str, dict[str, Any]]:
    """A WHERE condition on `chunks c` for `filters` (see base.check_filters for the rule)."""
    clauses: list[str] = []
    params: dict[str, Any] = {}
    for n, (key, values) in enumerate(filters.items()):
        if not values:
            clauses.append("0")
            continue
        names = [f"v{n}_{i}" for i in range(len(values))]
        params.update(zip(names, values))
        if key == "source":
            clauses.append(f"c.source IN ({', '.join(':' + name for name in names)})")
            continue
        path = f"p{n}"
        params[path] = f'$."{key}"'

        def matches(type_of: str, value_of: str) -> str:
            options = []
            for name, value in zip(names, values):
                if value is None:
                    options.append(f"{type_of} = 'null'")
                elif isinstance(value, bool):
                    options.append(f"{type_of} = '{'true' if value else 'false'}'")
                elif isinstance(value, (int, float)):
                    options.append(f"({type_of} IN ('integer', 'real') AND {value_of} = :{name})")
                else:
                    options.append(f"({type_of} = 'text' AND {value_of} = :{name})")
            return " OR ".join(options)

        # A list value matches when one of its items does; JSON objects never match.
        clauses.append(
            f"CASE json_type(c.metadata, :{path}) "
            f"WHEN 'array' THEN EXISTS (SELECT 1 FROM json_each(c.metadata, :{path}) AS j "
            f"WHERE {matches('j.type', 'j.atom')}) "
            f"ELSE coalesce({matches(f'json_type(c.metadata, :{path})', f'json_extract(c.metadata, :{path})')}, 0) END")
    return " AND ".join(clauses) or "1", params


@dataclass
class _Snapshot:
    """The committed vectors in memory, grouped by IVF list when an index exists."""

    generation: int
    rows: np.ndarray  # (n,) chunk rows, in the order of `vectors`
    vectors: np.ndarray  # (n, dim)
    index: ann.IvfIndex | None
    row_order: np.ndarray  # argsort of `rows`, to map rows to positions
    filtered: dict[str, np.ndarray] = field(default_factory=dict)  # filters -> positions that pass

    def positions_of(self, rows: np.ndarray) -> np.ndarray:
        if self.rows.size == 0 or rows.size == 0:
            return np.empty(0, dtype=np.int64)
        sorted_rows = self.rows[self.row_order]
        where = np.searchsorted(sorted_rows, rows).clip(0, sorted_rows.size - 1)
        found = sorted_rows[where] == rows  # rows committed after this snapshot are not in it
        return self.row_order[where[found]]


class SqliteStore(VectorStore):
    """A vector store in one SQLite file; see the module docstring for its layout."""

    def __init__(self, path: str | Path, *, create: bool = False, ann_params: ann.IvfParams | None = None,
                 busy_timeout: float = BUSY_TIMEOUT_S) -> None:
        self.path = Path(path)
        self.location = str(self.path)
        self._lock = threading.RLock()
        self._in_run = 0
        self._snapshot: _Snapshot | None = None
        self._busy_timeout = busy_timeout
        self._ivf: tuple[np.ndarray, ann.IvfState] | None = None  # read at the start of each write run
        if self.path.is_dir():
            raise LmforgeError(f"{self.path} is a directory: give the index a file name, such as "
                               f"{self.path / 'index.sqlite'}")
        exists = self.path.exists()
        if not exists and not create:
            raise LmforgeError(f"no index at {self.path}: build one first (create=True)")
        if not exists:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise LmforgeError(f"cannot create the directory for {self.path}: {exc.strerror}") from None
        mode = "rwc" if create else "rw"
        try:
            self._conn: sqlite3.Connection | None = sqlite3.connect(
                f"file:{self.path.resolve().as_posix()}?mode={mode}", uri=True, timeout=busy_timeout,
                isolation_level=None, check_same_thread=False)
        except sqlite3.Error as exc:
            raise LmforgeError(f"cannot open the index {self.path}: {exc}") from None
        try:
            self._setup(create)
        except BaseException:
            self._conn.close()
            self._conn = None
            raise
        self.params = self._load_params(ann_params)

    # -- connection and transactions ------------------------------------------------------
    def _setup(self, create: bool) -> None:
        conn = self._db
        try:
            if conn.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
                conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")  # in WAL mode: durable against a crashed process
            tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        except sqlite3.DatabaseError as exc:
            raise LmforgeError(f"{self.path} is not an lmforge index ({exc})") from None
        if "meta" not in tables:
            if not create or tables:
                raise LmforgeError(f"{self.path} is not an lmforge index (it has no meta table)")
            with self._transaction():
                for statement in SCHEMA.split(";"):
                    if statement.strip():
                        conn.execute(statement)
                conn.execute("INSERT OR IGNORE INTO meta VALUES ('format_version', ?), ('created', ?)",
                             (json.dumps(FORMAT_VERSION), json.dumps(utc_now())))
                conn.execute("INSERT OR IGNORE INTO ann VALUES ('generation', 0)")
        version = self.meta.get("format_version")
        if version != FORMAT_VERSION:
            raise LmforgeError(f"{self.path} has index format {version}; this lmforge reads format "
                               f"{FORMAT_VERSION}: rebuild the index")

    @property
    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            raise LmforgeError(f"the index {self.path} is closed")
        return self._conn

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        """BEGIN IMMEDIATE ... COMMIT, ROLLBACK on any exception (Ctrl-C included)."""
        conn = self._db
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as exc:
            raise self._busy_error(exc) from None
        try:
            yield
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    def _busy_error(self, exc: sqlite3.Error) -> LmforgeError:
        if "locked" in str(exc) or "busy" in str(exc):
            return LmforgeError(f"the index {self.path} is being written by another process "
                                f"(waited {self._busy_timeout:.0f} s); try again when it has finished")
        return LmforgeError(f"cannot write the index {self.path}: {exc}")

    @contextmanager
    def _write(self) -> Iterator[None]:
        """One write: inside an indexing run it joins the run, otherwise it is a run of its own."""
        with self._lock:
            if not self._in_run:
                with self.indexing():
                    yield
                return
            # Inside a run: a savepoint, so that a write that fails leaves the run as it was.
            saved = None if self._ivf is None else (self._ivf[0], replace(self._ivf[1]))
            self._db.execute("SAVEPOINT write")
            try:
                yield
                self._db.execute("RELEASE write")
            except BaseException:
                self._db.execute("ROLLBACK TO write")
                self._db.execute("RELEASE write")
                self._ivf = saved
                raise

    @contextmanager
    def indexing(self) -> Iterator[None]:
        with self._lock:
            if self._in_run:  # nested: part of the outer run
                self._in_run += 1
                try:
                    yield
                finally:
                    self._in_run -= 1
                return
            with self._transaction():
                self._in_run = 1
                try:
                    self._ivf = self._read_ivf()
                    yield
                    self._finish_run()
                except sqlite3.Error as exc:
                    raise self._busy_error(exc) from None
                finally:
                    self._in_run = 0

    # -- metadata -------------------------------------------------------------------------
    @property
    def meta(self) -> dict[str, Any]:
        with self._lock:
            return {key: json.loads(value) for key, value in self._db.execute("SELECT key, value FROM meta")}

    def set_meta(self, model_id: str, dim: int, **extra: Any) -> None:
        self._check_new_meta(self.meta, model_id, dim)
        values = {"model_id": model_id, "dim": int(dim), **extra}
        try:
            rows = [(key, json.dumps(value, ensure_ascii=False)) for key, value in values.items()]
        except (TypeError, ValueError) as exc:
            raise LmforgeError(f"index metadata must be JSON values: {exc}") from None
        with self._write():
            self._db.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)", rows)

    def _dim(self) -> int | None:
        row = self._db.execute("SELECT value FROM meta WHERE key = 'dim'").fetchone()
        return None if row is None else int(json.loads(row[0]))

    # -- documents and chunks -------------------------------------------------------------
    def documents(self) -> dict[str, str]:
        with self._lock:
            return dict(self._db.execute("SELECT source, digest FROM documents ORDER BY source"))

    def count(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM chunks").fetchone()[0])

    def replace_document(self, source: str, digest: str, chunks: list[Chunk], vectors: np.ndarray) -> None:
        check_chunks(source, chunks)
        with self._write():
            unit = check_vectors(vectors, len(chunks), self._dim())
            self._remove(source)
            conn = self._db
            conn.execute("INSERT INTO documents VALUES (?, ?, ?, ?)", (source, str(digest), len(chunks), utc_now()))
            rows = []
            for position, chunk in enumerate(chunks):
                try:
                    cursor = conn.execute(
                        "INSERT INTO chunks (id, source, position, text, headings, line_start, line_end, metadata) "
                        "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                        (chunk.id, source, position, chunk.text, json.dumps(list(chunk.headings), ensure_ascii=False),
                         int(chunk.line_start), int(chunk.line_end), metadata_json(chunk)))
                except sqlite3.IntegrityError:
                    owner = conn.execute("SELECT source FROM chunks WHERE id = ?", (chunk.id,)).fetchone()
                    raise LmforgeError(f"chunk id {chunk.id} of {source!r} is already used by "
                                       f"{owner[0] if owner else 'another chunk'!r}") from None
                rows.append(cursor.lastrowid)
            lists: list[int | None] = [None] * len(rows)
            if self._ivf is not None and rows:
                labels, sims = ann.assign(unit, self._ivf[0])
                self._ivf[1].record_added(sims)
                lists = labels.tolist()
            conn.executemany("INSERT INTO vectors VALUES (?, ?, ?)",
                             [(row, lst, unit[i].tobytes()) for i, (row, lst) in enumerate(zip(rows, lists))])

    def delete_document(self, source: str) -> None:
        with self._write():
            self._remove(source)

    def _remove(self, source: str) -> None:
        conn = self._db
        removed = conn.execute("DELETE FROM vectors WHERE row IN (SELECT row FROM chunks WHERE source = ?)",
                               (source,)).rowcount
        conn.execute("DELETE FROM chunks WHERE source = ?", (source,))
        conn.execute("DELETE FROM documents WHERE source = ?", (source,))
        if self._ivf is not None and removed > 0:
            self._ivf[1].removed += removed

    def get(self, ids: Sequence[str]) -> list[Chunk]:
        ids = list(ids)
        found: dict[str, Chunk] = {}
        with self._lock:
            for start in range(0, len(ids), PAGE):
                part = ids[start:start + PAGE]
                for row in self._db.execute(f"SELECT {CHUNK_COLUMNS} FROM chunks c WHERE c.id IN "
                                            f"({', '.join('?' * len(part))})", part):
                    found[row[1]] = chunk_from_row(row)
        return [found[i] for i in ids if i in found]

    def all_chunks(self) -> Iterator[Chunk]:
        """Every chunk by source and position, read in pages (a write between pages may show)."""
        after: tuple[str, int] = ("", -1)
        while True:
            with self._lock:
                page = self._db.execute(
                    f"SELECT {CHUNK_COLUMNS}, c.position FROM chunks c WHERE (c.source, c.position) > (?, ?) "
                    f"ORDER BY c.source, c.position LIMIT {PAGE}", after).fetchall()
            if not page:
                return
            for row in page:
                yield chunk_from_row(row[:-1])
            after = (page[-1][2], page[-1][-1])

    def _chunks_by_row(self, rows: Sequence[int]) -> dict[int, Chunk]:
        out: dict[int, Chunk] = {}
        for start in range(0, len(rows), PAGE):
            part = [int(r) for r in rows[start:start + PAGE]]
            for row in self._db.execute(f"SELECT {CHUNK_COLUMNS} FROM chunks c WHERE c.row IN "
                                        f"({', '.join('?' * len(part))})", part):
                out[row[0]] = chunk_from_row(row)
        return out

    # -- the approximate index ------------------------------------------------------------
    def _load_params(self, given: ann.IvfParams | None) -> ann.IvfParams:
        row = self._db.execute("SELECT value FROM ann WHERE key = 'params'").fetchone()
        stored = ann.IvfParams.from_dict(json.loads(row[0])) if row else None
        if given is None:
            return stored or ann.IvfParams()
        self.params = given
        if given != stored:  # remembered, so that later opens index and search the same way
            with self._write():
                self._db.execute("INSERT OR REPLACE INTO ann VALUES ('params', ?)", (json.dumps(given.to_dict()),))
        return given

    def _read_ivf(self) -> tuple[np.ndarray, ann.IvfState] | None:
        rows = dict(self._db.execute("SELECT key, value FROM ann WHERE key IN ('centroids', 'state')"))
        if "centroids" not in rows:
            return None
        state = ann.IvfState.from_dict(json.loads(rows["state"]))
        dim = self._dim() or 1
        centroids = np.frombuffer(rows["centroids"], dtype=np.float32).reshape(state.nlist, dim)
        return centroids, state

    def _generation(self) -> int:
        return int(self._db.execute("SELECT value FROM ann WHERE key = 'generation'").fetchone()[0])

    def _finish_run(self) -> None:
        """End of a write run, inside its transaction: train the index if due, save its state."""
        conn = self._db
        n = self.count()
        state = self._ivf[1] if self._ivf is not None else None
        reason = ann.retrain_reason(state, n, self.params)
        if reason is not None:
            self._train(n)
        elif state is not None:
            conn.execute("INSERT OR REPLACE INTO ann VALUES ('state', ?)", (json.dumps(state.to_dict()),))
        conn.execute("UPDATE ann SET value = value + 1 WHERE key = 'generation'")

    def _train(self, n: int) -> None:
        conn = self._db
        rows, _, vectors = self._read_vectors()
        nlist = self.params.lists_for(n)
        progress = Progress("ivf train", total=self.params.iterations, unit="iterations")
        centroids = ann.train_centroids(vectors, nlist, self.params, progress=progress)
        labels, sims = ann.assign(vectors, centroids)
        progress.close()
        conn.executemany("UPDATE vectors SET list = ? WHERE row = ?", zip(labels.tolist(), rows.tolist()))
        state = ann.IvfState(nlist=centroids.shape[0], trained_n=n, train_similarity=float(sims.mean()))
        conn.executemany("INSERT OR REPLACE INTO ann VALUES (?, ?)",
                         [("centroids", centroids.tobytes()), ("state", json.dumps(state.to_dict()))])
        self._ivf = (centroids, state)

    def _read_vectors(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(chunk rows, IVF list or -1, vectors), by row."""
        dim = self._dim() or 0
        n = int(self._db.execute("SELECT COUNT(*) FROM vectors").fetchone()[0])
        rows = np.empty(n, dtype=np.int64)
        lists = np.empty(n, dtype=np.int64)
        data = bytearray(n * dim * 4)
        view = memoryview(data)
        width = dim * 4
        progress = Progress("load vectors", total=n, unit="vectors", enabled=n >= LOAD_PROGRESS_FROM)
        for i, (row, lst, blob) in enumerate(self._db.execute("SELECT row, list, vector FROM vectors ORDER BY row")):
            rows[i] = row
            lists[i] = -1 if lst is None else lst
            view[i * width:(i + 1) * width] = blob
            if i % 16384 == 0:
                progress.update(i)
        progress.close()
        return rows, lists, np.frombuffer(data, dtype=np.float32).reshape(n, dim)

    def _current_snapshot(self) -> _Snapshot:
        generation = self._generation()
        snap = self._snapshot
        if snap is not None and snap.generation == generation:
            return snap
        rows, lists, vectors = self._read_vectors()
        order = np.argsort(lists, kind="stable")  # grouped by list: each list is one slice
        rows, lists, vectors = rows[order], lists[order], vectors[order]
        ivf = self._read_ivf()
        index = None
        if ivf is not None and rows.size and lists[0] >= 0:  # every vector has a list
            centroids = ivf[0]
            counts = np.bincount(lists, minlength=centroids.shape[0])
            offsets = np.concatenate(([0], np.cumsum(counts))).astype(np.int64)
            index = ann.IvfIndex(centroids=centroids, vectors=vectors, positions=np.arange(rows.size), offsets=offsets)
        self._snapshot = _Snapshot(generation=generation, rows=rows, vectors=vectors, index=index,
                                   row_order=np.argsort(rows, kind="stable"))
        return self._snapshot

    # -- search ---------------------------------------------------------------------------
    def search(self, vector: Any, k: int = 10, filters: dict[str, Any] | None = None,
               exact: bool = False) -> list[Hit]:
        """The k most similar chunks passing `filters`.

        Exact (every vector scored) when asked, when the index holds fewer than
        `params.exact_below` vectors, or when the filters leave at most that many; otherwise
        the IVF lists nearest the query are scored, filtered, and more lists are probed
        until k chunks pass the filters (or all lists are probed).
        """
        k = check_k(k)
        conditions = check_filters(filters)
        with self._lock:
            query = check_query(vector, self._dim())
            reading = not self._db.in_transaction
            if reading:  # one snapshot for the vectors, the filter and the chunks
                self._db.execute("BEGIN")
            try:
                positions, scores = self._candidates(query, k, conditions, exact)
                found = self._chunks_by_row(self._snapshot.rows[positions].tolist()) if positions.size else {}
            finally:
                if reading:
                    self._db.execute("COMMIT")
        rows = self._snapshot.rows[positions]
        return rank_hits(((found[r], s) for r, s in zip(rows.tolist(), scores.tolist()) if r in found), k)

    def _candidates(self, query: np.ndarray, k: int, filters: Filters, exact: bool
                    ) -> tuple[np.ndarray, np.ndarray]:
        snap = self._current_snapshot()
        allowed: np.ndarray | None = None
        subset: np.ndarray | None = None
        if filters:
            subset = self._passing(snap, filters)
            if subset.size == 0:
                return subset, np.empty(0, dtype=np.float32)
        use_index = (snap.index is not None and not exact and snap.rows.size >= self.params.exact_below
                     and (subset is None or subset.size > self.params.exact_below))
        if not use_index:
            return ann.exact_search(snap.vectors, query, k, subset)
        if subset is not None:
            allowed = np.zeros(snap.rows.size, dtype=bool)
            allowed[subset] = True
        index = snap.index
        return index.search(query, k, self.params.probes_for(index.nlist), allowed)

    def _passing(self, snap: _Snapshot, filters: Filters) -> np.ndarray:
        """Positions of the chunks that pass `filters`, remembered until the next committed write."""
        key = json.dumps(filters, sort_keys=True)
        cached = snap.filtered.get(key)
        if cached is not None:
            return cached
        where, params = filter_sql(filters)
        rows = np.fromiter((r for (r,) in self._db.execute(f"SELECT c.row FROM chunks c WHERE {where}", params)),
                           dtype=np.int64)
        subset = np.sort(snap.positions_of(rows))
        if not self._in_run:  # inside a run the uncommitted rows differ from the snapshot's
            if len(snap.filtered) >= FILTER_CACHE:
                snap.filtered.pop(next(iter(snap.filtered)))
            snap.filtered[key] = subset
        return subset

    # -- lifetime -------------------------------------------------------------------------
    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None
                self._snapshot = None
