"""Decoders: turn a list of token strings back into text.

They undo what encoding did to the text: byte-level spelling (``Ġ`` -> space), SentencePiece
``▁`` -> space and ``<0xNN>`` byte tokens, the prefix space added at the start. Like the
``decoder`` section of tokenizer.json, a decoder takes the whole token list and returns a
list of strings (``decode_chain``) so that decoders can be chained; the final text is the
concatenation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from lmforge.errors import LmforgeError
from lmforge.tokenizer.bytelevel import token_bytes
from lmforge.tokenizer.normalizers import compile_pattern
from lmforge.tokenizer.pretokenize import metaspace_fields


class Decoder(Protocol):
    """Maps token strings to text pieces."""

    def decode_chain(self, tokens: list[str]) -> list[str]: ...

    def to_dict(self) -> dict[str, Any]: ...


@dataclass(frozen=True)
class ByteLevelDecoder:
    """Join the bytes the tokens spell and decode them as UTF-8 (invalid bytes -> U+FFFD)."""

    def decode_chain(self, tokens: list[str]) -> list[str]:
        return [b"".join(map(token_bytes, tokens)).decode("utf-8", "replace")]

    def to_dict(self) -> dict[str, Any]:
        return {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True}


@dataclass(frozen=True)
class MetaspaceDecoder:
    """``▁`` -> space; in the first token the ``▁`` are dropped (they were the added prefix)."""

    replacement: str = "▁"
    prepend_scheme: str = "always"
    split: bool = True

    def decode_chain(self, tokens: list[str]) -> list[str]:
        rep = self.replacement
        out = [t.replace(rep, " ") for t in tokens]
        if out and self.prepend_scheme != "never":
            out[0] = tokens[0].replace(rep, "")
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"type": "Metaspace", "replacement": self.replacement,
                "prepend_scheme": self.prepend_scheme, "split": self.split}


def byte_token_value(token: str) -> int | None:
    """The byte a ``<0xNN>`` token stands for, else None."""
    if len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
        try:
            return int(token[3:5], 16)
        except ValueError:
            return None
    return None


@dataclass(frozen=True)
class ByteFallbackDecoder:
    """Consecutive ``<0xNN>`` tokens become text; invalid UTF-8 gives one U+FFFD per byte."""

    def decode_chain(self, tokens: list[str]) -> list[str]:
        out: list[str] = []
        pending = bytearray()

        def flush() -> None:
            if pending:
                try:
                    out.append(pending.decode("utf-8"))
                except UnicodeDecodeError:
                    out.extend("\ufffd" * len(pending))
                pending.clear()

        for token in tokens:
            value = byte_token_value(token)
            if value is not None:
                pending.append(value)
            else:
                flush()
                out.append(token)
        flush()
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"type": "ByteFallback"}


@dataclass(frozen=True)
class FuseDecoder:
    """Join everything into one string (so later steps see the whole text)."""

    def decode_chain(self, tokens: list[str]) -> list[str]:
        return ["".join(tokens)]

    def to_dict(self) -> dict[str, Any]:
        return {"type": "Fuse"}


@dataclass(frozen=True)
class StripDecoder:
    """Remove up to ``start``/``stop`` copies of ``content`` at each string's ends."""

    content: str = " "
    start: int = 0
    stop: int = 0

    def decode_chain(self, tokens: list[str]) -> list[str]:
        out = []
        for token in tokens:
            begin = 0
            while begin < min(self.start, len(token)) and token[begin] == self.content:
                begin += 1
            end = len(token)
            while len(token) - end < self.stop and end > begin and token[end - 1] == self.content:
                end -= 1
            out.append(token[begin:end])
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"type": "Strip", "content": self.content, "start": self.start, "stop": self.stop}


@dataclass(frozen=True)
class ReplaceDecoder:
    """Replace a literal or regex in every token."""

    pattern: dict[str, str]
    content: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "_compiled", compile_pattern(self.pattern))

    def decode_chain(self, tokens: list[str]) -> list[str]:
        literal = self.pattern.get("String")
        if literal:
            return [t.replace(literal, self.content) for t in tokens]
        compiled = self._compiled  # type: ignore[attr-defined]
        return [compiled.sub(lambda _m: self.content, t) for t in tokens]

    def to_dict(self) -> dict[str, Any]:
        return {"type": "Replace", "pattern": dict(self.pattern), "content": self.content}


@dataclass(frozen=True)
class BPESuffixDecoder:
    """Word-final suffix (e.g. ``</w>``) -> space, except after the last token."""

    suffix: str = "</w>"

    def decode_chain(self, tokens: list[str]) -> list[str]:
        last = len(tokens) - 1
        return [t.replace(self.suffix, "" if i == last else " ") for i, t in enumerate(tokens)]

    def to_dict(self) -> dict[str, Any]:
        return {"type": "BPEDecoder", "suffix": self.suffix}


@dataclass(frozen=True)
class DecoderSequence:
    """Run decoders one after another."""

    decoders: tuple[Decoder, ...]

    def decode_chain(self, tokens: list[str]) -> list[str]:
        for d in self.decoders:
            tokens = d.decode_chain(tokens)
        return tokens

    def to_dict(self) -> dict[str, Any]:
        return {"type": "Sequence", "decoders": [d.to_dict() for d in self.decoders]}


_WORDPIECE_CLEANUP = ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                      (" 'm", "'m"), (" do not", " don't"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"))


@dataclass(frozen=True)
class WordPieceDecoder:
    """BERT-style: ``##`` continuations glue to the previous token, other tokens get a space;
    ``cleanup`` removes the space before punctuation and English contractions."""

    prefix: str = "##"
    cleanup: bool = True

    def decode_chain(self, tokens: list[str]) -> list[str]:
        out = []
        for i, token in enumerate(tokens):
            if i:
                token = token.replace(self.prefix, "", 1) if token.startswith(self.prefix) else " " + token
            if self.cleanup:
                for dirty, clean in _WORDPIECE_CLEANUP:
                    token = token.replace(dirty, clean)
            out.append(token)
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"type": "WordPiece", "prefix": self.prefix, "cleanup": self.cleanup}


def decoder_from_dict(spec: dict[str, Any] | None) -> Decoder | None:
    """Build a decoder from its tokenizer.json form (None: tokens are joined with spaces)."""
    if spec is None:
        return None
    kind = spec.get("type")
    if kind == "ByteLevel":
        return ByteLevelDecoder()
    if kind == "Metaspace":
        return MetaspaceDecoder(*metaspace_fields(spec))
    if kind == "ByteFallback":
        return ByteFallbackDecoder()
    if kind == "Fuse":
        return FuseDecoder()
    if kind == "Strip":
        return StripDecoder(spec.get("content", " "), spec.get("start", 0), spec.get("stop", 0))
    if kind == "Replace":
        return ReplaceDecoder(spec["pattern"], spec["content"])
    if kind == "WordPiece":
        return WordPieceDecoder(spec.get("prefix", "##"), spec.get("cleanup", True))
    if kind == "BPEDecoder":
        return BPESuffixDecoder(spec.get("suffix", "</w>"))
    if kind == "Sequence":
        return DecoderSequence(tuple(d for d in map(decoder_from_dict, spec["decoders"]) if d))
    raise LmforgeError(f"unsupported decoder type {kind!r} in tokenizer.json")
