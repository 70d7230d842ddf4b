"""Documents to a searchable index: load, chunk, embed, store; only what changed.

An index remembers each document's content digest. Re-running `build_index` over the
same paths re-embeds only the files whose bytes changed, adds new ones, and removes
documents that are gone from the paths (unless `keep_missing`). The whole run is one
`store.indexing()` block: interrupted (an error, Ctrl-C, a killed process), it leaves the
previous index complete and usable.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from ..errors import LmforgeError
from .chunking import Chunker
from .config import IndexOptions
from .documents import iter_documents
from .store import open_store

# What a chunk's vector is made from (see `Chunk.embed_text`); a new layout re-embeds every chunk.
CHUNK_LAYOUT = "title+path+text/1"


@dataclass
class IndexReport:
    location: str
    added: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    unchanged: int = 0
    chunks_embedded: int = 0
    chunks_total: int = 0
    seconds: float = 0.0

    @property
    def changed(self) -> bool:
        return bool(self.added or self.updated or self.removed)

    def summary(self) -> str:
        return (f"{self.location}: {len(self.added)} added, {len(self.updated)} updated, {len(self.removed)} removed, "
                f"{self.unchanged} unchanged; {self.chunks_embedded} chunks embedded, {self.chunks_total} in the index "
                f"({self.seconds:.1f} s)")

    def to_dict(self) -> dict[str, Any]:
        return {"index": self.location, "added": self.added, "updated": self.updated, "removed": self.removed,
                "unchanged": self.unchanged, "chunks_embedded": self.chunks_embedded,
                "chunks_total": self.chunks_total, "seconds": round(self.seconds, 3)}


def build_index(paths: str | os.PathLike[str] | Iterable[str | os.PathLike[str]], location: str | os.PathLike[str],
                embedder, options: IndexOptions | None = None,
                progress: Callable[[str, int, int], None] | None = None,
                on_skip: Callable[[Path, str], None] | None = None, **meta: Any) -> IndexReport:
    """Index the documents under `paths` into the store at `location` (created if missing).

    `progress(stage, done, total)` is called as documents are read and chunks embedded;
    `meta` goes into the index's metadata (for example the calibrated thresholds).
    """
    options = options or IndexOptions()
    started = time.perf_counter()
    chunker = Chunker(max_tokens=options.max_tokens, overlap=options.overlap, window=embedder.max_tokens - 2,
                      count_tokens=embedder.count_tokens)
    documents = list(iter_documents(paths, options.suffixes, on_skip=on_skip))  # errors before anything is opened
    with open_store(location, create=True) as store:
        report = IndexReport(str(location))
        store.check_model(embedder.model_id)
        known = store.documents()
        # Chunks made another way (other budgets, another layout of the embedded text) are
        # rebuilt even where the files did not change.
        chunking = {"max_tokens": chunker.max_tokens, "overlap": chunker.overlap, "window": chunker.window,
                    "layout": CHUNK_LAYOUT}
        rechunk = store.meta.get("chunking") != chunking
        stale = [d for d in documents if rechunk or known.get(d.source) != d.digest]
        report.unchanged = len(documents) - len(stale)
        pending = [(d, chunker.chunk(d)) for d in stale]
        total = sum(len(chunks) for _, chunks in pending)
        if total == 0 and any(not chunks for _, chunks in pending) and not known:
            empty = [d.source for d, chunks in pending if not chunks]
            raise LmforgeError(f"no text to index in {', '.join(empty[:5])}")
        present = {d.source for d in documents}
        gone = [] if options.keep_missing else sorted(set(known) - present)
        with store.indexing():
            store.set_meta(model_id=embedder.model_id, dim=embedder.dim, embedder=embedder.name, chunking=chunking,
                           **meta)
            done = 0
            for document, chunks in pending:
                texts = [c.embed_text() for c in chunks]
                vectors = embedder.encode(texts, batch_size=options.batch_size, normalize=True) if texts else None
                if chunks:
                    store.replace_document(document.source, document.digest, chunks, vectors)
                else:  # an empty document: nothing to search, but remembered so it is not re-read
                    store.replace_document(document.source, document.digest, [], _empty(embedder.dim))
                (report.updated if document.source in known else report.added).append(document.source)
                done += len(chunks)
                report.chunks_embedded = done
                if progress is not None:
                    progress("embedding", done, total)
            for source in gone:
                store.delete_document(source)
                report.removed.append(source)
        report.chunks_total = store.count()
    report.seconds = time.perf_counter() - started
    return report


def _empty(dim: int):
    import numpy as np

    return np.zeros((0, dim), dtype=np.float32)
