"""CPU fast path for inference: weight layout and the matrix kernels.

A decode step multiplies a few activation rows by every weight matrix, so it is bound by
how fast the weights stream from memory; with one row the arithmetic is negligible.
Three choices decide that speed on a CPU; all are measured in benchmarks/decode.py,
benchmarks/serve.py and docs/benchmarks.md:

1. Memory order. `nn.Linear` stores W as [out, in] row-major. Storing the wide matrices
   (out >= in: fused q/k/v, fused gate/up, the vocabulary head) column-major (W.T
   contiguous, W a transposed view) lets the kernel stream rows of W.T; the tall down
   projection stays row-major.
2. The kernel, by number of rows.
   - One row (a batch-1 decode step): PyTorch's CPU wheels call MKL; NumPy's wheels
     bundle OpenBLAS. For matrix-vector products of these shapes OpenBLAS streamed
     weights ~1.6x faster on the 2-core AMD machine we measured (about 30 GB/s against
     19 GB/s). `BlasLinear` routes single-row float32 products through NumPy, zero-copy,
     or, where lmforge's own compiled product (lmforge/infer/decode_kernels.py) measures
     fast enough (`calibrate`), through that; then the whole batch-1 decode step runs as
     one compiled call (`Float32DecodeStep`; each pre-norm layer alone as one call,
     `Float32DecoderBlock`, where the whole step does not apply), weights row-major and
     in 2 MiB pages, and NumPy is not used.
   - Several rows (a batched decode step, a prefill): MKL's small-M GEMM is slow there
     too (30 gate/up products of 16 x 576 x 3072 took 38 ms), and OpenBLAS's is no
     better. oneDNN, which PyTorch also ships, runs the same products in 14 ms when the
     weight is first reordered into its blocked layout, and stays ahead of MKL up to
     thousands of rows (2048 x 576 x 3072: 37 ms against 58 ms). `BlasLinear` keeps
     such a packed copy, made on first use and remade whenever the weight changes
     (its version counter moves). The copy costs as much memory as the weights.
   `calibrate` times each kernel against PyTorch's on the model's largest matrix at load
   time and keeps PyTorch's wherever the other is not faster. Training (autograd on),
   GPUs and other dtypes always take plain `F.linear`.
3. Threads. Two thread pools (PyTorch's OpenMP workers and OpenBLAS's) spinning on two
   cores starve each other: a decode step went from 28 ms to 260 ms. While NumPy does
   the products, the few small element-wise ops left to PyTorch run on one thread
   (`torch_threads_for`), which costs nothing measurable.

Values equal `F.linear`'s up to float rounding (summation order); parameters,
`state_dict()` and saved checkpoints do not change.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..io import hugepages
from ..model.kv_cache import KVCache
from ..model.transformer import Block, Transformer
from . import decode_kernels


def _onednn_supported() -> bool:
    try:
        w = torch.ops.mkldnn._reorder_linear_weight(torch.zeros(2, 2))
        torch.ops.mkldnn._linear_pointwise(torch.zeros(2, 2), w, None, "none", [], "")
        return True
    except (AttributeError, RuntimeError, NotImplementedError):
        return False


ROWS_UNLIMITED = 1 << 30
FEW_ROWS = (16, 8, 4, 2)  # row counts `calibrate` tries for the few-rows product, most first


class BlasLinear(nn.Linear):
    """An `nn.Linear` whose CPU float32 inference uses the fastest measured kernel per row count.

    `numpy_rows`: single-row products go to NumPy's BLAS. `onednn`: products of 2 or
    more rows go to oneDNN with a packed weight. Both are set per module by
    `optimize_for_cpu_decoding`.
    """

    max_rows = 1  # rows NumPy's BLAS handles (matrix-vector products only)
    numpy_rows = True
    native_rows = False  # single rows on lmforge's own compiled product instead
    native_max_rows = 1  # and products of up to this many rows (a batched decode step of a few)
    onednn = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        rows = x.numel() // x.shape[-1] if x.numel() else 0
        if (
            rows == 0
            or x.device.type != "cpu"
            or x.dtype != torch.float32
            or w.dtype != torch.float32
            or (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad))
        ):
            return F.linear(x, w, self.bias)
        if rows == 1 and self.native_rows:
            y = decode_kernels.f32_gemv(w, x, self.bias, torch.get_num_threads())
            if y is not None:
                return y
        if 1 < rows <= self.native_max_rows and self.native_rows:
            y = decode_kernels.f32_gemm_rows(w, x, self.bias, torch.get_num_threads())
            if y is not None:
                return y
        if rows <= self.max_rows and self.numpy_rows:
            out = np.matmul(x.reshape(rows, x.shape[-1]).numpy(), w.detach().t().numpy())
            y = torch.from_numpy(out).view(*x.shape[:-1], w.shape[0])
            return y + self.bias if self.bias is not None else y
        if rows > 1 and self.onednn:
            bias = None if self.bias is None else self.bias.detach()
            return torch.ops.mkldnn._linear_pointwise(x, self.packed_weight(), bias, "none", [], "")
        return F.linear(x, w, self.bias)

    def float32_rows(self) -> int:
        """Up to how many rows a product of this layer is float32 arithmetic with single rows on
        lmforge's compiled product (0: not), i.e. what the compiled decode steps
        (`Float32DecoderBlock`, `Float32DecodeStep`) may compute in its place. Subclasses that
        send larger products to another precision lower it."""
        return ROWS_UNLIMITED if self.native_rows else 0

    def packed_weight(self) -> torch.Tensor:
        """oneDNN's blocked copy of the weight, remade if the weight changed since it was made."""
        w = self.weight
        key = (w.data_ptr(), w._version)
        cached = self.__dict__.get("_packed")
        if cached is None or cached[0] != key:
            with torch.inference_mode(False), torch.no_grad():
                cached = (key, torch.ops.mkldnn._reorder_linear_weight(w.detach()))
            self.__dict__["_packed"] = cached
        return cached[1]


def use_column_major_weights(model: nn.Module) -> nn.Module:
    """Re-store the Linear weights of `model` whose out_features >= in_features column-major, in place.

    Tied weights stay tied (the Parameter object is kept; only its storage changes).
    """
    with torch.no_grad():
        for module in model.modules():
            if not isinstance(module, nn.Linear) or module.weight.device.type != "cpu":
                continue
            w = module.weight
            if w.is_contiguous() and w.shape[0] >= w.shape[1]:
                w.data = w.data.t().contiguous().t()
    return model


def use_numpy_blas(model: nn.Module, numpy_rows: bool = True, onednn: bool = False) -> nn.Module:
    """Route the CPU inference products of every `nn.Linear` in `model` through `BlasLinear`.

    The modules keep their parameters and names; only their class (hence `forward`) changes.
    """
    for module in model.modules():
        if type(module) is nn.Linear or type(module) is BlasLinear:
            module.__class__ = BlasLinear
            module.numpy_rows = numpy_rows
            module.onednn = onednn
    return model


class Float32DecoderBlock(decode_kernels.CompiledDecodeBlock):
    """A pre-norm `Block` whose batch-1 decode step runs as one compiled call
    (`decode_kernels.f32_decode_layer`): the same norms, products, rotary, cache write,
    attention and SwiGLU, on lmforge's own float32 products. Anything else runs `Block.forward`."""

    def _decode_step(self, x, rope, cache: KVCache, layer: int, pos: int) -> torch.Tensor | None:
        attn, mlp = self.attn, self.mlp
        if not all(isinstance(m, BlasLinear) and m.float32_rows() >= 1 for m in (attn.qkv, attn.out, mlp.fc, mlp.proj)):
            return None
        return decode_kernels.f32_decode_layer(
            x, self.attn_norm.weight, self.mlp_norm.weight, self.attn_norm.eps, attn.qkv.weight, attn.qkv.bias,
            attn.out.weight, mlp.fc.weight, mlp.proj.weight, attn.n_head, attn.n_kv_head, attn.head_dim, rope,
            cache.k[layer, 0], cache.v[layer, 0], pos, torch.get_num_threads())


class Float32DecodeStep(decode_kernels.CompiledDecodeStep):
    """The whole batch-1 decode step of a model whose layers are all `Float32DecoderBlock`s, as one
    compiled call (`decode_kernels.f32_decode_model`; see `CompiledDecodeStep`)."""

    block_type = Float32DecoderBlock
    # batched steps of several sequences too (`lmf_f32_decode_rows_model`, its products those of
    # `f32_gemm_rows`), up to the rows at which `calibrate` found that product faster than the
    # library's (`native_max_rows`)
    max_rows = FEW_ROWS[0]

    # with bf16 or int8 prefill products (Bf16PrefillLinear), products stay float32 below min_rows
    flag_names = decode_kernels.CompiledDecodeStep.flag_names + ("min_rows", "native_max_rows")

    def _block_ok(self, block, linears) -> bool:
        return all(isinstance(m, BlasLinear) and m.float32_rows() >= 1 for m in linears)

    def _head_ok(self, head) -> bool:
        return isinstance(head, BlasLinear) and head.bias is None and head.float32_rows() >= 1

    def _most_rows(self, linear) -> int:
        return min(self.max_rows, linear.float32_rows(), max(linear.native_max_rows, 1))

    def _layer(self, block, linears, track):
        qkv, out, fc, proj = (track(m, "weight") for m in linears)
        bias = track(linears[0], "bias") if linears[0].bias is not None else None
        return decode_kernels.f32_layer(block.attn_norm.weight, block.mlp_norm.weight, qkv, bias, out, fc, proj)

    def _head_args(self, head, track):
        w = track(head, "weight")
        return None if decode_kernels.layout_of(w) is None else (w,)

    def _run(self, plan, x, rope, cache, pos):
        return decode_kernels.f32_decode_model(self._common_args(plan, x, rope, cache, pos), plan["head"][0],
                                               torch.get_num_threads())

    def _run_rows(self, plan, x, rope, cache, positions):
        return decode_kernels.f32_decode_rows_model(plan, x, rope, cache, positions, torch.get_num_threads())


def use_native_decoding(model: nn.Module, few_rows: int = 1) -> nn.Module:
    """Single-row products of every `BlasLinear` on lmforge's compiled product (and products of
    up to `few_rows` rows on its few-rows form, `decode_kernels.f32_gemm_rows`), every plain
    pre-norm `Block` a `Float32DecoderBlock` (their classes and flags only change), and a
    `Transformer`'s batch-1 decode step one compiled call (`Float32DecodeStep`).

    Every weight is stored row-major: each thread's share of a product is then one block of
    whole rows, read front to back as one sequential stream (the compiled product reads
    column-major weights too, and was faster on them when it read four rows side by side; on
    a 2-core AMD EPYC one row at a time runs the model's shapes at 85-95% of a plain streaming
    read, against 40-55% for either older variant)."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, BlasLinear):
                module.native_rows = True
                module.native_max_rows = max(1, few_rows)
                w = module.weight
                if w.device.type == "cpu" and not w.is_contiguous():
                    w.data = w.data.contiguous()
            elif type(module) is Block:
                module.__class__ = Float32DecoderBlock
            if isinstance(module, Transformer) and module.lm_head is not None:
                module.decode_step = Float32DecodeStep()
    return model


def uses_numpy_blas(model: nn.Module) -> bool:
    return any(isinstance(m, BlasLinear) and m.numpy_rows for m in model.modules())


def _best_time(fn, trials: int, threads: int) -> float:
    best = float("inf")
    with torch_threads_for(threads):
        for _ in range(trials):
            start = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - start)
    return best


NATIVE_SLACK = 2.0  # see `calibrate`


def calibrate(model: nn.Module, trials: int = 5, batch_rows: int = 8) -> dict[str, bool]:
    """Time the kernels on the largest weight: is NumPy faster for one row, oneDNN for `batch_rows`,
    lmforge's own compiled product (`native`) fast enough for one row?

    Each single-row kernel reads the weight in the layout and pages it will have: NumPy and
    PyTorch column-major, lmforge's row-major, in huge pages where `optimize_for_cpu_decoding`
    will put them. `native` is chosen unless its product measures more than `NATIVE_SLACK`
    times slower than the better of the other two, because it comes with the compiled decode
    step: the module path spends about a third of a step between its products (30 against 20
    ms a token for the default model on the 2-core AMD machine), the compiled step under a
    millisecond. The products are bound by memory, so a working build of lmforge's product is
    never that far behind a BLAS, while single timings on a shared machine are noisy: with a
    margin of 25%, about one load in five measured past it and fell back to the module path.
    `native_max_rows` (16, 8, 4 or 2: the most rows of those at which lmforge's few-rows product
    beat the library, else 1): the most rows a product sends there, and the most rows of a
    batched decode step compiled as one call (`Float32DecodeStep`).
    """
    weights = [m.weight for m in model.modules() if isinstance(m, nn.Linear) and m.weight.device.type == "cpu"]
    if not weights or weights[0].dtype != torch.float32:
        return {"numpy": False, "onednn": False, "native": False, "native_max_rows": 1}
    w = max(weights, key=lambda t: t.numel()).detach()
    x1, xb = torch.randn(1, w.shape[1]), torch.randn(batch_rows, w.shape[1])
    result = {}
    with torch.inference_mode(False), torch.no_grad():
        native, threads = decode_kernels.available(), torch.get_num_threads()
        w_cols = w.t().clone(memory_format=torch.contiguous_format).t()  # copies: the model's stay put
        w_rows = w.clone(memory_format=torch.contiguous_format) if native else None
        hugepages.move_to_huge_pages([w_cols, w_rows])
    with torch.inference_mode():
        t_torch = t_numpy = t_native = float("inf")
        for _ in range(trials):  # alternate, so a burst of load hits each
            t_torch = min(t_torch, _best_time(lambda: F.linear(x1, w_cols), 1, 2))
            if native:
                t_native = min(t_native, _best_time(lambda: decode_kernels.f32_gemv(w_rows, x1, None, threads), 1, 2))
        # NumPy last: after each call OpenBLAS's worker threads spin for up to ~0.1 s, and a
        # product timed during that ran at half speed on two cores (PyTorch's and lmforge's
        # share one OpenMP pool and do not disturb each other).
        for _ in range(trials):
            t_numpy = min(t_numpy, _best_time(lambda: np.matmul(x1.numpy(), w_cols.t().numpy()), 1, 1))
        result["numpy"] = t_numpy < t_torch
        result["native"] = native and t_native <= min(t_numpy, t_torch) * NATIVE_SLACK
        w_cols = None
        result["onednn"] = False
        packed = torch.ops.mkldnn._reorder_linear_weight(w) if _onednn_supported() else None
        if packed is not None:
            t_torch = t_dnn = float("inf")
            for _ in range(trials):
                t_torch = min(t_torch, _best_time(lambda: F.linear(xb, w), 1, 2))
                t_dnn = min(t_dnn, _best_time(lambda: torch.ops.mkldnn._linear_pointwise(xb, packed, None, "none", [], ""), 1, 2))
            result["onednn"] = t_dnn < t_torch
        # A batched step of a few rows: lmforge's few-rows product (tiles of four weight rows by
        # four rows, each weight read from memory once) against the library, at 16 rows, then
        # fewer: the most rows at which it is faster.
        result["native_max_rows"] = 1
        if result["native"]:
            for few in FEW_ROWS:
                xf = torch.randn(few, w.shape[1])
                t_few = t_lib = float("inf")
                for _ in range(trials):
                    t_few = min(t_few, _best_time(lambda: decode_kernels.f32_gemm_rows(w_rows, xf, None, threads), 1, 2))
                    t_lib = min(t_lib, _best_time(
                        (lambda: torch.ops.mkldnn._linear_pointwise(xf, packed, None, "none", [], "")) if result["onednn"]
                        else (lambda: F.linear(xf, w)), 1, 2))
                if t_few < t_lib:
                    result["native_max_rows"] = few
                    break
        w_rows = packed = None
    return result


def optimize_for_cpu_decoding(model: nn.Module, prefill_dtype: torch.dtype = torch.float32) -> nn.Module:
    """Column-major wide matrices; NumPy's BLAS and oneDNN wherever they measure faster, or
    lmforge's compiled decode step; with ``prefill_dtype`` bf16, bf16 products for prefills
    (lmforge/infer/bf16_prefill.py); the Linear weights, in the order a step reads them, in
    2 MiB pages where the system has them (lmforge/io/hugepages.py)."""
    use_column_major_weights(model)
    fast = calibrate(model)
    if fast["native"]:
        use_numpy_blas(model, numpy_rows=False, onednn=fast["onednn"])
        use_native_decoding(model, few_rows=fast["native_max_rows"])
    elif fast["numpy"] or fast["onednn"]:
        use_numpy_blas(model, numpy_rows=fast["numpy"], onednn=fast["onednn"])
    if prefill_dtype == torch.bfloat16:
        from .bf16_prefill import use_bf16_prefill

        use_bf16_prefill(model)
    hugepages.move_to_huge_pages(m.weight for m in model.modules() if isinstance(m, nn.Linear))
    return model


def prepack(model: nn.Module) -> None:
    """Make the oneDNN packed weights now (a server does this before its first request)."""
    with torch.inference_mode():
        for module in model.modules():
            if isinstance(module, BlasLinear) and module.onednn and module.weight.device.type == "cpu":
                module.packed_weight()


def release_openmp_threads() -> bool:
    """Let the next thread that runs PyTorch work get a fast OpenMP thread team.

    GNU OpenMP keeps a pool of worker threads per thread that starts parallel regions.
    After the model is loaded on the main thread, a second thread (a server's scheduler)
    gets its own pool, and on 2 cores the two pools fight: every parallel region of a
    batched decode step became 1.5-12x slower (a 4-row step took 65 ms instead of 40 ms).
    Pausing the OpenMP runtime frees the idle pool; it is rebuilt on demand by whichever
    thread uses it next. Returns False where the runtime has no such call.
    """
    import ctypes
    import glob
    import os

    libs = glob.glob(os.path.join(os.path.dirname(torch.__file__), "lib", "libgomp*.so*"))
    try:
        runtime = ctypes.CDLL(libs[0]) if libs else ctypes.CDLL(None)
        pause = runtime.omp_pause_resource_all
    except (OSError, AttributeError):
        return False
    return pause(1) == 0  # omp_pause_soft


@contextmanager
def torch_threads_for(rows: int) -> Iterator[None]:
    """One PyTorch thread while NumPy's BLAS does a single-row step (see the module docstring)."""
    if rows > BlasLinear.max_rows:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
