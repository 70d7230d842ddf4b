"""The records every part of retrieval passes around: a `Chunk` of a document and a `Hit`.

A chunk is the unit that is embedded, indexed, retrieved and cited. Its id is stable: it
depends only on where the chunk comes from and what it says, so re-indexing an unchanged
file gives the same ids, and a citation stays valid across rebuilds.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any


def chunk_id(source: str, headings: tuple[str, ...], text: str) -> str:
    """A stable id from a chunk's source, heading path and text (16 hex digits)."""
    key = "\x00".join((source, "\x1f".join(headings), text))
    return hashlib.sha256(key.encode("utf-8")).hexdigest()[:16]


@dataclass(frozen=True)
class Chunk:
    """A passage of a document, with what a citation needs to point back at it.

    `metadata` holds what filters and ranking may use: the document's `title`, and from a
    page's front matter its `zh_title` and `zh_terms` (Traditional Chinese title and key
    terms, so that questions in Chinese find English pages), plus anything a loader adds.
    """

    source: str  # the document's path as indexed (relative to the indexed root), or a URL
    text: str  # the passage as shown to the model and cited
    headings: tuple[str, ...] = ()  # heading path, outermost first
    line_start: int = 1  # 1-based, inclusive, in the source file
    line_end: int = 1
    metadata: dict[str, Any] = field(default_factory=dict)
    id: str = ""  # filled from source, headings and text when empty

    def __post_init__(self) -> None:
        if not self.id:
            object.__setattr__(self, "id", chunk_id(self.source, tuple(self.headings), self.text))

    @property
    def title(self) -> str:
        return str(self.metadata.get("title") or (self.headings[0] if self.headings else self.source))

    def search_text(self) -> str:
        """What embedding and keyword search see: the page's titles and terms, the heading path, the text.

        The titles and key terms travel with every chunk of a page, so that a passage deep in
        a page is found by a question that names the page's subject (in either language).
        """
        meta = self.metadata
        head = [self.title]
        if meta.get("zh_title"):
            head.append(str(meta["zh_title"]))
        terms = list(meta.get("terms") or []) + list(meta.get("zh_terms") or [])
        if terms:
            head.append(", ".join(map(str, terms)))
        path = " > ".join(h for h in self.headings[1:] if h)
        return "\n".join(part for part in (" | ".join(head), path, self.text) if part)

    def embed_text(self) -> str:
        """What the embedder reads: the page's title, the heading path and the text.

        The key-term lists stay out: repeated on every chunk of a page they would pull all
        of its chunks to one point and leave little of the embedder's window for the text.
        Keyword search reads them (`search_text`), which is where exact terms pay off.
        """
        path = " > ".join(h for h in self.headings[1:] if h)
        return "\n".join(part for part in (self.title, path, self.text) if part)

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "source": self.source, "text": self.text, "headings": list(self.headings),
                "line_start": self.line_start, "line_end": self.line_end, "metadata": dict(self.metadata)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Chunk:
        return cls(source=data["source"], text=data["text"], headings=tuple(data.get("headings") or ()),
                   line_start=int(data.get("line_start", 1)), line_end=int(data.get("line_end", 1)),
                   metadata=dict(data.get("metadata") or {}), id=data.get("id", ""))


@dataclass
class Hit:
    """A chunk a retriever returned: its score (higher is better) and its rank in each list that found it."""

    chunk: Chunk
    score: float
    ranks: dict[str, int] = field(default_factory=dict)  # e.g. {"dense": 1, "bm25": 4}, 1-based
