"""The installed package, not only the checkout, carries what the commands need."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_wheel_ships_recipes_web_chat_and_handbook_and_runs_the_default_recipe_outside_the_checkout(tmp_path):
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                            "-w", str(tmp_path / "dist"), str(REPO)], capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr
    (wheel,) = (tmp_path / "dist").glob("lmforge-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "lmforge/recipes/tiny-llama.yaml" in names and "lmforge/serve/static/index.html" in names
    # The knowledge base and its labelled questions: `lmforge ask` and `lmforge rag eval` need them installed.
    pages = {Path(n).name for n in names if n.startswith("lmforge/rag/handbook/") and n.endswith(".md")}
    assert pages == {p.name for p in (REPO / "docs" / "handbook").glob("*.md")}
    assert {"lmforge/rag/data/handbook_questions.jsonl", "lmforge/rag/data/groundedness_labels.jsonl"} <= names
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(tmp_path / "site")
    # Run from an empty directory with the unpacked wheel first on the path: no ./recipes, no checkout.
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "site")}
    code = ("import lmforge, sys; assert lmforge.__file__.startswith(sys.argv[1]), lmforge.__file__;"
            "from lmforge.cli import main; sys.exit(main(['pretrain', 'tiny-llama', '--print-recipe']))")
    run = subprocess.run([sys.executable, "-c", code, str(tmp_path / "site")], capture_output=True, text=True,
                         env=env, cwd=tmp_path, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "family: llama" in run.stdout and "max_steps: 400" in run.stdout
