"""Conversations, the human hand-off queue and feedback, in the assistant's database.

    store = ConversationStore(open_database("runs/assistant/store.db"))
    conv = store.start(variant="prompt-v2")
    store.add(conv, "user", "where is A10042?", intent="order_status")
    store.add(conv, "assistant", "It shipped on ...")
    store.rate(conv, 1, +1)                                  # thumbs up on message 1
    ticket = store.request_handoff(conv, "customer asked for a person")
    store.take(ticket, agent="maria")                        # an agent takes it from the queue
    store.add(conv, "agent", "Hi, Maria here ...", author="maria")
    store.resolve(ticket, "replacement sent")
    sft, preferences = store.flywheel()                      # records for lmforge's data layer

A conversation's life: ``bot`` (the assistant answers) -> ``waiting`` (hand-off requested,
in the queue) -> ``human`` (an agent took it: the customer's messages now go to the agent,
not the model) -> ``closed``; a resolved hand-off may go back to ``bot``. Every message is
one committed row before the caller answers, so a conversation survives the server being
killed mid-run.

What is stored is what the caller passes: the assistant redacts personal data before it
gets here (lmforge/guard), and keeps the unredacted text in ``original`` only where the
operator allows it.

The flywheel (`flywheel`): every assistant answer an agent corrected becomes a preference
pair (chosen: the correction, rejected: the bot's answer) and an SFT conversation ending in
the correction; every thumbs-up answer an SFT conversation; every resolved hand-off an SFT
conversation of the customer's messages and the agent's replies as the assistant turns (the
bot's own turns there are left out: they did not resolve it). Records use the layouts
``lmforge finetune`` (``{"messages": [...]}``) and ``lmforge align`` (``{"prompt", "chosen",
"rejected"}``) read, each with ``source`` saying where it came from.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

from ..errors import LmforgeError
from .db import Database

ROLES = ("system", "user", "assistant", "agent", "tool")


class NotFound(LmforgeError):
    """No such conversation, message or hand-off ticket."""


class Conflict(LmforgeError):
    """The request clashes with the state: a ticket already resolved, taken by another agent, a closed conversation."""
STATES = ("bot", "waiting", "human", "closed")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS conversations (
    id       TEXT PRIMARY KEY,
    created  DOUBLE PRECISION NOT NULL,
    updated  DOUBLE PRECISION NOT NULL,
    state    TEXT NOT NULL DEFAULT 'bot',
    variant  TEXT,
    channel  TEXT NOT NULL DEFAULT 'chat'
);
CREATE TABLE IF NOT EXISTS messages (
    id              {serial},
    conversation_id TEXT NOT NULL REFERENCES conversations (id),
    idx             INTEGER NOT NULL,
    role            TEXT NOT NULL,
    content         TEXT NOT NULL,
    original        TEXT,
    author          TEXT,
    intent          TEXT,
    meta            TEXT NOT NULL DEFAULT '{{}}',
    created         DOUBLE PRECISION NOT NULL,
    UNIQUE (conversation_id, idx)
);
CREATE TABLE IF NOT EXISTS handoffs (
    id              {serial},
    conversation_id TEXT NOT NULL REFERENCES conversations (id),
    reason          TEXT NOT NULL,
    created         DOUBLE PRECISION NOT NULL,
    agent           TEXT,
    taken           DOUBLE PRECISION,
    resolved        DOUBLE PRECISION,
    resolution      TEXT
);
CREATE TABLE IF NOT EXISTS ratings (
    id              {serial},
    conversation_id TEXT NOT NULL REFERENCES conversations (id),
    idx             INTEGER NOT NULL,
    rating          INTEGER NOT NULL,
    correction      TEXT,
    author          TEXT,
    created         DOUBLE PRECISION NOT NULL
)
"""


class ConversationStore:
    """Conversations, hand-offs and ratings of one assistant, in a `Database`."""

    def __init__(self, db: Database) -> None:
        self.db = db
        db.schema(_SCHEMA)

    # -- conversations -------------------------------------------------------------------------------

    def start(self, variant: str | None = None, channel: str = "chat", conversation_id: str | None = None) -> str:
        conversation_id = conversation_id or uuid.uuid4().hex
        now = time.time()
        self.db.execute("INSERT INTO conversations (id, created, updated, state, variant, channel) "
                        "VALUES (?, ?, ?, 'bot', ?, ?)", (conversation_id, now, now, variant, channel))
        return conversation_id

    def exists(self, conversation_id: str) -> bool:
        return bool(self.db.query("SELECT 1 AS x FROM conversations WHERE id = ?", (conversation_id,)))

    def state(self, conversation_id: str) -> str:
        rows = self.db.query("SELECT state FROM conversations WHERE id = ?", (conversation_id,))
        if not rows:
            raise NotFound(f"no conversation {conversation_id!r}")
        return rows[0]["state"]

    def add(self, conversation_id: str, role: str, content: str, *, original: str | None = None,
            author: str | None = None, intent: str | None = None, meta: dict[str, Any] | None = None) -> int:
        """Append a message (committed before it returns); its index in the conversation."""
        if role not in ROLES:
            raise LmforgeError(f"role must be one of {', '.join(ROLES)}, got {role!r}")
        if not isinstance(content, str):
            raise LmforgeError("message content must be a string")
        now = time.time()
        with self.db.transaction() as cur:
            if not cur.query("SELECT 1 AS x FROM conversations WHERE id = ?", (conversation_id,)):
                raise NotFound(f"no conversation {conversation_id!r}")
            idx = cur.query("SELECT COUNT(*) AS n FROM messages WHERE conversation_id = ?", (conversation_id,))[0]["n"]
            cur.execute("INSERT INTO messages (conversation_id, idx, role, content, original, author, intent, meta, "
                        "created) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        (conversation_id, idx, role, content, original, author, intent,
                         json.dumps(meta or {}, ensure_ascii=False), now))
            cur.execute("UPDATE conversations SET updated = ? WHERE id = ?", (now, conversation_id))
        return int(idx)

    def messages(self, conversation_id: str, with_original: bool = False) -> list[dict[str, Any]]:
        rows = self.db.query("SELECT idx, role, content, original, author, intent, meta, created FROM messages "
                             "WHERE conversation_id = ? ORDER BY idx", (conversation_id,))
        out = []
        for r in rows:
            item = {"idx": int(r["idx"]), "role": r["role"], "content": r["content"], "author": r["author"],
                    "intent": r["intent"], "meta": json.loads(r["meta"] or "{}"), "created": float(r["created"])}
            if with_original:
                item["original"] = r["original"]
            out.append(item)
        return out

    def close(self, conversation_id: str) -> None:
        self._set_state(conversation_id, "closed")

    def _set_state(self, conversation_id: str, state: str, cur=None) -> None:
        sql, args = "UPDATE conversations SET state = ?, updated = ? WHERE id = ?", (state, time.time(), conversation_id)
        changed = cur.execute(sql, args) if cur is not None else self.db.execute(sql, args)
        if not changed:
            raise NotFound(f"no conversation {conversation_id!r}")

    def counts(self) -> dict[str, int]:
        """Conversations per state, messages, ratings and hand-offs: what a restart must find again."""
        out = {s: 0 for s in STATES}
        for r in self.db.query("SELECT state, COUNT(*) AS n FROM conversations GROUP BY state"):
            out[r["state"]] = int(r["n"])
        for table in ("messages", "ratings", "handoffs"):
            out[table] = int(self.db.query(f"SELECT COUNT(*) AS n FROM {table}")[0]["n"])
        return out

    # -- hand-off to a human ----------------------------------------------------------------------------

    def request_handoff(self, conversation_id: str, reason: str) -> int:
        """Queue the conversation for a human agent (one open ticket per conversation); the ticket id."""
        with self.db.transaction() as cur:
            state = cur.query("SELECT state FROM conversations WHERE id = ?", (conversation_id,))
            if not state:
                raise NotFound(f"no conversation {conversation_id!r}")
            open_ticket = cur.query("SELECT id FROM handoffs WHERE conversation_id = ? AND resolved IS NULL",
                                    (conversation_id,))
            if open_ticket:
                return int(open_ticket[0]["id"])
            ticket = cur.insert("INSERT INTO handoffs (conversation_id, reason, created) VALUES (?, ?, ?)",
                                (conversation_id, reason, time.time()))
            self._set_state(conversation_id, "waiting", cur)
        return ticket

    def queue(self, include_taken: bool = False) -> list[dict[str, Any]]:
        """Open tickets, oldest first, with the conversation's last customer message."""
        taken = "" if include_taken else "AND h.agent IS NULL"
        rows = self.db.query(
            "SELECT h.id, h.conversation_id, h.reason, h.created, h.agent, h.taken FROM handoffs h "
            f"WHERE h.resolved IS NULL {taken} ORDER BY h.created, h.id")
        for r in rows:
            last = self.db.query("SELECT content FROM messages WHERE conversation_id = ? AND role = 'user' "
                                 "ORDER BY idx DESC LIMIT 1", (r["conversation_id"],))
            r["last_message"] = last[0]["content"] if last else ""
            r["id"] = int(r["id"])
        return rows

    def ticket(self, ticket: int) -> dict[str, Any]:
        rows = self.db.query("SELECT id, conversation_id, reason, created, agent, taken, resolved, resolution "
                             "FROM handoffs WHERE id = ?", (int(ticket),))
        if not rows:
            raise NotFound(f"no hand-off ticket {ticket}")
        return rows[0]

    def take(self, ticket: int, agent: str) -> dict[str, Any]:
        """An agent takes a waiting ticket (refused when another agent has it); the conversation goes to them."""
        if not agent or not isinstance(agent, str):
            raise LmforgeError("an agent name is required")
        with self.db.transaction() as cur:
            rows = cur.query("SELECT conversation_id, agent, resolved FROM handoffs WHERE id = ?", (int(ticket),))
            if not rows:
                raise NotFound(f"no hand-off ticket {ticket}")
            row = rows[0]
            if row["resolved"] is not None:
                raise Conflict(f"ticket {ticket} is already resolved")
            if row["agent"] not in (None, agent):
                raise Conflict(f"ticket {ticket} is taken by {row['agent']}")
            cur.execute("UPDATE handoffs SET agent = ?, taken = ? WHERE id = ?", (agent, time.time(), int(ticket)))
            self._set_state(row["conversation_id"], "human", cur)
        return self.ticket(ticket)

    def resolve(self, ticket: int, resolution: str, back_to_bot: bool = False) -> None:
        """Close a ticket; the conversation closes (or returns to the assistant with ``back_to_bot``)."""
        with self.db.transaction() as cur:
            rows = cur.query("SELECT conversation_id, resolved FROM handoffs WHERE id = ?", (int(ticket),))
            if not rows:
                raise NotFound(f"no hand-off ticket {ticket}")
            if rows[0]["resolved"] is not None:
                raise Conflict(f"ticket {ticket} is already resolved")
            cur.execute("UPDATE handoffs SET resolved = ?, resolution = ? WHERE id = ?",
                        (time.time(), resolution, int(ticket)))
            self._set_state(rows[0]["conversation_id"], "bot" if back_to_bot else "closed", cur)

    # -- ratings and corrections ------------------------------------------------------------------------

    def rate(self, conversation_id: str, idx: int, rating: int, correction: str | None = None,
             author: str | None = None) -> int:
        """A thumbs up (+1) or down (-1) on an assistant message, optionally with a better answer."""
        if rating not in (-1, 1):
            raise LmforgeError("rating must be +1 or -1")
        if correction is not None and not correction.strip():
            raise LmforgeError("a correction must not be empty")
        with self.db.transaction() as cur:
            role = cur.query("SELECT role FROM messages WHERE conversation_id = ? AND idx = ?",
                             (conversation_id, int(idx)))
            if not role:
                raise NotFound(f"conversation {conversation_id!r} has no message {idx}")
            if role[0]["role"] != "assistant":
                raise LmforgeError(f"message {idx} is a {role[0]['role']} message; only assistant answers are rated")
            return cur.insert("INSERT INTO ratings (conversation_id, idx, rating, correction, author, created) "
                              "VALUES (?, ?, ?, ?, ?, ?)",
                              (conversation_id, int(idx), rating, correction, author, time.time()))

    # -- the data flywheel ---------------------------------------------------------------------------

    def flywheel(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """(SFT conversations, preference pairs) from corrections, thumbs-up answers and resolved hand-offs."""
        sft: list[dict[str, Any]] = []
        pairs: list[dict[str, Any]] = []
        ratings = self.db.query("SELECT conversation_id, idx, rating, correction FROM ratings ORDER BY id")
        cache: dict[str, list[dict[str, Any]]] = {}

        def history(conv: str) -> list[dict[str, Any]]:
            if conv not in cache:
                cache[conv] = self.messages(conv)
            return cache[conv]

        def chat(messages: list[dict[str, Any]]) -> list[dict[str, str]]:
            # agents answer as the assistant; tool and internal rows are not training text
            return [{"role": "assistant" if m["role"] == "agent" else m["role"], "content": m["content"]}
                    for m in messages if m["role"] in ("system", "user", "assistant", "agent")]

        for r in ratings:
            conv, idx = r["conversation_id"], int(r["idx"])
            before = chat([m for m in history(conv) if m["idx"] < idx])
            answer = next(m["content"] for m in history(conv) if m["idx"] == idx)
            users = [m for m in before if m["role"] == "user"]
            if not users:
                continue
            if r["correction"]:
                sft.append({"messages": before + [{"role": "assistant", "content": r["correction"]}],
                            "source": f"assistant correction (conversation {conv}, message {idx})"})
                if r["correction"].strip() != answer.strip():
                    pairs.append({"prompt": users[-1]["content"], "chosen": r["correction"], "rejected": answer,
                                  "context": before[:-1], "source": f"assistant correction (conversation {conv}, "
                                                                    f"message {idx})"})
            elif int(r["rating"]) == 1:
                sft.append({"messages": before + [{"role": "assistant", "content": answer}],
                            "source": f"assistant answer rated up (conversation {conv}, message {idx})"})
        resolved = self.db.query("SELECT id, conversation_id FROM handoffs WHERE resolved IS NOT NULL ORDER BY id")
        for t in resolved:
            # the agent's replies are the answers to learn; the bot's turns there did not resolve it
            messages: list[dict[str, str]] = []
            for m in chat([m for m in history(t["conversation_id"]) if m["role"] != "assistant"]):
                if messages and messages[-1]["role"] == m["role"]:
                    messages[-1] = {**messages[-1], "content": messages[-1]["content"] + "\n" + m["content"]}
                else:
                    messages.append(m)
            while messages and messages[-1]["role"] != "assistant":
                messages.pop()
            if any(m["role"] == "user" for m in messages) and messages:
                sft.append({"messages": messages, "source": f"resolved hand-off {t['id']} "
                                                            f"(conversation {t['conversation_id']})"})
        return sft, pairs
