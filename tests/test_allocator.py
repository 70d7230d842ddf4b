"""The allocator settings a serving thread needs: scratch tensors reused without page faults."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

SCRIPT = r"""
import resource, sys, threading, torch
from lmforge.io import allocator
applied = allocator.keep_freed_memory() if sys.argv[1] == "on" else False
faults = []
def work():
    # A 16-row sampling step's scratch (scaled logits, probabilities, a float64 sum) among small
    # allocations, some of which stay (as a step's events and tokens do).
    logits = torch.randn(16, 49152)
    kept = []
    for i in range(30):
        before = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
        small = [torch.empty(1000) for _ in range(50)]
        probs = (logits / 0.8).softmax(-1)
        kept.append(torch.empty(100))
        cdf = probs.cumsum(-1, dtype=torch.float64)
        del probs, cdf, small
        if i >= 10:
            faults.append(resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - before)
t = threading.Thread(target=work)
t.start()
t.join()
print(applied, max(faults))
"""

glibc = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


def run(mode: str, **env: str) -> tuple[bool, int]:
    out = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, check=True,
                         env={**os.environ, **env}).stdout.split()
    return out[0] == "True", int(out[1])


@pytest.mark.skipif(not glibc, reason="the thresholds are GNU libc's")
def test_a_threads_scratch_memory_is_reused_without_page_faults():
    applied, faults = run("on")
    assert applied
    # 16 x 49152 floats: 3 MB each, the cumulative sum 6 MB. With glibc's own thresholds this loop
    # took up to 2,274 page faults a step (a trimmed arena refilled) on the machine of docs/benchmarks.md.
    assert faults < 50


@pytest.mark.parametrize("name, value", [("LMFORGE_KEEP_FREED_MEMORY", "0"), ("MALLOC_TRIM_THRESHOLD_", "1000000"),
                                         ("MALLOC_TOP_PAD_", "0"), ("GLIBC_TUNABLES", "glibc.malloc.trim_threshold=1")])
def test_the_user_settings_win(monkeypatch, name, value):
    from lmforge.io import allocator

    monkeypatch.setenv(name, value)
    assert allocator._apply() is False  # returns before touching the allocator


LARGE = r"""
import resource, sys
import torch
from lmforge.io import allocator
applied = allocator.keep_freed_memory(large_blocks=True) if sys.argv[1] == "on" else False
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(15):  # 64 MiB blocks (above any mmap threshold), each freed at once: the heap settles
    torch.ones(64 << 20, dtype=torch.uint8)
before = faults()
for _ in range(5):
    torch.ones(64 << 20, dtype=torch.uint8)
print(applied, faults() - before, allocator.keep_freed_memory())
"""


@pytest.mark.skipif(not glibc, reason="the thresholds are GNU libc's")
def test_a_training_steps_large_blocks_are_reused_without_page_faults():
    from lmforge.io import hugepages

    def run_large(mode: str) -> tuple[bool, int, bool]:
        out = subprocess.run([sys.executable, "-c", LARGE, mode], capture_output=True, text=True, check=True,
                             env={k: v for k, v in os.environ.items() if k != "LMFORGE_KEEP_FREED_MEMORY"}).stdout
        applied, faults, later = out.split()
        return applied == "True", int(faults), later == "True"

    applied, kept, later = run_large("on")
    assert applied and later  # a later plain call keeps the training settings (and says they are set)
    off, fresh, _ = run_large("off")
    assert not off
    pages = 5 * (64 << 20) // 4096
    # kept: once settled, the blocks reuse pages already touched; glibc's own thresholds map every
    # 64 MiB block anew (above the largest mmap threshold it accepts)
    assert kept <= pages // 20
    if hugepages.mode() != "always":  # (with huge pages everywhere a fault covers 512 pages)
        assert fresh >= 0.9 * pages
