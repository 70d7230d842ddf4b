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


# BERT's text cleaning, as Hugging Face `tokenizers` does it: drop NUL, U+FFFD, control
# characters (Cc) other than tab and newlines, private-use characters (Co) and format
# characters (Cf), then turn every White_Space character into a plain space. (Lone
# surrogates (Cs), which Python strings but not Rust ones can hold, go too.) Unassigned
# code points stay. The format characters are those of the Unicode tables `tokenizers` is
# built with (newer ones, such as U+0890, stay as well), so they are listed here.
_FORMAT_CHARS = ("\u00ad\u0600-\u0605\u061c\u06dd\u070f\u180e\u200b-\u200f\u202a-\u202e\u2060-\u2064"
                 "\u2066-\u206f\ufeff\ufff9-\ufffb\U000110bd\U0001bca0-\U0001bca3\U0001d173-\U0001d17a"
                 "\U000e0001\U000e0020-\U000e007f")
_BERT_DROP = regex.compile(f"[\\x00-\\x08\\x0b\\x0c\\x0e-\\x1f\\x7f-\\x9f\\ufffd\\p{{Co}}\\p{{Cs}}{_FORMAT_CHARS}]")
_BERT_SPACE = regex.compile(r"\p{White_Space}")
_ASCII_DROP = regex.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_ASCII_SPACE = regex.compile(r"[\t\n\r]")
# The CJK Unified Ideograph blocks BERT surrounds with spaces (so each becomes a word). The
# ranges are those of `tokenizers`, which starts Extension E at U+2B920 (not U+2B820).
_CJK = regex.compile(
    "([\u4e00-\u9fff\u3400-\u4dbf\U00020000-\U0002a6df\U0002a700-\U0002b81f"
    "\U0002b920-\U0002ceaf\uf900-\ufaff\U0002f800-\U0002fa1f])"
)
_NONSPACING_MARKS = regex.compile(r"\p{Mn}+")


@dataclass(frozen=True)
class BertNormalizer:
    """BERT's normalizer: clean control characters, space out CJK ideographs, strip accents
    (NFD, then drop non-spacing marks) and lowercase, each optional, in that order.

    ``strip_accents=None`` follows ``lowercase`` (uncased models strip accents). Lowercasing
    is per character, as in `tokenizers`: a final capital sigma becomes σ, not ς.
    """

    clean_text: bool = True
    handle_chinese_chars: bool = True
    strip_accents: bool | None = None
    lowercase: bool = True

    def normalize(self, text: str) -> str:
        ascii_only = text.isascii()
        if self.clean_text:
            if ascii_only:
                text = _ASCII_SPACE.sub(" ", _ASCII_DROP.sub("", text))
            else:
                text = _BERT_SPACE.sub(" ", _BERT_DROP.sub("", text))
        if self.handle_chinese_chars and not ascii_only:
            text = _CJK.sub(r" \1 ", text)
        strip = self.lowercase if self.strip_accents is None else self.strip_accents
        if strip and not ascii_only:
            text = _NONSPACING_MARKS.sub("", unicodedata.normalize("NFD", text))
        if self.lowercase:
            text = text.lower() if "\u03a3" not in text else "".join(c.lower() for c in text)
        return text

    def to_dict(self) -> dict[str, Any]:
        return {"type": "BertNormalizer", "clean_text": self.clean_text,
                "handle_chinese_chars": self.handle_chinese_chars, "strip_accents": self.strip_accents,
                "lowercase": self.lowercase}


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
    if kind == "BertNormalizer":
        return BertNormalizer(bool(spec.get("clean_text", True)), bool(spec.get("handle_chinese_chars", True)),
                              spec.get("strip_accents"), bool(spec.get("lowercase", True)))
    if kind == "Sequence":
        return NormalizerSequence(tuple(n for n in map(normalizer_from_dict, spec["normalizers"]) if n))
    raise LmforgeError(f"unsupported normalizer type {kind!r} in tokenizer.json")
