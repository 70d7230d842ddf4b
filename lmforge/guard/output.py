"""Output checks (G1, G2, G3): what leaves the model is checked before the user sees it.

- **System-prompt leakage**: the reply shares word n-grams with the system prompt. With
  S the system prompt's word n-grams (n = 5 by default) and R the reply's, the overlap
  is ``|S & R| / |S|``; the reply leaks when the overlap reaches ``leak_overlap`` or
  when it repeats ``leak_run`` or more consecutive words of the system prompt (a short
  but verbatim quote of a secret rule). Words are NFKC, lower-cased and stripped of
  punctuation, so spacing and case changes do not hide a copy. A paraphrase does hide
  it; that is what the other layers are for.
- **PII**: lmforge/data/pii.py's detectors on the reply; values the user gave in their
  own turn (their own e-mail read back) are not counted.
- **Policy**: the moderation classifier (lmforge/guard/moderation.py) on the reply,
  when one is loaded.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass, field

_WORD = re.compile(r"[^\W_]+(?:'[^\W_]+)?")


def words(text: str) -> list[str]:
    return _WORD.findall(unicodedata.normalize("NFKC", text).lower())


def ngrams(tokens: list[str], n: int) -> set[tuple[str, ...]]:
    return {tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)}


def longest_common_run(a: list[str], b: list[str]) -> int:
    """The longest run of consecutive words found in both (dynamic programming, O(len a * len b))."""
    best, prev = 0, [0] * (len(b) + 1)
    for x in a:
        cur = [0] * (len(b) + 1)
        for j, y in enumerate(b, 1):
            if x == y:
                cur[j] = prev[j - 1] + 1
                best = max(best, cur[j])
        prev = cur
    return best


@dataclass
class LeakResult:
    leaked: bool
    overlap: float  # share of the system prompt's n-grams found in the reply
    longest_run: int  # consecutive system-prompt words repeated


def leakage(reply: str, system_prompt: str, n: int = 5, leak_overlap: float = 0.2, leak_run: int = 12) -> LeakResult:
    """How much of `system_prompt` `reply` repeats (see the module's rule)."""
    s, r = words(system_prompt), words(reply)
    grams = ngrams(s, n)
    overlap = len(grams & ngrams(r, n)) / len(grams) if grams else 0.0
    run = longest_common_run(s, r) if s and r else 0
    return LeakResult(overlap >= leak_overlap or run >= min(leak_run, len(s)) and run > 0 and len(s) >= n,
                      overlap, run)


@dataclass
class OutputVerdict:
    allowed: bool
    reasons: list[str] = field(default_factory=list)
    leak: LeakResult | None = None
    pii: list[str] = field(default_factory=list)  # kinds found
    moderation: dict | None = None


def pii_in_reply(reply: str, user_turns: list[str] = ()) -> list:
    """PII matches in `reply`, less those whose text the user wrote themselves."""
    from lmforge.data.pii import find_pii

    own = " ".join(user_turns)
    return [m for m in find_pii(reply) if m.text not in own]
