"""Cross-entropy through the output head without keeping the logits (P1).

The usual loss, ``F.cross_entropy(hidden @ W.T, targets)``, materialises logits of
[tokens, vocab] floats, then a log-softmax of the same size, and in the backward pass a
gradient of that size again (plus a zero-filled buffer when the logits were sliced, as
``logits[:, :-1]`` is). With a small model and a large vocabulary these are the biggest
tensors of the step (508 x 8192 floats are 16 MB each), and on CPU each fresh one also
costs page faults: in a profile of benchmarks/train.py, transformers' log-softmax took
18 ms forward and 21 ms backward on one thread, several times what the arithmetic needs.

`linear_cross_entropy` instead walks the tokens in chunks. For each chunk it computes the
logits, turns them into softmax probabilities in place, subtracts 1 at the target
(that is d loss / d logits), and immediately multiplies that into the two gradients
the head needs: d hidden = G W and d W += G^T hidden. Only those gradients are kept for
the backward pass, so one logits-sized buffer per chunk is made and used three times.
The matrix products are the same three autograd would run (forward, input gradient,
weight gradient), on oneDNN where lmforge/model/onednn.py says it is faster; only their
grouping changes, so results equal the plain loss up to float rounding. The price is
memory held from forward to backward: one weight-sized gradient (the optimizer needs it
anyway) and a [tokens, n_embd] one.

Computing gradients in the forward pass would be wasted work when no backward follows
(an evaluation under `torch.no_grad()`); the function notices that and skips them.
"""

from __future__ import annotations

import torch

from lmforge.model import cpu_ops, onednn

from . import frozen_weights

# Rows of logits per chunk: as many as fit in 2**22 floats (16 MB in float32), but at least
# MIN_ROWS. A chunk's three matrix products are only as efficient as they are tall (with
# 128 rows the logits product ran about 10% slower than with 512), so small chunks cost
# speed; big ones cost memory. At 8192 words a 512-token batch is one chunk; at 49152 a
# chunk is 256 rows (48 MB), still a fraction of the full logits autograd would keep.
CHUNK_ELEMENTS = 2**22
MIN_ROWS = 256


def _chunk_rows(vocab: int, rows: int) -> int:
    return max(1, min(rows, max(MIN_ROWS, CHUNK_ELEMENTS // max(vocab, 1))))


class _LinearCrossEntropy(torch.autograd.Function):
    """sum_i scale * CE(hidden[i] @ weight.T, targets[i]); every target must be a real class."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, scale: float,
                grad_enabled: bool):
        rows, vocab = hidden.shape[0], weight.shape[0]
        # needs_input_grad is set from requires_grad even under torch.no_grad(), so the
        # caller passes the grad mode it saw.
        need_hidden = grad_enabled and ctx.needs_input_grad[0]
        need_weight = grad_enabled and ctx.needs_input_grad[1]
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        hidden_parts, grad_weight = [], None
        # Under autocast the head's products run in the autocast dtype, as F.linear's would;
        # the softmax and the loss stay float32. Casting here, once, keeps in-place
        # accumulation below in one dtype.
        device = hidden.device.type
        compute = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype
        if device == "cpu" and onednn.bf16_active():  # bf16 products (onednn.bf16_products), as the other layers
            compute = torch.bfloat16
        out_dtype, ctx.weight_dtype = hidden.dtype, weight.dtype
        if compute == torch.bfloat16 and onednn.bf16_usable(hidden, weight):
            # The block's bf16 copy (lmforge/model/onednn.py `bf16_weight`), shared with
            # any other product of the same weight in this forward.
            weight = onednn.bf16_weight(weight)
        hidden, weight = hidden.to(compute), weight.to(compute)
        step = _chunk_rows(vocab, rows)
        # bf16 logits go through one compiled call (lmforge/model/cpu_ops.py `cross_entropy_rows`)
        # that writes the gradient over them: a chunk's logits then take half the bytes of the
        # float32 ones below, so a chunk holds twice the rows for the same memory (fewer, taller
        # products; at SmolLM2's 49,152 words a 512-token batch is one chunk, and the head's
        # weight gradient one product, widened to float32 once).
        native = (hidden.dtype == torch.bfloat16 and hidden.device.type == "cpu"
                  and cpu_ops.threaded_library() is not None)
        if native:
            step = min(rows, 2 * step)
        with torch.autocast(device, enabled=False):
            # The products on oneDNN where it applies (lmforge/model/onednn.py), the weight
            # gradient in the layout that copies less, summed in it and turned back once.
            dnn = onednn.usable(hidden, weight)
            mm_nt = onednn.mm_nt if dnn else (lambda a, b: torch.mm(a, b.t()))
            transposed = dnn and onednn.transposed_weight_grad_is_cheaper(rows, vocab, hidden.shape[1])
            # W^T for dh = g W: a frozen head (a tied embedding while adapters train) keeps
            # oneDNN's blocked copy of W^T across steps (frozen_weights.py) instead of
            # re-laying the [vocab, n_embd] matrix from its transposed view in every chunk.
            weight_t = weight.t()
            if dnn and need_hidden and not weight.requires_grad and frozen_weights.PACK_HEAD:
                weight_t = frozen_weights.packed(weight, transposed=True)
            for lo in range(0, rows, step):
                h, t = hidden[lo : lo + step], targets[lo : lo + step].unsqueeze(1)
                product = mm_nt(h, weight)
                fused = cpu_ops.cross_entropy_rows(product, t, scale, need_hidden or need_weight) if native else None
                if fused is not None:
                    loss_rows, g = fused  # g: the bf16 gradient, written over the logits
                    total += loss_rows.sum()
                else:
                    logits = product.float()
                    # log-sum-exp with the row maximum taken out, so exp never overflows; the
                    # loss of a row is lse - logit[target].
                    top = logits.amax(dim=1, keepdim=True)
                    target_logit = logits.gather(1, t)
                    probs = logits.sub_(top).exp_()  # in place: the logits are not needed any more
                    sums = probs.sum(dim=1, keepdim=True)
                    total += (sums.log() + top - target_logit).sum()
                    g = None
                    if need_hidden or need_weight:
                        # d(scale * CE)/d logits = scale * (softmax - onehot(target)), built in place.
                        probs.mul_(sums.reciprocal_().mul_(scale))
                        probs.scatter_add_(1, t, torch.full_like(target_logit, -scale))
                        g = probs.to(weight.dtype)
                if g is None:
                    continue
                if need_hidden:
                    hidden_parts.append(mm_nt(g, weight_t))  # dh = g W
                if need_weight:
                    # dW = g^T h, summed over chunks in the weight's dtype; the first chunk
                    # writes it (no zero fill). With `transposed`, the sum is of h^T g = dW^T.
                    part = onednn.weight_grad_product(g, h, transposed) if dnn else torch.mm(g.t(), h)
                    part = part.to(ctx.weight_dtype)
                    grad_weight = part if grad_weight is None else grad_weight.add_(part)
        if transposed and grad_weight is not None:
            grad_weight = grad_weight.t().contiguous()
        grad_hidden = None
        if need_hidden:
            grad_hidden = hidden_parts[0] if len(hidden_parts) == 1 else torch.cat(hidden_parts)
            grad_hidden = grad_hidden.to(out_dtype)
        ctx.save_for_backward(grad_hidden, grad_weight)
        return total * scale

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        grad_hidden, grad_weight = ctx.saved_tensors
        # The usual caller backpropagates the loss itself (gradient exactly 1), and then the
        # stored gradients are final; rescaling the [vocab, n_embd] weight gradient would
        # be one more full pass over it.
        if grad_output.device.type != "cpu" or float(grad_output) != 1.0:
            grad_hidden = None if grad_hidden is None else grad_hidden * grad_output.to(grad_hidden.dtype)
            grad_weight = None if grad_weight is None else grad_weight * grad_output.to(grad_weight.dtype)
        return grad_hidden, grad_weight, None, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         ignore_index: int = -100, reduction: str = "mean") -> torch.Tensor:
    """``F.cross_entropy(hidden @ weight.T, targets, ignore_index, reduction)`` in chunks.

    hidden [N, D], weight [V, D] (an output head without bias), targets [N] class ids.
    Rows whose target is `ignore_index` are dropped before any product is computed, so
    a prompt-masked fine-tuning batch pays only for its counted tokens. The loss is a
    float32 scalar; with "mean" and no counted target it is NaN, as in F.cross_entropy.
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    hidden, targets = hidden.contiguous(), targets.reshape(-1)
    keep = targets != ignore_index
    count = int(keep.sum())
    if count < targets.numel():
        hidden, targets = hidden[keep], targets[keep]
    if count == 0:  # nothing counted: 0 for "sum", 0 / 0 = NaN for "mean" (as F.cross_entropy)
        zero = (hidden.sum() * 0 + weight.sum() * 0).float()  # still attached to the graph
        return zero if reduction == "sum" else zero / 0
    scale = 1.0 / count if reduction == "mean" else 1.0
    return _LinearCrossEntropy.apply(hidden, weight, targets, scale, torch.is_grad_enabled())
