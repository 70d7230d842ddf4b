"""Keep freed memory in the process, so that a training step's large tensors do not page-fault.

A training step allocates the same large tensors every time: gradients (freed when the
optimizer's `zero_grad(set_to_none=True)` runs), bf16 copies of the weights, a vocabulary
head's logits and its [vocabulary, width] gradient. glibc's malloc serves blocks above its
mmap threshold (at most 32 MiB, and the default model's head gradient is 113 MB) with fresh
`mmap` mappings and unmaps them on `free`, and it returns the top of its heap to the system
past a trim threshold; the next step's tensors are then new pages, and every 4 KiB page costs
a page fault (the kernel zeroes it) when first written. On the 2-core Xeon of
docs/benchmarks.md, a SmolLM2-135M-shaped step (512 tokens) spent about a tenth of its time
there: 1.25-1.31 s -> 1.09-1.26 s with bf16 products, 2.54-2.68 s -> 2.36-2.49 s in float32.

`keep_freed_memory()` asks glibc (through `mallopt`) to serve every block from its heap and
never to trim it: memory freed by one step is reused by the next. The process keeps its
peak memory instead of handing it back between steps, which is what a training process
wants; PyTorch's own CPU performance notes recommend an allocator that caches (jemalloc,
tcmalloc) for the same reason. The heap may hold some free room beside its live blocks
before the pattern settles: the SmolLM2-shaped run above grew by 3% (3.0 -> 3.1 GB resident)
and stayed there; a loop allocating one 64 MiB block at a time settled at six blocks' room. It changes the whole process, so it is called where a
training run starts (lmforge/train/loop.py), not on import. Elsewhere (another C library,
another OS, or `LMFORGE_KEEP_FREED_MEMORY=0`) it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform

# mallopt parameters (malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4

_applied = False


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory for reuse (see the module docstring); whether it applied."""
    global _applied
    if _applied:
        return True
    if os.environ.get("LMFORGE_KEEP_FREED_MEMORY", "1") in ("0", "false", "no", "off"):
        return False
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # mallopt returns 1 on success: no block through mmap, never trim the heap's top
    _applied = bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, 2**31 - 1))
    return _applied
