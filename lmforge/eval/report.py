"""Evaluation reports: one JSON file for machines, one markdown file for people.

Every evaluation verb ends the same way: a dict of results, a few tables, both written
atomically (temporary file, then rename) so an interrupted run never leaves half a
report. `ProgressLine` is the shared stderr progress line (rate and ETA) for long runs.

    >>> table = markdown_table(["metric", "score"], [["bleu", 31.4159], ["chrf", 55.0]])
    >>> write_report("out", "metrics", {"bleu": 31.4159}, "# Metrics\\n\\n" + table)
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Sequence, TextIO

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


class ProgressLine:
    """A one-line progress report on stderr: done/total, rate and ETA.

    On a terminal the line is rewritten in place at most a few times per second; on a
    pipe or a file (logs, CI) a full line is written every `log_every` seconds, so that
    long runs leave a readable trace. `enabled=False` silences it.
    """

    def __init__(self, total: int, label: str, unit: str = "items", stream: TextIO | None = None,
                 enabled: bool = True, log_every: float = 10.0) -> None:
        self.total, self.label, self.unit = total, label, unit
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.interval = 0.2 if self.tty else log_every
        self.started = time.perf_counter()
        # On a pipe the first line comes after `log_every` seconds: short runs stay quiet.
        self.last_shown = -math.inf if self.tty else self.started
        self.shown = False
        self.done = 0

    def __call__(self, done: int, total: int | None = None) -> None:
        self.done = done
        if total is not None:
            self.total = total
        now = time.perf_counter()
        finished = done >= self.total and (self.tty or self.shown)
        if self.enabled and (now - self.last_shown >= self.interval or finished):
            self.last_shown = now
            self.shown = True
            self._show(now)

    def _show(self, now: float) -> None:
        elapsed = now - self.started
        rate = self.done / elapsed if elapsed > 0 else 0.0
        eta = (self.total - self.done) / rate if rate > 0 else math.inf
        text = (f"{self.label}: {self.done}/{self.total} {self.unit} ({rate:.1f}/s, "
                f"elapsed {elapsed:.0f}s, eta {'?' if math.isinf(eta) else f'{eta:.0f}s'})")
        if self.tty:
            print("\r" + text + " " * 4, end="", file=self.stream, flush=True)
        else:
            print(text, file=self.stream, flush=True)

    def close(self) -> None:
        if self.enabled and self.tty and self.shown:
            print(file=self.stream, flush=True)
