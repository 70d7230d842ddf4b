"""Where lmforge keeps what it can rebuild (indexes, calibration results)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """$LMFORGE_CACHE, else $XDG_CACHE_HOME/lmforge, else ~/.cache/lmforge (not created here)."""
    if os.environ.get("LMFORGE_CACHE"):
        return Path(os.environ["LMFORGE_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "lmforge"
