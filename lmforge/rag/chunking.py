"""Documents to chunks: heading-aware, packed to a token budget, with overlap and exact lines.

A `Chunker` cuts a `Document` in three steps:

1. **Blocks.** Markdown (and HTML, which its loader turns into Markdown-like text) is read
   into headings, paragraphs (a list without blank lines is one paragraph), fenced or
   indented code blocks and tables. Plain text and PDF text are paragraphs only.
2. **Sections.** Each heading opens a section; its heading path (outermost first, the
   document's title at the root) travels with every chunk of the section. A heading
   with no text under it (a title followed directly by a subheading) joins the next
   section's first chunk, so no chunk is a bare heading. A PDF page break also ends a
   section, so that each chunk lies on one page.
3. **Packing.** Within a section, whole blocks are packed into a chunk while the chunk's
   text stays within `max_tokens`. A block that does not fit in any chunk is cut: a
   paragraph at sentence ends (`.`, `!`, `?` and `。`, `！`, `？`), code and tables at line
   ends, and a sentence or line that is still too long at word ends (or characters, for
   text without spaces). Consecutive chunks of one section share up to `overlap` tokens
   (whole sentences or lines from the end of the previous chunk), so that a passage cut
   in two is still found whole in one of them.

Every chunk is a verbatim slice of the document's text, so its `line_start`/`line_end`
are the file's own lines (front matter included) and a citation can point at them. Its id
depends on the source, heading path and text only: editing one section leaves the ids of
every other section as they were (chunks never cross sections).

The token counter is injected. The default, `estimate_tokens`, needs no tokenizer and errs
high: on the handbook it counts about 1.4 times the tokens of the default embedder's
WordPiece tokenizer (all-MiniLM-L6-v2). `DEFAULT_MAX_TOKENS` leaves room in that model's
256-token window for the title line and heading path that `Chunk.search_text()` puts in
front of the text, and `Chunker.window` shrinks a section's budget when its prefix (long
key-term lists) needs more.
"""

from __future__ import annotations

import bisect
import re
from dataclasses import dataclass, field
from typing import Callable, Iterable, NamedTuple

from ..errors import LmforgeError
from .documents import Document
from .types import Chunk, chunk_id

DEFAULT_MAX_TOKENS = 192  # the embedder's 256 positions, less its 2 special tokens and ~60 for search_text's prefix
DEFAULT_OVERLAP = 32
DEFAULT_WINDOW = 254  # all-MiniLM-L6-v2 reads 256 positions, two of them [CLS] and [SEP]

# One token per CJK character or punctuation mark, a few per Latin word by its length,
# each digit on its own (byte-level BPE tokenizers split numbers into digits).
_ESTIMATE_UNITS = re.compile(
    r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002ffff]"  # Han
    r"|[\u3040-\u30ff\u31f0-\u31ff]"  # kana
    r"|[\uac00-\ud7af\u1100-\u11ff\u3130-\u318f]"  # Hangul
    r"|\d|[^\W\d_]+|\S"
)
_VOWEL = re.compile(r"[aeiouyAEIOUY]")


def estimate_tokens(text: str) -> int:
    """A tokenizer-free token count that over- rather than under-estimates.

    Latin words cost 1 + (length - 1) // 3 (a WordPiece or BPE vocabulary splits rare
    words into pieces of about three letters) and a word without vowels one per letter;
    each digit, punctuation mark and Han character 1, kana 2 and Hangul syllables 3 (the
    uncased WordPiece vocabulary splits voiced kana and Hangul syllables into their
    parts), other alphabets a token per two letters. Against all-MiniLM-L6-v2's tokenizer
    on the handbook's chunks it counts 1.39 times the true tokens on average; on a few
    chunks dense with code identifiers and file paths (short pieces such as "py" and "cli"
    cost the tokenizer two tokens, the estimate one) it is up to 8% low. Inject the
    embedder's own counter where the window must never be exceeded.
    """
    total = 0
    for unit in _ESTIMATE_UNITS.findall(text):
        first = ord(unit[0])
        if len(unit) == 1:
            if 0xAC00 <= first <= 0xD7AF:
                total += 3
            elif 0x3040 <= first <= 0x31FF:
                total += 2
            else:
                total += 1
        elif unit.isascii():
            # A word without a vowel is an abbreviation ("hf", "ffn", "tmp"): spelled out in pieces.
            total += 1 + (len(unit) - 1) // 3 if _VOWEL.search(unit) else len(unit)
        else:
            total += 1 + len(unit) // 2
    return total


class _Block(NamedTuple):
    kind: str  # "heading", "paragraph", "code" or "table"
    start: int  # character offsets in the document's text: [start, end)
    end: int
    level: int = 0  # headings: 1-6
    title: str = ""


class _Atom(NamedTuple):
    start: int
    end: int
    block: int  # index of the block it came from, within its section
    heading: bool


_ATX = re.compile(r"^ {0,3}(#{1,6})(?:[ \t]+(.*?))?(?:[ \t]+#+)?[ \t]*$")
_FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")
_SETEXT = re.compile(r"^ {0,3}(=+|-+)[ \t]*$")
_TABLE_DELIMITER = re.compile(r"^[ \t]*\|?[ \t]*:?-+:?[ \t]*(\|[ \t]*:?-+:?[ \t]*)*\|?[ \t]*$")
_LIST_ITEM = re.compile(r"^[ \t]*([-*+]|\d{1,9}[.)])[ \t]")
_INDENTED = re.compile(r"^( {4}|\t)")


def _lines_with_offsets(text: str) -> list[tuple[int, int]]:
    """(start, end) offsets of each line, without its newline."""
    out, start = [], 0
    for line in text.split("\n"):
        out.append((start, start + len(line)))
        start += len(line) + 1
    return out


def parse_blocks(text: str, markdown: bool = True) -> list[_Block]:
    """The blocks of `text`; with `markdown=False` only blank-line separated paragraphs."""
    lines = _lines_with_offsets(text)
    blocks: list[_Block] = []
    paragraph: list[int] = []  # line indices of the paragraph being read

    def close_paragraph() -> None:
        if paragraph:
            first, last = lines[paragraph[0]], lines[paragraph[-1]]
            indented = markdown and all(_INDENTED.match(text[s:e]) for s, e in (lines[i] for i in paragraph))
            blocks.append(_Block("code" if indented else "paragraph", first[0], last[1]))
            paragraph.clear()

    i = 0
    while i < len(lines):
        start, end = lines[i]
        line = text[start:end]
        if not line.strip():
            close_paragraph()
            i += 1
            continue
        if not markdown:
            paragraph.append(i)
            i += 1
            continue
        fence = _FENCE.match(line)
        if fence:
            close_paragraph()
            marker = fence.group(1)
            j = i + 1
            while j < len(lines):
                inner = text[lines[j][0]:lines[j][1]].strip()
                if inner.startswith(marker[0] * len(marker)) and not inner.strip(marker[0]):
                    break
                j += 1
            j = min(j, len(lines) - 1)  # an unclosed fence runs to the end of the text
            blocks.append(_Block("code", start, lines[j][1]))
            i = j + 1
            continue
        heading = _ATX.match(line)
        if heading:
            close_paragraph()
            blocks.append(_Block("heading", start, end, len(heading.group(1)), (heading.group(2) or "").strip()))
            i += 1
            continue
        underline = _SETEXT.match(line)
        if underline and paragraph and not _LIST_ITEM.match(text[lines[paragraph[0]][0]:lines[paragraph[0]][1]]):
            title = " ".join(text[s:e].strip() for s, e in (lines[k] for k in paragraph))
            blocks.append(_Block("heading", lines[paragraph[0]][0], end, 1 if underline.group(1)[0] == "=" else 2,
                                 title))
            paragraph.clear()
            i += 1
            continue
        is_table = line.lstrip().startswith("|") or (
            "|" in line and i + 1 < len(lines) and _TABLE_DELIMITER.match(text[lines[i + 1][0]:lines[i + 1][1]])
            and "-" in text[lines[i + 1][0]:lines[i + 1][1]])
        if is_table and not paragraph:
            j = i + 1
            while j < len(lines) and "|" in text[lines[j][0]:lines[j][1]] and text[lines[j][0]:lines[j][1]].strip():
                j += 1
            blocks.append(_Block("table", start, lines[j - 1][1]))
            i = j
            continue
        paragraph.append(i)
        i += 1
    close_paragraph()
    return blocks


# Sentence ends: Latin punctuation followed by space, CJK punctuation anywhere (no space is
# written after it), and the line break before a list item.
_SENTENCE_END = re.compile(
    r"[.!?…]+[\"'”’)\]]*(?=\s)"
    r"|[。！？]+[」』”’）)\]]*"
    r"|\n(?=[ \t]*(?:[-*+]|\d{1,9}[.)])[ \t])"
)
_ABBREVIATIONS = frozenset(
    "e.g i.e etc vs cf al approx fig figs eq eqs no nos dr mr mrs ms prof st jr sr inc ltd co corp u.s "
    "resp incl ca p pp vol ch sec".split()
)
_LAST_WORD = re.compile(r"(\S+)$")


def sentence_spans(text: str, start: int, end: int) -> list[tuple[int, int]]:
    """[start, end) offsets of the sentences of text[start:end], without surrounding space."""
    cuts = [start]
    for match in _SENTENCE_END.finditer(text, start, end):
        if match.group().startswith("."):
            word = _LAST_WORD.search(text, start, match.start())
            stem = word.group(1).lstrip("([\"'").lower() if word else ""
            if stem in _ABBREVIATIONS or (len(stem) == 1 and stem.isalpha()):
                continue  # "e.g. the", "J. Smith"
        cuts.append(match.end())
    cuts.append(end)
    spans = []
    for a, b in zip(cuts, cuts[1:]):
        piece = text[a:b]
        stripped = piece.strip()
        if stripped:
            left = a + len(piece) - len(piece.lstrip())
            spans.append((left, left + len(stripped)))
    return spans


def _line_spans(text: str, start: int, end: int) -> list[tuple[int, int]]:
    """The non-blank lines of text[start:end], indentation kept."""
    spans, pos = [], start
    for line in text[start:end].split("\n"):
        if line.strip():
            spans.append((pos, pos + len(line.rstrip())))
        pos += len(line) + 1
    return spans


@dataclass
class Chunker:
    """Cuts documents into `Chunk`s of at most `max_tokens` tokens (by `count_tokens`)."""

    max_tokens: int = DEFAULT_MAX_TOKENS  # the most tokens of a chunk's text
    overlap: int = DEFAULT_OVERLAP  # tokens shared by consecutive chunks of one section
    # The most tokens of a chunk's `embed_text()` (title, heading path, text), which
    # is what the embedder reads: all-MiniLM-L6-v2's 256 positions less [CLS] and [SEP]. A
    # section whose prefix is long gets a smaller text budget, but never under half of
    # `max_tokens` (a very long title and heading path then overflow the window, and the
    # embedder truncates the end of the text). None: no window.
    window: int | None = DEFAULT_WINDOW
    count_tokens: Callable[[str], int] = field(default=estimate_tokens, repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.max_tokens, int) or self.max_tokens < 8:
            raise LmforgeError(f"max_tokens must be an integer of at least 8, not {self.max_tokens!r}")
        if not isinstance(self.overlap, int) or not 0 <= self.overlap <= self.max_tokens // 2:
            raise LmforgeError(f"overlap must be between 0 and half of max_tokens ({self.max_tokens // 2}), "
                               f"not {self.overlap!r}")
        if self.window is not None and (not isinstance(self.window, int) or self.window < 8):
            raise LmforgeError(f"window must be an integer of at least 8 or None, not {self.window!r}")

    def budget(self, source: str, headings: tuple[str, ...], metadata: dict) -> int:
        """Tokens left for the text of a chunk with this heading path and metadata."""
        if self.window is None:
            return self.max_tokens
        prefix = Chunk(source=source, text="", headings=headings, metadata=metadata, id="-").embed_text()
        return max(self.max_tokens // 2, min(self.max_tokens, self.window - self.count_tokens(prefix + "\n")))

    # -- public
    def chunk(self, document: Document) -> list[Chunk]:
        """The chunks of one document, in document order."""
        text = document.text
        blocks = parse_blocks(text, markdown=document.kind in ("markdown", "html"))
        line_starts = [start for start, _ in _lines_with_offsets(text)]
        base = {**document.metadata, "title": document.title, "kind": document.kind}
        chunks: list[Chunk] = []
        seen: dict[str, int] = {}
        for headings, section in self._sections(document, blocks, line_starts):
            budget = self.budget(document.source, headings, base)
            for first, last in self._pack(text, section, budget):
                body = text[first:last]
                line_a = bisect.bisect_right(line_starts, first) - 1
                line_b = bisect.bisect_right(line_starts, last - 1) - 1
                metadata = dict(base)
                page = document.page_of(line_a)
                if page is not None:
                    metadata["page"] = page
                key = chunk_id(document.source, headings, body)
                seen[key] = seen.get(key, 0) + 1
                if seen[key] > 1:  # the same text twice under one heading path: ids must still differ
                    key = chunk_id(document.source, headings, f"{body}\x00{seen[key]}")
                chunks.append(Chunk(source=document.source, text=body, headings=headings,
                                    line_start=document.file_lines(line_a)[0], line_end=document.file_lines(line_b)[1],
                                    metadata=metadata, id=key))
        return chunks

    def chunk_all(self, documents: Iterable[Document], progress: Callable[[int], None] | None = None) -> list[Chunk]:
        """The chunks of every document; `progress(documents_done)` after each one."""
        out: list[Chunk] = []
        for n, document in enumerate(documents, 1):
            out.extend(self.chunk(document))
            if progress is not None:
                progress(n)
        return out

    # -- sections
    def _sections(self, document: Document, blocks: list[_Block],
                  line_starts: list[int]) -> list[tuple[tuple[str, ...], list[_Block]]]:
        title = document.title
        stack: list[tuple[int, str]] = []
        sections: list[tuple[tuple[str, ...], list[_Block]]] = []
        current: list[_Block] = []
        path: tuple[str, ...] = (title,)
        page = None
        has_body = False  # whether `current` holds more than headings

        def heading_path() -> tuple[str, ...]:
            names = [name for _, name in stack]
            return tuple(names) if names and names[0] == title else (title, *names)

        for block in blocks:
            block_page = document.page_of(bisect.bisect_right(line_starts, block.start) - 1)
            if block.kind == "heading":
                if has_body:
                    sections.append((path, current))
                    current, has_body = [], False
                # A heading with nothing under it stays in `current` and opens the next chunk.
                while stack and stack[-1][0] >= block.level:
                    stack.pop()
                stack.append((block.level, block.title or "#" * block.level))
                path = heading_path()
                current.append(block)
                continue
            if page is not None and block_page != page and has_body:
                sections.append((path, current))
                current = []
            page = block_page
            current.append(block)
            has_body = True
        if current:
            sections.append((path, current))
        return sections

    # -- packing
    def _atoms(self, text: str, blocks: list[_Block], budget: int) -> list[_Atom]:
        atoms: list[_Atom] = []
        for index, block in enumerate(blocks):
            if block.kind == "paragraph":
                spans = sentence_spans(text, block.start, block.end)
            elif block.kind in ("code", "table"):
                spans = _line_spans(text, block.start, block.end)
            else:
                spans = [(block.start, block.end)]
            for start, end in spans:
                for a, b in self._fit(text, start, end, budget):
                    atoms.append(_Atom(a, b, index, block.kind == "heading"))
        return atoms

    def _fits(self, text: str, start: int, end: int, budget: int) -> bool:
        return self.count_tokens(text[start:end]) <= budget

    def _fit(self, text: str, start: int, end: int, budget: int) -> list[tuple[int, int]]:
        """text[start:end] in pieces that each fit: cut at spaces, or anywhere when there are none."""
        pieces = []
        while start < end:
            if self._fits(text, start, end, budget):
                pieces.append((start, end))
                break
            cuts = [m.start() for m in re.finditer(r"\s+", text[start:end])]
            cuts = [start + c for c in cuts if c > 0]
            cut = self._longest_fit(text, start, cuts, budget) if cuts else None
            if cut is None:  # no space, or the first word alone is too long: cut inside it
                cut = self._longest_fit(text, start, list(range(start + 1, end)), budget)
                cut = cut if cut is not None else start + 1
            pieces.append((start, cut))
            start = cut
            while start < end and text[start].isspace():
                start += 1
        return pieces

    def _longest_fit(self, text: str, start: int, cuts: list[int], budget: int) -> int | None:
        """The largest cut c in `cuts` (ascending) with text[start:c] within budget (binary search)."""
        lo, hi, best = 0, len(cuts) - 1, None
        while lo <= hi:
            mid = (lo + hi) // 2
            if self._fits(text, start, cuts[mid], budget):
                best, lo = cuts[mid], mid + 1
            else:
                hi = mid - 1
        return best

    def _pack(self, text: str, blocks: list[_Block], budget: int) -> list[tuple[int, int]]:
        """[start, end) offsets of the chunks of one section, each within `budget` tokens."""
        atoms = self._atoms(text, blocks, budget)
        n = len(atoms)
        if not n:
            return []
        block_first: dict[int, int] = {}
        block_end = [0] * n
        for i, atom in enumerate(atoms):
            block_first.setdefault(atom.block, i)
        for i in range(n - 1, -1, -1):
            same_next = i + 1 < n and atoms[i + 1].block == atoms[i].block
            block_end[i] = block_end[i + 1] if same_next else i + 1

        tokens_of = self._span_counter(text, atoms)

        def fits(a: int, b: int) -> bool:  # atoms a .. b-1 together
            return tokens_of(a, b) <= budget

        out: list[tuple[int, int]] = []
        first = pos = 0  # first atom of the chunk (overlap included), first atom not yet in a chunk
        while pos < n:
            end = pos
            while end < n and fits(first, block_end[end]):
                end = block_end[end]
            if end < n:
                rest_start, rest_end = max(block_first[atoms[end].block], pos), block_end[end]
                rest_fits_alone = fits(rest_start, rest_end)
                if end == pos and first < pos and rest_fits_alone:
                    first = pos  # the overlap would cut a block that fits whole: drop the overlap
                    continue
                if end == pos or not rest_fits_alone:
                    while end < rest_end and fits(first, end + 1):
                        end += 1
            if end == pos:
                if first < pos:
                    first = pos
                    continue
                end = pos + 1  # a counter that is not monotone: never loop forever
            out.append((atoms[first].start, atoms[end - 1].end))
            pos = end
            overlap = min(self.overlap, budget // 2)
            previous, first = first, end
            while (overlap and pos < n and first - 1 > previous and not atoms[first - 1].heading
                   and tokens_of(first - 1, end) <= overlap):
                first -= 1  # carry whole sentences (or lines) back while they fit the overlap
        return out

    def _span_counter(self, text: str, atoms: list[_Atom]) -> Callable[[int, int], int]:
        """tokens_of(a, b): the tokens of the text from atom a to atom b - 1.

        The default estimate counts whitespace-separated units, so the sum over atoms (which
        meet at whitespace, or inside a word too long for any chunk, where the parts cost
        at least the whole) never undercounts: prefix sums make each question O(1). An
        injected counter gets the exact slice.
        """
        if self.count_tokens is estimate_tokens:
            sums = [0]
            for atom in atoms:
                sums.append(sums[-1] + estimate_tokens(text[atom.start:atom.end]))
            return lambda a, b: sums[b] - sums[a]
        return lambda a, b: self.count_tokens(text[atoms[a].start:atoms[b - 1].end])


def chunk_document(document: Document, max_tokens: int = DEFAULT_MAX_TOKENS, overlap: int = DEFAULT_OVERLAP,
                   window: int | None = DEFAULT_WINDOW,
                   count_tokens: Callable[[str], int] = estimate_tokens) -> list[Chunk]:
    """The chunks of `document` (see `Chunker`)."""
    return Chunker(max_tokens=max_tokens, overlap=overlap, window=window, count_tokens=count_tokens).chunk(document)
