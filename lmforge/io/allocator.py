"""Keep freed memory for reuse: a decode step's scratch tensors without page faults.

PyTorch's CPU tensors come from the C library's `malloc`. GNU libc serves a request from a
thread's own arena and gives the top of that arena back to the kernel once more than
`M_TRIM_THRESHOLD` bytes are free there; requests above `M_MMAP_THRESHOLD` get a mapping of
their own, unmapped again on `free`. Both thresholds start small (128 KiB) and grow only as
large blocks are freed, so how often memory goes back to the kernel depends on the order of
earlier allocations. Each time it does, the next step touches fresh pages: a zero-filled
page fault per 4 KiB.

A server's scheduler runs on a thread of its own, whose arena was found trimming every step:
sampling 16 rows over a 49,152-token vocabulary (logits, scaled logits, probabilities and
a float64 cumulative sum, about 15 MB) took 3,841 page faults and 5-8 ms instead of 1.6 ms,
and a whole 16-row decode step 43-45 ms instead of 35-38 (docs/benchmarks.md). Fixing both
thresholds and the top pad (`keep_freed_memory`) stops that: blocks up to 32 MiB come from the
arenas, up to 256 MiB of free memory stays in an arena for the next step, and the 64 MiB top
pad keeps a thread's arena from deleting a sub-heap as soon as it is free (the thresholds
alone did not stop the faults in a server process). The cost is memory the process keeps
mapped after a peak, bounded by those figures per arena.

Nothing changes where the C library is not GNU libc, where the user set the allocator's own
environment variables (`MALLOC_TRIM_THRESHOLD_`, `MALLOC_MMAP_THRESHOLD_`, `MALLOC_TOP_PAD_`,
`GLIBC_TUNABLES`), or with `LMFORGE_KEEP_FREED_MEMORY=0`.
"""

from __future__ import annotations

import ctypes
import os
import platform

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
M_TOP_PAD = -2
MMAP_THRESHOLD = 32 << 20  # the largest glibc accepts on 64-bit systems
TRIM_THRESHOLD = 256 << 20
TOP_PAD = 64 << 20
USER_SETTINGS = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TOP_PAD_", "GLIBC_TUNABLES")

_applied: bool | None = None


def keep_freed_memory() -> bool:
    """Set glibc's trim and mmap thresholds and top pad once per process; whether they are set."""
    global _applied
    if _applied is None:
        _applied = _apply()
    return _applied


def _apply() -> bool:
    if os.environ.get("LMFORGE_KEEP_FREED_MEMORY", "1") == "0" or any(k in os.environ for k in USER_SETTINGS):
        return False
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    # mallopt returns 1 on success; setting either threshold also stops their automatic growth.
    return all([mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD), mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD),
                mallopt(M_TOP_PAD, TOP_PAD)])
