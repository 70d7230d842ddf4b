"""Structured output (I1): decoding that can only produce a JSON object.

Asking a model nicely for JSON works most of the time; constrained decoding makes it
work every time. At each step the sampler draws a token as usual, and `JsonPrefix`
checks whether the text so far plus that token can still be extended into a valid JSON
object. If not, the token is excluded and the draw repeated from what is left. Once the
top-level object closes, generation ends.

The check runs on bytes: every structural character of JSON is ASCII, so a byte-level
token that splits a multi-byte character can only occur inside a string, where any
byte is allowed.
"""

from __future__ import annotations

import torch

_WS = b" \t\n\r"
_MAX_WS_RUN = 4  # stops a model from padding forever with whitespace
_LITERALS = (b"true", b"false", b"null")
_DIGIT = b"0123456789"


class JsonPrefix:
    """An incremental validator: is the byte string fed so far a prefix of a JSON object?"""

    def __init__(self) -> None:
        # stack of containers: "{" or "["; `expect` is what may come next:
        # "value", "key" (or "}" right after "{"), "colon", "comma" (or a closing bracket)
        self.stack: list[str] = []
        self.expect = "start"
        self.in_string = False
        self.escape = 0  # >0 while inside an escape: 1 after "\", 2..5 inside \uXXXX
        self.literal = b""  # partial true/false/null
        self.number = b""  # partial number
        self.ws_run = 0
        self.done = False

    def copy(self) -> "JsonPrefix":
        other = JsonPrefix.__new__(JsonPrefix)
        other.__dict__.update(self.__dict__)
        other.stack = list(self.stack)
        return other

    def feed(self, data: bytes) -> bool:
        """Consume bytes; False (and an undefined state) as soon as they cannot continue a JSON object."""
        for byte in data:
            if not self._step(byte):
                return False
        return True

    # One byte at a time, as a pushdown automaton.
    def _step(self, b: int) -> bool:
        if self.done:
            return False
        c = bytes((b,))
        if self.in_string:
            return self._string_byte(c)
        if self.literal:
            return self._literal_byte(c)
        if self.number:
            if c in _DIGIT or c in b".eE+-":
                return self._number_byte(c)
            if not self._number_complete():
                return False
            self.number = b""
            self._value_done()
        if c in _WS:
            self.ws_run += 1
            return self.ws_run <= _MAX_WS_RUN
        self.ws_run = 0
        if self.expect == "start":
            if c != b"{":
                return False
            self.stack.append("{")
            self.expect = "key_or_close"
            return True
        if self.expect in ("key", "key_or_close"):
            if c == b'"':
                self.in_string, self.expect = True, "key_string"
                return True
            if c == b"}" and self.expect == "key_or_close":
                return self._close("{")
            return False
        if self.expect == "colon":
            if c == b":":
                self.expect = "value"
                return True
            return False
        if self.expect in ("value", "value_or_close"):
            if c == b"]" and self.expect == "value_or_close":
                return self._close("[")
            return self._start_value(c)
        if self.expect == "comma":
            if c == b",":
                self.expect = "key" if self.stack[-1] == "{" else "value"
                return True
            if c == b"}":
                return self._close("{")
            if c == b"]":
                return self._close("[")
            return False
        return False

    def _start_value(self, c: bytes) -> bool:
        if c == b'"':
            self.in_string, self.expect = True, "value_string"
            return True
        if c == b"{":
            self.stack.append("{")
            self.expect = "key_or_close"
            return True
        if c == b"[":
            self.stack.append("[")
            self.expect = "value_or_close"
            return True
        if c in b"tfn":
            self.literal = c
            return True
        if c in _DIGIT or c == b"-":
            self.number = c
            return True
        return False

    def _string_byte(self, c: bytes) -> bool:
        if self.escape == 1:
            if c == b"u":
                self.escape = 2
                return True
            if c in b'"\\/bfnrt':
                self.escape = 0
                return True
            return False
        if self.escape >= 2:
            if c not in b"0123456789abcdefABCDEF":
                return False
            self.escape = 0 if self.escape == 5 else self.escape + 1
            return True
        if c == b"\\":
            self.escape = 1
            return True
        if c == b'"':
            self.in_string = False
            if self.expect == "key_string":
                self.expect = "colon"
            else:
                self._value_done()
            return True
        return c[0] >= 0x20  # control characters must be escaped inside strings

    def _literal_byte(self, c: bytes) -> bool:
        candidate = self.literal + c
        if not any(lit.startswith(candidate) for lit in _LITERALS):
            return False
        self.literal = candidate
        if candidate in _LITERALS:
            self.literal = b""
            self._value_done()
        return True

    def _number_byte(self, c: bytes) -> bool:
        candidate = self.number + c
        if not _number_prefix(candidate):
            return False
        self.number = candidate
        return True

    def _number_complete(self) -> bool:
        n = self.number
        return bool(n) and n[-1:] in _DIGIT and _number_prefix(n)

    def _value_done(self) -> None:
        self.expect = "comma"

    def _close(self, opener: str) -> bool:
        if not self.stack or self.stack[-1] != opener:
            return False
        self.stack.pop()
        if not self.stack:
            self.done = True
        else:
            self._value_done()
        return True


def _number_prefix(n: bytes) -> bool:
    """Is `n` a prefix of a JSON number? (-?(0|[1-9]d*)(.d+)?([eE][+-]?d+)?)"""
    i = 0
    if n[i:i + 1] == b"-":
        i += 1
    if i == len(n):
        return True
    if n[i:i + 1] == b"0":
        i += 1
    elif n[i:i + 1] and n[i:i + 1] in _DIGIT:
        while i < len(n) and n[i:i + 1] in _DIGIT:
            i += 1
    else:
        return False
    # The optional fraction, then the optional exponent: a marker, for the exponent an
    # optional sign, then digits, at least one unless the prefix ends right there.
    for markers, signs in ((b".", b""), (b"eE", b"+-")):
        if i < len(n) and n[i:i + 1] in markers:
            i += 1
            if signs and i < len(n) and n[i:i + 1] in signs:
                i += 1
            start = i
            while i < len(n) and n[i:i + 1] in _DIGIT:
                i += 1
            if i == start and i < len(n):
                return False
    return i == len(n)


def constrained_choice(logits: torch.Tensor, state: JsonPrefix, token_bytes, eos_ids, draw, max_draws: int = 16) -> int:
    """Draw tokens with `draw(logits)` until one keeps `state` a valid JSON-object prefix.

    Rejected tokens are masked out and the draw repeated, so the result follows the
    model's distribution restricted to valid continuations. When the model strongly
    prefers invalid text (say, prose before the opening brace), `max_draws` rejections
    are followed by a scan in order of decreasing logit, taking the most likely valid
    token. `state` advances with the accepted token; end tokens are accepted only once
    the object is complete.
    """

    def accept(token: int) -> bool:
        if token in eos_ids:
            return state.done
        data = token_bytes(token)
        if not data:
            return False
        trial = state.copy()
        if trial.feed(data):
            state.__dict__.update(trial.__dict__)
            return True
        return False

    logits = logits.clone()
    for _ in range(max_draws):
        token = draw(logits)
        if accept(token):
            return token
        logits[token] = float("-inf")
    for token in torch.argsort(logits, descending=True).tolist():
        if logits[token] == float("-inf"):
            break
        if accept(token):
            return token
    raise RuntimeError("no token keeps the output valid JSON")
