"""Documents from files: Markdown, plain text, HTML and PDF, each as one `Document`.

A loader turns a file into text the chunker can cut, and keeps what a citation needs to
point back into the file: every line of `Document.text` knows the line (or, for HTML, the
range of lines) of the file it came from, and PDF text knows its pages.

* Markdown (`.md`, `.markdown`): YAML front matter between `---` lines at the top becomes
  `metadata` (a page's `zh_title`, `zh_terms`, `terms`, ...); it is cut from the text, and
  `first_line` says where the text starts in the file, so line numbers stay the file's.
  The title is the front matter's `title`, else the first `#` heading, else the file name.
* Plain text (`.txt`): the text as it is; the title is the file name without suffix.
* HTML (`.html`, `.htm`): the visible text, with `h1`-`h6` turned into `#` headings, list
  items into `- ` lines, `pre` into fenced code and table rows into `| a | b |` lines, so the
  chunker sees the page's structure. `script`, `style`, `nav`, `template`, `noscript`,
  `svg`, the `head` (but its `title`) and elements marked `hidden` are dropped; character
  references are decoded.
* PDF (`.pdf`): the text layer of each page, read with pypdf, pages separated by a blank
  line. A PDF has no lines of its own: line numbers count lines of this extracted text,
  and the page (`page_of`) is what a citation should name. A PDF with no text on any page
  (a scan) or one that needs a password is refused with a clear error: run OCR, or remove
  the password, first.

`iter_documents` walks files and directories. What is an error and what is skipped:

* a path that does not exist, a file given directly that cannot be loaded (unreadable,
  not UTF-8, a PDF without text, an encrypted PDF, malformed front matter) or whose type
  is not supported, a directory that cannot be listed, and a walk that yields no document
  at all: `LmforgeError`;
* inside a directory walk, a supported file that cannot be loaded is skipped with a
  warning (`DocumentSkipped`, or the `on_skip` callback), so that one bad file does not
  stop the indexing of a thousand good ones; `strict=True` makes these errors too;
  files of other types, and hidden files and directories (names starting with `.`), are
  passed over silently.
"""

from __future__ import annotations

import bisect
import codecs
import datetime
import hashlib
import os
import re
import warnings
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

from ..errors import LmforgeError

MARKDOWN_SUFFIXES = (".md", ".markdown")
TEXT_SUFFIXES = (".txt",)
HTML_SUFFIXES = (".html", ".htm")
PDF_SUFFIXES = (".pdf",)
SUFFIXES = MARKDOWN_SUFFIXES + TEXT_SUFFIXES + HTML_SUFFIXES + PDF_SUFFIXES


class DocumentSkipped(UserWarning):
    """A file in a directory walk that could not be loaded and was left out."""


@dataclass
class Document:
    """The text of one file, with where each of its lines came from."""

    source: str  # path relative to the indexed root (forward slashes), or the file's name
    text: str
    title: str = ""
    kind: str = "text"  # "markdown", "text", "html" or "pdf"
    metadata: dict[str, Any] = field(default_factory=dict)  # front matter; "page_count" for a PDF
    digest: str = ""  # sha256 of the file's bytes (hex): unchanged file, unchanged digest
    first_line: int = 1  # the file line of the text's first line (after front matter)
    # HTML: (first, last) file line of each text line; None where text lines are file lines.
    line_spans: tuple[tuple[int, int], ...] | None = None
    # PDF: the 0-based text line where each page starts (page n starts at page_starts[n-1]).
    page_starts: tuple[int, ...] = ()

    def file_lines(self, index: int) -> tuple[int, int]:
        """The (first, last) 1-based line in the file of the text's 0-based line `index`."""
        if self.line_spans is not None:
            if not self.line_spans:
                return (1, 1)
            return self.line_spans[min(index, len(self.line_spans) - 1)]
        return (self.first_line + index, self.first_line + index)

    def page_of(self, index: int) -> int | None:
        """The 1-based page of the text's 0-based line `index` (PDF only, else None)."""
        if not self.page_starts:
            return None
        return max(bisect.bisect_right(self.page_starts, index), 1)


def load_document(path: str | os.PathLike[str], source: str | None = None) -> Document:
    """One file as a `Document`; `source` defaults to the file's name. Raises `LmforgeError`."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise LmforgeError(f"{path}: unsupported document type {suffix or '(no suffix)'!r}; "
                           f"supported: {', '.join(SUFFIXES)}")
    data = _read_bytes(path)
    source = source if source is not None else path.name
    digest = hashlib.sha256(data).hexdigest()
    if suffix in MARKDOWN_SUFFIXES:
        return _markdown(path, source, _decode(path, data), digest)
    if suffix in HTML_SUFFIXES:
        return _html(path, source, _decode_html(path, data), digest)
    if suffix in PDF_SUFFIXES:
        return _pdf(path, source, data, digest)
    return Document(source=source, text=_decode(path, data), title=path.stem, kind="text", digest=digest)


def iter_documents(paths: str | os.PathLike[str] | Iterable[str | os.PathLike[str]],
                   suffixes: Sequence[str] = SUFFIXES, *, strict: bool = False,
                   on_skip: Callable[[Path, str], None] | None = None) -> Iterator[Document]:
    """The documents under `paths` (files and directories), in sorted order.

    A directory's documents get sources relative to that directory (`guide/setup.md`); a
    file given directly keeps its name. `suffixes` limits the types a walk picks up. A
    supported file that cannot be loaded inside a walk is reported to `on_skip(path,
    reason)` (default: a `DocumentSkipped` warning) and left out, unless `strict`. Two
    documents with the same source are an error: their chunks and citations would clash.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    wanted = tuple(s.lower() if s.startswith(".") else f".{s.lower()}" for s in suffixes)
    unknown = [s for s in wanted if s not in SUFFIXES]
    if unknown:
        raise LmforgeError(f"unsupported document type {unknown[0]!r}; supported: {', '.join(SUFFIXES)}")
    report = on_skip or _warn_skipped
    seen: dict[str, Path] = {}
    found = skipped = 0
    roots = [Path(p) for p in paths]
    if not roots:
        raise LmforgeError("no documents given: name at least one file or directory")
    for root in roots:
        if root.is_dir():
            files = [(path, path.relative_to(root).as_posix()) for path in _walk(root, wanted)]
        elif root.is_file():
            files = [(root, root.name)]
        elif root.exists():
            raise LmforgeError(f"{root} is neither a file nor a directory")
        else:
            raise LmforgeError(f"{root} does not exist")
        for path, source in files:
            if source in seen:
                raise LmforgeError(f"two documents have the same source {source!r} ({seen[source]} and {path}): "
                                   "index them separately, or name a directory that holds both")
            try:
                document = load_document(path, source)
            except LmforgeError as exc:
                if strict or not root.is_dir():
                    raise
                skipped += 1
                report(path, str(exc))
                continue
            seen[source] = path
            found += 1
            yield document
    if not found:
        names = ", ".join(str(r) for r in roots)
        why = f" ({skipped} could not be loaded, see the warnings)" if skipped else ""
        raise LmforgeError(f"no documents found in {names}{why}; supported types: {', '.join(wanted)}")


def _warn_skipped(path: Path, reason: str) -> None:
    warnings.warn(f"skipped {reason}" if reason.startswith(str(path)) else f"skipped {path}: {reason}",
                  DocumentSkipped, stacklevel=3)


def _walk(root: Path, suffixes: tuple[str, ...]) -> list[Path]:
    """Supported files under `root`, sorted by relative path, hidden names left out."""
    out: list[Path] = []

    def onerror(exc: OSError) -> None:
        raise LmforgeError(f"cannot list {exc.filename}: {exc.strerror}")

    for folder, dirs, files in os.walk(root, onerror=onerror):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in files:
            if not name.startswith(".") and Path(name).suffix.lower() in suffixes:
                path = Path(folder) / name
                if path.is_file():
                    out.append(path)
    return sorted(out, key=lambda p: p.relative_to(root).as_posix())


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise LmforgeError(f"{path} does not exist") from None
    except IsADirectoryError:
        raise LmforgeError(f"{path} is a directory, not a document") from None
    except OSError as exc:
        raise LmforgeError(f"cannot read {path}: {exc.strerror or exc}") from None


def _decode(path: Path, data: bytes) -> str:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise LmforgeError(f"{path}:{line}: not UTF-8 text (byte 0x{data[exc.start]:02x}); "
                           "convert it first, e.g. iconv -f latin1 -t utf-8") from None
    # A byte order mark is not text; universal newlines so that line numbers match editors.
    return text.removeprefix("\ufeff").replace("\r\n", "\n").replace("\r", "\n")


# ---------------------------------------------------------------------------------------
# Markdown

_FRONT_MATTER_END = re.compile(r"^(---|\.\.\.)[ \t]*$")
_ATX_HEADING = re.compile(r"^ {0,3}(#{1,6})(?:[ \t]+(.*?))?(?:[ \t]+#+)?[ \t]*$")
_FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")


def split_front_matter(text: str, source: str = "document") -> tuple[dict[str, Any], str, int]:
    """(metadata, text without the front matter, 1-based line where that text starts)."""
    lines = text.split("\n")
    if not lines or lines[0].rstrip() != "---":
        return {}, text, 1
    for end in range(1, len(lines)):
        if _FRONT_MATTER_END.match(lines[end]):
            break
    else:
        raise LmforgeError(f"{source}:1: front matter opened with '---' is never closed")
    import yaml

    try:
        data = yaml.safe_load("\n".join(lines[1:end]))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{source}:{mark.line + 2}" if mark is not None else source
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise LmforgeError(f"{where}: front matter is not valid YAML ({problem})") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise LmforgeError(f"{source}:2: front matter must be a mapping of keys to values, "
                           f"not {type(data).__name__}")
    return {str(k): _plain(v) for k, v in data.items()}, "\n".join(lines[end + 1:]), end + 2


def _plain(value: Any) -> Any:
    """YAML values as JSON can hold them (dates as ISO strings), so stores can keep them."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [_plain(v) for v in value]
    if isinstance(value, (datetime.date, datetime.datetime, datetime.time)):
        return value.isoformat()
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)


def markdown_title(text: str) -> str:
    """The text of the first level-1 ATX heading outside code fences ("" when none)."""
    fence = ""
    for line in text.split("\n"):
        match = _FENCE.match(line)
        if match:
            marker = match.group(1)
            if not fence:
                fence = marker
            elif marker[0] == fence[0] and len(marker) >= len(fence) and not line.strip().strip(marker[0]):
                fence = ""
            continue
        if not fence:
            heading = _ATX_HEADING.match(line)
            if heading and len(heading.group(1)) == 1 and heading.group(2):
                return heading.group(2).strip()
    return ""


def _markdown(path: Path, source: str, text: str, digest: str) -> Document:
    metadata, body, first_line = split_front_matter(text, str(path))
    title = str(metadata.get("title") or markdown_title(body) or path.stem)
    return Document(source=source, text=body, title=title, kind="markdown", metadata=metadata, digest=digest,
                    first_line=first_line)


# ---------------------------------------------------------------------------------------
# HTML

_DROPPED = {"script", "style", "nav", "template", "noscript", "svg", "head", "iframe", "object", "canvas"}
_VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "param", "source",
         "track", "wbr"}
_BLOCK = {"address", "article", "aside", "blockquote", "body", "dd", "details", "dialog", "div", "dl", "dt",
          "fieldset", "figcaption", "figure", "footer", "form", "header", "hgroup", "hr", "html", "li", "main",
          "ol", "p", "section", "summary", "table", "tbody", "thead", "tfoot", "tr", "ul", "caption"}
_HEADINGS = {"h1": 1, "h2": 2, "h3": 3, "h4": 4, "h5": 5, "h6": 6}
_SPACE = re.compile(r"\s+")


class _VisibleText(HTMLParser):
    """Collects visible text as Markdown-like blocks, each with its span of file lines."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.blocks: list[tuple[str, int, int]] = []  # (text, first file line, last file line)
        self.parts: list[str] = []
        self.span: list[int] = []
        self.skip: list[str] = []  # open elements whose content is dropped
        self.title: list[str] = []
        self.in_title = False
        self.heading = 0
        self.pre = 0
        self.list_item = False
        self.cells: list[str] | None = None  # the cells of the table row being read
        self.cell: list[str] = []

    def _note_lines(self, data: str) -> None:
        """Widen the current block's line span by the lines `data` (which has text) occupies."""
        line = self.getpos()[0]
        first = line + data[: len(data) - len(data.lstrip())].count("\n")
        last = line + data.rstrip().count("\n")
        if not self.span:
            self.span = [first, last]
        else:
            self.span[1] = max(self.span[1], last)

    def flush(self) -> None:
        raw = "".join(self.parts)
        text = raw.strip("\n").rstrip() if self.pre else _SPACE.sub(" ", raw).strip()
        if text and self.span:
            if self.heading:
                text = "#" * self.heading + " " + text
            elif self.list_item:
                text = "- " + text
                self.list_item = False
            self.blocks.append((text, self.span[0], self.span[1]))
        self.parts, self.span = [], []

    def fence(self) -> None:
        line = self.getpos()[0]
        self.blocks.append(("```", line, line))

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "title":
            self.in_title = True
            return
        names = dict(attrs)
        if self.skip or tag in _DROPPED or "hidden" in names or names.get("aria-hidden") == "true":
            if tag not in _VOID:
                self.skip.append(tag)
            return
        if tag in ("td", "th"):
            if self.cells is None:
                self.cells = []
            self.cell = []
        elif tag == "br":
            if self.pre:
                self.parts.append("\n")
            elif self.cells is None:
                self.flush()
        elif tag in _HEADINGS or tag in _BLOCK or tag == "pre":
            if self.cells is not None and tag != "tr":
                return  # blocks inside a table cell stay in the cell
            self.flush()
            if tag in _HEADINGS:
                self.heading = _HEADINGS[tag]
            elif tag == "li":
                self.list_item = True
            elif tag == "pre":
                self.pre += 1
                self.fence()
            elif tag == "tr":
                self.cells = []

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.handle_starttag(tag, attrs)
        if tag not in _VOID and self.skip and self.skip[-1] == tag:
            self.skip.pop()

    def handle_endtag(self, tag: str) -> None:
        if tag == "title":
            self.in_title = False
            return
        if self.skip:
            if tag in self.skip:  # closes the dropped element, and any unclosed children of it
                while self.skip.pop() != tag:
                    pass
            return
        if tag in ("td", "th"):
            if self.cells is not None:
                self.cells.append(_SPACE.sub(" ", "".join(self.cell)).strip().replace("|", "\\|"))
            self.cell = []
        elif tag == "tr" or (tag == "table" and self.cells):
            if self.cells is not None and any(self.cells):
                self.parts = ["| " + " | ".join(self.cells) + " |"]
                self.flush()
            self.cells, self.parts = None, []
        elif self.cells is not None:
            return
        elif tag == "pre" and self.pre:
            self.flush()
            self.pre -= 1
            self.fence()
        elif tag in _HEADINGS or tag in _BLOCK:
            self.flush()
            self.heading = 0

    def handle_data(self, data: str) -> None:
        if self.in_title:
            self.title.append(data)
        elif self.skip:
            return
        elif self.cells is not None:
            self.cell.append(data)
            if data.strip():
                self._note_lines(data)
        elif data.strip() or self.parts:
            self.parts.append(data)
            if data.strip():
                self._note_lines(data)

    def close(self) -> None:
        super().close()
        self.flush()
        if self.pre:
            self.fence()


_META_CHARSET = re.compile(rb"""<meta[^>]+charset\s*=\s*["']?\s*([A-Za-z0-9_.:-]+)""", re.IGNORECASE)


def _decode_html(path: Path, data: bytes) -> str:
    """UTF-8, or the charset a `<meta>` in the first 2 KB declares (a page may say latin-1)."""
    try:
        return _decode(path, data)
    except LmforgeError:
        match = _META_CHARSET.search(data[:2048])
        if not match:
            raise
        name = match.group(1).decode("ascii")
        try:
            codecs.lookup(name)
            text = data.decode(name)
        except (LookupError, UnicodeDecodeError):
            raise LmforgeError(f"{path}: cannot decode the page as UTF-8 or as its declared charset {name!r}") \
                from None
        return text.replace("\r\n", "\n").replace("\r", "\n")


def _html(path: Path, source: str, text: str, digest: str) -> Document:
    parser = _VisibleText()
    parser.feed(text)
    parser.close()
    lines: list[str] = []
    spans: list[tuple[int, int]] = []
    in_code = False
    for block, first, last in parser.blocks:
        # Blocks are separated by a blank line, as Markdown paragraphs are; list items and
        # table rows follow each other directly so that the list or table stays one block.
        if lines and not in_code:
            tight = block[:2] in ("- ", "| ") and lines[-1].startswith(block[:2])
            if not tight:
                lines.append("")
                spans.append(spans[-1])
        if block == "```":
            in_code = not in_code
        for offset, line in enumerate(block.split("\n")):
            lines.append(line)
            spans.append((min(first + offset, last), min(first + offset, last)) if in_code else (first, last))
    heading = next((line[2:].strip() for line in lines if line.startswith("# ")), "")
    title = heading or _SPACE.sub(" ", "".join(parser.title)).strip() or path.stem
    return Document(source=source, text="\n".join(lines), title=title, kind="html", digest=digest,
                    line_spans=tuple(spans))


# ---------------------------------------------------------------------------------------
# PDF

def _pdf(path: Path, source: str, data: bytes, digest: str) -> Document:
    import io

    try:
        import pypdf
        from pypdf.errors import DependencyError, PdfReadError
    except ImportError:
        raise LmforgeError(f"{path}: reading PDF needs pypdf: pip install 'lmforge[rag]'") from None
    try:
        reader = pypdf.PdfReader(io.BytesIO(data))
        if reader.is_encrypted and not reader.decrypt(""):
            raise LmforgeError(f"{path}: the PDF is encrypted with a password; save an unprotected copy "
                               "(e.g. qpdf --decrypt --password=... in.pdf out.pdf) and index that")
        pages = [(page.extract_text() or "") for page in reader.pages]
        info = reader.metadata
        pdf_title = str(info.title).strip() if info is not None and info.title else ""
    except LmforgeError:
        raise
    except DependencyError as exc:
        raise LmforgeError(f"{path}: this PDF's encryption needs the cryptography package ({exc})") from None
    except (PdfReadError, ValueError, KeyError, TypeError, OSError) as exc:
        raise LmforgeError(f"{path}: not a readable PDF ({exc})") from None
    if not any(page.strip() for page in pages):
        raise LmforgeError(f"{path}: no page of the PDF has a text layer (a scan?); "
                           "run OCR first (e.g. ocrmypdf) and index the result")
    lines: list[str] = []
    starts: list[int] = []
    for text in pages:
        text = text.rstrip()
        if lines:
            lines.append("")  # a page break is a paragraph break
        starts.append(len(lines))
        page_lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
        lines.extend(line.rstrip() for line in page_lines)
    title = pdf_title or next((line.strip() for line in lines if line.strip()), "") or path.stem
    return Document(source=source, text="\n".join(lines), title=title[:200], kind="pdf",
                    metadata={"page_count": len(pages)}, digest=digest, page_starts=tuple(starts))
