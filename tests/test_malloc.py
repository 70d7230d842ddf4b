"""`keep_freed_memory` (lmforge/io/malloc.py): glibc's malloc keeps freed blocks for reuse, so a
training step's large tensors land in pages the last step already touched."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

from lmforge.io import hugepages

SCRIPT = """
import resource, sys, torch
from lmforge.io.malloc import keep_freed_memory
applied = keep_freed_memory()
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(15):  # 64 MiB blocks, each freed at once: the heap settles (a few blocks' room)
    torch.ones(64 << 20, dtype=torch.uint8)
before = faults()
for _ in range(5):
    torch.ones(64 << 20, dtype=torch.uint8)  # the same size again and again
print(applied, faults() - before)
"""


def run(env_value: str | None) -> tuple[bool, int]:
    env = dict(os.environ)
    if env_value is not None:
        env["LMFORGE_KEEP_FREED_MEMORY"] = env_value
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, check=True)
    applied, faults = out.stdout.split()
    return applied == "True", int(faults)


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc's malloc only")
def test_freed_blocks_are_reused_without_page_faults():
    applied, kept = run(None)
    off, fresh = run("0")
    assert applied and not off
    pages = 5 * (64 << 20) // 4096
    # kept: once settled, the blocks reuse pages already touched; malloc's default maps every
    # block anew
    assert kept <= pages // 20
    if hugepages.mode() != "always":  # (with huge pages everywhere a fault covers 512 pages)
        assert fresh >= 0.9 * pages
