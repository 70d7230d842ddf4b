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


def heldout_texts(tokenizer, limit: int) -> tuple[list[str], int]:
    """Held-out documents holding at most ``limit`` tokens in all, and that count: whole documents
    while they fit, then the next one cut at the last word boundary that keeps the total within
    the limit (the first held-out article alone is about 16k tokens, so stopping only between
    documents would score four times what a 4k limit asks for)."""
    texts, total = [], 0
    for text in wiki_texts("heldout"):
        n = len(tokenizer.encode(text))
        if total + n <= limit:
            texts.append(text)
            total += n
            continue
        words = text.split(" ")
        lo, hi = 0, len(words)  # the longest word prefix whose tokens fit: binary search on word count
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if len(tokenizer.encode(" ".join(words[:mid]))) <= limit - total:
                lo = mid
            else:
                hi = mid - 1
        if lo:
            cut = " ".join(words[:lo])
            texts.append(cut)
            total += len(tokenizer.encode(cut))
        break
    return texts, total
