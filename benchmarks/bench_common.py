"""Helpers the benchmark scripts share (imported as `bench_common`: a script's own folder is on
its import path when it runs as `python benchmarks/NAME.py`)."""

from __future__ import annotations

import subprocess


def cpu_model() -> str:
    """`lscpu`'s model name, printed beside every figure ("unknown" where lscpu is missing)."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, StopIteration):
        return "unknown"


def wiki_texts(side: str):
    """Documents of the offline Wikipedia excerpt on one side of a fixed 90/10 split: "heldout"
    (the evaluation side) or anything else (the calibration / training side)."""
    from lmforge.data.corpora import load_source, split_of

    want = "validation" if side == "heldout" else "train"
    return (d.text for d in load_source("wiki") if split_of(d.text, 0.1, salt="prune") == want)
