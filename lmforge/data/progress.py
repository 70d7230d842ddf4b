"""A progress line on stderr with rate and ETA, at most a few times a second."""

from __future__ import annotations

import sys
import time
from typing import TextIO


def format_duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 \
        else f"{seconds // 60}:{seconds % 60:02d}"


class Progress:
    """``update(done_fraction, docs, nbytes)`` redraws a line such as
    ``prepare  41%  1,234 docs  2.1 MB  310 docs/s  0.5 MB/s  ETA 0:12``.

    On a terminal the line is redrawn in place; otherwise (a log file, CI) a line is
    printed every ``log_every`` seconds so that logs stay short.
    """

    def __init__(self, label: str, stream: TextIO | None = None, interval: float = 0.25,
                 log_every: float = 5.0, enabled: bool = True, unit: str = "docs") -> None:
        self.label, self.stream, self.enabled, self.unit = label, stream or sys.stderr, enabled, unit
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.interval = interval if self.tty else log_every
        self.start = time.perf_counter()
        self._last = 0.0
        self._drawn = False

    def update(self, fraction: float | None, docs: int, nbytes: int, force: bool = False) -> None:
        if not self.enabled:
            return
        now = time.perf_counter()
        if not force and now - self._last < self.interval:
            return
        self._last = now
        elapsed = max(1e-9, now - self.start)
        parts = [self.label]
        if fraction is not None:
            parts.append(f"{100 * fraction:3.0f}%")
        parts += [f"{docs:,} {self.unit}", f"{docs / elapsed:,.0f} {self.unit}/s"]
        if nbytes:
            parts += [f"{nbytes / 1e6:.1f} MB", f"{nbytes / 1e6 / elapsed:.2f} MB/s"]
        if fraction and 0 < fraction < 1:
            parts.append(f"ETA {format_duration(elapsed * (1 - fraction) / fraction)}")
        line = "  ".join(parts)
        if self.tty:
            self.stream.write("\r" + line + "\x1b[K")
        else:
            self.stream.write(line + "\n")
        self.stream.flush()
        self._drawn = True

    def done(self, message: str) -> None:
        if not self.enabled:
            return
        if self.tty and self._drawn:
            self.stream.write("\r\x1b[K")
        self.stream.write(f"{message} in {format_duration(time.perf_counter() - self.start)}\n")
        self.stream.flush()
