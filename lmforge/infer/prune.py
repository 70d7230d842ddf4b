"""Pruning (I5): zero out, or cut out, the weights a model needs least.

Four ways to choose and remove weights of the Transformer's linear layers (q/k/v, the
attention output, the MLP's up/gate and down products; embeddings and the output head
are left whole):

- **magnitude** (unstructured): the smallest |W| of each layer become zero.
- **wanda** (unstructured; Sun et al. 2023, "A Simple and Effective Pruning Approach for
  Large Language Models"): weight i of an output row scores |W_oi| * ||X_i||, the weight's
  size times the L2 norm of its input channel over calibration tokens, and each output
  row loses its lowest-scoring share. A small weight on a channel that carries large
  activations (LLMs have a few such outlier channels) survives; magnitude alone cuts it.
- **n:m semi-structured** (2:4 by default): in every group of m consecutive inputs of a
  row, the n lowest-scoring weights (Wanda's score) become zero: exactly 50% for 2:4, the
  pattern sparse tensor cores of recent GPUs run at up to twice the dense speed.
- **structured**: whole MLP channels (a row of the gate and up products and the matching
  column of the down product) or whole key/value head groups (a KV head with the query
  heads that share it, and their columns of the output product) are removed from every
  layer alike, so the result is a smaller dense model of the same family, with a smaller
  `intermediate_size` or fewer heads, that any runtime loads and that really runs faster.
  A channel scores ||X_c|| * ||W_down[:, c]|| (its activation norm at the down product's
  input times its outgoing weights); a head group the same summed over its columns of the
  attention output product.

Unstructured zeros make a model no faster with dense kernels (the products still read
every zero); they show how much of a model is redundant, and compress well. The
perplexity cost of each method against sparsity is measured by benchmarks/prune.py.
"""

from __future__ import annotations

import dataclasses
from typing import Iterable

import torch
from torch import nn

from ..errors import LmforgeError
from .options import PruneOptions  # noqa: F401  (the options of `prune`; they live apart, free of torch)

def prunable_linears(model) -> dict[str, nn.Linear]:
    """The decoder blocks' linear layers by name (embeddings and head excluded)."""
    if getattr(model.config, "num_experts", 0):
        raise LmforgeError("pruning works on dense models; this one has mixture-of-experts layers")
    out = {}
    for i, block in enumerate(model.layers):
        for name in ("attn.qkv", "attn.out", "mlp.fc", "mlp.proj"):
            layer = block.get_submodule(name)
            if not isinstance(layer, nn.Linear):
                raise LmforgeError(f"layers.{i}.{name} is not a linear layer; this model cannot be pruned here")
            out[f"layers.{i}.{name}"] = layer
    return out


@torch.no_grad()
def input_norms(model, batches: Iterable[torch.Tensor]) -> dict[str, torch.Tensor]:
    """L2 norm of every input channel of every prunable layer over the calibration tokens."""
    layers = prunable_linears(model)
    sums = {name: torch.zeros(layer.in_features, dtype=torch.float64) for name, layer in layers.items()}

    def hook(name):
        def record(_module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            sums[name] += (x * x).sum(0)
        return record

    handles = [layer.register_forward_pre_hook(hook(name)) for name, layer in layers.items()]
    try:
        seen = 0
        for ids in batches:
            model(ids)
            seen += ids.numel()
    finally:
        for h in handles:
            h.remove()
    if not seen:
        raise LmforgeError("no calibration tokens: pruning by activations needs some text")
    return {name: s.sqrt().float() for name, s in sums.items()}


def _score(weight: torch.Tensor, norm: torch.Tensor | None) -> torch.Tensor:
    score = weight.detach().abs().float()
    return score * norm[None, :] if norm is not None else score


def unstructured_masks(model, sparsity: float, norms: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Masks (True: keep) removing `sparsity` of each layer: by |W| over the whole layer when
    `norms` is None (magnitude), else by Wanda's score within each output row."""
    masks = {}
    for name, layer in prunable_linears(model).items():
        score = _score(layer.weight, None if norms is None else norms[name])
        if norms is None:
            k = int(score.numel() * sparsity)
            mask = torch.ones(score.numel(), dtype=torch.bool)
            if k:
                mask[torch.topk(score.flatten(), k, largest=False).indices] = False
            masks[name] = mask.view_as(score)
        else:
            k = int(score.shape[1] * sparsity)
            mask = torch.ones_like(score, dtype=torch.bool)
            if k:
                mask.scatter_(1, torch.topk(score, k, dim=1, largest=False).indices, False)
            masks[name] = mask
    return masks


def nm_masks(model, n: int, m: int, norms: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """n:m masks: in every m consecutive inputs of a row, the n lowest-scoring weights are dropped."""
    masks = {}
    for name, layer in prunable_linears(model).items():
        rows, cols = layer.weight.shape
        if cols % m:
            raise LmforgeError(f"{name} has {cols} inputs, not a multiple of m={m}")
        score = _score(layer.weight, None if norms is None else norms[name]).view(rows, cols // m, m)
        mask = torch.ones_like(score, dtype=torch.bool)
        mask.scatter_(2, torch.topk(score, n, dim=2, largest=False).indices, False)
        masks[name] = mask.view(rows, cols)
    return masks


@torch.no_grad()
def apply_masks(model, masks: dict[str, torch.Tensor]) -> dict[str, float]:
    """Zero the masked-out weights in place; returns each layer's share of zero weights."""
    layers = prunable_linears(model)
    zeros = {}
    for name, mask in masks.items():
        weight = layers[name].weight
        weight.mul_(mask.to(weight.dtype))
        zeros[name] = float((weight == 0).float().mean())
    return zeros


def sparsity_of(model) -> float:
    """Share of exactly-zero weights over the prunable layers."""
    layers = prunable_linears(model).values()
    total = sum(layer.weight.numel() for layer in layers)
    return sum(int((layer.weight == 0).sum()) for layer in layers) / total


# ------------------------------------------------------------------------- structured
def _rebuilt(model, config, state: dict[str, torch.Tensor]):
    """The smaller model from `state` (the untouched tensors copied, so it shares nothing with `model`)."""
    from ..model.checkpoint import build_model

    original = {t.data_ptr() for t in model.state_dict().values()}
    state = {k: v.clone() if v.data_ptr() in original else v for k, v in state.items()}
    return build_model(config, state, model.embed.weight.dtype, model.embed.weight.device)


@torch.no_grad()
def prune_mlp_channels(model, fraction: float, norms: dict[str, torch.Tensor]):
    """A new model with `fraction` of every layer's MLP channels removed (the same count in each layer)."""
    config = model.config
    width = config.intermediate_size
    keep = max(1, int(round(width * (1 - fraction))))
    state = dict(model.state_dict())  # the slices below replace their entries
    for i, block in enumerate(model.layers):
        proj = block.mlp.proj.weight  # [D, I]
        score = norms[f"layers.{i}.mlp.proj"] * proj.float().norm(dim=0)
        kept = torch.topk(score, keep).indices.sort().values
        rows = torch.cat([kept, kept + width]) if block.mlp.swiglu else kept  # gate rows, then up rows
        prefix = f"layers.{i}.mlp."
        state[prefix + "fc.weight"] = block.mlp.fc.weight[rows]
        if block.mlp.fc.bias is not None:
            state[prefix + "fc.bias"] = block.mlp.fc.bias[rows]
        state[prefix + "proj.weight"] = proj[:, kept]
    return _rebuilt(model, dataclasses.replace(config, intermediate_size=keep), state)


@torch.no_grad()
def prune_heads(model, fraction: float, norms: dict[str, torch.Tensor]):
    """A new model with `fraction` of the KV head groups removed from every layer (each with its query heads)."""
    config = model.config
    if config.family == "gpt2":
        raise LmforgeError("the GPT-2 format fixes head_dim = n_embd / n_head, so a GPT-2 model cannot lose heads "
                           "and stay loadable; prune MLP channels instead")
    groups, group, d = config.n_kv_head, config.n_head // config.n_kv_head, config.head_dim
    keep = max(1, int(round(groups * (1 - fraction))))
    state = dict(model.state_dict())  # the slices below replace their entries
    q_size, kv_size = config.q_size, config.kv_size
    for i, block in enumerate(model.layers):
        out = block.attn.out.weight  # [D, q_size]: columns by query head
        column = norms[f"layers.{i}.attn.out"] * out.float().norm(dim=0)
        score = column.view(groups, group * d).sum(1)
        kept = torch.topk(score, keep).indices.sort().values.tolist()
        q_cols = torch.cat([torch.arange(g * group * d, (g + 1) * group * d) for g in kept])
        kv_cols = torch.cat([torch.arange(g * d, (g + 1) * d) for g in kept])
        rows = torch.cat([q_cols, q_size + kv_cols, q_size + kv_size + kv_cols])  # q, k, v rows of the fused qkv
        prefix = f"layers.{i}.attn."
        state[prefix + "qkv.weight"] = block.attn.qkv.weight[rows]
        if block.attn.qkv.bias is not None:
            state[prefix + "qkv.bias"] = block.attn.qkv.bias[rows]
        state[prefix + "out.weight"] = out[:, q_cols]
    smaller = dataclasses.replace(config, n_head=keep * group, n_kv_head=keep, head_dim=d)
    return _rebuilt(model, smaller, state)


def prune(model, options: PruneOptions, calibration: Iterable[torch.Tensor] | None = None):
    """Prune `model` as `options` say: in place for the unstructured kinds (the same model is
    returned), a new smaller model for the structured ones."""
    norms = None
    if options.needs_calibration:
        if calibration is None:
            raise LmforgeError(f"{options.method} pruning needs calibration text")
        norms = input_norms(model, calibration)
    if options.method in ("magnitude", "wanda"):
        apply_masks(model, unstructured_masks(model, options.sparsity, norms))
        return model
    if options.method == "nm":
        apply_masks(model, nm_masks(model, options.n, options.m, norms))
        return model
    if options.method == "channels":
        return prune_mlp_channels(model, options.sparsity, norms)
    return prune_heads(model, options.sparsity, norms)


def calibration_batches(tokenizer, texts: Iterable[str], n_tokens: int, window: int = 512) -> list[torch.Tensor]:
    """Rows of `window` tokens ([1, window] each, the last one shorter) from the texts, `n_tokens` in all."""
    ids: list[int] = []
    for text in texts:
        ids += tokenizer.encode(text)
        if len(ids) >= n_tokens:
            break
    ids = ids[:n_tokens]
    if not ids:
        raise LmforgeError("the calibration text is empty")
    return [torch.tensor([ids[i: i + window]]) for i in range(0, len(ids), window)]
