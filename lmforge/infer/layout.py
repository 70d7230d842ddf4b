"""Weight layout for fast CPU decoding.

A decode step multiplies one activation row by every weight matrix, so it is bound by how
fast the weights stream from memory. `nn.Linear` stores W as [out, in] row-major and
computes x @ W.T. Which memory order lets the BLAS matrix-vector kernel stream fastest
depends on the shape: on the 2-core x86 machines we measured (benchmarks/decode.py,
docs/benchmarks.md), storing W column-major (W.T contiguous, W a transposed view) made
the wide matrices (out >= in: fused q/k/v, fused gate/up, the vocabulary head) about
1.3-2x faster, while the tall down projection (in > out) stayed fastest row-major.

Only strides change: values, results, `state_dict()` and saved checkpoints are the same.
"""

from __future__ import annotations

import torch
from torch import nn


def use_column_major_weights(model: nn.Module) -> nn.Module:
    """Re-store the Linear weights of `model` whose out_features >= in_features column-major, in place.

    Tied weights stay tied (the Parameter object is kept; only its storage changes).
    """
    with torch.no_grad():
        for module in model.modules():
            if not isinstance(module, nn.Linear) or module.weight.device.type != "cpu":
                continue
            w = module.weight
            if w.is_contiguous() and w.shape[0] >= w.shape[1]:
                w.data = w.data.t().contiguous().t()
    return model
