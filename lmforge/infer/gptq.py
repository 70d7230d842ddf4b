"""GPTQ (Frantar, Ashkboos, Hoefler, Alistarh 2022, "GPTQ: Accurate Post-Training Quantization
for Generative Pre-trained Transformers") onto a GGUF block grid.

A linear layer's output error on calibration inputs X is ||X W^T - X Q^T||^2, a quadratic in
each row of W with Hessian H = 2 X^T X. Rounding one input column j of W adds an error e_j
to every row; the other, not yet rounded columns can absorb it: the best update is
-e_j / [H^-1]_jj * [H^-1]_j,: (Optimal Brain Surgeon, one column for all rows at once). GPTQ
rounds the columns in a fixed order and applies that update each time:

- the inverse Hessian of the columns still free is read off one upper Cholesky factor U of
  H^-1 (row j of U, divided by U_jj, is the update for column j), so nothing is re-inverted;
- H gets `damp` x mean(diag H) added to its diagonal first (numerical stability);
- updates are applied lazily: eagerly inside a batch of `block_size` columns, and to the
  rest of the matrix once per batch as one product (the memory traffic is the cost);
- a block of 32 columns (one GGUF block of every row) gets its scale when its first column
  comes up, from the current values of its columns, errors fed so far included;
- act-order rounds the columns with the largest diag(H) (the busiest inputs) first; a
  block's columns are then spread over the order, and its scale is taken from their
  current values when the first of them comes up, with the updates pending in the batch
  applied to them first.
"""

from __future__ import annotations

import torch

from ..errors import LmforgeError
from .quantize import BLOCK, Grid, QuantizedTensor, block_linears, input_stats


def _inverse_factor(hessian: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of (H + damp*mean(diag H)*I)^-1, damping harder if H is not positive definite."""
    n = hessian.shape[0]
    mean = float(torch.diag(hessian).mean())
    eye = torch.eye(n, dtype=hessian.dtype)
    for attempt in range(6):
        lam = damp * mean * (10 ** attempt) if attempt else damp * mean
        factor, info = torch.linalg.cholesky_ex(hessian + lam * eye)
        if int(info) == 0:
            inverse = torch.cholesky_inverse(factor)
            upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
            if int(info) == 0:
                return upper
    raise LmforgeError("the calibration Hessian is not positive definite even with heavy damping; "
                       "use more calibration text")


@torch.no_grad()
def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, grid: Grid, damp: float = 0.01,
                  block_size: int = 128, act_order: bool = False) -> QuantizedTensor:
    """GPTQ of one weight matrix [rows, cols] (cols a multiple of 32) given H = 2 X^T X [cols, cols]."""
    rows, cols = weight.shape
    if cols % BLOCK:
        raise ValueError(f"GPTQ onto GGUF blocks needs a multiple of {BLOCK} columns, got {cols}")
    W = weight.detach().float().clone()
    H = hessian.detach().float().clone()
    dead = torch.diag(H) == 0  # inputs that never fire: their weights do not matter
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    perm = torch.argsort(torch.diag(H), descending=True, stable=True) if act_order else torch.arange(cols)
    W, H = W[:, perm], H[perm][:, perm]
    U = _inverse_factor(H, damp)

    group_of = (perm // BLOCK).tolist()  # file block of each processing position
    members: dict[int, list[int]] = {}
    for position, group in enumerate(group_of):
        members.setdefault(group, []).append(position)
    scales = torch.zeros(rows, cols // BLOCK)
    codes = torch.zeros(rows, cols)  # in processing order
    chosen = [False] * (cols // BLOCK)
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        W1 = W[:, i1:i2].clone()
        err = torch.zeros(rows, i2 - i1)
        U1 = U[i1:i2, i1:i2]
        for j in range(i2 - i1):
            group = group_of[i1 + j]
            if not chosen[group]:
                inside = [p - i1 for p in members[group] if p < i2]
                outside = [p for p in members[group] if p >= i2]
                current = [W1[:, inside]]
                if outside:  # later batches: add the updates this batch owes them so far
                    current.append(W[:, outside] - err[:, :j] @ U[i1:i1 + j, outside])
                scales[:, group] = grid.scale(torch.cat(current, dim=1)).to(torch.float16).float()
                chosen[group] = True
            w, d = W1[:, j], scales[:, group]
            q = grid.codes(w, d)
            codes[:, i1 + j] = q
            e = (w - d * (q - grid.offset)) / U1[j, j]
            W1[:, j:] -= e.unsqueeze(1) * U1[j, j:].unsqueeze(0)
            err[:, j] = e
        W[:, i2:] -= err @ U[i1:i2, i2:]
    ordered = torch.empty_like(codes)
    ordered[:, perm] = codes
    return QuantizedTensor(scales.to(torch.float16), ordered.to(torch.int8), grid)


@torch.no_grad()
def gptq_block(block, xs, extra, grid: Grid, options, config) -> dict:
    """GPTQ of one Transformer block's linears, in the order data reaches them: each layer's
    Hessian is measured with the layers before it in the block already quantized."""
    tensors = {}
    for name, layer in block_linears(block).items():
        gram, _, n = input_stats(block, [name], xs, extra, stop=True)[name]
        hessian = gram * (2.0 / max(1, n))
        qt = gptq_quantize(layer.weight, hessian, grid, options.damp, options.block_size, options.act_order)
        layer.weight.copy_(qt.dequantize())
        tensors[name] = qt
    return {"tensors": tensors}
