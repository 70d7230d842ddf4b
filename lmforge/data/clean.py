"""Cleaning and heuristic quality filters (D2).

Two kinds of work happen here:

* **Rewriting** a document into clean text: HTML tags and entities out, boilerplate lines
  (cookie banners, "all rights reserved", share buttons) out, unicode normalized to one
  canonical form (NFC keeps the text as written; NFKC also folds compatibility forms such
  as full-width letters and ligatures), invisible control characters dropped and
  whitespace tidied.
* **Judging** whether a document is worth training on. Web-scale pipelines found that a
  handful of cheap statistics catch most junk: too short or too long, mostly symbols or
  numbers, the same line or the same phrase over and over, no ordinary function words
  (a sign of keyword lists, tables or code dumps). :func:`quality_reasons` returns the
  name of every rule a text breaks; an empty list means it passes. The thresholds live in
  :class:`QualityConfig` so each corpus can tune them.
"""

from __future__ import annotations

import html
import re
import unicodedata
from collections import Counter
from dataclasses import dataclass

from lmforge.data.langid import STOP_WORDS, is_spaceless_script

ANY_STOP_WORDS = frozenset().union(*STOP_WORDS.values())

# Elements whose content is code or page furniture (menus, footers, sidebars, forms).
_SCRIPT_STYLE = re.compile(r"<(script|style|noscript|template|svg|head|nav|footer|aside|form)\b[^>]*>.*?</\1\s*>",
                           re.DOTALL | re.IGNORECASE)
_HTML_COMMENT = re.compile(r"<!--.*?-->", re.DOTALL)
_BLOCK_TAG = re.compile(r"</?(?:p|div|br|li|ul|ol|tr|table|h[1-6]|section|article|header|footer|nav|"
                        r"blockquote|pre|hr|dd|dt|dl|main|aside|form|figure|figcaption)\b[^>]*>", re.IGNORECASE)
_ANY_TAG = re.compile(r"</?[a-zA-Z][a-zA-Z0-9:-]*\b[^>]*>")
_LOOKS_LIKE_HTML = re.compile(r"</?(?:html|body|div|p|span|a|br|table|script|style|li|h[1-6])\b", re.IGNORECASE)

# Lines that are site furniture rather than content. Matched on a lowercased line.
BOILERPLATE_PATTERNS = (
    r"\ball rights reserved\b", r"\bcookies?\b.*\b(?:use|accept|policy|consent)\b",
    r"\b(?:privacy policy|terms of (?:use|service)|terms and conditions)\b",
    r"^\s*(?:home|menu|search|login|log in|sign in|sign up|register|subscribe|share|tweet|print|"
    r"email|next|previous|back to top|read more|skip to (?:main )?content)\s*[|:»>]*\s*$",
    r"\bclick here\b", r"\bjavascript (?:is )?(?:disabled|required)\b", r"\benable javascript\b",
    r"^\s*(?:share (?:this|on)|follow us|like us on)\b", r"\bsubscribe to (?:our|the) newsletter\b",
    r"^\s*copyright\s*(?:©|\(c\))?\s*\d{4}", r"^\s*©",
)
_BOILERPLATE = re.compile("|".join(f"(?:{p})" for p in BOILERPLATE_PATTERNS))
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\u200b\u200e\u200f\u2028\u2029\ufeff\ufffe]")
_SPACES = re.compile(r"[ \t\u00a0\u2000-\u200a\u202f\u205f\u3000]+")
_BLANK_LINES = re.compile(r"\n{3,}")
_WORD = re.compile(r"\S+")
_ALPHA = re.compile(r"[^\W\d_]")
_BULLET = re.compile(r"^\s*(?:[-*•‣◦·–]|\d+[.)])\s")


def strip_html(text: str) -> str:
    """Visible text of an HTML fragment: scripts/styles out, block tags -> line breaks."""
    text = _SCRIPT_STYLE.sub(" ", text)
    text = _HTML_COMMENT.sub(" ", text)
    text = _BLOCK_TAG.sub("\n", text)
    text = _ANY_TAG.sub("", text)
    return html.unescape(text)


def looks_like_html(text: str) -> bool:
    return len(_LOOKS_LIKE_HTML.findall(text[:20000])) >= 2


_MENU_SEPARATORS = re.compile(r"\s[|•·»/]\s")


def is_boilerplate_line(line: str) -> bool:
    stripped = line.strip()
    if not stripped or len(stripped) >= 200:
        return False
    if _BOILERPLATE.search(stripped.lower()):
        return True
    # A menu: three or more short items separated by | • · » or /, and no sentence punctuation.
    items = _MENU_SEPARATORS.split(stripped)
    return len(items) >= 2 and all(len(i.split()) <= 3 for i in items) and not stripped.endswith((".", "?", "!")) \
        and (len(items) >= 3 or "|" in stripped)


def remove_boilerplate(text: str) -> tuple[str, int]:
    """Drop boilerplate lines; returns the text and how many lines went."""
    kept, dropped = [], 0
    for line in text.split("\n"):
        if is_boilerplate_line(line):
            dropped += 1
        else:
            kept.append(line)
    return "\n".join(kept), dropped


def normalize_unicode(text: str, form: str = "NFC") -> str:
    """One canonical unicode form, no control/zero-width characters, tidy whitespace."""
    if form not in ("NFC", "NFKC", "NFD", "NFKD", "none"):
        raise ValueError(f"unknown unicode form {form!r}")
    if form != "none" and not unicodedata.is_normalized(form, text):
        text = unicodedata.normalize(form, text)
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = _CONTROL.sub("", text)
    lines = [_SPACES.sub(" ", line).strip() for line in text.split("\n")]
    return _BLANK_LINES.sub("\n\n", "\n".join(lines)).strip()


def clean_text(text: str, unicode_form: str = "NFC", html_mode: str = "auto") -> str:
    """Markup out, boilerplate out, unicode normalized (``html_mode``: auto, always, never)."""
    if html_mode == "always" or (html_mode == "auto" and looks_like_html(text)):
        text = strip_html(text)
    text, _ = remove_boilerplate(text)
    return normalize_unicode(text, unicode_form)


@dataclass
class QualityConfig:
    """Thresholds of the heuristic filters (a rule is off when its threshold is None)."""

    min_words: int | None = 30
    max_words: int | None = 200_000
    min_chars_spaceless: int | None = 60  # for CJK/Thai text, where words are not space-separated
    min_mean_word_length: float | None = 3.0
    max_mean_word_length: float | None = 10.0
    max_symbol_ratio: float | None = 0.1  # '#' and '...' per word
    min_alpha_word_ratio: float | None = 0.7  # words with at least one letter
    max_digit_char_ratio: float | None = 0.25
    max_duplicate_line_ratio: float | None = 0.3  # lines that repeat an earlier line
    max_duplicate_line_char_ratio: float | None = 0.2
    max_top_ngram_char_ratio: dict[int, float] | None = None  # n -> share of chars in the commonest n-gram
    max_duplicate_ngram_char_ratio: dict[int, float] | None = None  # n -> share of chars in repeated n-grams
    max_bullet_line_ratio: float | None = 0.9
    max_ellipsis_line_ratio: float | None = 0.3
    min_stop_words: int | None = 2  # only for languages with a stop-word list

    def __post_init__(self) -> None:
        if self.max_top_ngram_char_ratio is None:
            self.max_top_ngram_char_ratio = {2: 0.20, 3: 0.18, 4: 0.16}
        if self.max_duplicate_ngram_char_ratio is None:
            self.max_duplicate_ngram_char_ratio = {5: 0.15, 7: 0.13, 10: 0.10}


def _duplicate_line_stats(lines: list[str]) -> tuple[float, float]:
    seen: set[str] = set()
    dup_lines = dup_chars = total_chars = 0
    for line in lines:
        total_chars += len(line)
        if line in seen:
            dup_lines += 1
            dup_chars += len(line)
        seen.add(line)
    return dup_lines / max(1, len(lines)), dup_chars / max(1, total_chars)


def top_ngram_char_ratio(words: list[str], n: int) -> float:
    """Share of the characters covered by the single commonest word n-gram."""
    if len(words) < n:
        return 0.0
    counts = Counter(zip(*(words[i:] for i in range(n))))
    gram, count = counts.most_common(1)[0]
    if count < 2:
        return 0.0
    total = sum(map(len, words))
    return count * sum(map(len, gram)) / max(1, total)


def duplicate_ngram_char_ratio(words: list[str], n: int) -> float:
    """Share of the characters inside word n-grams that occur more than once."""
    if len(words) < n:
        return 0.0
    grams = list(zip(*(words[i:] for i in range(n))))
    counts = Counter(grams)
    covered = [False] * len(words)
    for i, gram in enumerate(grams):
        if counts[gram] > 1:
            for j in range(i, i + n):
                covered[j] = True
    total = sum(map(len, words))
    return sum(len(w) for w, c in zip(words, covered) if c) / max(1, total)


def quality_reasons(text: str, lang: str | None = None, config: QualityConfig | None = None) -> list[str]:
    """Names of the quality rules ``text`` breaks (empty: it passes).

    ``lang`` (an ISO 639-1 code from :mod:`lmforge.data.langid`) turns on the stop-word rule
    for languages that have a list (``und``, undetermined, must have function words of
    some listed language), and relaxes word-based rules for scripts that do not separate
    words by spaces.
    """
    c = config or QualityConfig()
    reasons: list[str] = []
    words = _WORD.findall(text)
    n_words = len(words)
    spaceless = lang is not None and is_spaceless_script(lang)
    if spaceless:
        if c.min_chars_spaceless is not None and len(text) < c.min_chars_spaceless:
            reasons.append("too_short")
    else:
        if c.min_words is not None and n_words < c.min_words:
            reasons.append("too_short")
    if c.max_words is not None and n_words > c.max_words:
        reasons.append("too_long")
    if not words:
        return reasons or ["empty"]
    if not spaceless:
        mean_len = sum(map(len, words)) / n_words
        if c.min_mean_word_length is not None and mean_len < c.min_mean_word_length:
            reasons.append("short_words")
        if c.max_mean_word_length is not None and mean_len > c.max_mean_word_length:
            reasons.append("long_words")
    if c.max_symbol_ratio is not None:
        symbols = text.count("#") + text.count("...") + text.count("…")
        if symbols / n_words > c.max_symbol_ratio:
            reasons.append("symbol_ratio")
    if c.min_alpha_word_ratio is not None:
        alpha = sum(1 for w in words if _ALPHA.search(w))
        if alpha / n_words < c.min_alpha_word_ratio:
            reasons.append("non_alpha_words")
    if c.max_digit_char_ratio is not None:
        non_space = sum(map(len, words))
        digits = sum(ch.isdigit() for ch in text)
        if digits / max(1, non_space) > c.max_digit_char_ratio:
            reasons.append("digit_ratio")
    lines = [line.strip() for line in text.split("\n") if line.strip()]
    if lines:
        dup_lines, dup_chars = _duplicate_line_stats(lines)
        if c.max_duplicate_line_ratio is not None and dup_lines > c.max_duplicate_line_ratio:
            reasons.append("duplicate_lines")
        elif c.max_duplicate_line_char_ratio is not None and dup_chars > c.max_duplicate_line_char_ratio:
            reasons.append("duplicate_lines")
        if c.max_bullet_line_ratio is not None and len(lines) >= 3:
            if sum(1 for line in lines if _BULLET.match(line)) / len(lines) > c.max_bullet_line_ratio:
                reasons.append("bullet_lines")
        if c.max_ellipsis_line_ratio is not None and len(lines) >= 3:
            ellipsis = sum(1 for line in lines if line.endswith(("...", "…")))
            if ellipsis / len(lines) > c.max_ellipsis_line_ratio:
                reasons.append("ellipsis_lines")
    if not spaceless:
        lowered = [w.lower() for w in words]
        for n, limit in (c.max_top_ngram_char_ratio or {}).items():
            if top_ngram_char_ratio(lowered, n) > limit:
                reasons.append("repeated_ngram")
                break
        for n, limit in (c.max_duplicate_ngram_char_ratio or {}).items():
            if duplicate_ngram_char_ratio(lowered, n) > limit:
                reasons.append("duplicate_ngrams")
                break
        # Undetermined text (names, lists, code) is held to the function words of any language.
        stops = ANY_STOP_WORDS if lang == "und" else STOP_WORDS.get(lang or "")
        if c.min_stop_words is not None and stops:
            hits = sum(1 for w in lowered if w.strip(".,;:!?\"'()[]") in stops)
            if hits < c.min_stop_words:
                reasons.append("few_stop_words")
    return reasons
