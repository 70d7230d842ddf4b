"""The logit lens (X1): what each layer would predict if the model stopped there.

A pre-norm Transformer adds every block's contribution to one residual stream, and only
the final norm and the vocabulary head turn the last stream into logits. Applying that
same norm and head to the stream after block l,

    logits_l = W_U · norm(h_l),      l = 0 (embeddings) .. n_layer (the real output),

shows how the prediction forms across depth: the rank and probability of the token the
model finally predicts, per layer, and the top tokens each layer already favours. The
last row equals the model's own logits. (Early layers were never trained to be read this
way, so their "predictions" are often the input token or noise; tuned lenses learn a
per-layer translator to fix that, this is the plain lens.)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .capture import check_language_model, residual_streams


@dataclass
class LogitLens:
    """Logit-lens readings of one prompt (layer 0 = embeddings, layer n_layer = the output).

    top_ids / top_probs [n_layer + 1, T, k]: each layer's top tokens per position.
    final_ids [T]: the model's own top prediction per position.
    final_rank / final_prob [n_layer + 1, T]: rank (0 = top) and probability of that
    prediction as each layer reads it.
    target / target_rank / target_prob [n_layer + 1]: the same for one target token at
    the last position (the model's top prediction there unless another was asked for).
    """

    top_ids: torch.Tensor
    top_probs: torch.Tensor
    final_ids: torch.Tensor
    final_rank: torch.Tensor
    final_prob: torch.Tensor
    target: int
    target_rank: torch.Tensor
    target_prob: torch.Tensor

    @property
    def n_layers(self) -> int:
        return self.top_ids.shape[0] - 1

    def first_layer_on_top(self) -> int | None:
        """The first layer from which the target stays the lens's top token (None: only never)."""
        on_top = (self.target_rank == 0).tolist()
        for layer in range(len(on_top)):
            if all(on_top[layer:]):
                return layer
        return None


def read_stream(model, stream: torch.Tensor) -> torch.Tensor:
    """Logits from a residual stream [..., D] through the model's final norm and head (float32)."""
    with torch.no_grad():
        return model.lm_head(model.norm(stream)).float()


def logit_lens(model, ids: torch.Tensor, target: int | None = None, top_k: int = 5) -> LogitLens:
    """The logit lens of one prompt `ids` [1, T] (or [T])."""
    check_language_model(model)
    if ids.dim() == 1:
        ids = ids.unsqueeze(0)
    logits, streams = residual_streams(model, ids)
    final_ids = logits[0].argmax(-1)  # [T]
    if target is None:
        target = int(final_ids[-1])
    positions = torch.arange(ids.shape[1])
    top_ids, top_probs, final_rank, final_prob, target_rank, target_prob = [], [], [], [], [], []
    for stream in streams[:, 0]:  # one layer at a time: [T, V] is small, [n_layer, T, V] may not be
        layer_logits = read_stream(model, stream)
        probs = layer_logits.softmax(-1)
        top = probs.topk(min(top_k, probs.shape[-1]), dim=-1)
        top_ids.append(top.indices)
        top_probs.append(top.values)
        chosen = layer_logits[positions, final_ids]
        final_rank.append((layer_logits > chosen[:, None]).sum(-1))
        final_prob.append(probs[positions, final_ids])
        target_rank.append((layer_logits[-1] > layer_logits[-1, target]).sum())
        target_prob.append(probs[-1, target])
    return LogitLens(torch.stack(top_ids), torch.stack(top_probs), final_ids, torch.stack(final_rank),
                     torch.stack(final_prob), target, torch.stack(target_rank), torch.stack(target_prob))
