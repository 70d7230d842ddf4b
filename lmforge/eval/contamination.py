"""Benchmark contamination: how much of a task's text already appears in a training corpus (E3).

Text is normalized (NFKC, case-folded) and split into words (runs of letters and digits)
exactly as the training-data filter `lmforge.data.decontam` does, which drops training
documents that share an n-gram with a benchmark; this module looks from the other side
and reports, per benchmark item, what a given corpus contains. An item's
fingerprint is the set of its word n-grams (13 by default: long enough that a match is
almost never chance, short enough to survive small edits around it). Items shorter than
n words contribute one n-gram of all their words. The corpus is streamed once, word by
word, with a rolling window, and checked against the (small) set of task n-grams, so a
corpus of any size fits in memory.

Per item: how many of its n-grams were found, and the overlap fraction. An item counts
as contaminated when the fraction exceeds `threshold` (default 0: any shared n-gram).
Overall: the share of contaminated items and of all task n-grams found. A high score on
contaminated items says little about the model; comparing accuracy on the clean subset
with the full set shows how much memorization inflates it.
"""

from __future__ import annotations

from collections import deque
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

from ..data.decontam import words_of
from ..errors import LmforgeError
from ..io import text_files

def words(text: str) -> list[str]:
    """Lower-cased NFKC words: the same tokenization as the training-data filter (`lmforge.data.decontam`)."""
    return words_of(text)


def ngrams(tokens: Sequence[str], n: int) -> set[tuple[str, ...]]:
    if not tokens:
        return set()
    if len(tokens) < n:
        return {tuple(tokens)}
    return {tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)}


@dataclass
class ItemOverlap:
    id: str
    ngrams: int
    matched: int
    contaminated: bool
    example: str | None = None  # one matched n-gram, for a human to check

    @property
    def overlap(self) -> float:
        return self.matched / self.ngrams if self.ngrams else 0.0

    def to_dict(self) -> dict:
        return {**asdict(self), "overlap": self.overlap}


@dataclass
class ContaminationReport:
    task: str
    corpus: list[str]
    n: int
    threshold: float
    corpus_words: int
    items: list[ItemOverlap]

    def contaminated_items(self) -> list[ItemOverlap]:
        return [i for i in self.items if i.contaminated]

    @property
    def contaminated_fraction(self) -> float:
        return len(self.contaminated_items()) / len(self.items) if self.items else 0.0

    @property
    def ngram_overlap(self) -> float:
        total = sum(i.ngrams for i in self.items)
        return sum(i.matched for i in self.items) / total if total else 0.0

    def to_dict(self, items: bool = True) -> dict:
        data = {"task": self.task, "corpus": self.corpus, "n": self.n, "threshold": self.threshold,
                "corpus_words": self.corpus_words, "items_total": len(self.items),
                "contaminated": len(self.contaminated_items()), "contaminated_fraction": self.contaminated_fraction,
                "ngram_overlap": self.ngram_overlap, "contaminated_ids": [i.id for i in self.contaminated_items()]}
        if items:
            data["items"] = [i.to_dict() for i in self.items]
        return data

    def summary(self) -> str:
        return (f"{self.task}: {len(self.contaminated_items())} of {len(self.items)} items "
                f"({self.contaminated_fraction:.1%}) share {self.n}-grams with the corpus "
                f"({self.corpus_words:,} words); {self.ngram_overlap:.2%} of all task {self.n}-grams found")

    def markdown(self) -> str:
        from .report import markdown_table

        rows = [[i.id, i.ngrams, i.matched, i.overlap, i.example or ""] for i in self.contaminated_items()]
        text = [f"# Contamination: {self.task}", "", self.summary(), ""]
        if rows:
            text += [markdown_table(["item", f"{self.n}-grams", "found", "overlap", "example"], rows)]
        return "\n".join(text)


def corpus_documents(path: str | Path) -> Iterator[str]:
    """Documents of a corpus file: .jsonl gives one per line ("text" field); anything else is read in chunks."""
    path = Path(path)
    try:
        handle = open(path, encoding="utf-8", errors="replace")
    except FileNotFoundError:
        raise LmforgeError(f"corpus file {path} does not exist") from None
    except OSError as exc:
        raise LmforgeError(f"cannot read {path}: {exc.strerror or exc}") from None
    with handle:
        if path.suffix == ".jsonl":
            for number, record in text_files.parse_jsonl(handle, path):
                yield text_files.text_of(record, f"{path}:{number}")
        else:
            yield from _chunks(handle)


def _chunks(handle, size: int = 1 << 20) -> Iterator[str]:
    """One document as pieces cut at whitespace, so no word is split between pieces."""
    carry = ""
    while True:
        block = handle.read(size)
        if not block:
            if carry:
                yield carry
            return
        block = carry + block
        cut = max(block.rfind(" "), block.rfind("\n"))
        if cut <= 0:
            carry = block
            continue
        yield block[:cut]
        carry = block[cut:]


def find_overlap(texts: Sequence[str], documents: Iterable[str] | Iterable[Iterable[str]], n: int = 13,
                 ids: Sequence[str] | None = None, threshold: float = 0.0) -> tuple[list[ItemOverlap], int]:
    """Per-text n-gram overlap with the documents; also returns the number of corpus words read.

    `documents` is an iterable of documents, each a string or an iterable of string pieces
    of one document (the rolling window continues across pieces, not across documents).
    """
    if n < 1:
        raise LmforgeError("the n-gram length must be at least 1")
    item_grams = [ngrams(words(t), n) for t in texts]
    wanted: dict[int, set[tuple[str, ...]]] = {}
    for grams in item_grams:
        for g in grams:
            wanted.setdefault(len(g), set()).add(g)
    lengths = sorted(wanted)
    longest = lengths[-1] if lengths else n
    found: set[tuple[str, ...]] = set()
    total_words = 0
    for document in documents:
        pieces = [document] if isinstance(document, str) else document
        window: deque[str] = deque(maxlen=longest)
        for piece in pieces:
            for word in words(piece):
                total_words += 1
                window.append(word)
                current = tuple(window)
                size = len(current)
                for length in lengths:
                    if length > size:
                        break
                    gram = current[size - length:]
                    if gram in wanted[length]:
                        found.add(gram)
    items = []
    for k, grams in enumerate(item_grams):
        hits = grams & found
        overlap = len(hits) / len(grams) if grams else 0.0
        items.append(ItemOverlap(str(ids[k]) if ids else str(k), len(grams), len(hits),
                                 bool(hits) and overlap > threshold, " ".join(min(hits)) if hits else None))
    return items, total_words


def check_contamination(task, corpus: str | Path | Sequence[str | Path], n: int = 13,
                        threshold: float = 0.0) -> ContaminationReport:
    """Overlap between a benchmark `Task` (its `text_fields`) and one or more corpus files."""
    from .bench.task import record_id, record_text

    paths = [corpus] if isinstance(corpus, (str, Path)) else list(corpus)
    if not 0.0 <= threshold < 1.0:
        raise LmforgeError("--threshold must be in [0, 1)")
    for p in paths:
        if not Path(p).is_file():
            raise LmforgeError(f"corpus file {p} does not exist")
    texts = [record_text(task.spec, r) for r in task.records]
    ids = [record_id(r, i) for i, r in enumerate(task.records)]

    def documents() -> Iterator[Iterable[str]]:
        for p in paths:
            if Path(p).suffix == ".jsonl":
                yield from corpus_documents(p)
            else:
                yield corpus_documents(p)

    items, total = find_overlap(texts, documents(), n=n, ids=ids, threshold=threshold)
    return ContaminationReport(task.name, [str(p) for p in paths], n, threshold, total, items)
