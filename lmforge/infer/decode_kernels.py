"""A whole decoder layer of a batch-1 decode step in one compiled call, and the float32
matrix-vector product it uses (lmforge/infer/kernels/decode_layer.c).

Between the matrix products of a decode step a layer runs some forty small operations (norms,
views, rotary, cache writes, attention set-up, SiLU, residual adds), each a few microseconds of
Python and PyTorch bookkeeping; on a 135M-parameter model that is a third of the step. The C
file does the layer's whole step with the kernels of lmforge/model/kernels/cpu_ops.c (norm,
decode attention) and either lmforge's int4 products (quant_gemv.c, `q4_decode_layer`) or its
float32 ones (`f32_decode_layer`, `f32_gemv`), which read row-major or column-major weights as
lmforge/infer/layout.py stores them. The float32 layer runs in one OpenMP parallel region: the
products are split over the threads with a barrier after each, everything else runs on one.

Built on first use for this CPU (lmforge/io/native.py); without a compiler `available()` is
False and the modules keep their PyTorch / NumPy paths. `threads` arguments are explicit:
during a decode step PyTorch is set to one thread (lmforge/infer/layout.py,
`torch_threads_for`) while these kernels use the machine's.
"""

from __future__ import annotations

import contextlib
import ctypes
import operator
from pathlib import Path

import torch
from torch import nn
from torch.nn.modules import module as torch_module

from ..io import native
from ..model.kv_cache import KVCache
from ..model.transformer import MLP, Block, RMSNorm
from . import quant_kernels

_FORWARD_HOOKS = operator.attrgetter("_forward_hooks")
_PRE_HOOKS = operator.attrgetter("_forward_pre_hooks")

SOURCE = Path(__file__).parent / "kernels" / "decode_layer.c"
INCLUDES = (quant_kernels.SOURCE, Path(__file__).parents[1] / "model" / "kernels" / "cpu_ops.c")
NAME = "decode_layer"

_p, _i, _f, _l = ctypes.c_void_p, ctypes.c_int, ctypes.c_float, ctypes.c_long
SIGNATURES: native.Signatures = {
    "lmf_q4_decode_layer": (_i, [_p, _i, _p, _p, _f, _p, _p, _p, _p, _p, _i, _i, _i, _i, _p, _p, _p, _p, _l, _i, _p]),
    "lmf_f32_decode_layer": (_i, [_p, _i, _p, _p, _f, _p, _i, _p, _p, _i, _p, _i, _p, _i, _i, _i, _i, _i, _p, _p, _p,
                                  _p, _l, _i, _p, _i]),
    "lmf_f32_gemv": (_i, [_p, _i, _i, _i, _p, _p, _p, _i]),
    "lmf_f32_gemm_rows": (_i, [_p, _i, _i, _p, _l, _i, _p, _p, _l, _i]),
    "lmf_f32_decode_rows_model": (_i, [_p, _i, _i, _i, _p, _f, _i, _i, _i, _i, _p, _p, _l, _p, _p, _l, _l, _l, _p, _p,
                                       _f, _p, _i, _p, _i]),
    "lmf_q4_decode_model": (_i, [_p, _i, _i, _p, _f, _i, _i, _i, _i, _p, _p, _p, _p, _l, _l, _i, _p, _f, _i, _p, _p, _i,
                                 _p, _p]),
    "lmf_f32_decode_model": (_i, [_p, _i, _i, _p, _f, _i, _i, _i, _i, _p, _p, _p, _p, _l, _l, _i, _p, _f, _p, _i, _i,
                                  _p, _p, _i]),
    "lmf_q4_decode_rows_model": (_i, [_p, _i, _i, _i, _p, _f, _i, _i, _i, _i, _p, _p, _l, _p, _p, _l, _l, _l, _p, _p,
                                      _f, _i, _p, _p, _i, _p]),
}


class F32Layer(ctypes.Structure):
    """`lmf_f32_layer` of decode_layer.c: one layer's weights for `f32_decode_model`."""

    _fields_ = [("attn_norm", _p), ("mlp_norm", _p), ("qkv_w", _p), ("qkv_bias", _p), ("out_w", _p), ("fc_w", _p),
                ("proj_w", _p), ("cm_qkv", _i), ("cm_out", _i), ("cm_fc", _i), ("cm_proj", _i)]


def _library():
    return native.load(NAME, SOURCE, INCLUDES, signatures=SIGNATURES)


def available() -> bool:
    return _library() is not None


def layout_of(w: torch.Tensor) -> int | None:
    """0 for a row-major [n, k] float32 weight, 1 for a column-major one (its transpose
    contiguous), None for anything else."""
    if w.dtype != torch.float32 or w.dim() != 2 or w.device.type != "cpu":
        return None
    if w.is_contiguous():
        return 0
    if w.t().is_contiguous():
        return 1
    return None


def f32_gemv(w: torch.Tensor, x: torch.Tensor, bias: torch.Tensor | None, threads: int) -> torch.Tensor | None:
    """x [..., k] (one row) @ w^T (+ bias) with w [n, k] float32 row- or column-major: [..., n], or None."""
    lib = _library()
    n, k = w.shape
    cm = layout_of(w)
    if lib is None or cm is None or x.shape[-1] != k or x.dtype != torch.float32:
        return None
    x1 = x.reshape(k).contiguous()
    y = torch.empty(n, dtype=torch.float32)
    lib.lmf_f32_gemv(w.data_ptr(), cm, n, k, x1.data_ptr(), native.ptr(bias), y.data_ptr(), threads)
    return y.view(*x.shape[:-1], n)


def _scratch(d: int, n_head: int, n_kv_head: int, head_dim: int, inter: int) -> torch.Tensor:
    return torch.empty(2 * d + (2 * n_head + 2 * n_kv_head) * head_dim + 3 * inter)


def q4_decode_layer(x: torch.Tensor, attn_norm: torch.Tensor, mlp_norm: torch.Tensor, eps: float,
                    qkv: torch.Tensor, qkv_bias: torch.Tensor | None, out: torch.Tensor, fc: torch.Tensor,
                    proj: torch.Tensor, inter: int, n_head: int, n_kv_head: int, head_dim: int,
                    rope: tuple[torch.Tensor, torch.Tensor] | None, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    pos: int) -> torch.Tensor | None:
    """x + attention + MLP of one pre-norm SwiGLU layer for one token, every product on the
    packed int4 rows given (qkv, out, fc, proj from `quant_kernels.q4_pack`), or None where it
    does not apply.

    x: the residual stream row (d float32); norms' weights [d]; rope (cos, sin) [head_dim] or
    None; k_cache / v_cache: this layer's cache of the sequence [n_kv_head, max_len, head_dim],
    written at `pos`. Returns a new row; x is not changed.
    """
    lib = _library()
    d = x.shape[-1]
    if (lib is None or not quant_kernels.available() or d % 64 or inter % 64 or (n_head * head_dim) % 64
            or not 0 <= pos < k_cache.shape[1]):
        return None
    cos, sin = rope if rope is not None else (None, None)
    y = x.reshape(d).clone()
    scratch = _scratch(d, n_head, n_kv_head, head_dim, inter)
    code = lib.lmf_q4_decode_layer(y.data_ptr(), d, attn_norm.data_ptr(), mlp_norm.data_ptr(), eps, qkv.data_ptr(),
                                   native.ptr(qkv_bias), out.data_ptr(), fc.data_ptr(), proj.data_ptr(), inter, n_head,
                                   n_kv_head, head_dim, native.ptr(cos), native.ptr(sin), k_cache.data_ptr(),
                                   v_cache.data_ptr(), k_cache.stride(0), pos, scratch.data_ptr())
    return y.view(x.shape) if code == 0 else None


def f32_decode_layer(x: torch.Tensor, attn_norm: torch.Tensor, mlp_norm: torch.Tensor, eps: float,
                     qkv: torch.Tensor, qkv_bias: torch.Tensor | None, out: torch.Tensor, fc: torch.Tensor,
                     proj: torch.Tensor, n_head: int, n_kv_head: int, head_dim: int,
                     rope: tuple[torch.Tensor, torch.Tensor] | None, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     pos: int, threads: int) -> torch.Tensor | None:
    """`q4_decode_layer` with float32 weights [n, k], each row- or column-major; None where it
    does not apply."""
    lib = _library()
    d = x.shape[-1]
    layouts = [layout_of(w) for w in (qkv, out, fc, proj)]
    if lib is None or any(v is None for v in layouts) or not 0 <= pos < k_cache.shape[1]:
        return None
    inter = proj.shape[1]
    cos, sin = rope if rope is not None else (None, None)
    y = x.reshape(d).clone()
    scratch = _scratch(d, n_head, n_kv_head, head_dim, inter)
    code = lib.lmf_f32_decode_layer(y.data_ptr(), d, attn_norm.data_ptr(), mlp_norm.data_ptr(), eps, qkv.data_ptr(),
                                    layouts[0], native.ptr(qkv_bias), out.data_ptr(), layouts[1], fc.data_ptr(),
                                    layouts[2], proj.data_ptr(), layouts[3], inter, n_head, n_kv_head, head_dim,
                                    native.ptr(cos), native.ptr(sin), k_cache.data_ptr(), v_cache.data_ptr(),
                                    k_cache.stride(0), pos, scratch.data_ptr(), threads)
    return y.view(x.shape) if code == 0 else None


def f32_layer(attn_norm: torch.Tensor, mlp_norm: torch.Tensor, qkv: torch.Tensor, qkv_bias: torch.Tensor | None,
              out: torch.Tensor, fc: torch.Tensor, proj: torch.Tensor) -> F32Layer | None:
    """One layer's weights (as `f32_decode_layer` takes them) for `f32_decode_model`, or None
    where a weight is in neither layout. The structure holds addresses only: the tensors must
    stay alive and in place while it is used."""
    layouts = [layout_of(w) for w in (qkv, out, fc, proj)]
    if any(v is None for v in layouts):
        return None
    return F32Layer(attn_norm.data_ptr(), mlp_norm.data_ptr(), qkv.data_ptr(), native.ptr(qkv_bias), out.data_ptr(),
                    fc.data_ptr(), proj.data_ptr(), *layouts)


class Q4Layer(ctypes.Structure):
    """`lmf_q4_layer` of decode_layer.c: one int4 layer for `q4_decode_model`."""

    _fields_ = [("attn_norm", _p), ("mlp_norm", _p), ("qkv_bias", _p), ("qkv_w", _p), ("out_w", _p), ("fc_w", _p),
                ("proj_w", _p)]


def q4_decode_model(common: list, head_bits: int, head: torch.Tensor, head_scale: torch.Tensor | None,
                    vocab: int) -> torch.Tensor | None:
    """`lmf_q4_decode_model`: a whole batch-1 decode step of int4 layers (`CompiledDecodeStep._common_args`)
    and a head of `head_bits` 4 (packed rows), 8 (codes + 128, float32 row scales) or 32 (float32
    row-major): logits [vocab], or None."""
    lib = _library()
    d, inter, n_head, n_kv_head, head_dim = _step_shape(common)
    if lib is None or not _q4_step_fits(d, inter, n_head * head_dim, head_bits):
        return None
    rows = head.shape[0]
    logits, scratch = torch.empty(rows, dtype=torch.float32), _scratch(d, n_head, n_kv_head, head_dim, inter)
    code = lib.lmf_q4_decode_model(*common, head_bits, head.data_ptr(), native.ptr(head_scale), rows,
                                   logits.data_ptr(), scratch.data_ptr())
    return logits[:vocab] if code == 0 else None


def q4_decode_rows_model(plan: dict, x: torch.Tensor, rope, cache: KVCache, positions: torch.Tensor, head_bits: int,
                         head: torch.Tensor, head_scale: torch.Tensor | None, vocab: int) -> torch.Tensor | None:
    """`lmf_q4_decode_rows_model`: a batched decode step of int4 layers (x [B, d] the rows'
    embeddings, rope (cos, sin) [B, head_dim], positions [B] int32): logits [B, vocab], each row
    what `q4_decode_model` gives for it alone; or None."""
    lib = _library()
    inter, n_head, _, head_dim = plan["shape"]
    if lib is None or not _q4_step_fits(x.shape[1], inter, n_head * head_dim, head_bits):
        return None
    logits = torch.empty(x.shape[0], head.shape[0], dtype=torch.float32)
    code = lib.lmf_q4_decode_rows_model(*_rows_args(plan, x, rope, cache, positions), head_bits, head.data_ptr(),
                                        native.ptr(head_scale), head.shape[0], logits.data_ptr())
    return logits[:, :vocab] if code == 0 else None


def _q4_step_fits(d: int, inter: int, attn_width: int, head_bits: int) -> bool:
    """Shapes the int4 steps take: every product's inputs a multiple of 64, a known head."""
    return (quant_kernels.available() and not (d % 64 or inter % 64 or attn_width % 64)
            and head_bits in (4, 8, 32))


def _rows_args(plan: dict, x: torch.Tensor, rope, cache: KVCache, positions: torch.Tensor) -> list:
    """The arguments both batched-step C entry points share, up to the final norm."""
    inter, n_head, n_kv_head, head_dim = plan["shape"]
    k, v = cache.k, cache.v
    return [x.data_ptr(), x.shape[0], x.shape[1], len(plan["layers"]), ctypes.addressof(plan["layers"]), plan["eps"],
            inter, n_head, n_kv_head, head_dim, rope[0].data_ptr(), rope[1].data_ptr(), rope[0].stride(0),
            k.data_ptr(), v.data_ptr(), k.stride(0), k.stride(1), k.stride(2), positions.data_ptr(),
            plan["norm"].weight.data_ptr(), plan["norm"].eps]


def _step_shape(common: list) -> tuple[int, int, int, int, int]:
    """(d, inter, n_head, n_kv_head, head_dim) from `CompiledDecodeStep._common_args`."""
    return common[1], common[5], common[6], common[7], common[8]


def f32_decode_model(common: list, head: torch.Tensor, threads: int) -> torch.Tensor | None:
    """`lmf_f32_decode_model`: a whole batch-1 decode step (`CompiledDecodeStep._common_args`, then
    the head [V, d] float32, row- or column-major): logits [V], or None."""
    lib = _library()
    cm_head = layout_of(head)
    if lib is None or cm_head is None:
        return None
    d, inter, n_head, n_kv_head, head_dim = _step_shape(common)
    vocab = head.shape[0]
    logits, scratch = torch.empty(vocab, dtype=torch.float32), _scratch(d, n_head, n_kv_head, head_dim, inter)
    code = lib.lmf_f32_decode_model(*common, head.data_ptr(), cm_head, vocab, logits.data_ptr(), scratch.data_ptr(),
                                    threads)
    return logits if code == 0 else None


def f32_gemm_rows(w: torch.Tensor, x: torch.Tensor, bias: torch.Tensor | None, threads: int) -> torch.Tensor | None:
    """x [..., k] (a few rows) @ w^T (+ bias) with w [n, k] float32 row-major, each weight row read once
    for every row of x: [..., n], or None where it does not apply."""
    lib = _library()
    n, k = w.shape
    if lib is None or layout_of(w) != 0 or x.shape[-1] != k or x.dtype != torch.float32 or x.device.type != "cpu":
        return None
    x2 = x.reshape(-1, k)
    if x2.stride(1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    y = torch.empty(m, n, dtype=torch.float32)
    lib.lmf_f32_gemm_rows(w.data_ptr(), n, k, x2.data_ptr(), x2.stride(0), m, native.ptr(bias), y.data_ptr(), n,
                          threads)
    return y.view(*x.shape[:-1], n)


def f32_decode_rows_model(plan: dict, x: torch.Tensor, rope, cache: KVCache, positions: torch.Tensor,
                          threads: int) -> torch.Tensor | None:
    """`lmf_f32_decode_rows_model`: a batched decode step of a few sequences (x [B, d] their
    embedding rows, rope (cos, sin) [B, head_dim], positions [B] int32): logits [B, V], or None."""
    lib = _library()
    head = plan["head"][0]
    if lib is None or layout_of(head) != 0:
        return None
    logits = torch.empty(x.shape[0], head.shape[0], dtype=torch.float32)
    code = lib.lmf_f32_decode_rows_model(*_rows_args(plan, x, rope, cache, positions), head.data_ptr(), head.shape[0],
                                         logits.data_ptr(), threads)
    return logits if code == 0 else None


class CompiledDecodeBlock(Block):
    """A pre-norm `Block` whose batch-1 decode step may run as one compiled call: subclasses say
    how in `_decode_step` (None: not this block, not now); every other call, and every step
    they decline, runs `Block.forward` unchanged."""

    def forward(self, x, rope, mask, cache, layer, start, end):
        if (x.shape[0] == 1 and x.shape[1] == 1 and mask is None and isinstance(start, int) and end == start + 1
                and isinstance(cache, KVCache) and x.dtype == torch.float32 and x.device.type == "cpu"
                and not (torch.is_grad_enabled() and x.requires_grad) and self._fits(rope, cache)):
            y = self._decode_step(x, rope, cache, layer, start)
            if y is not None:
                return y
        return super().forward(x, rope, mask, cache, layer, start, end)

    def _fits(self, rope, cache: KVCache) -> bool:
        """The layer shape the compiled layers take: RMS norms with weights and one eps, a SwiGLU
        MLP without biases after the q/k/v product, a float32 [layers, batch, heads, len, dim]
        cache, rotary tables of one head's width (or none)."""
        attn, mlp, n1, n2 = self.attn, self.mlp, self.attn_norm, self.mlp_norm
        return (isinstance(mlp, MLP) and mlp.swiglu and type(n1) is RMSNorm and type(n2) is RMSNorm
                and n1.weight is not None and n2.weight is not None and n1.eps is not None and n1.eps == n2.eps
                and attn.out.bias is None and mlp.fc.bias is None and mlp.proj.bias is None
                and cache.k.dim() == 5 and cache.k.dtype == torch.float32
                and (rope is None or (rope[0].numel() == attn.head_dim and rope[0].dtype == torch.float32)))

    def _decode_step(self, x, rope, cache: KVCache, layer: int, pos: int) -> torch.Tensor | None:
        raise NotImplementedError


class CompiledDecodeStep:
    """A `Transformer.decode_step` (see there): the whole batch-1 decode step of a pre-norm model
    whose layers are all compiled-decode blocks (embedding row, every layer, the final norm, the
    head) as one call into C, instead of one call per layer with Python between them.

    Subclasses say which blocks and heads they take (`_block_ok`, `_head_ok`), what the C call
    needs of each (`_layer`, `_head_args`, which also report through `track` the objects the
    call depends on) and make the call (`_run`). What the plan depends on (which modules and
    tensors sit where, their classes, flags and hooks, the tensors' addresses) is gathered once
    and re-checked on each step with dictionary lookups and pointer comparisons (about 0.1 ms
    with the objects in cache, against about a millisecond for walking the modules); anything
    moved and the step is planned again. It declines (returns None, and the modules run) with
    autograd on, with forward hooks, for anything but a float32 `KVCache` of one row, and for
    shapes the per-layer path would decline.

    A step streams all the weights through the caches, so the next step's check finds its
    ~1,500 objects evicted and took 0.6 ms of a 12-17 ms step. Loops in which nothing can change
    the model between steps (`Scheduler.run_until_idle`, a scheduler's own thread between jobs)
    run inside `steady()`: the plan is checked at the first step and then trusted.
    """

    block_type: type = Block

    def __init__(self) -> None:
        self._plan: dict | None = None
        self._steady = 0  # depth of `steady()` blocks
        self._checked: dict | None = None  # the plan checked since the outermost one began

    @contextlib.contextmanager
    def steady(self):
        """Steps inside are trusted to see the model as the first of them did (the caller
        promises that nothing changes it in between): the plan is checked once, not per step."""
        self._steady += 1
        try:
            yield
        finally:
            self._steady -= 1
            if not self._steady:
                self._checked = None

    def forget_check(self) -> None:
        """The model may have changed (inside `steady()`): check the plan again at the next step."""
        self._checked = None

    # --- what subclasses define -------------------------------------------------------------
    def _block_ok(self, block, linears: list[nn.Module]) -> bool:
        raise NotImplementedError

    def _head_ok(self, head: nn.Module) -> bool:
        raise NotImplementedError

    def _layer(self, block, linears: list[nn.Module], track):
        """The C structure of one layer, or None."""
        raise NotImplementedError

    def _head_args(self, head: nn.Module, track) -> tuple | None:
        raise NotImplementedError

    def _run(self, plan: dict, x: torch.Tensor, rope, cache: KVCache, pos: int) -> torch.Tensor | None:
        """Logits [V] of the step, or None."""
        raise NotImplementedError

    # --- planning ---------------------------------------------------------------------------
    def _build(self, model, rope, cache: KVCache) -> dict | None:
        entries: list[tuple[dict, str, object]] = []  # (an object's dict of members, name, member)
        tensors: list[torch.Tensor] = []

        def child(owner, name: str, kind: str = "_modules"):
            members = getattr(owner, kind) if kind != "__dict__" else owner.__dict__
            obj = members.get(name)
            entries.append((members, name, obj))
            if isinstance(obj, torch.Tensor):
                tensors.append(obj)
            return obj

        def track(owner, name: str, kind: str = "_parameters"):
            """A member the C call reads (a parameter, a buffer, an attribute holding a tensor)."""
            return child(owner, name, kind)

        layers_list = child(model, "layers")
        embed, norm, head = child(model, "embed"), child(model, "norm"), child(model, "lm_head")
        if (layers_list is None or not len(layers_list) or type(norm) is not RMSNorm or norm.weight is None
                or not isinstance(embed, nn.Embedding) or head is None or not self._head_ok(head)):
            return None
        blocks = [child(layers_list, str(i)) for i in range(len(layers_list))]
        modules: list[nn.Module] = [model, layers_list, norm, head, *blocks]
        most = min(self.max_rows, self._most_rows(head))  # rows of a batched step the plan takes
        structs = []
        for block in blocks:
            if type(block) is not self.block_type or not block._fits(rope, cache):
                return None
            attn, mlp = child(block, "attn"), child(block, "mlp")
            n1, n2 = child(block, "attn_norm"), child(block, "mlp_norm")
            linears = [child(attn, "qkv"), child(attn, "out"), child(mlp, "fc"), child(mlp, "proj")]
            if not self._block_ok(block, linears):
                return None
            most = min(most, *map(self._most_rows, linears))
            modules += [attn, mlp, n1, n2, *linears]
            track(n1, "weight"), track(n2, "weight")
            struct = self._layer(block, linears, track)
            if struct is None:
                return None
            structs.append(struct)
        track(embed, "weight"), track(norm, "weight")
        head_args = self._head_args(head, track)
        eps = {b.attn_norm.eps for b in blocks} | {b.mlp_norm.eps for b in blocks}
        if head_args is None or len(eps) != 1 or embed.weight.dtype != torch.float32:
            return None
        first = blocks[0]
        plan = {
            "modules": modules, "tensors": tensors, "classes": [type(m) for m in modules],
            "pointers": list(map(torch.Tensor.data_ptr, tensors)), "strides": list(map(torch.Tensor.stride, tensors)),
            # (dict, name, object) of every member read, as three columns for `_still_valid`
            "entry_dicts": [e[0] for e in entries], "entry_names": [e[1] for e in entries],
            "entry_objs": [e[2] for e in entries],
            "layers": (type(structs[0]) * len(structs))(*structs), "head": head_args, "eps": eps.pop(),
            "max_rows": most,
            "shape": (first.mlp.proj.in_features, first.attn.n_head, first.attn.n_kv_head, first.attn.head_dim),
            "embed": embed.weight, "norm": norm,
        }
        flag_items = [(m, name) for m in modules for name in self.flag_names if hasattr(m, name)]
        plan["flag_owners"], plan["flag_attrs"] = [m for m, _ in flag_items], [name for _, name in flag_items]
        plan["flags"] = list(map(getattr, plan["flag_owners"], plan["flag_attrs"]))
        return plan if self._still_valid(plan) else None  # (hooks)

    # per-module switches that decide a path, checked on every step where a module has them
    flag_names = ("native_rows", "compute_dtype")

    @staticmethod
    def _still_valid(plan: dict) -> bool:
        """Every member the plan read is still there (the same objects), with the same classes,
        switches, data pointers and strides, and no module has hooks. Run before every step, so
        each check is one `map` over a prepared column (no Python loop: about 3x faster)."""
        modules = plan["modules"]
        return (all(map(operator.is_, map(dict.get, plan["entry_dicts"], plan["entry_names"]), plan["entry_objs"]))
                and list(map(type, modules)) == plan["classes"]
                and not any(map(_FORWARD_HOOKS, modules)) and not any(map(_PRE_HOOKS, modules))
                and list(map(getattr, plan["flag_owners"], plan["flag_attrs"])) == plan["flags"]
                and list(map(torch.Tensor.data_ptr, plan["tensors"])) == plan["pointers"]
                and list(map(torch.Tensor.stride, plan["tensors"])) == plan["strides"])

    # the most rows of a batched step (one new token per sequence) it takes; subclasses that
    # implement `_run_rows` raise it
    max_rows = 1

    def __call__(self, model, input_ids: torch.Tensor, cache, start: int | torch.Tensor) -> torch.Tensor | None:
        config = model.config
        rows = input_ids.shape[0]
        if (torch.is_grad_enabled() or not isinstance(cache, KVCache) or cache.k.dim() != 5
                or cache.k.dtype != torch.float32 or model.rope is None or model.type_embed is not None
                or model.embed_norm is not None or not config.causal or input_ids.device.type != "cpu"
                or input_ids.dim() != 2 or input_ids.shape[1] != 1 or not 1 <= rows <= self.max_rows
                or cache.k.shape[1] != rows or torch_module._global_forward_hooks
                or torch_module._global_forward_pre_hooks):
            return None
        if rows == 1 and not isinstance(start, int) and start.numel() == 1:
            start = int(start.reshape(-1)[0])  # one row: the one-row call
        one = rows == 1 and isinstance(start, int)
        if one:
            if (config.sliding_window is not None and start + 1 > config.sliding_window) or not 0 <= start < cache.k.shape[3]:
                return None
            cos, sin = model.rope.slice(start, 1, torch.float32)
            rope = first = (cos.reshape(-1), sin.reshape(-1))
        else:  # rows at their own positions (a window would need its mask: modules)
            positions = torch.full((rows,), start) if isinstance(start, int) else start.reshape(-1)
            if (config.sliding_window is not None or positions.numel() != rows or positions.device.type != "cpu"
                    or int(positions.min()) < 0 or int(positions.max()) >= cache.k.shape[3]):
                return None
            cos, sin = model.rope(positions.view(rows, 1).long(), torch.float32)
            rope = (cos.reshape(rows, -1).contiguous(), sin.reshape(rows, -1).contiguous())
            first = (rope[0][0], rope[1][0])
        plan = self._plan
        if plan is None or not (self._checked is plan or self._still_valid(plan)):
            plan = self._plan = self._build(model, first, cache)
            if plan is None:
                return None
        if self._steady:
            self._checked = plan
        k, v = cache.k, cache.v
        if (first[0].numel() != plan["shape"][3] or k.stride() != v.stride() or k.stride(-1) != 1
                or k.stride(-2) != plan["shape"][3] or len(plan["layers"]) != k.shape[0] or rows > plan["max_rows"]):
            return None
        if one:
            x = plan["embed"][int(input_ids[0, 0])].clone()
            logits = self._run(plan, x, rope, cache, start)
            return None if logits is None else logits.view(1, 1, -1)
        x = plan["embed"][input_ids.view(-1)]
        logits = self._run_rows(plan, x, rope, cache, positions.to(torch.int32).contiguous())
        return None if logits is None else logits.view(rows, 1, -1)

    def _most_rows(self, linear: nn.Module) -> int:
        """The most rows of a batched step for which the C call computes what `linear` would."""
        return self.max_rows

    def _run_rows(self, plan: dict, x: torch.Tensor, rope, cache: KVCache, positions: torch.Tensor) -> torch.Tensor | None:
        """Logits [B, V] of a batched step (x [B, d] the rows' embeddings, positions [B] int32), or None."""
        return None

    @staticmethod
    def _common_args(plan: dict, x: torch.Tensor, rope, cache: KVCache, pos: int) -> list:
        """The arguments both C entry points share, up to the final norm."""
        inter, n_head, n_kv_head, head_dim = plan["shape"]
        k, v = cache.k, cache.v
        return [x.data_ptr(), x.numel(), len(plan["layers"]), ctypes.addressof(plan["layers"]), plan["eps"], inter,
                n_head, n_kv_head, head_dim, rope[0].data_ptr(), rope[1].data_ptr(), k.data_ptr(), v.data_ptr(),
                k.stride(0), k.stride(2), pos, plan["norm"].weight.data_ptr(), plan["norm"].eps]


def steady(model: nn.Module):
    """`CompiledDecodeStep.steady()` of `model`'s decode step, or a no-op where it has none."""
    step = getattr(model, "decode_step", None)
    return step.steady() if isinstance(step, CompiledDecodeStep) else contextlib.nullcontext()


def forget_check(model: nn.Module) -> None:
    """`CompiledDecodeStep.forget_check()` of `model`'s decode step, where it has one."""
    step = getattr(model, "decode_step", None)
    if isinstance(step, CompiledDecodeStep):
        step.forget_check()
