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

The value rows of the fused q/k/v product get a Hessian of their own. A head's output is
sum_s p_ts v_s = W_v xbar_t with xbar_t = sum_s p_ts x_s, the inputs averaged with the
attention weights, so the error that reaches the rest of the model is E_v xbar_t, not E_v x_t.
The plain H = 2 X^T X weights every token once; attention weights some tokens far more. In
SmolLM2-135M's deeper layers most heads put 70% of their weight on the first position (an
attention sink) whose input is small and unlike the rest: X^T X hardly sees it, so GPTQ pushes
the rounding error into that direction, and the sink's value, which should stay near zero,
becomes noise every query then reads. Each KV head's value rows therefore use
H = 2 Xbar^T Xbar over the query heads that read it (attention weights from the unquantized
q and k), which is that head's output error exactly.
"""

from __future__ import annotations

import torch

from ..errors import LmforgeError
from ..model.attention_pattern import pattern_from_input
from .quantize import BLOCK, Grid, QuantizedTensor, block_linears, input_stats, layer_inputs


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
def value_hessians(block, xs, extra) -> torch.Tensor:
    """H = 2 Xbar^T Xbar / n [n_kv_head, cols, cols] for each KV head's value rows of
    `block.attn.qkv`: xbar_t = sum_s p_ts x_s, the qkv inputs averaged with the attention
    weights of every query head that reads that KV head (from the layer's current weights);
    n counts (query head, token) pairs. `extra` holds each row's (rope, mask, ...) block arguments."""
    attn = block.attn
    n_kv, group = attn.n_kv_head, attn.n_head // attn.n_kv_head
    cols = attn.qkv.in_features
    grams = torch.zeros(n_kv, cols, cols, dtype=torch.float64)
    count = 0
    for inputs, args in zip(layer_inputs(block, "attn.qkv", xs, extra), extra):
        inputs = inputs.float()  # [B, L, cols]
        batch, length, _ = inputs.shape
        probs = pattern_from_input(attn, inputs, args[0], args[1]).probs  # [B, n_head, L, L]
        averaged = probs @ inputs.unsqueeze(1)  # [B, n_head, L, cols]
        per_kv = averaged.view(batch, n_kv, group, length, cols).transpose(0, 1).reshape(n_kv, -1, cols).double()
        grams += per_kv.transpose(1, 2) @ per_kv
        count += batch * group * length
    return (grams * (2.0 / max(1, count))).float()


@torch.no_grad()
def gptq_fused_qkv(attn, hessian: torch.Tensor, values: torch.Tensor, grid: Grid, options) -> QuantizedTensor:
    """GPTQ of `attn.qkv`'s weight: the q and k rows with the inputs' Hessian, each KV head's
    value rows with its attention-weighted one (`values`, from `value_hessians`)."""
    weight = attn.qkv.weight
    parts = [gptq_quantize(weight[:attn.q_size + attn.kv_size], hessian, grid, options.damp, options.block_size,
                           options.act_order)]
    for head, value_hessian in enumerate(values):
        start = attn.q_size + attn.kv_size + head * attn.head_dim
        parts.append(gptq_quantize(weight[start:start + attn.head_dim], value_hessian, grid, options.damp,
                                   options.block_size, options.act_order))
    return QuantizedTensor(torch.cat([p.scales for p in parts]), torch.cat([p.codes for p in parts]), grid)


@torch.no_grad()
def gptq_block(block, xs, extra, grid: Grid, options, config) -> dict:
    """GPTQ of one Transformer block's linears, in the order data reaches them: each layer's
    Hessian is measured with the layers before it in the block already quantized. The value
    rows of attn.qkv use their KV head's attention-weighted Hessian (`value_hessians`)."""
    tensors = {}
    for name, layer in block_linears(block).items():
        gram, _, n = input_stats(block, [name], xs, extra, stop=True)[name]
        hessian = gram * (2.0 / max(1, n))
        if name == "attn.qkv":
            qt = gptq_fused_qkv(block.attn, hessian, value_hessians(block, xs, extra), grid, options)
        else:
            qt = gptq_quantize(layer.weight, hessian, grid, options.damp, options.block_size, options.act_order)
        layer.weight.copy_(qt.dequantize())
        tensors[name] = qt
    return {"tensors": tensors}
