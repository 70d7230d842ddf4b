"""Max-activating examples of feed-forward neurons (X1): which tokens in a corpus make a
neuron fire most.

A neuron here is one channel of a block's feed-forward hidden layer, the value that
enters the down projection (`mlp.proj`): GELU(x W_1) or, in SwiGLU models,
SiLU(x W_gate) * (x W_up). A pre-hook on `mlp.proj` reads it for every token; the tokens
with the highest values, shown in their context, are the classic first look at what a
neuron responds to (with the caveat that most neurons respond to several unrelated
things, superposition, so a handful of top examples can mislead).
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

import torch

from lmforge.errors import LmforgeError

from .capture import hooked


@dataclass
class Activation:
    value: float
    text: int  # index of the text in the corpus
    position: int  # token position inside it
    context: str  # the tokens up to and including the activating one (the model is causal)
    token: str


def check_neuron(model, layer: int, neuron: int):
    """The down projection whose input holds the neuron, or an error naming the valid range."""
    if not 0 <= layer < len(model.layers):
        raise LmforgeError(f"layer {layer} is out of range (0..{len(model.layers) - 1})")
    proj = getattr(model.layers[layer].mlp, "proj", None)
    if proj is None:
        raise LmforgeError("max-activating examples need a dense feed-forward layer (this block is a mixture of experts)")
    if not 0 <= neuron < proj.in_features:
        raise LmforgeError(f"neuron {neuron} is out of range (0..{proj.in_features - 1})")
    return proj


def max_activating(model, tokenizer, texts: list[str], layer: int, neuron: int, top: int = 10,
                   context_tokens: int = 12, max_tokens: int = 128, batch_size: int = 16) -> list[Activation]:
    """The `top` highest activations of one neuron over `texts`, highest first."""
    proj = check_neuron(model, layer, neuron)
    seen: dict[str, torch.Tensor] = {}

    def grab(module, args):
        seen["h"] = args[0][..., neuron].float()

    encoded = [tokenizer.encode(text, add_special_tokens=False)[:max_tokens] for text in texts]
    order = sorted((i for i in range(len(texts)) if encoded[i]), key=lambda i: len(encoded[i]))
    heap: list[tuple[float, int, int]] = []
    device = next(model.parameters()).device
    with hooked([lambda: proj.register_forward_pre_hook(grab)]), torch.no_grad():
        for first in range(0, len(order), batch_size):
            rows = order[first:first + batch_size]  # similar lengths: little padding
            width = max(len(encoded[i]) for i in rows)
            ids = torch.zeros(len(rows), width, dtype=torch.long)
            mask = torch.zeros(len(rows), width, dtype=torch.long)
            for r, i in enumerate(rows):
                ids[r, :len(encoded[i])] = torch.tensor(encoded[i])
                mask[r, :len(encoded[i])] = 1
            model.encode(ids.to(device), attention_mask=mask.to(device))  # causal, padding masked
            values = seen["h"].cpu()
            for r, i in enumerate(rows):
                for position, value in enumerate(values[r, :len(encoded[i])].tolist()):
                    item = (value, i, position)
                    if len(heap) < top:
                        heapq.heappush(heap, item)
                    elif item > heap[0]:
                        heapq.heapreplace(heap, item)
    out = []
    for value, index, position in sorted(heap, reverse=True):
        ids = encoded[index]
        out.append(Activation(value, index, position,
                              tokenizer.decode(ids[max(0, position - context_tokens + 1):position + 1]),
                              tokenizer.decode(ids[position:position + 1])))
    return out
