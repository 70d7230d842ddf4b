"""Keep freed memory for reuse: a decode step's scratch tensors and a training step's large
tensors without page faults.

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

A training step needs more (`keep_freed_memory(large_blocks=True)`, which the trainer calls on
a CPU): its large tensors are larger than any mmap threshold glibc accepts (the default
model's 113 MB head gradient, the bf16 weight copies) and `zero_grad(set_to_none=True)` frees
hundreds of megabytes of gradients at once, more than the trim threshold. So no block is
served by a mapping of its own (`M_MMAP_MAX` 0) and the heap is never trimmed: what one step
frees, the next reuses. On the 2-core Xeon of docs/benchmarks.md a SmolLM2-135M-shaped step
(512 tokens) spent about a tenth of its time in page faults before: 1.25-1.31 s -> 1.09-1.26 s
with bf16 products, 2.54-2.68 s -> 2.36-2.49 s in float32. Resident memory of that run grew
3% (3.0 -> 3.1 GB) and stayed there; a loop allocating one 64 MiB block at a time settled
with six blocks' room in its heap.

Nothing changes where the C library is not GNU libc, where the user set the allocator's own
environment variables (`MALLOC_TRIM_THRESHOLD_`, `MALLOC_MMAP_THRESHOLD_`, `MALLOC_TOP_PAD_`,
`GLIBC_TUNABLES`), or with `LMFORGE_KEEP_FREED_MEMORY=0`.
"""

from __future__ import annotations

import ctypes
import os
import platform

M_TRIM_THRESHOLD = -1
M_TOP_PAD = -2
M_MMAP_THRESHOLD = -3
M_MMAP_MAX = -4
MMAP_THRESHOLD = 32 << 20  # the largest glibc accepts on 64-bit systems
TRIM_THRESHOLD = 256 << 20
NEVER_TRIM = 2**31 - 1  # the largest value mallopt takes
TOP_PAD = 64 << 20
USER_SETTINGS = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TOP_PAD_", "GLIBC_TUNABLES")

_applied: dict[bool, bool] = {}


def keep_freed_memory(large_blocks: bool = False) -> bool:
    """Set glibc's thresholds and top pad once per process; whether they are set. With
    `large_blocks` (a training run) no block gets a mapping of its own and the heap is never
    trimmed; a later call without it leaves those settings in place."""
    if True in _applied:
        return _applied[True]
    if large_blocks not in _applied:
        _applied[large_blocks] = _apply(large_blocks)
    return _applied[large_blocks]


def _apply(large_blocks: bool = False) -> bool:
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
    if large_blocks:
        settings = [(M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, NEVER_TRIM), (M_TOP_PAD, TOP_PAD)]
    else:
        settings = [(M_MMAP_THRESHOLD, MMAP_THRESHOLD), (M_TRIM_THRESHOLD, TRIM_THRESHOLD), (M_TOP_PAD, TOP_PAD)]
    return all([mallopt(key, value) for key, value in settings])
