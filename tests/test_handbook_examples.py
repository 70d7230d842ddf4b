"""Every ```python block of the handbook (docs/handbook/*.md) runs and exits 0.

Each page is one test; its blocks run in order, each in a fresh interpreter started
from the repository root, exactly as a reader would paste them.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HANDBOOK = ROOT / "docs" / "handbook"
PAGES = sorted(HANDBOOK.glob("*.md"))
PYTHON_BLOCK = re.compile(r"^```python[ \t]*\n(.*?)^```[ \t]*$", re.DOTALL | re.MULTILINE)
TIMEOUT_S = 120


def python_blocks(page: Path) -> list[str]:
    return PYTHON_BLOCK.findall(page.read_text(encoding="utf-8"))


def test_handbook_has_pages():
    assert PAGES, f"no handbook pages found in {HANDBOOK}"


# Each page starts an interpreter and imports torch: together they take minutes, so they run
# with the slow tests (in CI, after the everyday suite).
@pytest.mark.slow
@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_page_examples_run(page: Path):
    blocks = python_blocks(page)
    if not blocks:
        pytest.skip(f"{page.name} has no python example")
    for n, code in enumerate(blocks, 1):
        try:
            result = subprocess.run(
                [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT_S
            )
        except subprocess.TimeoutExpired:
            pytest.fail(f"{page.name}: python block {n} did not finish within {TIMEOUT_S} s")
        assert result.returncode == 0, (
            f"{page.name}: python block {n} exited with {result.returncode}\n"
            f"--- stdout (tail) ---\n{result.stdout[-2000:]}\n--- stderr (tail) ---\n{result.stderr[-4000:]}"
        )
