"""Pre-tokenizers: cut normalized text into the pieces that BPE encodes one at a time.

BPE merges never cross a pre-token boundary, so the splitting rule is part of the
vocabulary's definition: the same merges give different ids under a different regex. Each
class here mirrors one ``pre_tokenizer`` type of ``tokenizer.json`` and works on a list of
pieces, so that a ``Sequence`` is simply one stage after another.

Byte-level pre-tokenizers do not spell their pieces in the byte alphabet here. That spelling
depends only on the piece itself, so the BPE model does it once per distinct piece, inside
its cache (see :mod:`lmforge.tokenizer.bpe`), instead of once per occurrence.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import regex

from lmforge.errors import LmforgeError
from lmforge.tokenizer.bytelevel import text_to_symbols
from lmforge.tokenizer.normalizers import compile_pattern

# Regexes that decide how text is cut into words before BPE. They come from the models'
# own tokenizer.json files and from llama.cpp's table of `tokenizer.ggml.pre` names.
GPT2_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN35_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}"
    r"| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
GPT4O_PATTERN = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
TEKKEN_PATTERN = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
CHATGLM4_PATTERN = LLAMA3_PATTERN
DEEPSEEK_LLM_PATTERNS = (
    r"[\r\n]",
    r"\s?[A-Za-zµÀ-ÖØ-öø-ƺƼ-ƿǄ-ʓʕ-ʯͰ-ͳͶͷͻ-ͽͿΆΈ-ΊΌΎ-ΡΣ-ϵϷ-ҁҊ-ԯԱ-ՖႠ-ჅᎠ-Ᏽᏸ-ᏽᲐ-ᲺᲽ-Ჿᴀ-ᴫᵫ-ᵷᵹ-ᶚḀ-ἕἘ-Ἕἠ-ὅὈ-Ὅὐ-ὗὙὛὝὟ-ώᾀ-ᾴᾶ-ᾼιῂ-ῄῆ-ῌῐ-ΐῖ-Ίῠ-Ῥῲ-ῴῶ-ῼℂℇℊ-ℓℕℙ-ℝℤΩℨK-ℭℯ-ℴℹℼ-ℿⅅ-ⅉⅎↃↄⰀ-ⱻⱾ-ⳤⳫ-ⳮⳲⳳꙀ-ꙭꚀ-ꚛꜢ-ꝯꝱ-ꞇꞋ-ꞎꭰ-ꮿﬀ-ﬆﬓ-ﬗＡ-Ｚａ-ｚ𐐀-𐑏𐒰-𐓓𐓘-𐓻𐲀-𐲲𐳀-𐳲𑢠-𑣟𞤀-𞥃]+",
    r"\s?[!-/:-~！-／：-～‘-‟　-。]+",
    r"\s+$",
    r"[一-龥ࠀ-一가-퟿]+",
    r"\p{N}+",
)
DEEPSEEK_CODER_PATTERNS = (r"[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", r"[一-龥ࠀ-一가-퟿]+", r"\p{N}")
DEEPSEEK3_PATTERNS = (
    r"\p{N}{1,3}",
    r"[一-龥぀-ゟ゠-ヿ]+",
    r"[!\"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+"
    r"| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
)
FALCON_PATTERNS = (
    r"[\p{P}\$\+<=>\^~\|`]+",
    GPT2_PATTERN,
    r"[0-9][0-9][0-9]",
)
BLOOM_PATTERNS = (r" ?[^(\s|.,!?…。，、।۔،)]+",)
DEFAULT_GGUF_PATTERNS = (
    r"[\p{P}\$\+<=>\^~\|]+",
    GPT2_PATTERN,
    r"\p{N}+",
    r"[0-9][0-9][0-9]",
)
# llama.cpp's "starcoder"-family pre-tokenizers (SmolLM among them): every digit on its own,
# then the GPT-2 rule. Equivalent to tokenizer.json's Digits(individual_digits) + ByteLevel.
# (llama.cpp drops GPT-2's final `|\s+`; text no alternative matches stays a piece of its own
# anyway, so the result is the same, and keeping it lets a single findall tile the text.)
DIGITS_THEN_GPT2_PATTERNS = (r"\p{N}", GPT2_PATTERN)

# `tokenizer.ggml.pre` name -> the regexes applied one after another (matches kept, as
# "Isolated"), plus whether whole pre-tokens found in the vocabulary skip the merges.
GGUF_PRE_TOKENIZERS: dict[str, tuple[tuple[str, ...], bool]] = {
    "default": (DEFAULT_GGUF_PATTERNS, False),
    "gpt-2": ((GPT2_PATTERN,), False),
    **{name: ((GPT2_PATTERN,), False) for name in (
        "phi-2", "jina-es", "jina-de", "gigachat", "jina-v2-es", "jina-v2-de", "a.x-4.0", "mellum",
        "modern-bert", "jina-v1-en", "jina-v2-code", "roberta-bpe", "mpt", "olmo", "jais",
        "trillion", "granite-docling", "exaone4",
    )},
    **{name: (DIGITS_THEN_GPT2_PATTERNS, False) for name in (
        "smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b", "mellum2",
    )},
    **{name: ((LLAMA3_PATTERN,), True) for name in (
        "llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2",
        "jina-v5-nano",
    )},
    **{name: ((LLAMA3_PATTERN,), False) for name in ("dbrx", "smaug-bpe", "glm4", "chatglm-bpe")},
    **{name: ((QWEN2_PATTERN,), False) for name in (
        "qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "megrez", "stablelm2", "hunyuan",
        "solar-open",
    )},
    "qwen35": ((QWEN35_PATTERN,), False),
    **{name: ((GPT4O_PATTERN,), False) for name in ("gpt-4o", "llama4", "kanana2", "talkie", "minimax-m2")},
    "tekken": ((TEKKEN_PATTERN,), True),
    "deepseek-llm": (DEEPSEEK_LLM_PATTERNS, False),
    "deepseek-coder": (DEEPSEEK_CODER_PATTERNS, False),
    **{name: (DEEPSEEK3_PATTERNS, False) for name in ("deepseek-v3", "hunyuan-dense", "joyai-llm")},
    "falcon": (FALCON_PATTERNS, False),
    **{name: (BLOOM_PATTERNS, False) for name in ("bloom", "poro-chat", "gpt3-finnish")},
    "viking": ((*BLOOM_PATTERNS, r"\p{N}"), False),
}

_BEHAVIORS = ("removed", "isolated", "merged_with_previous", "merged_with_next", "contiguous")


def _normalize_behavior(name: str) -> str:
    """tokenizer.json writes behaviors as "Isolated"; the Python bindings accept "isolated"."""
    snake = regex.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()
    if snake not in _BEHAVIORS:
        raise LmforgeError(f"unsupported split behavior {name!r} in tokenizer.json")
    return snake


def _camel(behavior: str) -> str:
    return "".join(part.title() for part in behavior.split("_"))


def split_spans(text: str, pattern: regex.Pattern[str], behavior: str, invert: bool = False) -> list[str]:
    """Split ``text`` on the matches of ``pattern`` with one of tokenizer.json's behaviors.

    The text is first cut into alternating (span, is_match) stretches; the behavior then
    decides whether matches are dropped, kept alone, or glued to a neighbour.
    """
    if not text:
        return []
    stretches: list[tuple[int, int, bool]] = []
    prev = 0
    for m in pattern.finditer(text):
        start, end = m.span()
        if prev != start:
            stretches.append((prev, start, invert))
        stretches.append((start, end, not invert))
        prev = end
    if prev != len(text):
        stretches.append((prev, len(text), invert))

    merged: list[list[int]] = []  # [start, end, keep]
    if behavior == "removed":
        merged = [[s, e, 0 if is_match else 1] for s, e, is_match in stretches]
    elif behavior == "isolated":
        merged = [[s, e, 1] for s, e, _ in stretches]
    elif behavior == "contiguous":
        previous = False
        for s, e, is_match in stretches:
            if merged and is_match == previous:
                merged[-1][1] = e
            else:
                merged.append([s, e, 1])
            previous = is_match
    elif behavior == "merged_with_previous":
        previous = False
        for s, e, is_match in stretches:
            if merged and is_match and not previous:
                merged[-1][1] = e
            else:
                merged.append([s, e, 1])
            previous = is_match
    elif behavior == "merged_with_next":
        previous = False
        for s, e, is_match in reversed(stretches):
            if merged and is_match and not previous:
                merged[-1][0] = s
            else:
                merged.append([s, e, 1])
            previous = is_match
        merged.reverse()
    return [text[s:e] for s, e, keep in merged if keep and e > s]


class PreTokenizer(Protocol):
    """Turns a list of text pieces into a finer list of pieces."""

    def split(self, pieces: list[str], at_start: bool) -> list[str]:
        """Split every piece; ``at_start`` says whether ``pieces[0]`` begins the input text."""
        ...

    def to_dict(self) -> dict[str, Any]: ...


@dataclass
class Split:
    """Split on a regex or a literal string with a chosen behavior (tokenizer.json ``Split``)."""

    pattern: dict[str, str]
    behavior: str = "isolated"
    invert: bool = False
    _compiled: regex.Pattern[str] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.behavior = _normalize_behavior(self.behavior)
        self._compiled = compile_pattern(self.pattern)
        # findall is one C call; it is exact when the matches tile the whole piece, which is
        # the case for the usual "catch-all" pre-tokenizer regexes.
        self._fast = self.behavior == "isolated" and not self.invert and self._compiled.groups == 0

    def split(self, pieces: list[str], at_start: bool) -> list[str]:
        out: list[str] = []
        findall = self._compiled.findall
        for piece in pieces:
            if self._fast:
                found = findall(piece)
                if sum(map(len, found)) == len(piece):
                    out += found if all(found) else [f for f in found if f]
                    continue
            out += split_spans(piece, self._compiled, self.behavior, self.invert)
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"type": "Split", "pattern": dict(self.pattern), "behavior": _camel(self.behavior),
                "invert": self.invert}


_GPT2_SPLIT = Split({"Regex": GPT2_PATTERN})


@dataclass
class ByteLevel:
    """GPT-2's pre-tokenizer: optional prefix space, optional GPT-2 regex, byte spelling.

    The byte spelling itself is done by the BPE model (see module docstring) unless
    ``spell_bytes`` is set, which a pipeline does when other stages follow this one.
    """

    add_prefix_space: bool = True
    use_regex: bool = True
    trim_offsets: bool = True
    spell_bytes: bool = field(default=False, repr=False)

    def split(self, pieces: list[str], at_start: bool) -> list[str]:
        if self.add_prefix_space:
            pieces = [p if p.startswith(" ") else " " + p for p in pieces]
        if self.use_regex:
            pieces = _GPT2_SPLIT.split(pieces, at_start)
        if self.spell_bytes:
            pieces = [text_to_symbols(p) for p in pieces]
        return pieces

    def to_dict(self) -> dict[str, Any]:
        return {"type": "ByteLevel", "add_prefix_space": self.add_prefix_space,
                "trim_offsets": self.trim_offsets, "use_regex": self.use_regex}


_DIGIT = regex.compile(r"(\p{N})")
_DIGITS = regex.compile(r"(\p{N}+)")


@dataclass(frozen=True)
class Digits:
    """Isolate digits, each on its own or as runs (``\\p{N}``: the Nd, Nl and No categories)."""

    individual_digits: bool = False

    def split(self, pieces: list[str], at_start: bool) -> list[str]:
        splitter = (_DIGIT if self.individual_digits else _DIGITS).split
        out: list[str] = []
        for piece in pieces:
            out += [p for p in splitter(piece) if p]
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"type": "Digits", "individual_digits": self.individual_digits}


@dataclass(frozen=True)
class Metaspace:
    """SentencePiece's spaces: ``" "`` becomes ``▁``, an optional ``▁`` prefix, optional split.

    ``prepend_scheme`` "first" prefixes only the text at the very start of the input, so text
    right after a special token such as ``<s>`` gets no extra ``▁``.
    """

    replacement: str = "▁"
    prepend_scheme: str = "always"
    split_on_replacement: bool = True

    def split(self, pieces: list[str], at_start: bool) -> list[str]:
        rep = self.replacement
        out: list[str] = []
        for i, piece in enumerate(pieces):
            piece = piece.replace(" ", rep)
            prepend = self.prepend_scheme == "always" or (self.prepend_scheme == "first" and i == 0 and at_start)
            if prepend and not piece.startswith(rep):
                piece = rep + piece
            if self.split_on_replacement:
                out += _split_before(piece, rep)
            elif piece:
                out.append(piece)
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"type": "Metaspace", "replacement": self.replacement,
                "prepend_scheme": self.prepend_scheme, "split": self.split_on_replacement}


def metaspace_fields(spec: dict[str, Any]) -> tuple[str, str, bool]:
    """(replacement, prepend_scheme, split) of a tokenizer.json Metaspace section.

    The pre-tokenizer and the decoder read the same section; files written before
    ``prepend_scheme`` existed say ``add_prefix_space: false`` for "never".
    """
    scheme = spec.get("prepend_scheme", "always")
    if spec.get("add_prefix_space") is False:
        scheme = "never"
    return spec.get("replacement", "▁"), scheme, spec.get("split", True)


def _split_before(piece: str, rep: str) -> list[str]:
    """Split so each ``rep`` starts a new piece; runs of ``rep`` keep only the last one attached."""
    parts = piece.split(rep)
    out = [parts[0]] if parts[0] else []
    # Every part after the first was preceded by one `rep`; an empty part means two in a row.
    for i, part in enumerate(parts[1:], 1):
        if part or i == len(parts) - 1:
            out.append(rep + part)
        else:
            out.append(rep)
    return out


_WHITESPACE_WORDS = regex.compile(r"\w+|[^\w\s]+")
_PUNCT = regex.compile(r"([\p{P}!-/:-@\[-`{-~])")


@dataclass(frozen=True)
class Whitespace:
    """Words and runs of punctuation, whitespace dropped (``\\w+|[^\\w\\s]+``)."""

    def split(self, pieces: list[str], at_start: bool) -> list[str]:
        out: list[str] = []
        for piece in pieces:
            out += _WHITESPACE_WORDS.findall(piece)
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"type": "Whitespace"}


@dataclass(frozen=True)
class WhitespaceSplit:
    """Split on whitespace, dropping it."""

    def split(self, pieces: list[str], at_start: bool) -> list[str]:
        out: list[str] = []
        for piece in pieces:
            out += piece.split()
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"type": "WhitespaceSplit"}


@dataclass(frozen=True)
class Punctuation:
    """Isolate each punctuation character."""

    def split(self, pieces: list[str], at_start: bool) -> list[str]:
        out: list[str] = []
        for piece in pieces:
            out += [p for p in _PUNCT.split(piece) if p]
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"type": "Punctuation", "behavior": "Isolated"}


# BERT: runs of non-space, non-punctuation characters, and every punctuation character on
# its own. Punctuation is Unicode's P categories plus all ASCII punctuation (so $, +, <, =,
# >, ^, `, | and ~, which Unicode calls symbols, split too); spaces are White_Space. U+166D
# and U+111C9 were punctuation in the older Unicode tables `tokenizers` follows.
_BERT_PUNCT = r"\p{P}!-/:-@\[-`{-~\u166d\U000111c9"
_BERT_PIECES = regex.compile(rf"[^\p{{White_Space}}{_BERT_PUNCT}]+|[{_BERT_PUNCT}]")


@dataclass(frozen=True)
class BertPreTokenizer:
    """Split on whitespace (dropped) and isolate each punctuation character."""

    def split(self, pieces: list[str], at_start: bool) -> list[str]:
        if len(pieces) == 1:
            return _BERT_PIECES.findall(pieces[0])
        out: list[str] = []
        for piece in pieces:
            out += _BERT_PIECES.findall(piece)
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"type": "BertPreTokenizer"}


# Digits(individual_digits) followed by GPT-2's ByteLevel regex, as one regex. Splitting the
# digits out first only changes two things for the GPT-2 rule: a number can no longer follow
# a space (` ?\p{N}+` goes, `\p{N}` comes first), and whitespace right before a digit now
# ends its piece (the lookahead `(?!\S)` becomes "not followed by a non-space non-digit").
# One findall over the text is about twice as fast as splitting and then matching each part.
DIGITS_GPT2_FUSED = r"\p{N}|'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?[^\s\p{L}\p{N}]+|\s+(?![^\s\p{N}])|\s+"


@dataclass
class PreTokenizerSequence:
    """Several pre-tokenizers, each applied to the pieces the previous one produced."""

    stages: tuple[PreTokenizer, ...]
    _fused: Split | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if (len(self.stages) == 2 and self.stages[0] == Digits(individual_digits=True)
                and isinstance(self.stages[1], ByteLevel) and self.stages[1].use_regex
                and not self.stages[1].add_prefix_space):
            self._fused = Split({"Regex": DIGITS_GPT2_FUSED})

    def split(self, pieces: list[str], at_start: bool) -> list[str]:
        if self._fused is not None and not self.stages[1].spell_bytes:  # type: ignore[attr-defined]
            return self._fused.split(pieces, at_start)
        for stage in self.stages:
            pieces = stage.split(pieces, at_start)
        return pieces

    def to_dict(self) -> dict[str, Any]:
        return {"type": "Sequence", "pretokenizers": [s.to_dict() for s in self.stages]}


def pre_tokenizer_from_dict(spec: dict[str, Any] | None) -> PreTokenizer | None:
    """Build a pre-tokenizer from its tokenizer.json form (None means no pre-tokenizer)."""
    if spec is None:
        return None
    kind = spec.get("type")
    if kind == "Split":
        return Split(spec["pattern"], spec.get("behavior", "Isolated"), spec.get("invert", False))
    if kind == "ByteLevel":
        return ByteLevel(spec.get("add_prefix_space", True), spec.get("use_regex", True),
                         spec.get("trim_offsets", True))
    if kind == "Digits":
        return Digits(spec.get("individual_digits", False))
    if kind == "Metaspace":
        return Metaspace(*metaspace_fields(spec))
    if kind == "Whitespace":
        return Whitespace()
    if kind == "WhitespaceSplit":
        return WhitespaceSplit()
    if kind == "Punctuation":
        return Punctuation()
    if kind == "BertPreTokenizer":
        return BertPreTokenizer()
    if kind == "Sequence":
        stages = tuple(s for s in map(pre_tokenizer_from_dict, spec["pretokenizers"]) if s)
        return PreTokenizerSequence(stages)
    raise LmforgeError(f"unsupported pre_tokenizer type {kind!r} in tokenizer.json")


def flatten(pre: PreTokenizer | None) -> list[PreTokenizer]:
    """The stages of a (possibly nested) sequence, in order."""
    if pre is None:
        return []
    if isinstance(pre, PreTokenizerSequence):
        return [s for stage in pre.stages for s in flatten(stage)]
    return [pre]


def defers_byte_spelling(pre: PreTokenizer | None) -> bool:
    """True when the last stage is ByteLevel, so the model may spell bytes per cached piece.

    A ByteLevel stage followed by other stages spells its pieces itself, because the later
    stages were written against the spelled text.
    """
    stages = flatten(pre)
    for stage in stages[:-1]:
        if isinstance(stage, ByteLevel):
            stage.spell_bytes = True
    return bool(stages) and isinstance(stages[-1], ByteLevel)
