"""The handbook as lmforge's default knowledge base.

The handbook's pages (docs/handbook/ in a checkout) ship inside the package as
`lmforge/rag/handbook/`, so `lmforge ask` works from an installed wheel too. Its index is
built on first use in the user's cache directory, one file per embedding model, and
brought up to date (only changed pages re-embedded) whenever the pages change.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import LmforgeError
from ..io.cache import cache_dir


def handbook_dir() -> Path:
    """The directory of handbook pages: the packaged copy (a link to docs/handbook in a checkout)."""
    here = Path(__file__).resolve().parent / "handbook"
    if here.is_dir():
        return here
    checkout = Path(__file__).resolve().parents[2] / "docs" / "handbook"
    if checkout.is_dir():
        return checkout
    raise LmforgeError("the handbook pages are missing from this installation (lmforge/rag/handbook)")


def handbook_pages() -> list[Path]:
    """The concept pages (the index page README.md is navigation, not knowledge)."""
    pages = sorted(p for p in handbook_dir().glob("*.md") if p.name != "README.md")
    if not pages:
        raise LmforgeError(f"no handbook pages in {handbook_dir()}")
    return pages


def default_index_path(embedder) -> Path:
    """The handbook index for `embedder` (its model fingerprint names the file)."""
    safe = "".join(c if c.isalnum() or c in "-_." else "-" for c in embedder.model_id)[:80]
    return cache_dir() / f"handbook-{safe}.sqlite"


def handbook_index(embedder, progress=None, **meta):
    """The path of an up-to-date handbook index for `embedder`, building or updating it as needed."""
    from .index import build_index

    path = default_index_path(embedder)
    path.parent.mkdir(parents=True, exist_ok=True)
    pages = handbook_pages()
    build_index(pages, path, embedder, progress=progress, **meta)
    return path
