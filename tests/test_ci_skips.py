"""In CI a test skipped for a missing package fails instead: a renamed or absent reference
package must not silently turn a parity test into a skip."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

PROBE = '''
import pytest

def test_needs_a_missing_package():
    pytest.importorskip("lmforge_no_such_reference_package")

def test_skips_for_another_reason():
    pytest.skip("the claim is about another Python version")
'''


def run_probe(tmp_path: Path, ci: str) -> subprocess.CompletedProcess:
    (tmp_path / "test_probe.py").write_text(PROBE)
    env = {**os.environ, "CI": ci, "PYTHONPATH": str(Path(__file__).parent)}
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "conftest", "-p", "no:cacheprovider",
                           str(tmp_path / "test_probe.py")], capture_output=True, text=True, env=env,
                          cwd=tmp_path, timeout=120)


@pytest.mark.slow
def test_missing_package_fails_in_ci_and_skips_elsewhere(tmp_path):
    ci = run_probe(tmp_path, "true")
    assert ci.returncode == 1 and "1 failed, 1 skipped" in ci.stdout, ci.stdout
    assert "skipped in CI, where every dependency is installed" in ci.stdout
    local = run_probe(tmp_path, "")
    assert local.returncode == 0 and "2 skipped" in local.stdout, local.stdout
