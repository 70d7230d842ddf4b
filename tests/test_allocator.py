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
