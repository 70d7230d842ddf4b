"""The one progress line of lmforge: done/total, rate, extra figures and ETA on stderr.

    prepare   41% [########------------]  1,234 docs  310 docs/s  2.1 MB  0.52 MB/s  ETA 0:12
    train     40% [########------------]  120/300 steps  2.1 steps/s  loss 4.2130 lr 2.8e-03  ETA 0:41

Data preparation, tokenizer training, pretraining, evaluation and the benchmarks all draw
this line. On a terminal it is redrawn in place a few times a second; on a pipe or a file
(logs, CI) a full line is written every ``log_every`` seconds (or every ``every`` items
when given), and the first one only after that interval, so short runs leave no noise and
long runs leave a readable trace.
"""

from __future__ import annotations

import math
import sys
import time
from typing import TextIO

BAR_WIDTH = 20


def format_duration(seconds: float) -> str:
    """``m:ss`` below an hour, ``h:mm:ss`` above."""
    seconds = max(0, int(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 \
        else f"{seconds // 60}:{seconds % 60:02d}"


class Progress:
    """``update(done, ...)`` (or call it: ``progress(done, total)``) as work advances; ``close()`` at the end.

    The fraction done comes from ``done/total`` or, where items are not known in advance
    (documents in a compressed file), from an explicit ``fraction``; the ETA comes from the
    pace so far unless the caller knows better (``eta=``: a resumed training run times only
    this invocation's steps).
    """

    def __init__(self, label: str, total: int | None = None, unit: str = "items", *, stream: TextIO | None = None,
                 enabled: bool = True, log_every: float = 10.0, every: int | None = None, initial: int = 0) -> None:
        self.label, self.total, self.unit, self.enabled = label, total, unit, enabled
        self.initial = initial  # done before this invocation (a resumed run): not part of the rate
        self.stream = stream if stream is not None else sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.interval = 0.2 if self.tty else log_every
        self.every = None if self.tty else every
        self.started = time.perf_counter()
        self.last_shown = -math.inf if self.tty else self.started
        self.shown = False
        self.done = initial

    def __call__(self, done: int, total: int | None = None) -> None:
        self.update(done, total=total)

    def update(self, done: int, *, total: int | None = None, fraction: float | None = None, nbytes: int = 0,
               info: str = "", eta: float | None = None, force: bool = False) -> None:
        self.done = done
        if total is not None:
            self.total = total or None  # 0: nothing known yet to measure against
        if not self.enabled:
            return
        now = time.perf_counter()
        finished = self.total is not None and done >= self.total and (self.tty or self.shown)
        if self.every is not None:
            due = done % self.every == 0
        else:
            due = now - self.last_shown >= self.interval
        if not (due or finished or force):
            return
        self.last_shown, self.shown = now, True
        self._write(self.line(now, fraction, nbytes, info, eta))

    def line(self, now: float, fraction: float | None = None, nbytes: int = 0, info: str = "",
             eta: float | None = None) -> str:
        elapsed = max(1e-9, now - self.started)
        if fraction is None and self.total:
            fraction = min(1.0, self.done / self.total)
        parts = [self.label]
        if fraction is not None:
            filled = int(BAR_WIDTH * fraction)
            parts.append(f"{100 * fraction:3.0f}% [{'#' * filled}{'-' * (BAR_WIDTH - filled)}]")
        count = f"{self.done:,}/{self.total:,}" if self.total else f"{self.done:,}"
        rate = (self.done - self.initial) / elapsed
        parts += [f"{count} {self.unit}", f"{rate:,.1f} {self.unit}/s"]
        if nbytes:
            parts += [f"{nbytes / 1e6:.1f} MB", f"{nbytes / 1e6 / elapsed:.2f} MB/s"]
        if info:
            parts.append(info)
        if eta is None and self.total and rate > 0:
            eta = (self.total - self.done) / rate  # this invocation's pace: a resumed run's earlier work is not in it
        elif eta is None and fraction and 0 < fraction < 1:
            eta = elapsed * (1 - fraction) / fraction
        if eta is not None and math.isfinite(eta) and (fraction is None or fraction < 1):
            parts.append(f"ETA {format_duration(eta)}")
        return "  ".join(parts)

    def _write(self, line: str) -> None:
        if self.tty:
            self.stream.write("\r" + line + "\x1b[K")
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def close(self, summary: str | None = None) -> None:
        """End the line; with ``summary``, print ``summary in m:ss`` (shown even when nothing was drawn)."""
        if not self.enabled:
            return
        if self.tty and self.shown:
            self.stream.write("\r\x1b[K" if summary else "\n")
        if summary:
            self.stream.write(f"{summary} in {format_duration(time.perf_counter() - self.started)}\n")
        self.stream.flush()
