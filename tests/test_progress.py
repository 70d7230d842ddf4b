"""The one progress line (lmforge/io/progress.py): what it shows on a terminal and in a log."""

from __future__ import annotations

import io

import pytest

from lmforge.io.progress import Progress, format_duration


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_terminal_redraws_in_place_with_count_rate_and_eta():
    screen = Terminal()
    line = Progress("perplexity", unit="windows", stream=screen)
    line(1, 4)
    line.update(2, force=True)
    line.close()
    out = screen.getvalue()
    assert out.count("\r") >= 2 and out.endswith("\n")
    assert "perplexity" in out and "2/4 windows" in out and " 50% [##########----------]" in out
    assert "windows/s" in out and "ETA " in out


def test_pipe_stays_quiet_for_short_runs_and_logs_whole_lines():
    log = io.StringIO()
    Progress("x", 3, stream=log)(3)  # finished before the first logging interval
    assert log.getvalue() == ""
    log = io.StringIO()
    line = Progress("x", 3, stream=log, log_every=0.0)
    line(1)
    line(2)
    assert log.getvalue().count("\n") == 2 and "\r" not in log.getvalue()


def test_every_n_items_on_a_pipe_and_the_rate_of_a_resumed_run():
    log = io.StringIO()
    line = Progress("train", 100, unit="steps", stream=log, every=10, initial=40)
    for step in range(41, 61):
        line.update(step, info="loss 1.0000", eta=65.0)
    lines = log.getvalue().splitlines()
    assert [ln.split()[3] for ln in lines] == ["50/100", "60/100"]  # label, percent, bar, count
    assert all("loss 1.0000" in ln and "ETA 1:05" in ln for ln in lines)
    rate = float(lines[-1].split()[5].replace(",", ""))  # steps/s: the 20 steps of this invocation only
    assert rate == pytest.approx(20 / (line.last_shown - line.started), rel=0.01, abs=0.1)
    # Without an explicit ETA it also comes from this invocation's pace: 40 steps left at 20 per elapsed.
    quiet = Progress("train", 100, unit="steps", stream=io.StringIO(), every=10, initial=40)
    quiet.update(60)
    elapsed = quiet.last_shown - quiet.started
    assert f"ETA {format_duration(40 * elapsed / 20)}" in quiet.line(quiet.last_shown)


def test_fraction_bytes_and_summary():
    screen = Terminal()
    line = Progress("prepare", unit="docs", stream=screen)
    line.update(7, fraction=0.25, nbytes=3_000_000)
    line.close("prepared 7 documents")
    out = screen.getvalue()
    assert "25%" in out and "7 docs" in out and "3.0 MB" in out
    assert out.rstrip().endswith("prepared 7 documents in 0:00")
    silent = Terminal()
    off = Progress("x", 3, stream=silent, enabled=False)
    off(1)
    off.close("done")
    assert silent.getvalue() == ""


@pytest.mark.parametrize("seconds,text", [(0, "0:00"), (65, "1:05"), (3600, "1:00:00"), (3725.9, "1:02:05")])
def test_format_duration(seconds, text):
    assert format_duration(seconds) == text
