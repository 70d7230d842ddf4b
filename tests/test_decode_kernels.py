"""lmforge's compiled float32 decode path (lmforge/infer/decode_kernels.py): its matrix-vector
product on both weight layouts, and a float32 model's decode steps with every pre-norm layer
run as one compiled call, against the same model on PyTorch."""

from __future__ import annotations

import copy

import pytest
import torch

from lmforge.infer import decode_kernels as dk
from lmforge.infer.layout import (BlasLinear, Float32DecoderBlock, use_column_major_weights, use_native_decoding,
                                  use_numpy_blas)
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


def tiny(config_kw=None) -> Transformer:
    torch.manual_seed(0)
    config = ModelConfig(family="qwen2", vocab_size=300, n_layer=2, n_embd=64, n_head=4, n_kv_head=2,
                         intermediate_size=96, max_position_embeddings=64, norm="rmsnorm", mlp="swiglu",
                         position="rope", qkv_bias=True, **(config_kw or {}))
    return Transformer(config).eval()


@needs_kernels
@pytest.mark.parametrize("threads", [1, 2])
def test_float32_model_decodes_the_same_with_its_layers_compiled(threads):
    plain = tiny()
    fast = copy.deepcopy(plain)
    use_column_major_weights(fast)
    use_numpy_blas(fast, numpy_rows=False)
    use_native_decoding(fast)
    assert all(type(b) is Float32DecoderBlock for b in fast.layers)
    assert all(m.native_rows for m in fast.modules() if isinstance(m, BlasLinear))
    ids = torch.randint(0, 300, (1, 10), generator=torch.Generator().manual_seed(1))
    calls = []
    real = dk.f32_decode_layer

    def counted(*a, **kw):
        out = real(*a, **kw)
        calls.append(out is not None)
        return out

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    dk.f32_decode_layer = counted
    try:
        with torch.inference_mode():
            outs = []
            for model in (fast, plain):
                cache = KVCache.for_model(model.config, 1, 12, torch.float32, "cpu")
                model(ids[:, :4], cache=cache, start=0)
                outs.append(torch.stack([model(ids[:, i:i + 1], cache=cache, start=i)[0, -1] for i in range(4, 10)]))
                if model is fast:
                    assert calls == [True] * 12  # 2 layers x 6 steps; the prefill took the plain path
    finally:
        dk.f32_decode_layer = real
        torch.set_num_threads(before)
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-4, atol=1e-4)
