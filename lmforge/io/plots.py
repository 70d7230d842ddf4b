"""matplotlib for the plots that commands save next to their results (files only, no window)."""

from __future__ import annotations


def pyplot():
    """`matplotlib.pyplot` on the file-only Agg backend, or None where matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt
