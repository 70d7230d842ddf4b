"""AWQ (Lin, Tang, Tang, Yang, Gan, Han 2023, "AWQ: Activation-aware Weight Quantization for
LLM Compression and Acceleration") onto a GGUF block grid.

A few input channels of each linear layer carry much larger activations than the rest, and
the rounding error of their weights costs the most. Multiplying input channel c of W by
s_c > 1 before rounding (and the input x_c by 1/s_c) keeps the product X W^T the same in
exact arithmetic while the weights that matter get a finer relative grid:

    y = (X diag(s)^-1) Q(W diag(s))^T,   s = mean|x|^alpha  (normalized around 1)

alpha is searched per layer group on a grid (0 is plain rounding), minimizing the output
error ||X W^T - X (Q(W diag(s)) diag(s)^-1)^T||^2 = tr(E X^T X E^T), with
E = W - Q(W s) / s; the Gram matrix X^T X holds every calibration token, so the search is
cheap whatever the amount of text. The 1/s is folded into what produces x, so the saved
model is an ordinary one:

- attention norm -> q, k, v (the norm's weight, and bias, divided by s)
- v -> attention output (rows of v divided by s; with grouped-query attention a v row
  feeds all query heads of its group, so their channels share one scale)
- MLP norm -> gate and up
- up -> down (the SwiGLU product is linear in up; a GELU MLP has no such group)
"""

from __future__ import annotations

import torch

from .quantize import Grid, QuantizedTensor, block_linears, input_stats, rtn

GROUPS = ("attn.qkv", "attn.out", "mlp.fc", "mlp.proj")  # the layer each scale group's search measures


def normalized(mean_abs: torch.Tensor, alpha: float) -> torch.Tensor:
    s = mean_abs.clamp(min=1e-5) ** alpha
    return s / (s.max() * s.min()).sqrt()


def output_error(weight: torch.Tensor, gram: torch.Tensor, grid: Grid, s: torch.Tensor) -> float:
    """tr(E G E^T) for E = W - Q(W diag(s)) diag(s)^-1."""
    e = weight - rtn(weight * s, grid).dequantize() / s
    return float(((e @ gram) * e).sum())


def search_alpha(weight: torch.Tensor, gram: torch.Tensor, mean_abs: torch.Tensor, grid: Grid, points: int,
                 tie=None) -> tuple[float, torch.Tensor, float, float]:
    """(best alpha, its scales, its error, the error of alpha = 0) over alpha = 0, 1/points, ..., (points-1)/points.
    `tie` maps scales before use (grouped-query v -> output channels share them)."""
    best = None
    plain = None
    for k in range(points):
        alpha = k / points
        s = normalized(mean_abs, alpha)
        s = tie(s) if tie is not None else s
        err = output_error(weight, gram, grid, s)
        if k == 0:
            plain = err
        if best is None or err < best[2]:
            best = (alpha, s, err)
    return best[0], best[1], best[2], plain


# ------------------------------------------------------------------------ folding scales
@torch.no_grad()
def fold_norm(norm, layers, s: torch.Tensor) -> None:
    """norm(x) / s feeds layers whose input columns are multiplied by s."""
    norm.weight.div_(s)
    if getattr(norm, "bias", None) is not None:
        norm.bias.div_(s)
    for layer in layers:
        layer.weight.mul_(s)


@torch.no_grad()
def fold_v_out(attn, s_out: torch.Tensor) -> None:
    """Rows of v divided by the scales of their channels, the output product's columns multiplied."""
    group = attn.n_head // attn.n_kv_head
    s_v = s_out.view(attn.n_kv_head, group, attn.head_dim)[:, 0].reshape(-1)
    rows = slice(attn.q_size + attn.kv_size, attn.q_size + 2 * attn.kv_size)
    attn.qkv.weight[rows].div_(s_v.unsqueeze(1))
    if attn.qkv.bias is not None:
        attn.qkv.bias[rows].div_(s_v)
    attn.out.weight.mul_(s_out)


@torch.no_grad()
def fold_up_down(mlp, s: torch.Tensor) -> None:
    """Up rows of the fused gate/up product divided by s, the down product's columns multiplied."""
    width = mlp.proj.in_features
    mlp.fc.weight[width:].div_(s.unsqueeze(1))
    if mlp.fc.bias is not None:
        mlp.fc.bias[width:].div_(s)
    mlp.proj.weight.mul_(s)


def tie_groups(attn):
    """Scales of the output product's input channels made equal across the query heads of a KV group."""
    group = attn.n_head // attn.n_kv_head

    def tie(s: torch.Tensor) -> torch.Tensor:
        per_kv = s.view(attn.n_kv_head, group, attn.head_dim).mean(1, keepdim=True)
        return per_kv.expand(attn.n_kv_head, group, attn.head_dim).reshape(-1)
    return tie


def foldable(block, name: str) -> bool:
    if name in ("attn.qkv", "mlp.fc"):
        return True
    if name == "attn.out":
        return True  # v rows exist in every decoder block here
    return bool(getattr(block.mlp, "swiglu", False))  # mlp.proj: only when the MLP is linear in up


@torch.no_grad()
def awq_block(block, xs, extra, grid: Grid, options, config) -> dict:
    """Search and fold one block's scales (all from the block's float activations), then round to nearest."""
    layers = block_linears(block)
    stats = input_stats(block, layers, xs, extra, mean_abs=True)
    alphas = {}
    gains = {}
    for name in GROUPS:
        if name not in layers or not foldable(block, name):
            continue
        gram, mean_abs, _ = stats[name]
        if name == "attn.qkv" or name == "mlp.fc":
            weight = layers[name].weight.float()
            alpha, s, err, plain = search_alpha(weight, gram, mean_abs, grid, options.awq_grid)
            fold_norm(block.attn_norm if name == "attn.qkv" else block.mlp_norm, [layers[name]], s)
        elif name == "attn.out":
            alpha, s, err, plain = search_alpha(layers[name].weight.float(), gram, mean_abs, grid, options.awq_grid,
                                                tie=tie_groups(block.attn))
            fold_v_out(block.attn, s)
        else:
            alpha, s, err, plain = search_alpha(layers[name].weight.float(), gram, mean_abs, grid, options.awq_grid)
            fold_up_down(block.mlp, s)
        alphas[name] = alpha
        gains[name] = err / plain if plain else 1.0
    tensors = {}
    for name, layer in layers.items():
        qt: QuantizedTensor = rtn(layer.weight, grid)
        layer.weight.copy_(qt.dequantize())
        tensors[name] = qt
    return {"tensors": tensors, "alphas": alphas, "error_ratio": gains}
