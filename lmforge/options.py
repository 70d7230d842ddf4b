"""Configuration fields that also describe their command-line flag.

A configuration dataclass is the one description of a command's settings: its fields,
types and defaults are the Python API, and `lmforge.cli` turns the same fields into
flags (``seq_len`` -> ``--seq-len``; a bool that defaults to True -> ``--no-...``). What
a type alone cannot say — the help text, a different flag name, choices, how a raw
string becomes the value — rides along in the field's metadata through `option(...)`.

    @dataclass
    class PrepareConfig:
        seq_len: int = option(1024, help="tokens per packed row")
        unicode_form: str = option("NFC", flag="--unicode", choices=("NFC", "NFKC", "none"), help="...")
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

from lmforge.errors import LmforgeError

OPTION_KEY = "lmforge.option"


@dataclasses.dataclass(frozen=True)
class FlagSpec:
    help: str
    flag: str | None = None  # default: --field-name (or --no-field-name for a bool that defaults to True)
    choices: Sequence[Any] | None = None
    metavar: str | None = None
    repeat: bool = False  # the flag may be given several times; the values form a list
    nargs: str | None = None  # "+" for one flag followed by several values
    parse: Callable[[Any], Any] | None = None  # raw value(s) from the command line -> field value
    cli: bool = True  # False: a Python-only setting, no flag


def option(default: Any = dataclasses.MISSING, *, help: str, default_factory: Any = dataclasses.MISSING,
           flag: str | None = None, choices: Sequence[Any] | None = None, metavar: str | None = None,
           repeat: bool = False, nargs: str | None = None, parse: Callable[[Any], Any] | None = None,
           cli: bool = True) -> Any:
    """A dataclass field whose metadata describes its flag."""
    spec = FlagSpec(help, flag, choices, metavar, repeat, nargs, parse, cli)
    return dataclasses.field(default=default, default_factory=default_factory, metadata={OPTION_KEY: spec})


def flag_spec(field: dataclasses.Field) -> FlagSpec | None:
    return field.metadata.get(OPTION_KEY)


def int_list(text: str, flag: str = "") -> list[int]:
    """``1,10,100`` -> [1, 10, 100]; anything else is an error (naming `flag` when given)."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values:
        raise LmforgeError(f"{flag + ': ' if flag else ''}expected comma-separated integers, got {text!r}")
    return values
