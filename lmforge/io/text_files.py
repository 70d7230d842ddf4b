"""Reading user-supplied text and JSONL files with one-line, located errors.

Every reader of user files in lmforge reports problems the same way: a missing file,
an unreadable one, or a bad line as `path:line: what is wrong`, as an `LmforgeError`
(which the CLI prints as one line and exit status 1).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable, Iterator

from ..errors import LmforgeError


def read_text(path: str | Path, what: str = "input") -> str:
    """The whole file as UTF-8 text; `what` names it in the error ("task file ... does not exist")."""
    path = Path(path)
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise LmforgeError(f"{what} file {path} does not exist") from None
    except IsADirectoryError:
        raise LmforgeError(f"{what} file {path} is a directory") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise LmforgeError(f"cannot read {path}: {exc}") from None


def parse_json(text: str, source: str | Path) -> Any:
    """The value of a whole-file JSON document; a syntax error names `source` and the line."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise LmforgeError(f"{source}: not valid JSON ({exc.msg} at line {exc.lineno})") from None


def parse_jsonl(lines: Iterable[str], source: str | Path) -> Iterator[tuple[int, Any]]:
    """(line number, parsed value) for each non-blank line; a bad line names `source:line`."""
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            yield number, json.loads(line)
        except json.JSONDecodeError as exc:
            raise LmforgeError(f"{source}:{number}: not valid JSON ({exc.msg})") from None


def read_jsonl(path: str | Path, what: str = "input") -> list[tuple[int, Any]]:
    """Every record of a JSONL file, with its line number."""
    return list(parse_jsonl(read_text(path, what).splitlines(), path))


def text_of(record: Any, source: str, field: str = "text") -> str:
    """A record that is a string, or an object with a string `field`."""
    text = record.get(field) if isinstance(record, dict) else record
    if not isinstance(text, str):
        raise LmforgeError(f"{source}: expected a string or an object with a {field!r} string")
    return text
