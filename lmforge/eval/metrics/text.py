"""Word splitting and stemming shared by ROUGE and METEOR.

English follows the rules of the original ROUGE toolkit (and of Google's `rouge-score`):
lower-case, every character other than a-z and 0-9 separates words, and the Porter
stemmer applies to words longer than three characters. Those rules silently delete every
non-ASCII letter, so a Chinese summary scores exactly 0 against a perfect reference.
lmforge adds one rule: each CJK character (Han ideographs, kana, Hangul syllables and
jamo) is a word of its own. Chinese and Japanese are written without spaces and a single
Han character usually carries meaning, so character n-grams are the common convention
for CJK ROUGE; it needs no segmentation dictionary and never changes a score of ASCII text.

For other languages (`lang` not English) words are runs of Unicode letters and digits,
so accented and Cyrillic letters survive; the Porter stemmer is English-only and is not
applied there.
"""

from __future__ import annotations

import functools
import re
import unicodedata

import regex

from ...errors import LmforgeError

# Han (unified ideographs, extensions A-F, compatibility), kana, Hangul syllables and jamo,
# CJK symbols and punctuation are not words (they fall through as separators).
CJK_RANGES = (
    (0x1100, 0x11FF), (0x3040, 0x309F), (0x30A0, 0x30FF), (0x3130, 0x318F), (0x31F0, 0x31FF),
    (0x3400, 0x4DBF), (0x4E00, 0x9FFF), (0xA960, 0xA97F), (0xAC00, 0xD7AF), (0xD7B0, 0xD7FF),
    (0xF900, 0xFAFF), (0xFF66, 0xFF9F), (0x20000, 0x2FA1F),
)
_CJK_CLASS = "".join(f"\\U{lo:08x}-\\U{hi:08x}" for lo, hi in CJK_RANGES)
ENGLISH_WORD = re.compile(f"[a-z0-9]+|[{_CJK_CLASS}]")
UNICODE_WORD = regex.compile(f"[{_CJK_CLASS}]|(?:(?![{_CJK_CLASS}])[\\p{{L}}\\p{{M}}\\p{{N}}])+")
ENGLISH = (None, "", "en")


def is_cjk(char: str) -> bool:
    code = ord(char)
    return any(lo <= code <= hi for lo, hi in CJK_RANGES)


@functools.lru_cache(maxsize=1)
def _porter():
    try:
        from nltk.stem.porter import PorterStemmer
    except ImportError:
        raise LmforgeError("stemming needs nltk (pip install 'lmforge[eval]')") from None
    return PorterStemmer()


@functools.lru_cache(maxsize=65536)
def porter_stem(word: str) -> str:
    """The Porter stem (NLTK's variant, the one `rouge-score` uses) of a lower-case word."""
    return _porter().stem(word)


def words(text: str, lang: str | None = None, stem: bool = False) -> list[str]:
    """Lower-cased words of `text` as ROUGE counts them (see the module docstring)."""
    text = text.lower()
    if lang in ENGLISH:
        tokens = ENGLISH_WORD.findall(text)
        if stem:
            # Stems of ASCII words are ASCII; only long words are stemmed, as in ROUGE-1.5.5.
            tokens = [porter_stem(t) if len(t) > 3 else t for t in tokens]
        return tokens
    return UNICODE_WORD.findall(unicodedata.normalize("NFC", text))


def split_sentences(text: str) -> list[str]:
    """Sentences for ROUGE-Lsum: one per line (put each sentence on its own line first)."""
    return [line for line in text.split("\n") if line]
