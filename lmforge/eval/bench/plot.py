"""Per-group scores as a bar chart (PNG), when matplotlib is installed (`pip install 'lmforge[eval]'`)."""

from __future__ import annotations

from pathlib import Path

from ...io.atomic import atomic_path
from .runner import BenchResult


def main_metric(result: BenchResult) -> str:
    for name in ("acc", "pass@1"):
        if name in result.metrics:
            return name
    return next(iter(result.metrics))


def plot_groups(result: BenchResult, path: str | Path, chance: float | None = None) -> Path | None:
    """Write a horizontal bar chart of the main metric per group; None when matplotlib or groups are missing."""
    from lmforge.io.plots import pyplot

    plt = pyplot()
    if plt is None:
        return None
    if not result.groups:
        return None
    metric = main_metric(result)
    names = sorted(result.groups, key=lambda g: (result.groups[g].get(metric) or 0.0, g))
    values = [result.groups[g].get(metric) or 0.0 for g in names]
    fig, ax = plt.subplots(figsize=(7, max(2.5, 0.18 * len(names) + 1)))
    ax.barh(range(len(names)), values, color="#4c72b0")
    ax.set_yticks(range(len(names)), [f"{g} ({result.groups[g]['n']})" for g in names], fontsize=6)
    ax.axvline(result.metrics[metric], color="black", linewidth=1, label=f"overall {result.metrics[metric]:.3f}")
    if chance is not None:
        ax.axvline(chance, color="grey", linestyle="--", linewidth=1, label=f"chance {chance:.2f}")
    ax.set_xlim(0, 1)
    ax.set_xlabel(f"{metric} (items per group in parentheses)")
    ax.set_title(f"{result.task} on {result.model}", fontsize=9)
    ax.legend(loc="lower right", fontsize=7)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with atomic_path(path, suffix=".png") as tmp:
            fig.savefig(tmp, dpi=120)
    finally:
        plt.close(fig)
    return path
