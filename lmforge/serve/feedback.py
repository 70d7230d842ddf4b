"""Conversations and answer ratings from the web chat, kept in an embedded SQLite file.

The store is the first link of the feedback loop: people rate answers in the browser,
the ratings land here next to the exact conversation the model saw, and
`FeedbackStore.export()` turns them into (prompt, completion, rating) records that
preference tuning and evaluation can read.

Durability: the database runs in WAL mode with `synchronous=FULL`, and every write is
its own committed transaction before the method returns. The HTTP layer answers only
after that, so a rating the client saw acknowledged survives a crash of the server
process, and with FULL also a power cut (the WAL is fsynced at each commit).

An answer from a knowledge base (`lmforge serve --rag`) keeps the sources it cited in
`messages.sources` (JSON), so a reopened conversation shows them again and the export
says which passages a rated answer rested on. Schema 2 added that column; a file of
schema 1 gains it when opened.

One connection is shared by all threads behind a lock: writes are serialized anyway
by SQLite, and the web chat's traffic is small next to the model's work.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Iterable

from ..errors import LmforgeError

SCHEMA_VERSION = 2  # 2: messages.sources, the sources an answer from a knowledge base cited
ROLES = ("system", "user", "assistant")
TITLE_CHARS = 60

_SCHEMA = """
CREATE TABLE IF NOT EXISTS schema_version (
    version INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS conversations (
    id       TEXT PRIMARY KEY,
    created  REAL NOT NULL,
    updated  REAL NOT NULL,
    title    TEXT NOT NULL DEFAULT '',
    model    TEXT,
    settings TEXT NOT NULL DEFAULT '{}'
);
CREATE INDEX IF NOT EXISTS conversations_updated ON conversations (updated DESC);
CREATE TABLE IF NOT EXISTS messages (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    conversation_id TEXT NOT NULL REFERENCES conversations (id) ON DELETE CASCADE,
    idx             INTEGER NOT NULL,
    role            TEXT NOT NULL CHECK (role IN ('system', 'user', 'assistant')),
    content         TEXT NOT NULL,
    created         REAL NOT NULL,
    sources         TEXT,
    UNIQUE (conversation_id, idx)
);
CREATE TABLE IF NOT EXISTS feedback (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    message_id INTEGER NOT NULL UNIQUE REFERENCES messages (id) ON DELETE CASCADE,
    rating     INTEGER NOT NULL CHECK (rating IN (-1, 1)),
    comment    TEXT NOT NULL DEFAULT '',
    created    REAL NOT NULL
);
"""


class NotFound(LmforgeError):
    """The conversation or message asked for does not exist."""


class FeedbackStore:
    """Conversations, their messages, and one rating per assistant message."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if str(path) != ":memory:":
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        try:
            # isolation_level=None: no implicit transactions; each write below opens and
            # commits its own, so nothing is ever left pending between calls.
            self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None, timeout=30)
            self._db.row_factory = sqlite3.Row
            mode = self._db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute("PRAGMA foreign_keys=ON")
            self._db.execute("PRAGMA busy_timeout=30000")
            self._create_schema()
        except sqlite3.DatabaseError as exc:
            raise LmforgeError(f"cannot open the feedback database {path}: {exc}") from None
        if mode.lower() != "wal" and str(path) != ":memory:":
            raise LmforgeError(f"cannot switch {path} to WAL mode (journal_mode is {mode})")

    # ------------------------------------------------------------------ setup
    def _create_schema(self) -> None:
        with _transaction(self._db):
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    self._db.execute(statement)
            row = self._db.execute("SELECT max(version) FROM schema_version").fetchone()
            found = row[0]
            if found is None:
                self._db.execute("INSERT INTO schema_version (version) VALUES (?)", (SCHEMA_VERSION,))
            elif found > SCHEMA_VERSION:
                raise LmforgeError(f"{self.path} was written by a newer lmforge (schema {found}, "
                                   f"this one knows {SCHEMA_VERSION})")
            elif found < SCHEMA_VERSION:
                self._migrate(found)

    def _migrate(self, found: int) -> None:
        """Bring an older file up to this schema, inside the opening transaction (all or nothing)."""
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(messages)")}
        if found < 2 and "sources" not in columns:
            self._db.execute("ALTER TABLE messages ADD COLUMN sources TEXT")
        self._db.execute("UPDATE schema_version SET version = ?", (SCHEMA_VERSION,))

    @property
    def schema_version(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT max(version) FROM schema_version").fetchone()[0])

    def pragma(self, name: str) -> Any:
        """A PRAGMA's current value on the store's connection (journal_mode, synchronous, ...)."""
        if not name.isidentifier():
            raise ValueError(f"not a pragma name: {name!r}")
        with self._lock:
            return self._db.execute(f"PRAGMA {name}").fetchone()[0]

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> "FeedbackStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---------------------------------------------------------- conversations
    def create_conversation(self, title: str = "", model: str | None = None, settings: dict | None = None,
                            messages: Iterable[dict] = ()) -> dict[str, Any]:
        """A new conversation (optionally with its first messages), as `get_conversation` returns it."""
        conv_id, now = uuid.uuid4().hex, time.time()
        with self._lock, _transaction(self._db):
            self._db.execute("INSERT INTO conversations (id, created, updated, title, model, settings) "
                             "VALUES (?, ?, ?, ?, ?, ?)",
                             (conv_id, now, now, title.strip(), model, json.dumps(settings or {})))
            added = self._append(conv_id, list(messages), now)
            conv = self._conversation(conv_id)
        conv["messages"] = added
        return conv

    def list_conversations(self, limit: int = 50, offset: int = 0) -> list[dict[str, Any]]:
        with self._lock:
            rows = self._db.execute(
                "SELECT c.*, (SELECT count(*) FROM messages m WHERE m.conversation_id = c.id) AS message_count "
                "FROM conversations c ORDER BY c.updated DESC, c.rowid DESC LIMIT ? OFFSET ?",
                (limit, offset)).fetchall()
        return [_conversation_summary(r) for r in rows]

    def get_conversation(self, conv_id: str) -> dict[str, Any]:
        """The conversation with its messages in order; each message carries its feedback or None."""
        with self._lock:
            conv = self._conversation(conv_id)
            rows = self._db.execute(
                "SELECT m.*, f.rating, f.comment AS feedback_comment, f.created AS feedback_created "
                "FROM messages m LEFT JOIN feedback f ON f.message_id = m.id "
                "WHERE m.conversation_id = ? ORDER BY m.idx", (conv_id,)).fetchall()
        conv["messages"] = [_message(r) for r in rows]
        return conv

    def append_messages(self, conv_id: str, messages: Iterable[dict]) -> list[dict[str, Any]]:
        """Append messages at the end of a conversation; returns them with ids and indexes."""
        with self._lock, _transaction(self._db):
            self._conversation(conv_id)
            return self._append(conv_id, list(messages), time.time())

    def _conversation(self, conv_id: str) -> dict[str, Any]:
        row = self._db.execute(
            "SELECT c.*, (SELECT count(*) FROM messages m WHERE m.conversation_id = c.id) AS message_count "
            "FROM conversations c WHERE c.id = ?", (conv_id,)).fetchone()
        if row is None:
            raise NotFound(f"conversation {conv_id!r} does not exist")
        out = _conversation_summary(row)
        out["settings"] = json.loads(row["settings"] or "{}")
        return out

    def _append(self, conv_id: str, messages: list[dict], now: float) -> list[dict[str, Any]]:
        if not messages:
            return []
        for m in messages:
            if m.get("role") not in ROLES:
                raise ValueError(f"role must be one of {', '.join(ROLES)}")
            if not isinstance(m.get("content"), str):
                raise ValueError("content must be a string")
            if m.get("sources") is not None and (m["role"] != "assistant" or not isinstance(m["sources"], list)):
                raise ValueError("sources must be a list, on assistant messages only")
        start = self._db.execute("SELECT coalesce(max(idx) + 1, 0) FROM messages WHERE conversation_id = ?",
                                 (conv_id,)).fetchone()[0]
        ids = []
        for k, m in enumerate(messages):
            sources = json.dumps(m["sources"], ensure_ascii=False) if m.get("sources") is not None else None
            cur = self._db.execute("INSERT INTO messages (conversation_id, idx, role, content, created, sources) "
                                   "VALUES (?, ?, ?, ?, ?, ?)",
                                   (conv_id, start + k, m["role"], m["content"], now, sources))
            ids.append(cur.lastrowid)
        first_user = next((m["content"] for m in messages if m["role"] == "user" and m["content"].strip()), None)
        if first_user is not None:  # untitled conversations are named after their first question
            self._db.execute("UPDATE conversations SET title = ? WHERE id = ? AND title = ''",
                             (_title(first_user), conv_id))
        self._db.execute("UPDATE conversations SET updated = ? WHERE id = ?", (now, conv_id))
        rows = self._db.execute(f"SELECT *, NULL AS rating FROM messages WHERE id IN ({','.join('?' * len(ids))}) "
                                "ORDER BY idx", ids).fetchall()
        return [_message(r) for r in rows]

    # --------------------------------------------------------------- feedback
    def add_feedback(self, message_id: int, rating: int, comment: str = "") -> dict[str, Any]:
        """Rate an assistant message +1 or -1; rating it again replaces the earlier rating."""
        if rating not in (-1, 1):
            raise ValueError("rating must be 1 or -1")
        now = time.time()
        with self._lock, _transaction(self._db):
            msg = self._db.execute("SELECT id, conversation_id, idx, role FROM messages WHERE id = ?",
                                   (message_id,)).fetchone()
            if msg is None:
                raise NotFound(f"message {message_id} does not exist")
            if msg["role"] != "assistant":
                raise ValueError("feedback applies to assistant messages only")
            self._db.execute(
                "INSERT INTO feedback (message_id, rating, comment, created) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (message_id) DO UPDATE SET rating = excluded.rating, comment = excluded.comment, "
                "created = excluded.created", (message_id, rating, comment.strip(), now))
            row = self._db.execute("SELECT * FROM feedback WHERE message_id = ?", (message_id,)).fetchone()
        return {"id": row["id"], "message_id": message_id, "conversation_id": msg["conversation_id"],
                "message_index": msg["idx"], "rating": row["rating"], "comment": row["comment"],
                "created": row["created"]}

    def export(self, rating: int | None = None) -> list[dict[str, Any]]:
        """Every rated answer with the conversation that led to it, oldest rating first.

        Each record: the `prompt` messages (everything before the answer, system prompt
        included), the rated `completion`, `rating` (+1/-1), `comment`, and where it came from.
        """
        where, args = ("WHERE f.rating = ?", (rating,)) if rating is not None else ("", ())
        with self._lock:
            rated = self._db.execute(
                "SELECT f.id, f.message_id, f.rating, f.comment, f.created, m.conversation_id, m.idx, m.content, "
                "m.sources, c.model, c.settings FROM feedback f JOIN messages m ON m.id = f.message_id "
                f"JOIN conversations c ON c.id = m.conversation_id {where} ORDER BY f.created, f.id", args).fetchall()
            history: dict[str, list[sqlite3.Row]] = {}
            for conv_id in {r["conversation_id"] for r in rated}:
                history[conv_id] = self._db.execute(
                    "SELECT idx, role, content FROM messages WHERE conversation_id = ? ORDER BY idx",
                    (conv_id,)).fetchall()
        return [{
            "id": r["id"], "conversation_id": r["conversation_id"], "message_id": r["message_id"],
            "message_index": r["idx"], "model": r["model"], "settings": json.loads(r["settings"] or "{}"),
            "prompt": [{"role": m["role"], "content": m["content"]} for m in history[r["conversation_id"]]
                       if m["idx"] < r["idx"]],
            "completion": r["content"], "rating": r["rating"], "comment": r["comment"], "created": r["created"],
            "sources": json.loads(r["sources"]) if r["sources"] else None,
        } for r in rated]


class _transaction:
    """BEGIN IMMEDIATE ... COMMIT (or ROLLBACK on error) on an autocommit connection."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    def __enter__(self) -> None:
        self.db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.db.execute("COMMIT")
        else:
            self.db.execute("ROLLBACK")


def _title(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= TITLE_CHARS else text[: TITLE_CHARS - 1].rstrip() + "…"


def _conversation_summary(row: sqlite3.Row) -> dict[str, Any]:
    return {"id": row["id"], "created": row["created"], "updated": row["updated"], "title": row["title"],
            "model": row["model"], "message_count": row["message_count"]}


def _message(row: sqlite3.Row) -> dict[str, Any]:
    keys = row.keys()
    feedback = None
    if "rating" in keys and row["rating"] is not None:
        feedback = {"rating": row["rating"], "comment": row["feedback_comment"], "created": row["feedback_created"]}
    sources = row["sources"] if "sources" in keys else None
    return {"id": row["id"], "conversation_id": row["conversation_id"], "index": row["idx"], "role": row["role"],
            "content": row["content"], "created": row["created"], "feedback": feedback,
            "sources": json.loads(sources) if sources else None}
