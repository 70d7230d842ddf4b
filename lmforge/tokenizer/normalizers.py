"""Text normalizers, as described by the ``normalizer`` section of a ``tokenizer.json``.

A normalizer rewrites a stretch of raw text before it is cut into pre-tokens: unicode
normalization (so that ``é`` typed as one code point or as ``e`` + combining accent encodes
the same), or SentencePiece's habit of spelling spaces as ``▁``. Each class knows how to
read and write its own JSON form so that a loaded tokenizer can be saved back unchanged.
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass
from typing import Any, Protocol

import regex

from lmforge.errors import LmforgeError


class Normalizer(Protocol):
    """Anything that rewrites a text segment before pre-tokenization."""

    def normalize(self, text: str) -> str: ...

    def to_dict(self) -> dict[str, Any]: ...


@dataclass(frozen=True)
class UnicodeNormalizer:
    """NFC / NFD / NFKC / NFKD via :mod:`unicodedata`."""

    form: str

    def normalize(self, text: str) -> str:
        # is_normalized is a fast check; most text is already NFC and needs no copy.
        if unicodedata.is_normalized(self.form, text):
            return text
        return unicodedata.normalize(self.form, text)

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.form}


@dataclass(frozen=True)
class Lowercase:
    """Lowercase everything (BERT-uncased style)."""

    def normalize(self, text: str) -> str:
        return text.lower()

    def to_dict(self) -> dict[str, Any]:
        return {"type": "Lowercase"}


@dataclass(frozen=True)
class Prepend:
    """Prefix non-empty segments with a string (Llama-2 adds ``▁`` this way)."""

    prepend: str

    def normalize(self, text: str) -> str:
        return self.prepend + text if text else text

    def to_dict(self) -> dict[str, Any]:
        return {"type": "Prepend", "prepend": self.prepend}


@dataclass(frozen=True)
class Replace:
    """Replace every occurrence of a literal string or a regex with ``content``."""

    pattern: dict[str, str]  # {"String": "..."} or {"Regex": "..."}, as in tokenizer.json
    content: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "_compiled", compile_pattern(self.pattern))

    def normalize(self, text: str) -> str:
        literal = self.pattern.get("String")
        if literal is not None:
            return text.replace(literal, self.content) if literal else text
        return self._compiled.sub(lambda _m: self.content, text)  # type: ignore[attr-defined]

    def to_dict(self) -> dict[str, Any]:
        return {"type": "Replace", "pattern": dict(self.pattern), "content": self.content}


@dataclass(frozen=True)
class Strip:
    """Strip whitespace on the left and/or right of each segment."""

    left: bool = True
    right: bool = True

    def normalize(self, text: str) -> str:
        if self.left and self.right:
            return text.strip()
        if self.left:
            return text.lstrip()
        return text.rstrip() if self.right else text

    def to_dict(self) -> dict[str, Any]:
        return {"type": "Strip", "strip_left": self.left, "strip_right": self.right}


@dataclass(frozen=True)
class StripAccents:
    """Drop combining marks (meant to follow NFD)."""

    def normalize(self, text: str) -> str:
        return "".join(c for c in text if unicodedata.category(c) != "Mn")

    def to_dict(self) -> dict[str, Any]:
        return {"type": "StripAccents"}


@dataclass(frozen=True)
class NormalizerSequence:
    """Apply several normalizers in order."""

    normalizers: tuple[Normalizer, ...]

    def normalize(self, text: str) -> str:
        for n in self.normalizers:
            text = n.normalize(text)
        return text

    def to_dict(self) -> dict[str, Any]:
        return {"type": "Sequence", "normalizers": [n.to_dict() for n in self.normalizers]}


def compile_pattern(pattern: dict[str, str]) -> regex.Pattern[str]:
    """Compile a tokenizer.json pattern (``{"String": s}`` or ``{"Regex": r}``) once."""
    if "String" in pattern:
        return regex.compile(regex.escape(pattern["String"]))
    if "Regex" in pattern:
        try:
            return regex.compile(pattern["Regex"])
        except regex.error as exc:
            raise LmforgeError(f"tokenizer regex {pattern['Regex']!r} does not compile: {exc}") from exc
    raise LmforgeError(f"unsupported pattern {pattern!r}: expected a 'String' or a 'Regex'")


def normalizer_from_dict(spec: dict[str, Any] | None) -> Normalizer | None:
    """Build a normalizer from its tokenizer.json form (None means no normalizer)."""
    if spec is None:
        return None
    kind = spec.get("type")
    if kind in ("NFC", "NFD", "NFKC", "NFKD"):
        return UnicodeNormalizer(kind)
    if kind == "Lowercase":
        return Lowercase()
    if kind == "Prepend":
        return Prepend(spec["prepend"])
    if kind == "Replace":
        return Replace(spec["pattern"], spec["content"])
    if kind == "Strip":
        return Strip(spec.get("strip_left", True), spec.get("strip_right", True))
    if kind == "StripAccents":
        return StripAccents()
    if kind == "Sequence":
        return NormalizerSequence(tuple(n for n in map(normalizer_from_dict, spec["normalizers"]) if n))
    raise LmforgeError(f"unsupported normalizer type {kind!r} in tokenizer.json")
