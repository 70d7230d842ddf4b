"""One small database interface for the assistant's tables, on SQLite or PostgreSQL.

    db = open_database("runs/assistant/store.db")                 # SQLite file (the default)
    db = open_database("postgresql://shop@db.internal/shop")      # PostgreSQL, same code

The assistant keeps its orders, conversations, hand-off queue and feedback in ordinary
tables. SQLite needs no server and is the default; a deployment points the same code at
PostgreSQL. The two differ in three places this module hides: the parameter style (SQL
here is written with ``?`` and becomes ``%s`` for psycopg), the auto-increment column
(``{serial}`` in a schema becomes ``INTEGER PRIMARY KEY AUTOINCREMENT`` or ``BIGSERIAL
PRIMARY KEY``) and connection set-up. Everything else is written in the SQL both accept.

Durability: SQLite runs in WAL mode with ``synchronous=FULL`` and every `transaction()`
commits before it returns, so a row the caller saw written survives the process being
killed; PostgreSQL commits are durable by default. One connection is shared behind a lock
(SQLite serialises writers anyway; the assistant's writes are small).
"""

from __future__ import annotations

import sqlite3
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Sequence

from ..errors import LmforgeError


def is_postgres_url(location: str | Path) -> bool:
    return str(location).startswith(("postgresql://", "postgres://"))


class Database:
    """A connection to SQLite or PostgreSQL with one SQL spelling (``?`` parameters)."""

    def __init__(self, location: str | Path) -> None:
        self.location = str(location)
        self.postgres = is_postgres_url(location)
        self._lock = threading.RLock()
        self.errors: tuple[type[BaseException], ...] = (sqlite3.Error,)
        if self.postgres:
            self._conn = _connect_postgres(self.location)
            import psycopg

            self.errors = (psycopg.Error,)
        else:
            path = Path(self.location.removeprefix("sqlite:///"))
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                self._conn = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None, timeout=30)
                self._conn.execute("PRAGMA journal_mode=WAL")
                self._conn.execute("PRAGMA synchronous=FULL")
                self._conn.execute("PRAGMA foreign_keys=ON")
            except (sqlite3.Error, OSError) as exc:
                raise LmforgeError(f"cannot open the database {path}: {exc}") from None

    # -- SQL -----------------------------------------------------------------------------------------

    def _sql(self, sql: str) -> str:
        return sql.replace("?", "%s") if self.postgres else sql

    def schema(self, ddl: str) -> None:
        """Run a schema script (statements separated by ``;``) with ``{serial}`` filled in."""
        serial = "BIGSERIAL PRIMARY KEY" if self.postgres else "INTEGER PRIMARY KEY AUTOINCREMENT"
        with self.transaction() as cur:
            for statement in ddl.format(serial=serial).split(";"):
                if statement.strip():
                    cur.execute(statement)

    @contextmanager
    def transaction(self) -> Iterator["Cursor"]:
        """A cursor inside one transaction: committed on success, rolled back on any error."""
        with self._lock:
            raw = self._conn.cursor()
            try:
                if not self.postgres:
                    raw.execute("BEGIN IMMEDIATE")
                yield Cursor(self, raw)
            except BaseException:
                self._conn.rollback() if self.postgres else raw.execute("ROLLBACK")
                raise
            else:
                self._conn.commit() if self.postgres else raw.execute("COMMIT")
            finally:
                raw.close()

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]:
        """Rows of a read-only statement as dicts."""
        with self.transaction() as cur:
            return cur.query(sql, params)

    def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        """Run one statement in its own transaction; the number of rows it changed."""
        with self.transaction() as cur:
            return cur.execute(sql, params)

    def close(self) -> None:
        with self._lock:
            self._conn.close()


class Cursor:
    """A cursor of `Database.transaction`, taking ``?`` parameters on both databases."""

    def __init__(self, db: Database, raw) -> None:
        self.db, self.raw = db, raw

    def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        try:
            self.raw.execute(self.db._sql(sql), tuple(params))
        except self.db.errors as exc:
            raise LmforgeError(f"database error: {str(exc).splitlines()[0]}") from None
        return self.raw.rowcount

    def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        if rows:
            try:
                self.raw.executemany(self.db._sql(sql), [tuple(r) for r in rows])
            except self.db.errors as exc:
                raise LmforgeError(f"database error: {str(exc).splitlines()[0]}") from None

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]:
        self.execute(sql, params)
        names = [d[0] for d in self.raw.description or ()]
        return [dict(zip(names, row)) for row in self.raw.fetchall()]

    def insert(self, sql: str, params: Sequence[Any] = ()) -> int:
        """Run an INSERT into a table with a ``{serial}`` id; the new row's id."""
        if self.db.postgres:
            self.execute(sql.rstrip().rstrip(";") + " RETURNING id", params)
            return int(self.raw.fetchone()[0])
        self.execute(sql, params)
        return int(self.raw.lastrowid)


def _connect_postgres(url: str):
    try:
        import psycopg
    except ImportError:
        raise LmforgeError("a PostgreSQL database needs psycopg: pip install 'lmforge[rag]'") from None
    try:
        return psycopg.connect(url, connect_timeout=10)
    except psycopg.Error as exc:
        # the message may hold the URL's password: say where, not how
        from urllib.parse import urlsplit

        parts = urlsplit(url)
        where = f"{parts.hostname or 'localhost'}:{parts.port or 5432}{parts.path}"
        raise LmforgeError(f"cannot connect to PostgreSQL at {where}: {str(exc).splitlines()[0]}") from None


def open_database(location: str | Path) -> Database:
    """A `Database` for a SQLite path (``sqlite:///`` optional) or a ``postgresql://`` URL."""
    return Database(location)
