"""Tensors in 2 MiB pages: fewer address translations for weights that are streamed every step.

A batch-1 decode step reads every weight once, front to back. With the usual 4 KiB pages that
is one page-table walk per 4 KiB read, and inside a virtual machine each walk goes through two
levels of tables; on the 2-core AMD EPYC machine of docs/benchmarks.md a plain streaming read
ran at 25-31 GB/s from 4 KiB pages and at 53-60 GB/s from 2 MiB pages. Linux gives a process
2 MiB pages ("transparent huge pages") for memory it marks with madvise(MADV_HUGEPAGE) when
/sys/kernel/mm/transparent_hugepage/enabled says `always` or `madvise`.

`move_to_huge_pages` copies parameters into one such region (2 MiB aligned, in the order given,
each tensor at a 64-byte boundary) and points them at their copies; each tensor gets a storage
of its own, so saving and copying models treat them as before. Where the kernel or Python cannot
do it (another OS, `never`, `LMFORGE_HUGE_PAGES=0`), nothing moves. The kernel may still back
part of the region with small pages when it finds no free 2 MiB ones; `huge_bytes` says how
much it did not.
"""

from __future__ import annotations

import ctypes
import mmap
import os
from pathlib import Path
from typing import Iterable

import numpy as np
import torch

HUGE_PAGE = 2 << 20
ALIGN = 64
SETTING = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def mode() -> str:
    """The kernel's setting (`always`, `madvise`, `never`), or `unavailable`."""
    try:
        text = SETTING.read_text()
    except OSError:
        return "unavailable"
    start, end = text.find("["), text.find("]")
    return text[start + 1:end] if 0 <= start < end else "unavailable"


def available() -> bool:
    """Whether `move_to_huge_pages` will move anything here."""
    return (os.environ.get("LMFORGE_HUGE_PAGES", "1") != "0" and hasattr(mmap, "MADV_HUGEPAGE")
            and mode() in ("always", "madvise"))


class Region:
    """An anonymous mapping whose 2 MiB-aligned part of `nbytes` is advised to use huge pages."""

    def __init__(self, nbytes: int) -> None:
        whole = -(-nbytes // HUGE_PAGE) * HUGE_PAGE  # advised in whole huge pages
        self.map = mmap.mmap(-1, whole + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        address = ctypes.addressof(ctypes.c_char.from_buffer(self.map))
        self.offset = -address % HUGE_PAGE
        self.address = address + self.offset
        self.nbytes = nbytes
        self.map.madvise(mmap.MADV_HUGEPAGE, self.offset, whole)

    def tensor(self, offset: int, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """A tensor (with a storage of its own) over bytes offset.. of the aligned part."""
        itemsize = torch.empty(0, dtype=dtype).element_size()
        count = int(np.prod(shape)) if shape else 1
        raw = np.frombuffer(self.map, dtype=np.uint8, count=count * itemsize, offset=self.offset + offset)
        return torch.from_numpy(raw).view(dtype).view(shape)


def move_to_huge_pages(params: Iterable[torch.Tensor]) -> Region | None:
    """Copy the CPU tensors given (parameters or buffers; each once, in this order) into one huge-page
    region and make each `.data` its copy, keeping its memory order (row- or column-major).
    Returns the region, or None where nothing moved (not available, nothing to move)."""
    if not available():
        return None
    chosen, seen = [], set()
    for p in params:
        if p is None or id(p) in seen or p.device.type != "cpu" or p.numel() == 0:
            continue
        if not (p.is_contiguous() or (p.dim() == 2 and p.t().is_contiguous())):
            continue
        seen.add(id(p))
        chosen.append(p)
    if not chosen:
        return None
    offsets, total = [], 0
    for p in chosen:
        offsets.append(total)
        total += -(-p.numel() * p.element_size() // ALIGN) * ALIGN
    try:
        region = Region(total)
    except (OSError, ValueError):
        return None
    with torch.no_grad():
        for p, offset in zip(chosen, offsets):
            transposed = not p.is_contiguous()
            shape = tuple(p.t().shape) if transposed else tuple(p.shape)
            copy = region.tensor(offset, shape, p.dtype)
            copy.copy_(p.t() if transposed else p)
            p.data = copy.t() if transposed else copy
    return region


def zeros(shape: tuple[int, ...], dtype: torch.dtype, least: int = 2 * HUGE_PAGE) -> torch.Tensor | None:
    """A new zero-filled CPU tensor in a region of its own advised to use huge pages, for buffers a
    step streams through (a decode step reads its rows' whole key/value cache); None where huge
    pages are not available or the tensor would be smaller than `least` bytes. Its pages are
    backed as they are first written (an anonymous mapping reads as zeros)."""
    itemsize = torch.empty(0, dtype=dtype).element_size()
    nbytes = int(np.prod(shape)) * itemsize if shape else itemsize
    if nbytes < least or not available():
        return None
    try:
        return Region(nbytes).tensor(0, tuple(shape), dtype)
    except (OSError, ValueError):
        return None


def _smaps_field(t: torch.Tensor, field: str) -> int | None:
    """A numeric field of the /proc/self/smaps entry of the mapping holding `t` (None: unreadable)."""
    address = t.data_ptr()
    try:
        lines = Path("/proc/self/smaps").read_text().splitlines()
    except OSError:
        return None
    inside = False
    for line in lines:
        head = line.split(None, 1)[0] if line.strip() else ""
        if "-" in head and not head.endswith(":"):
            lo, hi = (int(v, 16) for v in head.split("-"))
            inside = lo <= address < hi
        elif inside and head == field + ":":
            return int(line.split()[1])
    return None


def huge_bytes(t: torch.Tensor) -> int:
    """How many bytes of the mapping holding `t` the kernel backs with huge pages now (0 where
    that cannot be read)."""
    return (_smaps_field(t, "AnonHugePages") or 0) * 1024


def eligible(t: torch.Tensor) -> bool:
    """Whether the kernel may back the mapping holding `t` with huge pages (its THPeligible flag)."""
    return _smaps_field(t, "THPeligible") == 1
