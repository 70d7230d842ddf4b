"""lmforge's own int4 / int8 kernels (lmforge/infer/quant_kernels.py): the exact
arithmetic they promise (int8-rounded row, integer dot products, float scales), their use by
`Int4Linear` / `Int8Linear`, and when they step aside."""

from __future__ import annotations

import copy
import os

import pytest
import torch

from lmforge.infer import quant_kernels as qk
from lmforge.infer.quant_linear import Int4Linear, Int8Linear, dequantize_model, quantize_model

needs_kernels = pytest.mark.skipif(not qk.available(), reason=f"kernels unavailable: {qk.why_not()}")


def rounded_row(x: torch.Tensor) -> torch.Tensor:
    """x as the kernels write it: per group of 32, d = max|x| / 127 (in float32, as the kernel),
    x8 = round(x / d), r8 = round((x / d - x8) * 128), x ~ d (x8 + r8 / 128)."""
    g = x.reshape(-1, 32).float()
    d = g.abs().amax(1, keepdim=True) / 127
    t = g * torch.where(d > 0, 1 / torch.where(d > 0, d, 1), 0)
    q = torch.round(t).clamp(-127, 127)
    r = torch.round((t - q) * 128).clamp(-127, 127)
    return ((128 * q.double() + r.double()) * (d.double() / 128)).reshape(x.shape)


@needs_kernels
@pytest.mark.parametrize("n,k", [(40, 128), (33, 192), (7, 64), (96, 576)])  # whole 128-chunks and a half chunk
def test_int4_kernel_computes_the_promised_sum(n, k):
    g = torch.Generator().manual_seed(n + k)
    codes = torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8)
    # float16-representable scales and offsets: the packed rows keep them as float16
    scales = (torch.rand(n, k // 32, generator=g) * 0.05).half().float()
    offsets = (torch.randn(n, k // 32, generator=g) * 0.1).half().float()
    x = torch.randn(k, generator=g) * 3
    packed = qk.q4_pack(codes, scales, offsets)
    assert packed.shape == (n, qk.q4_row_bytes(k))
    y = qk.q4_gemv(packed, x)
    # sum over groups of s * (q . x rounded) + z * (exact sum of x)
    s, z = scales.double().repeat_interleave(32, 1), offsets.double().repeat_interleave(32, 1)
    want = (codes.double() * s) @ rounded_row(x) + z @ x.double()
    torch.testing.assert_close(y.double(), want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))


@needs_kernels
def test_int8_kernel_computes_the_promised_sum():
    g = torch.Generator().manual_seed(1)
    n, k = 70, 320
    codes = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
    scales = torch.rand(n, generator=g) * 0.01
    x = torch.randn(k, generator=g)
    y = qk.q8_gemv(qk.q8_codes(codes), scales, x)
    want = (codes.double() * scales.double()[:, None]) @ rounded_row(x)
    torch.testing.assert_close(y.double(), want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))
    zero = qk.q8_gemv(qk.q8_codes(codes), scales, torch.zeros(k))  # all-zero groups: scale 0, no NaN
    assert torch.equal(zero, torch.zeros(n))


@needs_kernels
@pytest.mark.parametrize("n,k", [(40, 128), (33, 576), (70, 320), (19, 1536)])
@pytest.mark.parametrize("rows", [2, 3, 8, 9, 17])
def test_several_rows_equal_each_row_alone(n, k, rows):
    """The several-rows kernels (tiles of up to eight rows over blocks of weight rows, a half
    chunk at the end of 576 and 320) give every row exactly its one-row result."""
    g = torch.Generator().manual_seed(n * rows + k)
    codes = torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8)
    scales = (torch.rand(n, k // 32, generator=g) * 0.05).half().float()
    offsets = (torch.randn(n, k // 32, generator=g) * 0.1).half().float()
    packed = qk.q4_pack(codes, scales, offsets)
    c8, s8 = qk.q8_codes(torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)), torch.rand(n, generator=g)
    x = torch.randn(rows, k, generator=g) * 2
    x[1] = 0  # an all-zero row: scales 0, no NaN
    four, eight = qk.q4_gemm_rows(packed, x), qk.q8_gemm_rows(c8, s8, x)
    assert four.shape == eight.shape == (rows, n)
    assert torch.equal(four, torch.stack([qk.q4_gemv(packed, r) for r in x]))
    assert torch.equal(eight, torch.stack([qk.q8_gemv(c8, s8, r) for r in x]))
    assert torch.equal(four[1], qk.q4_gemv(packed, torch.zeros(k)))


@needs_kernels
def test_linear_layers_use_the_kernels_for_the_rows_they_cover():
    g = torch.Generator().manual_seed(2)
    lin = torch.nn.Linear(192, 50, bias=True)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(50, 192, generator=g) * 0.1)
    m4 = Int4Linear.from_linear(lin)
    m8 = Int8Linear.from_linear(lin)
    assert m4.native_nbytes == 50 * qk.q4_row_bytes(192) and m8.native_nbytes == 50 * 192 + 50 * 4
    x = torch.randn(1, 1, 192, generator=g)
    for m in (m4, m8):
        exact = (x @ m.dequantized().T + lin.bias).detach()
        with torch.inference_mode():
            got = m(x)
            qk.ENABLED = False
            try:
                pytorch = m(x)
            finally:
                qk.ENABLED = True
        assert got.shape == (1, 1, 50) and got.dtype == torch.float32
        err = float((got - exact).abs().max() / exact.abs().max())
        # not bit-equal: the row is rounded (steps of max|x| / (127 * 128) per 32), and the kernels
        # keep the float scales the layer was built with where dequantized() reads bfloat16 ones
        assert 0 < err < 1e-2
        assert not torch.equal(got, pytorch)  # the two paths are different arithmetic
    # several rows: each row what it gets alone, int4 up to INT4_KERNEL_ROWS rows, int8 at any count
    from lmforge.infer.quant_linear import INT4_KERNEL_ROWS

    with torch.inference_mode():
        for m, most in ((m4, INT4_KERNEL_ROWS), (m8, 4 * INT4_KERNEL_ROWS)):
            batch = torch.randn(2, most // 2, 192, generator=g)
            assert torch.equal(m(batch)[1, 3], m(batch[1, 3]))
        over = torch.randn(INT4_KERNEL_ROWS + 1, 192, generator=g)
        qk.ENABLED = False
        try:
            pytorch = m4(over)
        finally:
            qk.ENABLED = True
        assert torch.equal(m4(over), pytorch)  # past the limit: PyTorch's int4 kernel
    # an exact (float32 compute) layer: PyTorch's kernels, exact values
    exact_m4 = Int4Linear.from_linear(lin, compute_dtype=torch.float32)
    rows = torch.randn(3, 192, generator=g)
    torch.testing.assert_close(exact_m4(rows), rows @ exact_m4.dequantized().T + lin.bias)


@needs_kernels
def test_copy_is_rebuilt_when_the_buffers_change():
    g = torch.Generator().manual_seed(3)
    a = Int4Linear.from_linear(torch.nn.Linear(128, 32, bias=False))
    b = Int4Linear.from_linear(torch.nn.Linear(128, 32, bias=False))
    x = torch.randn(1, 128, generator=g)
    fresh = Int4Linear(128, 32)  # buffers from a state dict only: the copy is made from them
    fresh.load_state_dict(b.state_dict())
    with torch.no_grad():
        before = a(x)
        a.load_state_dict(b.state_dict())  # in-place copies into a's buffers
        after = a(x)
        assert torch.equal(after, fresh(x))  # rebuilt from the new buffers (their scales in bfloat16)
        assert not torch.equal(before, after)
        # b's own copy was made from the float scales it was built with: the same up to bfloat16 scales
        assert float((after - b(x)).abs().max() / b(x).abs().max()) < 2e-2


@needs_kernels
def test_quantized_model_decodes_with_the_kernels():
    from lmforge.infer import Generator, SamplingParams
    from lmforge.model import ModelConfig, Transformer

    torch.manual_seed(0)
    config = ModelConfig(family="llama", vocab_size=320, n_layer=2, n_embd=128, n_head=4, n_kv_head=2,
                         intermediate_size=192, max_position_embeddings=64, norm="rmsnorm", mlp="swiglu",
                         position="rope", bos_token_id=1, eos_token_id=2)
    model = Transformer(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(8)
    quantize_model(model, bits=4)
    reference = dequantize_model(copy.deepcopy(model))  # float32 copy of exactly these weights
    ids = torch.tensor([[1, 5, 9, 14, 30]])
    from lmforge.model.kv_cache import KVCache

    def stepwise() -> torch.Tensor:  # one token at a time through the cache: single-row products
        cache = KVCache.for_model(config, 1, 8, torch.float32, "cpu")
        for i in range(ids.shape[1]):
            out = model(ids[:, i:i + 1], cache=cache, start=i, last_only=True)[0, -1]
        return out

    with torch.inference_mode():
        want = reference(ids)[0, -1]
        ours = stepwise()
        qk.ENABLED = False
        try:
            pytorch = stepwise()  # bfloat16 rows through PyTorch's weight-only kernels
        finally:
            qk.ENABLED = True
    err_ours = float((ours - want).abs().max() / want.abs().max())
    err_pytorch = float((pytorch - want).abs().max() / want.abs().max())
    # rows rounded to max|x| / (127 * 128) per 32 against bfloat16 rows (8 significant bits):
    # the kernels' rows are the finer ones
    assert err_ours < err_pytorch < 0.05, (err_ours, err_pytorch)
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    out = Generator(model).generate([[1, 5, 9]], params)[0].token_ids
    assert len(out) == 6


def test_no_kernels_when_disabled(tmp_path):
    import subprocess
    import sys

    code = ("from lmforge.infer import quant_kernels as qk; import torch; print(qk.available(), qk.why_not()); "
            "from lmforge.infer.quant_linear import Int4Linear; "
            "m = Int4Linear.from_linear(torch.nn.Linear(128, 16)); print(m.native_nbytes)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, "LMFORGE_NATIVE": "0", "LMFORGE_CACHE": str(tmp_path)})
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["False disabled by LMFORGE_NATIVE=0", "0"]


@needs_kernels
@pytest.mark.parametrize("whole_step,head_bits", [(False, 8), (True, 8), (True, 4), (True, None)])
def test_whole_layer_call_equals_the_layer_run_module_by_module(monkeypatch, count_calls, whole_step, head_bits):
    """One compiled call per layer (`QuantizedDecoderBlock`) or for the whole step
    (`QuantizedDecodeStep`, with an int8, int4 or float32 head) against the modules one by one."""
    from lmforge.infer import quant_linear
    from lmforge.model import ModelConfig, Transformer
    from lmforge.model.kv_cache import KVCache

    torch.manual_seed(5)
    config = ModelConfig(family="qwen2", vocab_size=320, n_layer=2, n_embd=128, n_head=4, n_kv_head=2,
                         intermediate_size=192, max_position_embeddings=64, norm="rmsnorm", mlp="swiglu",
                         position="rope", qkv_bias=True, bos_token_id=1, eos_token_id=2)
    model = quantize_model(Transformer(config).eval(), bits=4, head_bits=head_bits)
    assert all(type(b) is quant_linear.QuantizedDecoderBlock for b in model.layers)
    assert isinstance(model.decode_step, quant_linear.QuantizedDecodeStep)
    if not whole_step:
        model.decode_step = None
    ids = torch.tensor([[1, 5, 9, 14, 30, 7, 8]])
    from lmforge.infer import decode_kernels

    def steps() -> torch.Tensor:
        cache = KVCache.for_model(config, 1, 8, torch.float32, "cpu")
        model(ids[:, :3], cache=cache, start=0)
        return torch.stack([model(ids[:, i:i + 1], cache=cache, start=i)[0, -1] for i in range(3, 7)])

    calls = count_calls(decode_kernels, "q4_decode_model" if whole_step else "q4_decode_layer")
    with torch.inference_mode():
        fused = steps()
        assert calls == [True] * (4 if whole_step else 8)  # per step, or 2 layers x 4 steps; not the prefill
        model.decode_step = None
        monkeypatch.setattr(quant_linear.QuantizedDecoderBlock, "_decode_step", lambda *a: None)
        modules = steps()
    # Same kernels, same order; SiLU's exp differs in the last bits (C's expf against PyTorch's),
    # which can move a value of the down product's input across a rounding step (max|x| / 32512
    # of its group): differences of that order, far below the rounding's own error.
    torch.testing.assert_close(fused, modules, rtol=0, atol=2e-4 * float(modules.abs().max()))


@needs_kernels
@pytest.mark.parametrize("head_bits", [8, 4, None])
def test_a_batched_step_is_one_compiled_call_equal_to_each_row_alone(count_calls, head_bits):
    """Sequences at their own positions, each on its own cache row: one compiled call for the
    batched step (`lmf_q4_decode_rows_model`) gives every row the logits, bit for bit, of that
    sequence decoded alone (one-row calls); more rows than `max_rows` are left to the modules."""
    from lmforge.infer import decode_kernels
    from lmforge.infer.quant_linear import QuantizedDecodeStep
    from lmforge.model import ModelConfig, Transformer
    from lmforge.model.kv_cache import KVCache

    torch.manual_seed(6)
    config = ModelConfig(family="qwen2", vocab_size=320, n_layer=2, n_embd=128, n_head=4, n_kv_head=2,
                         intermediate_size=192, max_position_embeddings=64, norm="rmsnorm", mlp="swiglu",
                         position="rope", qkv_bias=True, bos_token_id=1, eos_token_id=2)
    model = quantize_model(Transformer(config).eval(), bits=4, head_bits=head_bits)
    lengths = [3, 6, 4, 9, 5]
    ids = torch.randint(3, 320, (5, 14), generator=torch.Generator().manual_seed(1))

    def steps(rows: list[int]) -> torch.Tensor:
        cache = KVCache.for_model(config, len(rows), 16, torch.float32, "cpu")
        for b, r in enumerate(rows):
            model(ids[r:r + 1, :lengths[r]], cache=cache.rows(b, b + 1), start=0)
        positions = torch.tensor([lengths[r] for r in rows])
        return torch.stack([model(ids[rows][:, [i]], cache=cache, start=positions + i)[:, -1] for i in range(3)])

    rows_calls = count_calls(decode_kernels, "q4_decode_rows_model")
    one_calls = count_calls(decode_kernels, "q4_decode_model")
    with torch.inference_mode():
        two = steps([0, 1])
        five = steps([0, 1, 2, 3, 4])
        assert rows_calls == [True] * 6 and one_calls == []  # 3 steps of 2 rows, 3 of 5
        alone = torch.cat([steps([r]) for r in range(5)], dim=1)
        assert len(one_calls) == 15 and len(rows_calls) == 6
        model.decode_step.max_rows = 4
        modules = steps([0, 1, 2, 3, 4])
        assert len(rows_calls) == 6  # five rows over the limit: the modules
    assert isinstance(model.decode_step, QuantizedDecodeStep)
    assert torch.equal(two, alone[:, :2]) and torch.equal(five, alone)
    torch.testing.assert_close(modules, alone, rtol=0, atol=2e-4 * float(alone.abs().max()))
