"""Benchmark decontamination by n-gram overlap (D5).

If a benchmark's questions (or answers) appear in the training data, the benchmark stops
measuring generalization: the model may simply remember them. The usual guard, used for
the GPT-3 and later reports, is n-gram overlap: collect every word 13-gram of the
evaluation texts, and drop every training document that contains one of them. Thirteen
words are long enough that an accidental match between unrelated texts is very rare,
and short enough to catch a copied question inside a longer page.

Evaluation items shorter than ``n`` words (a short question) contribute their whole word
sequence instead, if they have at least ``min_words`` words, so they are not ignored.

Evaluation files may be plain text (each non-empty line is one item), JSON Lines or JSON
(every string value inside is one item), optionally gzipped.
"""

from __future__ import annotations

import gzip
import re
import unicodedata
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmforge.errors import LmforgeError
from lmforge.io import text_files

_WORD = re.compile(r"\w+")


def words_of(text: str) -> list[str]:
    """Lowercased NFKC word tokens (punctuation and layout do not break a match)."""
    return _WORD.findall(unicodedata.normalize("NFKC", text).casefold())


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)


def read_eval_items(path: str | Path) -> list[str]:
    """The evaluation texts in one file (see module docstring for the formats)."""
    path = Path(path)
    if not path.is_file():
        raise LmforgeError(f"evaluation file not found: {path}")
    opener = gzip.open if path.suffix == ".gz" else open
    name = path.name.removesuffix(".gz").lower()
    try:
        with opener(path, "rt", encoding="utf-8") as f:  # type: ignore[operator]
            if name.endswith(".jsonl"):
                return [text for _, value in text_files.parse_jsonl(f, path) for text in _strings(value)]
            if name.endswith(".json"):
                return list(_strings(text_files.parse_json(f.read(), path)))
            return [line for line in f.read().split("\n") if line.strip()]
    except (OSError, UnicodeDecodeError) as exc:
        raise LmforgeError(f"cannot read evaluation file {path}: {exc}") from None


@dataclass
class Decontaminator:
    """Index of evaluation n-grams; ``contaminated(text)`` says whether a text overlaps."""

    n: int = 13
    min_words: int = 8
    _grams: dict[int, set[int]] = field(default_factory=dict, repr=False)
    items: int = 0

    def add(self, text: str) -> None:
        words = words_of(text)
        if len(words) >= self.n:
            grams = self._grams.setdefault(self.n, set())
            grams.update(hash(tuple(words[i:i + self.n])) for i in range(len(words) - self.n + 1))
        elif len(words) >= self.min_words:
            self._grams.setdefault(len(words), set()).add(hash(tuple(words)))
        else:
            return
        self.items += 1

    def add_all(self, texts: Iterable[str]) -> Decontaminator:
        for text in texts:
            self.add(text)
        return self

    @classmethod
    def from_files(cls, paths: Iterable[str | Path], n: int = 13, min_words: int = 8) -> Decontaminator:
        index = cls(n, min_words)
        for path in paths:
            index.add_all(read_eval_items(path))
        return index

    @property
    def num_ngrams(self) -> int:
        return sum(map(len, self._grams.values()))

    def overlaps(self, text: str, stop_after: int | None = 1) -> int:
        """How many of the text's n-grams are evaluation n-grams (stops early by default)."""
        if not self._grams:
            return 0
        words = words_of(text)
        hits = 0
        for length, grams in self._grams.items():
            for i in range(len(words) - length + 1):
                if hash(tuple(words[i:i + length])) in grams:
                    hits += 1
                    if stop_after is not None and hits >= stop_after:
                        return hits
        return hits

    def contaminated(self, text: str) -> bool:
        return self.overlaps(text) > 0
