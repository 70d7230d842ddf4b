"""Small text helpers shared by answering and groundedness: sentences, languages, numbers, words.

They are deliberately simple and language-aware only where it matters here: English and
Chinese sentences end differently, Chinese has no spaces, and a number is the fact a
plausible wrong sentence most often changes.
"""

from __future__ import annotations

import re

_CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\u3040-\u30ff\uac00-\ud7af]")
# A sentence ends at . ! ? followed by space and an upper-case letter, digit, quote or bracket
# (so "e.g. this" and "3.14" do not split), at Chinese full stops, or at a blank line.
_SENTENCE_END = re.compile(
    r"(?<=[.!?])[\"')\]]*\s+(?=[A-Z0-9\"'(\[`*\u3400-\u9fff])"  # English
    r"|(?<=[。！？；])"  # Chinese: always a boundary
    r"|\n\s*\n"  # paragraphs
    r"|\n(?=\s*(?:[-*+] |\d+[.)] |#))"  # list items and headings start new sentences
)
_NUMBER = re.compile(r"(?<![\w.])[-+]?\d+(?:[.,]\d+)*(?:\s?%|x\b)?")
_WORD = re.compile(r"[a-z0-9]+(?:[-'][a-z0-9]+)*")
_CITATION = re.compile(r"\s?\[(\d+(?:\s*[,;]\s*\d+)*)\]")

STOPWORDS = frozenset("""
a about above after again against all also an and any are as at be because been before being below between both
but by can could did do does doing down during each few for from further had has have having he her here hers him
his how i if in into is it its itself just me more most my no nor not now of off on once only or other our ours out
over own same she should so some such than that the their theirs them then there these they this those through to
too under until up very was we were what when where which while who whom why will with would you your yours
""".split())


def cjk_share(text: str) -> float:
    """The share of CJK characters among the letters of `text` (0 for none)."""
    letters = [c for c in text if c.isalpha()]
    if not letters:
        return 0.0
    return sum(1 for c in letters if _CJK.match(c)) / len(letters)


def is_chinese(text: str) -> bool:
    """True when `text` is mostly Chinese (or Japanese/Korean): enough to pick the answer's language."""
    return cjk_share(text) >= 0.3


def split_sentences(text: str) -> list[str]:
    """`text` cut into sentences (English and Chinese punctuation), stripped, empty ones dropped."""
    return [s.strip() for s in _SENTENCE_END.split(text) if s and s.strip()]


def numbers(text: str) -> set[str]:
    """The numbers written in `text`, normalized (thousands separators and spaces before % dropped)."""
    found = set()
    for match in _NUMBER.findall(text):
        value = match.replace(",", "").replace(" ", "").lstrip("+")
        if value.endswith("x"):
            value = value[:-1]
        found.add(value)
    return found


def content_words(text: str) -> list[str]:
    """Lower-cased words without stopwords; CJK characters count one each."""
    lower = text.lower()
    words = [w for w in _WORD.findall(lower) if w not in STOPWORDS]
    return words + _CJK.findall(lower)


def stem(word: str) -> str:
    """A light English suffix stripper: enough for "caches"/"cached"/"caching" to meet."""
    for suffix in ("ations", "ation", "ings", "ing", "ies", "ied", "ed", "es", "s"):
        if len(word) > len(suffix) + 2 and word.endswith(suffix):
            word = word[: -len(suffix)] + ("y" if suffix in ("ies", "ied") else "")
            break
    return word[:-1] if len(word) > 3 and word.endswith("e") else word  # "cache" meets "cached"


def citation_numbers(text: str) -> list[int]:
    """The source numbers cited in `text` as [1], [2, 3] or [1; 4], in order of first appearance."""
    seen: list[int] = []
    for group in _CITATION.findall(text):
        for part in re.split(r"\s*[,;]\s*", group):
            n = int(part)
            if n not in seen:
                seen.append(n)
    return seen


def strip_citations(text: str) -> str:
    return _CITATION.sub("", text).strip()


def keep_citations(text: str, allowed: set[int]) -> str:
    """`text` with citation markers to sources outside `allowed` removed (a small model invents [7])."""

    def fix(match: re.Match) -> str:
        kept = [p for p in re.split(r"\s*[,;]\s*", match.group(1)) if int(p) in allowed]
        return f" [{', '.join(kept)}]" if kept else ""

    return _CITATION.sub(fix, text)
