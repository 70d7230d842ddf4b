"""A calculator tool: arithmetic expressions read by a small parser of its own (never `eval`).

Grammar (usual precedence, `**`/`^` binds right and tighter than unary minus on its left):

    expr   := term (("+" | "-") term)*
    term   := unary (("*" | "/" | "//" | "%") unary)*
    unary  := ("+" | "-") unary | power
    power  := atom (("**" | "^") unary)?
    atom   := NUMBER | NAME | NAME "(" expr ("," expr)* ")" | "(" expr ")"

Names are a fixed table of constants and functions; nothing else is reachable. Sizes
are bounded (input length, exponent, digits of integer results), so an expression
cannot make the process hang or run out of memory.
"""

from __future__ import annotations

import math
import re

from ..errors import LmforgeError
from .tools import Tool

MAX_CHARS = 500
MAX_EXPONENT = 1000
MAX_DIGITS = 400

_TOKEN = re.compile(r"\s*(?:(\d+(?:\.\d*)?(?:[eE][+-]?\d+)?|\.\d+(?:[eE][+-]?\d+)?)|([A-Za-z_][A-Za-z_0-9]*)"
                    r"|(\*\*|//|[-+*/%^(),]))")
_CONSTANTS = {"pi": math.pi, "e": math.e, "tau": math.tau}
_FUNCTIONS = {
    "sqrt": (1, math.sqrt), "abs": (1, abs), "round": ((1, 2), round), "floor": (1, math.floor),
    "ceil": (1, math.ceil), "exp": (1, math.exp), "log": ((1, 2), math.log), "log10": (1, math.log10),
    "log2": (1, math.log2), "sin": (1, math.sin), "cos": (1, math.cos), "tan": (1, math.tan),
    "min": ((1, 64), min), "max": ((1, 64), max),
}


def _tokens(text: str) -> list[tuple[str, str]]:
    out, i = [], 0
    text = text.rstrip()
    while i < len(text):
        m = _TOKEN.match(text, i)
        if not m or m.end() == i:
            raise LmforgeError(f"unexpected {text[i:].strip()[:1]!r} at position {i + 1}")
        number, name, op = m.groups()
        out.append(("num", number) if number else ("name", name) if name else ("op", op))
        i = m.end()
    return out


class _Parser:
    def __init__(self, text: str) -> None:
        self.tokens = _tokens(text)
        self.i = 0

    def peek(self) -> tuple[str, str] | None:
        return self.tokens[self.i] if self.i < len(self.tokens) else None

    def take(self, value: str | None = None) -> tuple[str, str]:
        token = self.peek()
        if token is None or (value is not None and token[1] != value):
            raise LmforgeError(f"expected {value!r}" if value else "the expression ends too early")
        self.i += 1
        return token

    def at(self, *ops: str) -> bool:
        token = self.peek()
        return token is not None and token[0] == "op" and token[1] in ops

    def expr(self):
        value = self.term()
        while self.at("+", "-"):
            op = self.take()[1]
            value = _checked(value + self.term() if op == "+" else value - self.term())
        return value

    def term(self):
        value = self.unary()
        while self.at("*", "/", "//", "%"):
            op = self.take()[1]
            right = self.unary()
            if op != "*" and right == 0:
                raise LmforgeError("division by zero")
            value = _checked(value * right if op == "*" else value / right if op == "/"
                             else value // right if op == "//" else value % right)
        return value

    def unary(self):
        if self.at("+", "-"):
            op = self.take()[1]
            value = self.unary()
            return -value if op == "-" else value
        return self.power()

    def power(self):
        base = self.atom()
        if self.at("**", "^"):
            self.take()
            exponent = self.unary()
            if abs(exponent) > MAX_EXPONENT:
                raise LmforgeError(f"exponents are limited to {MAX_EXPONENT}")
            if base == 0 and exponent < 0:
                raise LmforgeError("division by zero")
            result = base ** exponent
            if isinstance(result, complex):
                raise LmforgeError("the result is not a real number")
            return _checked(result)
        return base

    def atom(self):
        kind, text = self.take()
        if kind == "num":
            return float(text) if any(c in text for c in ".eE") else int(text)
        if kind == "name":
            if self.at("("):
                if text not in _FUNCTIONS:
                    raise LmforgeError(f"unknown function {text!r}; known: {', '.join(_FUNCTIONS)}")
                self.take("(")
                args = [self.expr()]
                while self.at(","):
                    self.take()
                    args.append(self.expr())
                self.take(")")
                arity, fn = _FUNCTIONS[text]
                low, high = arity if isinstance(arity, tuple) else (arity, arity)
                if not low <= len(args) <= high:
                    raise LmforgeError(f"{text}() takes {low if low == high else f'{low} to {high}'} argument(s)")
                if text == "round" and len(args) == 2:
                    args[1] = int(args[1])
                try:
                    return _checked(fn(*args))
                except (ValueError, OverflowError) as exc:
                    raise LmforgeError(f"{text}(): {exc}") from None
            if text in _CONSTANTS:
                return _CONSTANTS[text]
            raise LmforgeError(f"unknown name {text!r}")
        if text == "(":
            value = self.expr()
            self.take(")")
            return value
        raise LmforgeError(f"unexpected {text!r}")


def _checked(value):
    if isinstance(value, int) and not isinstance(value, bool) and abs(value).bit_length() > MAX_DIGITS * 3.33:
        raise LmforgeError(f"the result has more than {MAX_DIGITS} digits")
    if isinstance(value, float) and not math.isfinite(value):
        raise LmforgeError("the result is too large")
    return value


def evaluate(expression: str) -> int | float:
    """The value of an arithmetic expression; LmforgeError saying what is wrong with a bad one."""
    if not isinstance(expression, str) or not expression.strip():
        raise LmforgeError("give an arithmetic expression")
    if len(expression) > MAX_CHARS:
        raise LmforgeError(f"expressions are limited to {MAX_CHARS} characters")
    try:
        parser = _Parser(expression)
        value = parser.expr()
    except OverflowError:
        raise LmforgeError("the result is too large") from None
    if parser.peek() is not None:
        raise LmforgeError(f"unexpected {parser.peek()[1]!r} after a complete expression")
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        return int(value)
    return value


def calculator_tool() -> Tool:
    return Tool(
        name="calculator",
        description="Evaluate an arithmetic expression: + - * / // % ** and parentheses, the constants pi, e, "
                    "and sqrt, abs, round, floor, ceil, exp, log, log10, log2, sin, cos, tan, min, max.",
        parameters={"type": "object", "properties": {"expression": {"type": "string", "maxLength": 200,
                                                                    "description": "for example (3 + 4) * 2"}},
                    "required": ["expression"]},
        function=lambda expression: evaluate(expression),
    )
