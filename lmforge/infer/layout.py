"""CPU fast path for decoding: weight layout and the matrix-vector kernel.

A decode step multiplies one activation row by every weight matrix, so it is bound by how
fast the weights stream from memory; the arithmetic is negligible. Two choices decide
that speed on a CPU, and both are measured in benchmarks/decode.py and
docs/benchmarks.md:

1. Memory order. `nn.Linear` stores W as [out, in] row-major. Storing the wide matrices
   (out >= in: fused q/k/v, fused gate/up, the vocabulary head) column-major (W.T
   contiguous, W a transposed view) lets the kernel stream rows of W.T; the tall down
   projection stays row-major.
2. The BLAS. PyTorch's CPU wheels call MKL; NumPy's wheels bundle OpenBLAS. For
   matrix-vector products of these shapes, OpenBLAS streamed weights ~1.6x faster on the
   2-core AMD machine we measured (about 30 GB/s against 19 GB/s). `BlasLinear` routes
   single-row float32 products without autograd through NumPy, zero-copy, and leaves
   everything else (training, GPUs, prefill of long prompts) to PyTorch.
   `calibrate` times both kernels on the model's largest matrix at load time and keeps
   PyTorch's wherever NumPy's is not faster.
3. Threads. Two thread pools (PyTorch's OpenMP workers and OpenBLAS's) spinning on two
   cores starve each other: a decode step went from 28 ms to 260 ms. While NumPy does
   the products, the few small element-wise ops left to PyTorch run on one thread
   (`torch_threads_for`), which costs nothing measurable.

Values are identical up to float rounding; parameters, `state_dict()` and saved
checkpoints do not change.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


class BlasLinear(nn.Linear):
    """An `nn.Linear` whose single-row CPU float32 inference calls NumPy's BLAS."""

    # Matrix-vector products only: for several rows OpenBLAS's small-M GEMM measured far
    # slower than MKL's (milliseconds instead of ~0.2 ms for 8 x 576 x 3072).
    max_rows = 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        rows = x.numel() // x.shape[-1] if x.numel() else 0
        if (
            rows == 0
            or rows > self.max_rows
            or x.device.type != "cpu"
            or x.dtype != torch.float32
            or w.dtype != torch.float32
            or (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad))
        ):
            return F.linear(x, w, self.bias)
        out = np.matmul(x.reshape(rows, x.shape[-1]).numpy(), w.detach().t().numpy())
        y = torch.from_numpy(out).view(*x.shape[:-1], w.shape[0])
        return y + self.bias if self.bias is not None else y


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


def use_numpy_blas(model: nn.Module) -> nn.Module:
    """Route the single-row CPU products of every `nn.Linear` in `model` through `BlasLinear`.

    The modules keep their parameters and names; only their class (hence `forward`) changes.
    """
    for module in model.modules():
        if type(module) is nn.Linear:
            module.__class__ = BlasLinear
    return model


def uses_numpy_blas(model: nn.Module) -> bool:
    return any(isinstance(m, BlasLinear) for m in model.modules())


def calibrate(model: nn.Module, trials: int = 5) -> bool:
    """Time PyTorch's and NumPy's matrix-vector product on the largest weight; True if NumPy wins."""
    weights = [m.weight for m in model.modules() if isinstance(m, nn.Linear) and m.weight.device.type == "cpu"]
    if not weights or weights[0].dtype != torch.float32:
        return False
    w = max(weights, key=lambda t: t.numel())
    x = torch.randn(1, w.shape[1])
    best = {"torch": float("inf"), "numpy": float("inf")}
    with torch.inference_mode():
        for _ in range(trials):  # alternate, so a burst of load hits both
            for name in best:
                with torch_threads_for(1 if name == "numpy" else BlasLinear.max_rows + 1):
                    start = time.perf_counter()
                    if name == "torch":
                        F.linear(x, w)
                    else:
                        np.matmul(x.numpy(), w.t().numpy())
                    best[name] = min(best[name], time.perf_counter() - start)
    return best["numpy"] < best["torch"]


def optimize_for_cpu_decoding(model: nn.Module) -> nn.Module:
    """Column-major wide matrices, and NumPy's BLAS for small batches where it measures faster."""
    use_column_major_weights(model)
    if calibrate(model):
        use_numpy_blas(model)
    return model


@contextmanager
def torch_threads_for(rows: int) -> Iterator[None]:
    """One PyTorch thread while NumPy's BLAS does a single-row step (see the module docstring)."""
    if rows > BlasLinear.max_rows:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
