"""Added and special tokens: strings that are matched whole, before any other processing.

``<|im_start|>`` must become one id, never ``<``, ``|``, ``im``, ... So before normalization
and pre-tokenization the text is cut at every occurrence of an added token (the longest one
wins where several start at the same place), and only the text between them goes through
BPE. ``normalized=False`` tokens are found in the raw text, ``normalized=True`` ones in the
normalized text; ``lstrip``/``rstrip`` let a token swallow neighbouring whitespace and
``single_word`` only matches it as a whole word, as in tokenizer.json.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

# Added tokens are literal strings, so the standard library's `re` is enough here (and its
# alternation of literals is fast).
_WORD_CHAR = re.compile(r"\w")
_TRAILING_SPACE = re.compile(r"\s*\Z")
_LEADING_SPACE = re.compile(r"\s*")


@dataclass(frozen=True)
class AddedToken:
    """One entry of tokenizer.json's ``added_tokens``."""

    id: int
    content: str
    special: bool = True
    normalized: bool = False
    lstrip: bool = False
    rstrip: bool = False
    single_word: bool = False

    @classmethod
    def from_dict(cls, spec: dict[str, Any]) -> AddedToken:
        return cls(
            id=int(spec["id"]),
            content=spec["content"],
            special=bool(spec.get("special", False)),
            normalized=bool(spec.get("normalized", not spec.get("special", False))),
            lstrip=bool(spec.get("lstrip", False)),
            rstrip=bool(spec.get("rstrip", False)),
            single_word=bool(spec.get("single_word", False)),
        )

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        return {k: d[k] for k in ("id", "content", "single_word", "lstrip", "rstrip", "normalized", "special")}


Segment = str | int
"""Text still to encode (str), or the id of an added token already found (int)."""


class AddedTokenSplitter:
    """Finds added tokens in text with one compiled alternation per matching pass."""

    def __init__(self, tokens: list[AddedToken], normalize: Callable[[str], str] | None = None) -> None:
        # normalized=True tokens are looked for in normalized text, so they are matched in
        # their normalized spelling.
        self.by_match: dict[str, AddedToken] = {}
        raw, normalized = [], []
        for t in tokens:
            if not t.content:
                continue
            if t.normalized:
                key = normalize(t.content) if normalize else t.content
                normalized.append(key)
            else:
                key = t.content
                raw.append(key)
            self.by_match[key] = t
        self._raw = self._compile(raw)
        self._normalized = self._compile(normalized)

    @staticmethod
    def _compile(contents: list[str]) -> re.Pattern[str] | None:
        if not contents:
            return None
        # Longest first: Python tries alternatives in order, so at a given start position the
        # longest token wins, which is the "leftmost-longest" rule of tokenizers.
        contents = sorted(contents, key=len, reverse=True)
        return re.compile("|".join(map(re.escape, contents)))

    @property
    def has_normalized(self) -> bool:
        return self._normalized is not None

    def split_raw(self, text: str) -> list[Segment]:
        return self._split(text, self._raw)

    def split_normalized(self, text: str) -> list[Segment]:
        return self._split(text, self._normalized)

    def _split(self, text: str, pattern: re.Pattern[str] | None) -> list[Segment]:
        if pattern is None or not text:
            return [text] if text else []
        out: list[Segment] = []
        done = 0  # end of the text already consumed
        for m in pattern.finditer(text):
            token = self.by_match[m.group()]
            start, stop = m.span()
            if token.single_word:
                before_ok = start == 0 or not _WORD_CHAR.match(text, start - 1)
                after_ok = stop == len(text) or not _WORD_CHAR.match(text, stop)
                if not (before_ok and after_ok):
                    continue
            if token.lstrip:
                start = max(_TRAILING_SPACE.search(text, done, start).start(), done)  # type: ignore[union-attr]
            if token.rstrip:
                stop = _LEADING_SPACE.match(text, stop).end()  # type: ignore[union-attr]
            if done < start:
                out.append(text[done:start])
            out.append(token.id)
            done = stop
        if done < len(text):
            out.append(text[done:])
        return out
