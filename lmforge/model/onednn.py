"""float32 matrix products through oneDNN, with autograd, for training on CPU.

PyTorch's CPU wheels send float32 `mm`/`F.linear` to MKL. On the 2-core AMD EPYC machines
we benchmark on, oneDNN (which the same wheels ship for their mkldnn ops) runs the
products of a training step faster, with the same float32 arithmetic (no reduced-precision
mode; results differ from MKL's only in summation order, about 1e-6 relative). For the
shapes of benchmarks/train.py, the forward product x W^T and the input gradient dy W took
5-20% less CPU time on one thread and 7-45% less wall time on two (MKL's two-thread
speed-up on these small matrices is poor); those figures are from a Zen 4 EPYC. There
the weight gradient dy^T x was no faster in any layout we tried; on a Zen 5 EPYC oneDNN
computes it 1.2-2x faster than MKL, so it goes through oneDNN as well (`weight_grad`).

`linear` is what the Transformer's training forward calls in place of `F.linear`. It
falls back to `F.linear` wherever oneDNN's op is missing or the tensors are not float32 on
CPU, so other devices and dtypes see no difference. Inside `bf16_products` (or CPU
autocast to bf16) it runs `_LinearBF16` instead: bf16 products on a bf16 copy of the
weight made once per forward (`bf16_weight`), with a float32 result
(lmforge/model/precision.py says when).
Decoder inference never comes here: outside training the model calls its `nn.Linear`
modules directly (see `project`), so lmforge.infer.layout's kernels still apply.

Encoder inference (`Transformer.encode_packed`: embeddings, the reranker) uses the
`packed_*` functions: oneDNN products whose weights were reordered once into oneDNN's
blocked layout (`packed_weight`), with the bias, the GELU or the residual add applied as
the product's results are written (post-ops). Unfused, a [tokens, 1536] feed-forward
activation is written by the product, read and rewritten by the bias, read and rewritten
by GELU; fused it is written once. With plain weights oneDNN reorders every weight at
every call, which costs what the fusion saves (the reason an earlier unpacked version of
this gained nothing); with the packed copy one layer's feed-forward ran 1.10x faster than
MKL's products plus separate passes on a loaded machine, while end to end the gain is
within the noise of a shared machine (docs/benchmarks.md, sentence embeddings). Values
equal the unfused ones up to float rounding (summation order, about 1e-6 relative).
"""

from __future__ import annotations

import contextlib
import functools
import threading
import weakref
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn


@functools.cache
def available() -> bool:
    """Whether this PyTorch build has oneDNN's linear op and it runs on plain (unpacked) weights."""
    try:
        op = torch.ops.mkldnn._linear_pointwise
        out = op(torch.ones(2, 3), torch.ones(4, 3).t().contiguous().t(), None, "none", [], "")
        return bool(torch.equal(out, torch.full((2, 4), 3.0)))
    except (AttributeError, RuntimeError, NotImplementedError):
        return False


def mm_nt(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b.T for 2-D float32 CPU tensors (no autograd); b may be any strided view."""
    return torch.ops.mkldnn._linear_pointwise(a, b, None, "none", [], "")


def transposed_weight_grad_is_cheaper(rows: int, n_out: int, n_in: int) -> bool:
    """Whether dW = dy^T x is cheaper as (x^T dy)^T for dy [rows, n_out], x [rows, n_in].

    oneDNN reads its second operand through any strides but wants the first one
    contiguous, so a transpose is copied either way: dy^T (rows * n_out floats), or x^T
    plus the [n_in, n_out] result turned back (n_in * (rows + n_out)). The copies, not
    the arithmetic, differ; for a vocabulary head (n_out >> n_in) the second way halves
    them, and in benchmarks/train.py it made the whole step about 15% faster.
    """
    return n_in * (rows + n_out) < rows * n_out


def weight_grad_product(grad: torch.Tensor, x: torch.Tensor, transposed: bool) -> torch.Tensor:
    """grad^T x, or with ``transposed`` its transpose x^T grad, both contiguous (see below).

    A caller summing several products (the fused loss, chunk by chunk) sums them in one
    layout and turns the sum back once.
    """
    return mm_nt(x.t().contiguous(), grad.t()) if transposed else mm_nt(grad.t(), x.t())


def weight_grad(grad: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """dW = grad^T x for grad [rows, n_out] and x [rows, n_in] (2-D float32 CPU), contiguous.

    On the CPUs we measured, oneDNN computes this product faster than MKL's `torch.mm` on
    the transposed view (about 1.2-2x for the shapes of benchmarks/train.py on a Zen 5
    EPYC), whichever transpose it copies; see `transposed_weight_grad_is_cheaper`.
    """
    transposed = transposed_weight_grad_is_cheaper(grad.shape[0], grad.shape[1], x.shape[1])
    product = weight_grad_product(grad, x, transposed)
    return product.t().contiguous() if transposed else product


# Set to False to train with PyTorch's default kernels (e.g. to compare the two).
ENABLED = True


def usable(*tensors: torch.Tensor) -> bool:
    """float32 CPU tensors, oneDNN present, and no autocast (which would want its own dtype)."""
    return (ENABLED and not torch.is_autocast_enabled("cpu") and available()
            and all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors))


class _Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        grad = grad.contiguous()
        # dx = dy W = dy (W^T)^T: the weight's transposed view is read in place.
        grad_x = mm_nt(grad, weight.t()) if ctx.needs_input_grad[0] else None
        grad_w = weight_grad(grad, x) if ctx.needs_input_grad[1] else None
        grad_b = grad.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_x, grad_w, grad_b


# -- bf16 products under CPU autocast ------------------------------------------------------

# id(weight) -> (weakref, (data pointer, version), bf16 copy), as _PACKED below.
_BF16: dict[int, tuple[weakref.ref, tuple[int, int], torch.Tensor]] = {}


def bf16_weight(w: torch.Tensor) -> torch.Tensor:
    """A bfloat16 copy of the float32 tensor `w`.

    Inside a `bf16_products` block the copy is made once per block: a training forward
    and its backward (and a tied embedding used by the lookup and the head) share it.
    That block ends before the optimizer steps, so no copy outlives a weight update;
    the version counter cannot tell, because the fused AdamW kernel writes the weights
    without moving it. Outside (inference: lmforge/infer/bf16_prefill.py) the copy is
    kept until `w` changes (another storage, or its version counter moved).
    """
    local = getattr(_STATE, "copies", None)
    if local is not None:
        cached = local.get(id(w))
        if cached is None or cached[0] is not w:
            with torch.no_grad():
                cached = local[id(w)] = (w, w.detach().to(torch.bfloat16))
        return cached[1]
    if torch.is_grad_enabled() and w.requires_grad:  # training under plain autocast: a fresh copy
        return w.detach().to(torch.bfloat16)
    key = (w.data_ptr(), w._version)
    cached = _BF16.get(id(w))
    if cached is None or cached[0]() is not w or cached[1] != key:
        with torch.inference_mode(False), torch.no_grad():
            copy = w.detach().to(torch.bfloat16)
        if cached is None or cached[0]() is not w:
            weakref.finalize(w, _BF16.pop, id(w), None)
        cached = _BF16[id(w)] = (weakref.ref(w), key, copy)
    return cached[2]


_STATE = threading.local()


@contextlib.contextmanager
def bf16_products(enabled: bool = True) -> Iterator[None]:
    """Within this block (this thread), `linear` and lmforge/train/fused_ce.py multiply in
    bf16 and everything else stays float32: the CPU's mixed precision for training.

    Unlike ``torch.autocast``, attention is not cast: PyTorch's CPU flash attention ran
    its backward several times slower on bf16 inputs than on float32 ones (a fifth of a
    small model's step), while its forward gains little at training lengths.

    `torch.utils.checkpoint` restores autocast's state when it recomputes a block during
    the backward, but not this flag: with activation checkpointing use ``torch.autocast``
    (under which `linear` takes the same bf16 path), as lmforge/train/loop.py does.
    """
    previous, copies = getattr(_STATE, "bf16", False), getattr(_STATE, "copies", None)
    _STATE.bf16 = enabled
    if enabled and copies is None:
        _STATE.copies = {}  # this block's bf16 weight copies (`bf16_weight`)
    try:
        yield
    finally:
        _STATE.bf16, _STATE.copies = previous, copies


_GENERATION = threading.local()


@contextlib.contextmanager
def generation_products() -> Iterator[None]:
    """Mark this thread's work inside the block as generation (prefill and decode of the
    scheduler), where a model prepared for it may take its reduced-precision prefill paths
    (lmforge/infer/bf16_prefill.py); outside it, the same layers compute in float32, so a
    likelihood never depends on the CPU's bf16 units."""
    before = getattr(_GENERATION, "on", False)
    _GENERATION.on = True
    try:
        yield
    finally:
        _GENERATION.on = before


def generation_products_on() -> bool:
    """Whether this thread is inside `generation_products`."""
    return getattr(_GENERATION, "on", False)


def bf16_active() -> bool:
    """`bf16_products` is on, or CPU autocast to bf16 is."""
    return getattr(_STATE, "bf16", False) or (torch.is_autocast_enabled("cpu")
                                              and torch.get_autocast_dtype("cpu") == torch.bfloat16)


def bf16_usable(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """bf16 products are on (`bf16_active`) and x, weight are CPU tensors with a float32 weight."""
    return (ENABLED and x.device.type == "cpu" and weight.device.type == "cpu" and weight.dtype == torch.float32
            and x.dtype in (torch.float32, torch.bfloat16) and bf16_active())


class _LinearBF16(torch.autograd.Function):
    """y = x W^T + b with x and W rounded to bf16 and the product summed in float32 by
    oneDNN (AMX / AVX512-BF16 where the CPU has them); y is handed on as float32.

    Plain autocast hands bf16 activations to the next op: RMSNorm, RoPE, SwiGLU and the
    residual adds then run on bf16 tensors, which the CPU converts element by element
    (slower than float32 here, and it rounds the residual stream). Returning float32
    keeps every op but the products in float32, as on a GPU with fp32 master weights.
    The bf16 weight is the block's copy (`bf16_weight`); the weight gradient is rounded
    to bf16 by the product and accumulated in float32, as autocast's is.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
        xb, wb = x.to(torch.bfloat16), bf16_weight(weight)
        with torch.autocast("cpu", enabled=False):
            out = torch.mm(xb, wb.t()).float()
        if bias is not None:
            out += bias
        ctx.save_for_backward(xb, wb)  # the copy, not the weight: the backward runs after the block
        ctx.has_bias, ctx.x_dtype = bias is not None, x.dtype
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        xb, wb = ctx.saved_tensors
        gb = grad.to(torch.bfloat16)
        grad_x = grad_w = grad_b = None
        with torch.autocast("cpu", enabled=False):
            if ctx.needs_input_grad[0]:
                grad_x = torch.mm(gb, wb).to(ctx.x_dtype)
            if ctx.needs_input_grad[1]:
                grad_w = torch.mm(gb.t(), xb).float()
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad.sum(0)
        return grad_x, grad_w, grad_b


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear(x, weight, bias)`, computed by oneDNN when x and weight are float32 CPU tensors;
    under CPU bf16 autocast, as bf16 products with a cached bf16 weight and a float32 result."""
    if x.numel() and bf16_usable(x, weight):
        flat = x.reshape(-1, x.shape[-1])
        return _LinearBF16.apply(flat, weight, bias).view(*x.shape[:-1], weight.shape[0])
    if not usable(x, weight) or x.numel() == 0:
        return F.linear(x, weight, bias)
    flat = x.reshape(-1, x.shape[-1]).contiguous()
    return _Linear.apply(flat, weight, bias).view(*x.shape[:-1], weight.shape[0])


def project(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """`layer(x)`, except that a training forward (train mode, autograd on) uses `linear`.

    Everything else calls the module itself, so inference keeps whatever forward the
    module has (lmforge.infer.layout swaps in its own kernels by changing the class).
    """
    if layer.training and torch.is_grad_enabled() and isinstance(layer, nn.Linear):
        return linear(x, layer.weight, layer.bias)
    return layer(x)


# -- encoder inference: packed weights, fused epilogues --------------------------------

# id(weight) -> (weakref to the weight, (data pointer, version), packed copy); an entry
# leaves when its weight is freed. (Tensors compare element-wise, so they cannot be the
# keys of a WeakKeyDictionary.)
_PACKED: dict[int, tuple[weakref.ref, tuple[int, int], torch.Tensor]] = {}


@functools.cache
def fused_inference_available() -> bool:
    """Whether this build runs oneDNN's linear op on packed weights with GELU and add epilogues,
    and gets the unfused values (checked once, on small random matrices)."""
    if not available():
        return False
    try:
        g = torch.Generator().manual_seed(0)
        x, w, b = torch.randn(5, 16, generator=g), torch.randn(24, 16, generator=g), torch.randn(24, generator=g)
        other = torch.randn(5, 24, generator=g)
        with torch.no_grad():
            packed = torch.ops.mkldnn._reorder_linear_weight(w)
            plain = torch.ops.mkldnn._linear_pointwise(x, packed, b, "none", [], "")
            gelu = torch.ops.mkldnn._linear_pointwise(x, packed, b, "gelu", [], "none")
            gelu_tanh = torch.ops.mkldnn._linear_pointwise(x, packed, b, "gelu", [], "tanh")
            added = torch.ops.mkldnn._linear_pointwise.binary(x, other, packed, b, "add")
            ref = F.linear(x, w, b)
        close = functools.partial(torch.allclose, rtol=1e-5, atol=1e-5)
        return (close(plain, ref) and close(gelu, F.gelu(ref)) and close(gelu_tanh, F.gelu(ref, approximate="tanh"))
                and close(added, ref + other))
    except (AttributeError, RuntimeError, NotImplementedError):
        return False


def packed_usable(x: torch.Tensor, *layers: nn.Linear) -> bool:
    """Inference (no autograd) on a 2-D float32 CPU tensor, oneDNN's fused ops present."""
    return (ENABLED and x.dim() == 2 and x.numel() > 0 and x.device.type == "cpu" and x.dtype == torch.float32
            and all(isinstance(m, nn.Linear) for m in layers)  # adapter wrappers run their own forward
            and not (torch.is_grad_enabled() and (x.requires_grad or any(m.weight.requires_grad for m in layers)))
            and not torch.is_autocast_enabled("cpu")
            and all(m.weight.dtype == torch.float32 and m.weight.device.type == "cpu" for m in layers)
            and fused_inference_available())


def packed_weight(layer: nn.Linear) -> torch.Tensor:
    """oneDNN's blocked copy of `layer.weight`, made on first use and remade whenever the
    weight changes (another tensor, or its version counter moved: an optimizer step or any
    in-place write). Kept beside the module, not in it: state_dict and copies never see it."""
    w = layer.weight
    key = (w.data_ptr(), w._version)
    cached = _PACKED.get(id(w))
    if cached is None or cached[0]() is not w or cached[1] != key:
        with torch.inference_mode(False), torch.no_grad():
            packed = torch.ops.mkldnn._reorder_linear_weight(w.detach())
        if cached is None or cached[0]() is not w:
            weakref.finalize(w, _PACKED.pop, id(w), None)
        cached = _PACKED[id(w)] = (weakref.ref(w), key, packed)
    return cached[2]


def _bias(layer: nn.Linear) -> torch.Tensor | None:
    return None if layer.bias is None else layer.bias.detach()


def packed_linear(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """`layer(x)` for x [rows, in] (see `packed_usable`), bias added as results are written."""
    return torch.ops.mkldnn._linear_pointwise(x.contiguous(), packed_weight(layer), _bias(layer), "none", [], "")


def packed_linear_gelu(layer: nn.Linear, x: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    """`gelu(layer(x))` with bias and GELU (erf, or tanh with approximate="tanh") in the product's epilogue."""
    return torch.ops.mkldnn._linear_pointwise(x.contiguous(), packed_weight(layer), _bias(layer), "gelu", [],
                                              approximate)


def packed_linear_add(layer: nn.Linear, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """`layer(x) + residual` (a residual connection) in the product's epilogue."""
    return torch.ops.mkldnn._linear_pointwise.binary(x.contiguous(), residual.contiguous(), packed_weight(layer),
                                                     _bias(layer), "add")
