"""Forward hooks on lmforge's real Transformer modules: what flows through each block.

The model code has no interpretability hooks of its own; PyTorch's module hooks see
every call: a pre-hook on a block sees its input (the residual stream entering it), a
forward hook its output, and a pre-hook on `block.attn` the normalized input, RoPE
tables and mask that attention itself receives. Hooks are always removed, even when the
forward fails.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

import torch

from lmforge.errors import LmforgeError


def check_language_model(model) -> None:
    """The interpretability tools read next-token predictions: they need a causal model with a head."""
    if getattr(model, "lm_head", None) is None or not model.config.causal:
        raise LmforgeError("interpretability needs a decoder language model (causal, with a vocabulary head); "
                           "this one is an encoder")


@contextmanager
def hooked(registrations: list[Callable[[], torch.utils.hooks.RemovableHandle]]) -> Iterator[None]:
    """Register hooks (each a zero-argument call returning a handle) for the duration of a block."""
    handles = []
    try:
        for register in registrations:
            handles.append(register())
        yield
    finally:
        for handle in handles:
            handle.remove()


def residual_streams(model, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits [B, T, V], streams [n_layer + 1, B, T, D]) of one forward.

    Stream 0 is the input of the first block (token embeddings, plus learned positions
    where the model has them); stream i is the output of block i - 1, the last one before
    the final norm, so ``lm_head(norm(streams[-1]))`` are the logits.
    """
    streams: list[torch.Tensor | None] = [None] * (len(model.layers) + 1)

    def first_input(module, args):
        streams[0] = args[0].detach()

    def output_of(index):
        def hook(module, args, out):
            streams[index + 1] = out.detach()
        return hook

    registrations = [lambda: model.layers[0].register_forward_pre_hook(first_input)]
    registrations += [lambda i=i, b=b: b.register_forward_hook(output_of(i)) for i, b in enumerate(model.layers)]
    with hooked(registrations), torch.no_grad():
        logits = model(ids)
    return logits, torch.stack(streams)


@contextmanager
def replaced_embeddings(model, embeddings: torch.Tensor) -> Iterator[None]:
    """Within the block, the token-embedding lookup returns `embeddings` [B, T, D] instead.

    `Transformer.forward` takes token ids only; this lets attribution methods run it on
    embeddings they choose (interpolated, occluded) while the rest of the forward
    (positions, blocks, norm, head) stays the model's own.
    """
    def hook(module, args, out):
        if out.shape != embeddings.shape:
            raise ValueError(f"replacement embeddings {tuple(embeddings.shape)} for a lookup of {tuple(out.shape)}")
        return embeddings.to(out.dtype)

    with hooked([lambda: model.embed.register_forward_hook(hook)]):
        yield
