"""Evaluation reports: one JSON file for machines, one markdown file for people.

Every evaluation verb ends the same way: a dict of results, a few tables, both written
atomically (temporary file, then rename) so an interrupted run never leaves half a
report.

    >>> table = markdown_table(["metric", "score"], [["bleu", 31.4159], ["chrf", 55.0]])
    >>> write_report("out", "metrics", {"bleu": 31.4159}, "# Metrics\\n\\n" + table)
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Iterable, Sequence

from ..errors import LmforgeError
from ..io import atomic


def format_cell(value: Any, digits: int = 4) -> str:
    """Floats with `digits` decimals (integers stay integers), None as an empty cell, pipes escaped."""
    if value is None:
        return ""
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            return str(value)
        return f"{value:.{digits}f}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[Any]], digits: int = 4) -> str:
    """A GitHub-flavoured markdown table; numeric columns are right-aligned."""
    rows = [list(r) for r in rows]
    numeric = [bool(rows) and all(isinstance(r[i], (int, float)) or r[i] is None for r in rows)
               for i in range(len(headers))]
    lines = ["| " + " | ".join(format_cell(h) for h in headers) + " |",
             "|" + "|".join("---:" if num else "---" for num in numeric) + "|"]
    lines += ["| " + " | ".join(format_cell(v, digits) for v in r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def json_safe(value: Any) -> Any:
    """Replace NaN and infinities (not valid JSON) by None, recursively."""
    if isinstance(value, float) and (math.isnan(value) or math.isinf(value)):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def write_text_atomic(path: str | os.PathLike[str], text: str) -> Path:
    """Write `text` to a temporary file beside `path`, then rename it into place."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        return atomic.write_text_atomic(path, text)
    except OSError as exc:
        raise LmforgeError(f"cannot write {path}: {exc.strerror or exc}") from None


def to_json(data: Any) -> str:
    return json.dumps(json_safe(data), ensure_ascii=False, indent=2) + "\n"


def write_jsonl(path: str | os.PathLike[str], records: Iterable[dict[str, Any]]) -> Path:
    """One JSON object per line, written atomically."""
    return write_text_atomic(path, "".join(json.dumps(json_safe(r), ensure_ascii=False) + "\n" for r in records))


def write_report(out_dir: str | os.PathLike[str], name: str, data: dict[str, Any], markdown: str) -> tuple[Path, Path]:
    """Write `out_dir/name.json` and `out_dir/name.md`; returns both paths."""
    out = Path(out_dir)
    return write_text_atomic(out / f"{name}.json", to_json(data)), write_text_atomic(out / f"{name}.md", markdown)
