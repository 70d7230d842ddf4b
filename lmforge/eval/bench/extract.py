"""Reading an answer out of generated text, comparing it with the gold one, and voting.

- `number`: GSM8K-style. A "#### 42" line wins, then "the answer is 42", then the last
  number in the text. Thousands separators and a leading "$" are dropped; numbers
  compare by value (so "3.0" equals "3").
- `letter`: "the answer is (B)", "answer: B", then the last "(B)" in the text.
- `first_line`: the first non-empty line.
- `code_block`: the contents of the first fenced block (```python ... ```), else the whole
  text; how a chat model's reply to a coding request becomes a program.
- `exact`: the whole text.
- `regex:<pattern>`: the first group (or the whole match) of the last match.

Text answers compare after normalization: lower case, surrounding whitespace and
punctuation removed, inner whitespace collapsed.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from typing import Sequence

_NUMBER = r"-?\$?\d[\d,]*(?:\.\d+)?|-?\$?\.\d+"
_HASHES = re.compile(r"####\s*(" + _NUMBER + r")")
_ANSWER_IS_NUMBER = re.compile(r"answer is:?\s*\**\s*(" + _NUMBER + r")", re.IGNORECASE)
_ANY_NUMBER = re.compile(_NUMBER)
_ANSWER_IS_LETTER = re.compile(r"answer(?: is|:)\s*:?\s*\(?\**((?-i:[A-Z]))\b\)?", re.IGNORECASE)
_PAREN_LETTER = re.compile(r"\(([A-Z])\)")


def _clean_number(text: str) -> str:
    return text.replace(",", "").replace("$", "").rstrip(".")


def extract_number(text: str) -> str | None:
    for pattern in (_HASHES, _ANSWER_IS_NUMBER):
        found = pattern.findall(text)
        if found:
            return _clean_number(found[-1])
    found = _ANY_NUMBER.findall(text)
    return _clean_number(found[-1]) if found else None


def extract_letter(text: str) -> str | None:
    found = _ANSWER_IS_LETTER.findall(text)
    if found:
        return found[-1].upper()
    found = _PAREN_LETTER.findall(text)
    return found[-1] if found else None


def extract_answer(text: str, how: str) -> str | None:
    """The answer in `text` according to `how` (see the module docstring); None if there is none."""
    if how == "number":
        return extract_number(text)
    if how == "letter":
        return extract_letter(text)
    if how == "first_line":
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        return lines[0] if lines else None
    if how == "exact":
        return text.strip() or None
    if how == "code_block":
        return extract_code_block(text)
    if how.startswith("regex:"):
        found = list(re.finditer(how[len("regex:"):], text))
        if not found:
            return None
        last = found[-1]
        return (last.group(1) if last.groups() else last.group(0)).strip()
    raise ValueError(f"unknown answer extraction {how!r}")


_FENCE = re.compile(r"```[^\n`]*\n(.*?)(?:```|\Z)", re.DOTALL)


def extract_code_block(text: str) -> str:
    """The first fenced code block of `text` (an unclosed one runs to the end), else `text` itself."""
    found = _FENCE.search(text)
    return found.group(1) if found else text


def normalize_text(text: str) -> str:
    return " ".join(text.lower().split()).strip(" .,;:!?\"'")


def _as_float(text: str) -> float | None:
    try:
        value = float(_clean_number(text))
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def answers_match(predicted: str | None, gold: str, how: str) -> bool:
    if predicted is None:
        return False
    if how == "number":
        a, b = _as_float(predicted), _as_float(gold)
        if a is not None and b is not None:
            return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-9)
    if how == "letter":
        return predicted.strip().upper() == gold.strip().upper()
    return normalize_text(predicted) == normalize_text(gold)


def vote_key(answer: str, how: str) -> str:
    """Answers that `answers_match` treats as equal get the same key."""
    if how == "number":
        value = _as_float(answer)
        if value is not None:
            return repr(float(value))
    if how == "letter":
        return answer.strip().upper()
    return normalize_text(answer)


def majority_vote(answers: Sequence[str | None], how: str = "exact") -> tuple[str | None, int]:
    """Self-consistency: the most frequent answer (ties go to the one seen first) and its count.

    Samples with no extractable answer do not vote; if none has one, the result is (None, 0).
    """
    keys = [(vote_key(a, how), a) for a in answers if a is not None]
    if not keys:
        return None, 0
    counts = Counter(k for k, _ in keys)
    best = max(counts.values())
    for key, answer in keys:
        if counts[key] == best:
            return answer, best
    raise AssertionError("unreachable")
