"""Real corpora as streams of documents, and deterministic train/validation/test splits (D1).

A *document* is the unit that every later stage works on: deduplication compares
documents, the split assigns documents, and packing puts an end-of-sequence token after
each one so that the model learns where a text ends. Keeping documents intact (never
cutting a file into arbitrary chunks before this point) is what makes those stages mean
something.

Sources:
  * ``wiki``: the English Wikipedia dump excerpt shipped with gensim's test data
    (MediaWiki XML in bzip2; 106 pages, articles only, redirects skipped);
  * ``news``: gensim's ``lee_background.cor`` (300 Australian news articles, one a line);
  * a path: MediaWiki XML (``.xml``/``.xml.bz2``), JSON Lines (``.jsonl``, ``.jsonl.gz``;
    a ``text`` field), plain text (``.txt``/``.md``: the whole file is one document unless
    ``split_docs`` says otherwise) or a directory of such files.

gensim is used only as a package of data files: install it with
``pip install --no-deps gensim`` and it is never imported.
"""

from __future__ import annotations

import bz2
import gzip
import hashlib
import io
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from lmforge.errors import LmforgeError
from ..io import text_files
from ..io.packages import installed_path

WIKI_FILE = "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
NEWS_FILE = "gensim/test/test_data/lee_background.cor"
BGWIKI_FILE = "gensim/test/test_data/bgwiki-latest-pages-articles-shortened.xml.bz2"
NAMED_SOURCES = {"wiki": WIKI_FILE, "news": NEWS_FILE, "bgwiki": BGWIKI_FILE}
GENSIM_INSTALL = "pip install --no-deps gensim"
TEXT_SUFFIXES = (".txt", ".md", ".text", ".cor")
SPLITS = ("train", "validation", "test")


@dataclass
class Document:
    """One text with where it came from; ``id`` is unique within its source."""

    id: str
    text: str
    source: str
    meta: dict[str, Any] = field(default_factory=dict)


def gensim_data_file(relative: str) -> Path:
    """Path of a file inside the installed gensim distribution (never imports gensim)."""
    path = installed_path("gensim", relative)
    if path is None:
        raise LmforgeError(f"the gensim test corpora are not installed; install them with: {GENSIM_INSTALL}")
    if not path.is_file():
        raise LmforgeError(f"{path} is missing from the gensim installation; reinstall with: {GENSIM_INSTALL}")
    return path


class _CountingReader(io.RawIOBase):
    """Wraps a binary file and counts the bytes read, for progress and ETA."""

    def __init__(self, raw: IO[bytes]) -> None:
        self.raw = raw
        self.bytes_read = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        data = self.raw.read(len(buffer))
        n = len(data)
        buffer[:n] = data
        self.bytes_read += n
        return n

    def close(self) -> None:
        self.raw.close()
        super().close()


class Source:
    """A stream of documents from one file, with the fraction of the file already read.

    Iterate over it for documents; ``progress()`` (0..1) tells how far the underlying
    file has been consumed, compressed or not, so a caller can show a rate and an ETA.
    """

    def __init__(self, name: str, path: Path, kind: str, **options: Any) -> None:
        self.name, self.path, self.kind, self.options = name, path, kind, options
        self.size = path.stat().st_size
        self._reader: _CountingReader | None = None

    def progress(self) -> float:
        if self._reader is None or not self.size:
            return 0.0
        return min(1.0, self._reader.bytes_read / self.size)

    def _open(self) -> IO[bytes]:
        self._reader = _CountingReader(open(self.path, "rb"))
        raw: IO[bytes] = io.BufferedReader(self._reader, 1 << 16)
        name = self.path.name.lower()
        if name.endswith(".bz2"):
            return bz2.BZ2File(raw)  # type: ignore[return-value]
        if name.endswith(".gz"):
            return gzip.GzipFile(fileobj=raw)  # type: ignore[return-value]
        return raw

    def __iter__(self) -> Iterator[Document]:
        try:
            with self._open() as f:
                if self.kind == "mediawiki":
                    yield from iter_mediawiki(f, self.name, **self.options)
                elif self.kind == "jsonl":
                    yield from iter_jsonl(f, self.name, **self.options)
                elif self.kind == "lines":
                    yield from iter_text(f, self.name, split_docs="line")
                else:
                    yield from iter_text(f, self.name, **self.options)
        except (OSError, EOFError) as exc:
            raise LmforgeError(f"cannot read {self.path}: {exc}") from None


def iter_mediawiki(f: IO[bytes], source: str, namespaces: tuple[int, ...] = (0,),
                   skip_redirects: bool = True, strip_markup: bool = True) -> Iterator[Document]:
    """Articles of a MediaWiki XML export, streamed (memory stays flat on a full dump)."""
    import xml.etree.ElementTree as ET

    from lmforge.data.wikitext import strip_wiki_markup

    def local(tag: str) -> str:
        return tag.rsplit("}", 1)[-1]

    try:
        for _event, elem in ET.iterparse(f, events=("end",)):
            if local(elem.tag) != "page":
                continue
            fields = {local(child.tag): child for child in elem}
            title = (fields["title"].text or "") if "title" in fields else ""
            ns = int(fields["ns"].text or 0) if "ns" in fields else 0
            page_id = (fields["id"].text or title) if "id" in fields else title
            text = ""
            revision = fields.get("revision")
            if revision is not None:
                for child in revision:
                    if local(child.tag) == "text":
                        text = child.text or ""
            is_redirect = "redirect" in fields or text.lstrip()[:9].upper() == "#REDIRECT"
            elem.clear()
            if ns not in namespaces or (skip_redirects and is_redirect):
                continue
            body = strip_wiki_markup(text) if strip_markup else text
            yield Document(f"{source}:{page_id}", f"{title}\n\n{body}" if body else "", source,
                           {"title": title, "page_id": page_id})
    except ET.ParseError as exc:
        raise LmforgeError(f"{source}: not a valid MediaWiki XML export ({exc})") from None


def iter_jsonl(f: IO[bytes], source: str, text_field: str = "text") -> Iterator[Document]:
    """One JSON object per line with a string field ``text_field``."""
    for n, record in text_files.parse_jsonl(io.TextIOWrapper(f, encoding="utf-8", errors="replace"), source):
        if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
            raise LmforgeError(f"{source}:{n}: expected an object with a string field {text_field!r}")
        doc_id = record.get("id", n)
        meta = {k: v for k, v in record.items() if k not in (text_field, "id")}
        yield Document(f"{source}:{doc_id}", record[text_field], source, meta)


_BLANK_LINE_RUN = re.compile(r"\n\s*\n(?:\s*\n)+")  # two or more blank lines


def iter_text(f: IO[bytes], source: str, split_docs: str = "file") -> Iterator[Document]:
    """Plain text: the whole file (``file``), one document a line (``line``), or documents
    separated by two or more blank lines (``blank``)."""
    text = io.TextIOWrapper(f, encoding="utf-8", errors="replace").read()
    if split_docs == "file":
        parts = [text]
    elif split_docs == "line":
        parts = text.split("\n")
    elif split_docs == "blank":
        parts = _BLANK_LINE_RUN.split(text)
    else:
        raise LmforgeError(f"unknown split_docs {split_docs!r}: use file, line or blank")
    for n, part in enumerate(parts, 1):
        if part.strip():
            yield Document(f"{source}:{n}", part.strip("\n"), source)


def _file_kind(path: Path) -> str:
    name = path.name.lower()
    for suffix in (".bz2", ".gz"):
        name = name.removesuffix(suffix)
    if name.endswith(".xml"):
        return "mediawiki"
    if name.endswith(".jsonl"):
        return "jsonl"
    return "text"


def _readable_corpus_file(path: Path) -> bool:
    if not path.is_file() or path.name.startswith("."):
        return False
    return _file_kind(path) in ("mediawiki", "jsonl") or path.suffix.lower() in TEXT_SUFFIXES


def open_sources(spec: str, split_docs: str = "file", text_field: str = "text") -> list[Source]:
    """``wiki``, ``news``, ``bgwiki``, a file or a directory -> the sources to read, in order."""
    if spec in NAMED_SOURCES:
        path = gensim_data_file(NAMED_SOURCES[spec])
        return [Source(spec, path, "lines" if spec == "news" else "mediawiki")]
    path = Path(spec).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if _readable_corpus_file(p))
        if not files:
            raise LmforgeError(f"{path} has no .txt, .md, .jsonl or .xml files")
        return [s for p in files for s in open_sources(str(p), split_docs, text_field)]
    if not path.is_file():
        known = ", ".join(NAMED_SOURCES)
        raise LmforgeError(f"no such corpus: {spec!r} is not a file, a directory or a named source ({known})")
    kind = _file_kind(path)
    options: dict[str, Any] = {}
    if kind == "jsonl":
        options["text_field"] = text_field
    elif kind == "text":
        options["split_docs"] = split_docs
    return [Source(str(path), path, kind, **options)]


def load_source(spec: str, **options: Any) -> Iterator[Document]:
    """All documents of one source spec (see :func:`open_sources`)."""
    for source in open_sources(spec, **options):
        yield from source


def split_of(text: str, val_fraction: float = 0.01, test_fraction: float = 0.0, salt: str = "") -> str:
    """``train``, ``validation`` or ``test`` for a document, decided by a hash of its text.

    Hashing the content (not drawing random numbers, not using the position in the file)
    keeps every document in the same split across runs, across reorderings of the
    corpus and when more data is added later, so validation text never leaks into
    training on a re-run. ``salt`` gives an independent split of the same corpus.
    """
    if not 0 <= val_fraction < 1 or not 0 <= test_fraction < 1 or val_fraction + test_fraction >= 1:
        raise LmforgeError("validation and test fractions must be in [0, 1) and sum to less than 1")
    digest = hashlib.blake2b((salt + text).encode("utf-8", "replace"), digest_size=8).digest()
    u = int.from_bytes(digest, "big") / 2**64
    if u < test_fraction:
        return "test"
    if u < test_fraction + val_fraction:
        return "validation"
    return "train"


def total_size(sources: list[Source]) -> int:
    return sum(s.size for s in sources)
