"""oneDNN's blocked copies of frozen float32 weights, for training products on CPU.

A frozen weight (the base of a LoRA layer, a tied embedding used as the output head while
only adapters train) is a constant of the run, so the layout its products want can be
made once instead of at every call. oneDNN's linear op computes x W^T; given a plain W it
first re-lays W into its blocked format, and given the transposed view W^T that the input
gradient g W = g (W^T)^T needs, the copy is a strided gather of the whole matrix. For the
default model's 49152 x 576 head that re-lay took about a third of the input-gradient
product on one core (benchmarks/finetune_profile.py, docs/benchmarks.md).

`packed(weight, transposed)` returns the blocked copy of W (for x W^T) or of W^T (for
g W), made on first use and remade whenever the weight changes: another tensor, or its
version counter moved (an optimizer step, a merge, a checkpoint load write in place).
Copies live beside the model, never in its state_dict, and leave when the weight is freed.
The price is memory: one more weight-sized tensor per copy.
"""

from __future__ import annotations

import weakref

import torch

# Whether the fused loss keeps a frozen head's W^T packed (lmforge/train/fused_ce.py).
PACK_HEAD = True

# (id(weight), transposed) -> (weakref to the weight, (data pointer, version), packed copy)
_CACHE: dict[tuple[int, bool], tuple[weakref.ref, tuple[int, int], torch.Tensor]] = {}


def _drop(ident: int) -> None:
    for transposed in (False, True):
        _CACHE.pop((ident, transposed), None)


def packed(weight: torch.Tensor, transposed: bool = False) -> torch.Tensor:
    """oneDNN's blocked copy of `weight` [out, in] (transposed=False: for x W^T) or of its
    transpose (True: for g W), cached until the weight changes; a 2-D float32 CPU weight."""
    slot = (id(weight), transposed)
    key = (weight.data_ptr(), weight._version)
    cached = _CACHE.get(slot)
    if cached is None or cached[0]() is not weight or cached[1] != key:
        with torch.inference_mode(False), torch.no_grad():
            w = weight.detach()
            copy = torch.ops.mkldnn._reorder_linear_weight(w.t().contiguous() if transposed else w)
        if not any(c is not None and c[0]() is weight for c in (_CACHE.get((id(weight), t)) for t in (False, True))):
            weakref.finalize(weight, _drop, id(weight))
        cached = _CACHE[slot] = (weakref.ref(weight), key, copy)
    return cached[2]


def cached_bytes() -> int:
    """Memory the cached copies hold (what the speed costs)."""
    return sum(entry[2].numel() * entry[2].element_size() for entry in _CACHE.values())
