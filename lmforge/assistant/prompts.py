"""Versioned system prompts, A/B traffic splits with per-variant results, and a response cache.

    registry = PromptRegistry(db)
    registry.publish("support", "You are Lumen & Loom's assistant ...", note="first version")   # v1
    registry.publish("support", "You are ... Always cite the page.", note="cite sources")        # v2
    split = TrafficSplit({"support@1": 0.5, "support@2": 0.5})
    variant = split.assign(conversation_id)          # sticky: a conversation keeps its variant
    registry.text(variant)                           # the prompt text of that version
    registry.results(conversations)                  # per variant: conversations, thumbs, hand-offs

A prompt is code: a change can break what worked, so every version is kept (never edited
in place), a deployment names the exact versions it serves (``name@version``), and a new
version meets real traffic beside the old one before it replaces it. Assignment hashes the
conversation id, so it needs no stored state, spreads traffic by the weights, and keeps a
conversation on one variant from its first message to its last (a customer must not see
the assistant change its manner mid-conversation, and a variant's results must count whole
conversations).

`results` compares variants on what the conversation store records (thumbs up rate,
hand-off rate, messages per conversation) with a two-proportion z-test on the thumbs-up
rate, so a difference is reported with how likely chance alone would give it.

`ResponseCache` keeps answers to deterministic requests (greedy decoding, same model, same
prompt version, same messages): a repeated FAQ is answered without running the model. Any
sampling temperature above zero bypasses it, as does any request with tools results or
retrieved text that may change (the caller decides: it passes ``cacheable``).
"""

from __future__ import annotations

import hashlib
import json
import math
import threading
import time
from collections import OrderedDict
from typing import Any

from ..errors import LmforgeError
from .db import Database

_SCHEMA = """
CREATE TABLE IF NOT EXISTS prompts (
    name    TEXT NOT NULL,
    version INTEGER NOT NULL,
    text    TEXT NOT NULL,
    note    TEXT NOT NULL DEFAULT '',
    created DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (name, version)
)
"""


def parse_variant(variant: str) -> tuple[str, int]:
    """``"support@2"`` -> ("support", 2)."""
    name, sep, version = str(variant).rpartition("@")
    if not sep or not name or not version.isdigit() or int(version) < 1:
        raise LmforgeError(f"a prompt variant is NAME@VERSION (e.g. support@2), got {variant!r}")
    return name, int(version)


class PromptRegistry:
    """Every version of every named prompt, in the assistant's database."""

    def __init__(self, db: Database) -> None:
        self.db = db
        db.schema(_SCHEMA)

    def publish(self, name: str, text: str, note: str = "") -> str:
        """Store ``text`` as the next version of ``name`` (the same text as the latest is not a new version)."""
        if not name or "@" in name or not name.strip() == name:
            raise LmforgeError(f"a prompt name must be non-empty, without '@' or surrounding spaces: {name!r}")
        if not isinstance(text, str) or not text.strip():
            raise LmforgeError("a prompt's text must not be empty")
        with self.db.transaction() as cur:
            latest = cur.query("SELECT version, text FROM prompts WHERE name = ? ORDER BY version DESC LIMIT 1",
                               (name,))
            if latest and latest[0]["text"] == text:
                return f"{name}@{latest[0]['version']}"
            version = int(latest[0]["version"]) + 1 if latest else 1
            cur.execute("INSERT INTO prompts (name, version, text, note, created) VALUES (?, ?, ?, ?, ?)",
                        (name, version, text, note, time.time()))
        return f"{name}@{version}"

    def text(self, variant: str) -> str:
        name, version = parse_variant(variant)
        rows = self.db.query("SELECT text FROM prompts WHERE name = ? AND version = ?", (name, version))
        if not rows:
            raise LmforgeError(f"no prompt {variant} (published: {', '.join(self.versions(name)) or 'none'})")
        return rows[0]["text"]

    def versions(self, name: str) -> list[str]:
        return [f"{name}@{r['version']}" for r in
                self.db.query("SELECT version FROM prompts WHERE name = ? ORDER BY version", (name,))]

    def history(self, name: str) -> list[dict[str, Any]]:
        return self.db.query("SELECT version, note, created, text FROM prompts WHERE name = ? ORDER BY version",
                             (name,))

    def results(self, variants: list[str] | None = None) -> dict[str, dict[str, Any]]:
        """Per variant (the conversations table's ``variant``): conversations, rated answers, thumbs-up
        rate, hand-off rate, messages per conversation; with two variants, the z-test of their up rates."""
        rows = self.db.query(
            "SELECT c.variant, COUNT(DISTINCT c.id) AS conversations, "
            "COUNT(DISTINCT h.conversation_id) AS handed_off FROM conversations c "
            "LEFT JOIN handoffs h ON h.conversation_id = c.id GROUP BY c.variant")
        out: dict[str, dict[str, Any]] = {}
        for r in rows:
            if r["variant"] is None or (variants and r["variant"] not in variants):
                continue
            out[r["variant"]] = {"conversations": int(r["conversations"]), "handed_off": int(r["handed_off"]),
                                 "handoff_rate": int(r["handed_off"]) / max(1, int(r["conversations"]))}
        for r in self.db.query("SELECT c.variant, COUNT(*) AS rated, SUM(CASE WHEN g.rating > 0 THEN 1 ELSE 0 END) "
                               "AS up FROM ratings g JOIN conversations c ON c.id = g.conversation_id "
                               "GROUP BY c.variant"):
            if r["variant"] in out:
                out[r["variant"]].update(rated=int(r["rated"]), up=int(r["up"] or 0),
                                         up_rate=int(r["up"] or 0) / max(1, int(r["rated"])))
        for r in self.db.query("SELECT c.variant, COUNT(m.id) AS messages FROM conversations c "
                               "JOIN messages m ON m.conversation_id = c.id GROUP BY c.variant"):
            if r["variant"] in out:
                out[r["variant"]]["messages_per_conversation"] = int(r["messages"]) / out[r["variant"]]["conversations"]
        for item in out.values():
            item.setdefault("rated", 0), item.setdefault("up", 0), item.setdefault("up_rate", None)
        if len(out) == 2:
            a, b = out.values()
            z, p = two_proportion_z(a["up"], a["rated"], b["up"], b["rated"])
            for item in out.values():
                item["up_rate_z"], item["up_rate_p"] = z, p
        return out


def two_proportion_z(success_a: int, n_a: int, success_b: int, n_b: int) -> tuple[float | None, float | None]:
    """z statistic and two-sided p-value for "the two rates are equal" (pooled variance)."""
    if n_a == 0 or n_b == 0:
        return None, None
    pooled = (success_a + success_b) / (n_a + n_b)
    se = math.sqrt(pooled * (1 - pooled) * (1 / n_a + 1 / n_b))
    if se == 0:
        return 0.0, 1.0
    z = (success_a / n_a - success_b / n_b) / se
    return z, math.erfc(abs(z) / math.sqrt(2))


class TrafficSplit:
    """Weighted, sticky assignment of conversations to prompt variants by a hash of their id."""

    def __init__(self, weights: dict[str, float]) -> None:
        if not weights:
            raise LmforgeError("a traffic split needs at least one variant")
        for variant, weight in weights.items():
            parse_variant(variant)
            if not (isinstance(weight, (int, float)) and weight >= 0 and math.isfinite(weight)):
                raise LmforgeError(f"variant {variant}: weight must be a non-negative number, got {weight!r}")
        total = float(sum(weights.values()))
        if total <= 0:
            raise LmforgeError("a traffic split needs a positive weight somewhere")
        self.weights = {v: w / total for v, w in weights.items()}
        self._edges, acc = [], 0.0
        for variant, share in self.weights.items():
            acc += share
            self._edges.append((acc, variant))

    def assign(self, conversation_id: str) -> str:
        digest = hashlib.sha256(f"split:{conversation_id}".encode()).digest()
        u = int.from_bytes(digest[:8], "big") / 2 ** 64
        for edge, variant in self._edges:
            if u < edge:
                return variant
        return self._edges[-1][1]


class ResponseCache:
    """An LRU cache of deterministic answers, keyed by everything that decides them."""

    def __init__(self, max_entries: int = 1024, ttl_s: float = 3600.0) -> None:
        if max_entries < 0 or ttl_s <= 0:
            raise LmforgeError("response cache: max_entries must be >= 0 and ttl_s > 0")
        self.max_entries, self.ttl_s = max_entries, ttl_s
        self._items: OrderedDict[str, tuple[float, Any]] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    @staticmethod
    def key(model: str, variant: str, messages: list[dict[str, Any]], params: dict[str, Any]) -> str | None:
        """The cache key, or None when the request is not deterministic (temperature above 0)."""
        if float(params.get("temperature", 0.0) or 0.0) > 0.0:
            return None
        blob = json.dumps([model, variant, messages, params], sort_keys=True, ensure_ascii=False)
        return hashlib.sha256(blob.encode()).hexdigest()

    def get(self, key: str | None) -> Any:
        if key is None or self.max_entries == 0:
            return None
        with self._lock:
            item = self._items.get(key)
            if item is None or time.monotonic() - item[0] > self.ttl_s:
                self._items.pop(key, None)
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return item[1]

    def put(self, key: str | None, value: Any) -> None:
        if key is None or self.max_entries == 0:
            return
        with self._lock:
            self._items[key] = (time.monotonic(), value)
            self._items.move_to_end(key)
            while len(self._items) > self.max_entries:
                self._items.popitem(last=False)

    def __len__(self) -> int:
        return len(self._items)
