"""lmforge's compiled float32 decode path (lmforge/infer/decode_kernels.py): its matrix-vector
product on both weight layouts, and a float32 model's decode steps with every pre-norm layer
run as one compiled call, against the same model on PyTorch."""

from __future__ import annotations

import copy

import pytest
import torch

from lmforge.infer import decode_kernels as dk
from lmforge.infer.layout import (BlasLinear, Float32DecoderBlock, Float32DecodeStep, use_column_major_weights,
                                  use_native_decoding, use_numpy_blas)
from lmforge.model import ModelConfig, Transformer
from lmforge.model.kv_cache import KVCache

needs_kernels = pytest.mark.skipif(not dk.available(), reason="no C compiler: decode kernels not built")


@needs_kernels
@pytest.mark.parametrize("n,k", [(96, 64), (37, 72), (8, 1536)])  # vector widths, tails, a short wide one
@pytest.mark.parametrize("column_major", [False, True])
@pytest.mark.parametrize("threads", [1, 2])
def test_f32_gemv_equals_torch(n, k, column_major, threads):
    g = torch.Generator().manual_seed(n * k)
    w = torch.randn(n, k, generator=g)
    if column_major:
        w = w.t().contiguous().t()
    x, bias = torch.randn(1, k, generator=g), torch.randn(n, generator=g)
    got = dk.f32_gemv(w, x, bias, threads)
    torch.testing.assert_close(got, x @ w.T + bias, rtol=1e-5, atol=1e-5)
    assert dk.f32_gemv(w[:, ::2], x[:, ::2], None, threads) is None  # neither layout: declined


@needs_kernels
@pytest.mark.parametrize("n,k", [(96, 64), (37, 72), (8, 1536), (700, 48)])
@pytest.mark.parametrize("threads", [1, 2])
def test_f32_gemm_rows_equals_torch(n, k, threads):
    """The few-rows product: row counts around each group of four, with a bias, rows given as a
    strided view (700 x 48: several blocks of weight rows per thread, each fetching the next;
    37 and 8 rows: ranges that end in a part of a group of four); a column-major weight is
    declined."""
    g = torch.Generator().manual_seed(n + k)
    w, bias = torch.randn(n, k, generator=g), torch.randn(n, generator=g)
    for m in (1, 2, 3, 4, 5, 7, 9, 16, 17):
        x = torch.randn(m, 2 * k, generator=g)[:, ::2]  # a view with a row stride of 2k
        torch.testing.assert_close(dk.f32_gemm_rows(w, x, bias, threads), x @ w.T + bias, rtol=1e-5, atol=1e-4)
        y = dk.f32_gemm_rows(w, x.reshape(1, m, k), None, threads)
        torch.testing.assert_close(y, (x @ w.T).reshape(1, m, n), rtol=1e-5, atol=1e-4)
    assert dk.f32_gemm_rows(w.t().contiguous().t(), x, None, threads) is None


@needs_kernels
def test_blas_linear_sends_a_few_rows_to_the_few_rows_product():
    layer = BlasLinear(72, 40)
    layer.native_rows, layer.native_max_rows = True, 3
    calls = []
    real = dk.f32_gemm_rows

    def counted(*a):
        calls.append(a[1].shape[0])
        return real(*a)

    dk.f32_gemm_rows = counted
    try:
        with torch.inference_mode():
            for m in (1, 2, 3, 4):
                x = torch.randn(m, 72)
                torch.testing.assert_close(layer(x), x @ layer.weight.T + layer.bias, rtol=1e-5, atol=1e-5)
    finally:
        dk.f32_gemm_rows = real
    assert calls == [2, 3]  # one row: the one-row product; four: the library


def compiled_copy(plain: Transformer, few_rows: int = 1) -> Transformer:
    """A copy of `plain` decoding on lmforge's compiled steps (products of up to `few_rows` rows
    on its few-rows product)."""
    fast = copy.deepcopy(plain)
    use_numpy_blas(fast, numpy_rows=False)
    return use_native_decoding(fast, few_rows=few_rows)


def tiny(config_kw=None) -> Transformer:
    torch.manual_seed(0)
    config = ModelConfig(family="qwen2", vocab_size=300, n_layer=2, n_embd=64, n_head=4, n_kv_head=2,
                         intermediate_size=96, max_position_embeddings=64, norm="rmsnorm", mlp="swiglu",
                         position="rope", qkv_bias=True, **(config_kw or {}))
    return Transformer(config).eval()


@needs_kernels
@pytest.mark.parametrize("threads,prompt", [(1, 4), (2, 4), (2, 50)])  # (50: every head's scores longer)
@pytest.mark.parametrize("whole_step", [True, False])
@pytest.mark.parametrize("columns", [False, True])
def test_float32_model_decodes_the_same_with_its_layers_compiled(threads, prompt, whole_step, columns, count_calls):
    """Every one-token step as one compiled call for the whole model (`Float32DecodeStep`), or
    (without it) one per layer: the same logits as the modules on PyTorch, step after step.
    `columns`: the wide weights stored column-major again afterwards (the kernels' other layout:
    the gate/up product and the bias then take their separate passes)."""
    plain = tiny()
    fast = copy.deepcopy(plain)
    use_column_major_weights(fast)
    use_numpy_blas(fast, numpy_rows=False)
    use_native_decoding(fast)
    assert all(type(b) is Float32DecoderBlock for b in fast.layers)
    assert all(m.native_rows and m.weight.is_contiguous() for m in fast.modules() if isinstance(m, BlasLinear))
    assert isinstance(fast.decode_step, Float32DecodeStep)
    if columns:
        use_column_major_weights(fast)
        assert not fast.layers[0].mlp.fc.weight.is_contiguous()
    if not whole_step:
        fast.decode_step = None
    ids = torch.randint(0, 300, (1, prompt + 6), generator=torch.Generator().manual_seed(1))
    calls = count_calls(dk, "f32_decode_model" if whole_step else "f32_decode_layer")
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.inference_mode():
            outs = []
            for model in (fast, plain):
                cache = KVCache.for_model(model.config, 1, prompt + 8, torch.float32, "cpu")
                model(ids[:, :prompt], cache=cache, start=0)
                outs.append(torch.stack([model(ids[:, i:i + 1], cache=cache, start=i)[0, -1]
                                         for i in range(prompt, prompt + 6)]))
                if model is fast:  # the prefill took the plain path
                    assert calls == [True] * (6 if whole_step else 12)  # per step, or 2 layers x 6 steps
    finally:
        torch.set_num_threads(before)
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-4, atol=1e-4)


@needs_kernels
def test_whole_decode_step_declines_what_it_does_not_cover():
    """Autograd on, a forward hook, a cache row of a larger batch, a weight moved after the first
    step (the layers' addresses gathered again): each declines or re-plans, and logits stay right."""
    plain = tiny()
    fast = compiled_copy(plain)
    step = fast.decode_step
    ids = torch.tensor([[5]])

    def run(model, grad=False, rows=1):
        cache = KVCache.for_model(model.config, rows, 8, torch.float32, "cpu")
        with torch.set_grad_enabled(grad):
            return model(ids, cache=cache.rows(0, 1), start=0)[0, -1].detach()

    want = run(plain)
    with torch.inference_mode():
        cache = KVCache.for_model(fast.config, 1, 8, torch.float32, "cpu")
        assert step(fast, ids, cache, 0) is not None
        assert step(fast, ids, KVCache.for_model(fast.config, 2, 8, torch.float32, "cpu"), 0) is None  # 2 rows
        handle = fast.layers[1].register_forward_hook(lambda *a: None)
        assert step(fast, ids, cache, 0) is None
        handle.remove()
    with torch.no_grad():
        fast.layers[0].mlp.fc.weight.data = fast.layers[0].mlp.fc.weight.data.clone()  # moved
        torch.testing.assert_close(step(fast, ids, KVCache.for_model(fast.config, 1, 8, torch.float32, "cpu"), 0)
                                   .view(-1), want, rtol=1e-4, atol=1e-4)
    assert step(fast, ids, cache, 0) is None  # autograd on
    torch.testing.assert_close(run(fast, grad=True), want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(run(fast, rows=3), want, rtol=1e-4, atol=1e-4)


@needs_kernels
def test_a_steady_loop_checks_the_model_once_and_again_after_jobs(count_calls):
    """Inside `steady()` the plan is checked at the first step only (a hook added in between is
    not seen: the caller promised no changes); `forget_check` (what a scheduler does after running
    jobs) makes the next step check again; outside, every step checks. A generation through
    `Scheduler.run_until_idle` checks once and gives the plain model's tokens."""
    from lmforge.infer.sampling import SamplingParams
    from lmforge.infer.scheduler import Scheduler

    plain = tiny()
    fast = compiled_copy(plain)
    step = fast.decode_step
    ids = torch.tensor([[5]])
    cache = KVCache.for_model(fast.config, 1, 8, torch.float32, "cpu")
    checks = count_calls(step, "_still_valid")
    with torch.inference_mode():
        with dk.steady(fast):
            assert step(fast, ids, cache, 0) is not None and step(fast, ids, cache, 1) is not None
            assert len(checks) == 1  # (the plan was built at the first step: its own check)
            handle = fast.layers[1].register_forward_hook(lambda *a: None)
            assert step(fast, ids, cache, 2) is not None  # trusted, as promised
            dk.forget_check(fast)
            assert step(fast, ids, cache, 2) is None  # checked again: the hook is seen
            handle.remove()
            assert step(fast, ids, cache, 2) is not None
        n = len(checks)
        step(fast, ids, cache, 3), step(fast, ids, cache, 4)
        assert len(checks) == n + 2  # outside: every step
    tokens = []
    for model in (plain, fast):
        scheduler = Scheduler(model, None, max_batch=1, max_seq_len=32, prefix_cache_bytes=0)
        handle = scheduler.submit([1, 5, 9], SamplingParams(max_tokens=6, temperature=0, ignore_eos=True), stream=False)
        before = len(checks)
        scheduler.run_until_idle()
        tokens.append(handle.result().token_ids)
    assert len(checks) - before <= 2  # one check for the generation (two if it planned again)
    assert tokens[0] == tokens[1] and len(tokens[1]) == 6
    with torch.inference_mode(), dk.steady(fast):
        step(fast, ids, cache, 0)
        assert step._checked is not None
        scheduler.run(lambda: None)  # a job (here on the caller's thread): the next step checks again
        assert step._checked is None


@needs_kernels
def test_whole_decode_step_runs_beside_bf16_prefill_products():
    """`dtype="auto"` on a CPU with bf16 units gives the layers bf16 prefill products
    (`Bf16PrefillLinear`): one row stays float32, so the compiled step still takes it; a layer
    told to send single rows to bf16 too (`min_rows` 1) makes it give the step back, and a
    batched step only up to the rows that stay float32."""
    from lmforge.infer.bf16_prefill import generation_products, use_bf16_prefill

    plain = tiny()
    fast = compiled_copy(plain, few_rows=4)
    use_bf16_prefill(fast)
    step = fast.decode_step
    ids = torch.tensor([[7]])
    with torch.inference_mode():
        want = plain(ids, cache=KVCache.for_model(plain.config, 1, 8, torch.float32, "cpu"), start=0)[0, -1]
        with generation_products():
            got = step(fast, ids, KVCache.for_model(fast.config, 1, 8, torch.float32, "cpu"), 0)
            assert got is not None
            torch.testing.assert_close(got.view(-1), want, rtol=1e-4, atol=1e-4)
            fast.layers[1].mlp.fc.min_rows = 1
            assert step(fast, ids, KVCache.for_model(fast.config, 1, 8, torch.float32, "cpu"), 0) is None
            # bf16 from 3 rows on: a 2-row step stays compiled (float32, as the modules would
            # compute it), a 3-row one goes back to the modules and their bf16 products
            use_bf16_prefill(fast, min_rows=3)
            for rows, taken in ((2, True), (3, False)):
                cache = KVCache.for_model(fast.config, rows, 8, torch.float32, "cpu")
                got = step(fast, ids.expand(rows, 1), cache, torch.arange(rows))
                assert (got is not None) is taken


@needs_kernels
@pytest.mark.parametrize("threads", [1, 2])
def test_batched_steps_of_a_few_rows_run_as_one_compiled_call(threads, count_calls):
    """Rows at their own positions (each its own cache row, prompts of different lengths): the
    compiled step takes as many as the few-rows product does (`native_max_rows`, here 4), a
    fifth row gives the step back to the modules; the logits equal the plain model's either way.
    With the few-rows product off (`native_max_rows` 1) no batched step is compiled."""
    plain = tiny()
    fast = compiled_copy(plain, few_rows=4)
    calls = count_calls(dk, "f32_decode_rows_model")
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for rows in (2, 3, 4, 5):
            lengths = [4 + 5 * b for b in range(rows)]
            ids = torch.randint(0, 300, (rows, max(lengths) + 3), generator=torch.Generator().manual_seed(rows))
            outs = []
            for model in (fast, plain):
                cache = KVCache.for_model(model.config, rows, 40, torch.float32, "cpu")
                with torch.inference_mode():
                    for b, n in enumerate(lengths):
                        model(ids[b:b + 1, :n], cache=cache.rows(b, b + 1), start=0)
                    positions = torch.tensor(lengths)
                    outs.append(torch.stack([model(ids[:, [i]], cache=cache, start=positions + i)[:, -1]
                                             for i in range(3)]))
            torch.testing.assert_close(outs[0], outs[1], rtol=1e-4, atol=1e-4)
        assert calls == [True] * 9  # three steps each of 2, 3 and 4 rows; none of 5
        use_native_decoding(fast, few_rows=1)
        cache = KVCache.for_model(fast.config, 2, 8, torch.float32, "cpu")
        with torch.inference_mode():
            fast(ids[:2, :1], cache=cache, start=torch.tensor([0, 0]))
        assert len(calls) == 9
    finally:
        torch.set_num_threads(before)
