"""Training-path versions of the model's elementwise blocks, each one autograd function.

Plain autograd records every small op of RMSNorm, the rotary embedding and SwiGLU as a
node of its own, and each node's backward reads and writes a whole [tokens, features]
tensor: in a profile of a LoRA step of the default model these ops, their `cat`/split
copies and zero fills took about 7% of the step (benchmarks/finetune_profile.py,
docs/benchmarks.md). The functions here compute the same values
with hand-written backwards that make fewer passes, save less and copy nothing:

* `rms_norm`: forward through PyTorch's fused kernel (which also returns 1/rms); the
  backward is  dx = r (g w) - x r^3 mean(g w x)  (r = 1/rms over the last dimension),
  three passes where autograd's decomposed backward ran about ten ops, and the weight
  gradient sum(g x r) only when the weight trains.
* `rotary_qkv`: the fused q/k/v projection's output -> rotated q, k and the v view, the
  layout attention takes. RoPE rotates each pair (x1, x2) = (x[i], x[i + d/2]) by the
  token's angle a:  (x1 cos a - x2 sin a, x2 cos a + x1 sin a);  no `cat` of the rotated
  half. Its backward is the inverse rotation (angle -a) written straight into one
  [batch, tokens, heads, d] buffer, which is the gradient of the projection's output:
  no split/cat of the q/k/v gradients and no copy to make them contiguous.
* `swiglu`: the fused gate/up output h = [gate | up] -> silu(gate) * up. The backward
  writes both halves of dh into one buffer (no chunk/cat): d up = g silu(gate) and
  d gate = g up silu'(gate), saving only h (autograd saved gate, silu(gate) and up).

They are used only when a backward will run (`wants_grad`); inference and generation
(no_grad / inference_mode) keep the plain ops and their outputs bit for bit. Values equal
the plain ops' up to float rounding (tests/test_fused_training_ops.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Switch for comparing paths (benchmarks/finetune.py's `plain-model` variant).
ENABLED = True


def wants_grad(*tensors: torch.Tensor | None) -> bool:
    """A backward will run through these tensors: autograd on and one of them requires grad."""
    return ENABLED and torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


# -- RMSNorm ---------------------------------------------------------------------------

def _rms_forward(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, 1/rms [..., 1]) of x over its last dimension."""
    fused = getattr(torch.ops.aten, "_fused_rms_norm", None)
    if fused is not None and x.device.type == "cpu":
        y, rstd = fused(x, [x.shape[-1]], weight, eps)
        return y, rstd
    rstd = torch.rsqrt(x.pow(2).mean(-1, keepdim=True).add_(eps))
    y = x * rstd
    return (y.mul_(weight) if weight is not None else y), rstd


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        y, rstd = _rms_forward(x, weight, eps)
        ctx.save_for_backward(x, weight, rstd)
        return y

    @staticmethod
    def backward(ctx, grad):
        x, weight, rstd = ctx.saved_tensors
        gw = grad * weight if weight is not None else grad
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            # d/dx of x r w: r (g w) - x r^3 <g w, x> / D, per row
            coef = (gw * x).sum(-1, keepdim=True).mul_(rstd.pow(3)).div_(-x.shape[-1])
            grad_x = (gw.mul_(rstd) if weight is not None else gw * rstd).addcmul_(x, coef)
        if weight is not None and ctx.needs_input_grad[1]:
            grad_w = (grad * x * rstd).reshape(-1, x.shape[-1]).sum(0)
        return grad_x, grad_w, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float | None) -> torch.Tensor:
    """`F.rms_norm(x, (D,), weight, eps)` with the backward above."""
    if eps is None:
        eps = torch.finfo(x.dtype).eps
    return _RMSNorm.apply(x, weight, eps)


# -- rotary q/k --------------------------------------------------------------------------

def _rotate_into(out: torch.Tensor, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """out = x rotated by (cos, sin) (half tables [.., d/2]; a negative sin rotates back)."""
    half = x.shape[-1] // 2
    x1, x2, o1, o2 = x[..., :half], x[..., half:], out[..., :half], out[..., half:]
    torch.mul(x1, cos, out=o1)
    o1.addcmul_(x2, sin, value=-1)
    torch.mul(x2, cos, out=o2)
    o2.addcmul_(x1, sin)


class _RotaryQKV(torch.autograd.Function):
    @staticmethod
    def forward(ctx, qkv, cos, sin, n_head, n_kv_head, head_dim):
        batch, length, _ = qkv.shape
        heads = qkv.view(batch, length, n_head + 2 * n_kv_head, head_dim)
        qk = torch.empty(batch, length, n_head + n_kv_head, head_dim, dtype=qkv.dtype, device=qkv.device)
        _rotate_into(qk.transpose(1, 2), heads[:, :, :n_head + n_kv_head].transpose(1, 2), cos, sin)
        q, k = qk.transpose(1, 2).split((n_head, n_kv_head), dim=1)
        v = heads[:, :, n_head + n_kv_head:].transpose(1, 2)
        ctx.save_for_backward(cos, sin)
        ctx.sizes = (n_head, n_kv_head, head_dim)
        return q, k, v

    @staticmethod
    def backward(ctx, grad_q, grad_k, grad_v):
        cos, sin = ctx.saved_tensors
        n_head, n_kv_head, head_dim = ctx.sizes
        some = next(g for g in (grad_q, grad_k, grad_v) if g is not None)
        batch, length = some.shape[0], some.shape[2]
        grad = torch.empty(batch, length, n_head + 2 * n_kv_head, head_dim, dtype=some.dtype, device=some.device)
        heads = grad.transpose(1, 2)  # [B, heads, L, d] view of the [B, L, heads, d] buffer
        neg_sin = None
        for g, lo, hi in ((grad_q, 0, n_head), (grad_k, n_head, n_head + n_kv_head)):
            if g is None:
                heads[:, lo:hi].zero_()
            else:
                neg_sin = -sin if neg_sin is None else neg_sin
                _rotate_into(heads[:, lo:hi], g, cos, neg_sin)  # the inverse rotation
        if grad_v is None:
            heads[:, n_head + n_kv_head:].zero_()
        else:
            heads[:, n_head + n_kv_head:].copy_(grad_v)
        return grad.view(batch, length, -1), None, None, None, None, None


def rotary_qkv(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, n_head: int, n_kv_head: int,
               head_dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The fused projection's output qkv [B, L, (n_head + 2 n_kv_head) d] -> q [B, n_head, L, d],
    k and v [B, n_kv_head, L, d], q and k rotated by the rotate-half tables cos/sin
    [B|1, 1, L, d] (whose two halves are equal, as `RotaryTable` builds them)."""
    half = head_dim // 2
    return _RotaryQKV.apply(qkv, cos[..., :half], sin[..., :half], n_head, n_kv_head, head_dim)


# -- SwiGLU ------------------------------------------------------------------------------

class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h):
        gate, up = h.chunk(2, dim=-1)
        ctx.save_for_backward(h)
        return F.silu(gate).mul_(up)

    @staticmethod
    def backward(ctx, grad):
        (h,) = ctx.saved_tensors
        gate, up = h.chunk(2, dim=-1)
        grad_h = torch.empty_like(h)
        grad_gate, grad_up = grad_h.chunk(2, dim=-1)
        torch.mul(grad, up, out=grad_gate)
        torch.ops.aten.silu_backward.grad_input(grad_gate, gate, grad_input=grad_gate)  # * silu'(gate)
        torch.ops.aten.silu.out(gate, out=grad_up)
        grad_up.mul_(grad)
        return grad_h


def swiglu(h: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for h = [gate | up] along the last dimension."""
    return _SwiGLU.apply(h)
