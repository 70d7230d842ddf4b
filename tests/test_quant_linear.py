"""Weight-only int4 / int8 linear layers and GGUF models loaded with their weights kept quantized.

The packing is checked exactly: with float32 compute (PyTorch's reference kernels) a module's
product equals x @ dequant(W)^T, and a GGUF tensor's Q4_0 / Q4_1 blocks become the module's
codes, scales and zeros with the `gguf` package's dequantizer giving the same weights. The
fast path (bfloat16 activations) is checked against a stated tolerance.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from lmforge.errors import LmforgeError
from lmforge.infer import quant_kernels as qk
from lmforge.infer.quant_linear import (Int4Linear, Int8Linear, dequantize_model, plain_float_linears,
                                        quantize_int4, quantize_model, quantized_nbytes, reference_product)
from lmforge.model import ModelConfig, Transformer

gguf = pytest.importorskip("gguf")
T = gguf.GGMLQuantizationType

# bfloat16 activations and scales: 8 significant bits in, float32 accumulation, 8 bits out.
BF16_RTOL = 2e-2


def tiny_llama(seed: int = 0, tied: bool = True) -> Transformer:
    torch.manual_seed(seed)
    config = ModelConfig(family="llama", vocab_size=320, n_layer=2, n_embd=64, n_head=4, n_kv_head=2,
                         intermediate_size=96, max_position_embeddings=128, norm="rmsnorm", mlp="swiglu",
                         position="rope", tie_word_embeddings=tied, bos_token_id=1, eos_token_id=2)
    model = Transformer(config).eval()
    with torch.no_grad():  # larger weights than the init's 0.02 make logits (and argmax) decisive
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(8)
    return model


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def test_int4_codes_scales_and_zeros_round_trip_exactly():
    g = torch.Generator().manual_seed(0)
    n, k = 40, 96  # 40 rows: padded to 48 for the packing, cut from the result
    codes = torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8)
    scales, zeros = torch.rand(n, k // 32, generator=g), torch.randn(n, k // 32, generator=g)
    bias = torch.randn(n, generator=g)
    module = Int4Linear.from_codes(codes, scales, zeros, 32, bias, compute_dtype=torch.float32)
    assert torch.equal(module.codes(), codes)
    weight = (codes.float() - 8) * scales.repeat_interleave(32, 1) + zeros.repeat_interleave(32, 1)
    assert torch.equal(module.dequantized(), weight)
    x = torch.randn(3, 5, k, generator=g)
    torch.testing.assert_close(module(x), x @ weight.T + bias, rtol=1e-5, atol=1e-5)
    assert module(x).shape == (3, 5, n)


def test_int4_bfloat16_path_is_close_to_the_exact_product():
    linear = nn.Linear(128, 64)
    fast = Int4Linear.from_linear(linear)  # bfloat16 compute (the default)
    x = torch.randn(4, 128)
    assert fast(x).dtype == torch.float32
    assert relative_error(fast(x), reference_product(x, fast)) < BF16_RTOL
    # round to nearest with 16 levels a group: every weight within half a step of its group's grid
    # (float32 scales); bfloat16 scales and zeros move it by at most 8 steps x 2^-8 more
    exact = Int4Linear.from_linear(linear, compute_dtype=torch.float32)
    w = linear.weight.detach().view(64, 4, 32)
    step = (w.amax(-1) - w.amin(-1))[..., None] / 15
    assert bool(((exact.dequantized().view(64, 4, 32) - w).abs() <= step * (0.5 + 1e-4)).all())
    assert bool(((fast.dequantized().view(64, 4, 32) - w).abs() <= step * (0.5 + 8 * 2**-8)).all())


def test_int8_per_row_product_and_rounding():
    linear = nn.Linear(96, 48, bias=True)
    exact = Int8Linear.from_linear(linear, compute_dtype=torch.float32)
    x = torch.randn(2, 96)
    torch.testing.assert_close(exact(x), x @ exact.dequantized().T + linear.bias, rtol=1e-5, atol=1e-5)
    scale = linear.weight.detach().abs().amax(1, keepdim=True) / 127
    assert bool(((exact.dequantized() - linear.weight.detach()).abs() <= scale / 2 + 1e-7).all())
    fast = Int8Linear.from_linear(linear)
    assert relative_error(fast(x), exact(x)) < BF16_RTOL
    assert fast.nbytes < linear.weight.numel() * 4 / 3


def gguf_tensor(values: np.ndarray, qtype, name: str = "w"):
    from lmforge.io.gguf_file import GGUFTensor

    blocks = gguf.quants.quantize(values, qtype)
    return GGUFTensor(name, values.shape, qtype, blocks.reshape(-1))


@pytest.mark.parametrize("qtype", [T.Q4_0, T.Q4_1])
def test_gguf_4bit_blocks_become_the_modules_codes(qtype):
    from lmforge.infer.quant_gguf import int4_blocks

    values = np.random.default_rng(1).standard_normal((48, 128)).astype(np.float32)
    tensor = gguf_tensor(values, qtype)
    want = torch.from_numpy(tensor.to_numpy())  # the gguf package's dequantizer
    module = Int4Linear.from_codes(*int4_blocks(tensor), compute_dtype=torch.float32)
    assert torch.equal(module.dequantized(), want)
    x = torch.randn(2, 128)
    torch.testing.assert_close(module(x), x @ want.T, rtol=1e-5, atol=1e-5)
    fast = Int4Linear.from_codes(*int4_blocks(tensor))
    assert relative_error(fast(x), x @ want.T) < BF16_RTOL


def test_gguf_q4_k_blocks_become_the_modules_codes():
    from lmforge.infer.quant_gguf import q4_k_blocks
    from lmforge.io.gguf_file import GGUFTensor

    # Any bytes are valid Q4_K blocks once d and dmin are finite: random 6-bit scales/mins and codes.
    rng = np.random.default_rng(3)
    blocks = rng.integers(0, 256, (32, 2, 144), dtype=np.uint8)
    blocks[..., 0:2] = np.frombuffer(np.float16(0.013).tobytes(), np.uint8)
    blocks[..., 2:4] = np.frombuffer(np.float16(0.021).tobytes(), np.uint8)
    tensor = GGUFTensor("w", (32, 512), T.Q4_K, blocks.reshape(-1))
    module = Int4Linear.from_codes(*q4_k_blocks(tensor), compute_dtype=torch.float32)
    assert torch.equal(module.dequantized(), torch.from_numpy(tensor.to_numpy()))


def test_gguf_q8_0_blocks_match_the_dequantizer():
    from lmforge.infer.quant_gguf import q8_0_blocks

    values = np.random.default_rng(2).standard_normal((16, 64)).astype(np.float32)
    tensor = gguf_tensor(values, T.Q8_0)
    codes, scales = q8_0_blocks(tensor)
    weight = codes.float().view(16, 2, 32) * scales[..., None]
    assert torch.equal(weight.view(16, 64), torch.from_numpy(tensor.to_numpy()))


@pytest.fixture(scope="module")
def q4_0_file(tmp_path_factory):
    from lmforge.model.gguf_write import write_gguf

    path = tmp_path_factory.mktemp("quant") / "tiny-q4_0.gguf"
    write_gguf(tiny_llama(), path, "q4_0")  # Q4_0 block matrices, a Q8_0 tied head
    return path


def test_gguf_model_kept_quantized_equals_the_dequantized_model(q4_0_file):
    from lmforge.infer.quant_gguf import load_gguf_quantized
    from lmforge.model.gguf_io import load_gguf_model

    reference = load_gguf_model(q4_0_file)
    exact = load_gguf_quantized(q4_0_file, bits=4, head_bits=None, compute_dtype=torch.float32)
    assert isinstance(exact.layers[0].attn.qkv, Int4Linear) and isinstance(exact.layers[1].mlp.fc, Int4Linear)
    assert exact.lm_head.weight is exact.embed.weight  # float head stays tied
    for name in ("attn.qkv", "attn.out", "mlp.fc", "mlp.proj"):  # q/k rows unpermuted, parts stacked
        assert torch.equal(exact.get_submodule(f"layers.1.{name}").dequantized(),
                           reference.get_submodule(f"layers.1.{name}").weight)
    ids = torch.randint(3, 320, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        want = reference(ids)
        torch.testing.assert_close(exact(ids), want, rtol=1e-4, atol=1e-4)
        fast = load_gguf_quantized(q4_0_file, bits=4, head_bits=8)  # bf16 compute, int8 head
        assert isinstance(fast.lm_head, Int8Linear)
        if qk.available():  # the kernels' copies made at construction survive the float tensors' load
            assert all(m.__dict__.get("_native") is not None for m in fast.modules() if isinstance(m, (Int4Linear, Int8Linear)))
        assert relative_error(fast(ids), want) < 5e-2


def test_scheduler_decodes_a_quantized_model_like_its_dequantized_copy(q4_0_file):
    from lmforge.infer import Generator, SamplingParams
    from lmforge.infer.quant_gguf import load_gguf_quantized

    exact = load_gguf_quantized(q4_0_file, bits=4, head_bits=8, compute_dtype=torch.float32)
    reference = dequantize_model(load_gguf_quantized(q4_0_file, bits=4, head_bits=8, compute_dtype=torch.float32))
    assert not any(isinstance(m, (Int4Linear, Int8Linear)) for m in reference.modules())
    prompts = [[1, 5, 9, 14], [1, 7, 7, 7, 30, 31, 2], [1, 100]]
    params = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    got = [c.token_ids for c in Generator(exact).generate(prompts, params)]  # batched rows, KV cache
    want = [c.token_ids for c in Generator(reference).generate(prompts, params)]
    assert got == want and all(len(t) == 10 for t in got)
    fast = load_gguf_quantized(q4_0_file, bits=4)
    assert all(len(c.token_ids) == 10 for c in Generator(fast).generate(prompts, params))


def test_quantize_model_swaps_every_block_linear_and_the_head():
    model = tiny_llama(tied=False)
    ids = torch.randint(3, 320, (1, 10), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        want = model(ids)
    before = quantized_nbytes(model)["total"]
    quantize_model(model, bits=4, head_bits=8, compute_dtype=torch.float32)
    kinds = {type(m) for m in model.modules()}
    assert nn.Linear not in kinds and {Int4Linear, Int8Linear} <= kinds
    sizes = quantized_nbytes(model)
    assert sizes["total"] < before / 2
    with torch.inference_mode():
        got = model(ids)
        assert relative_error(got, dequantize_model(model)(ids)) < 1e-5
    eight = quantize_model(tiny_llama(tied=False), bits=8, head_bits=8, compute_dtype=torch.float32)
    with torch.inference_mode():
        err8 = relative_error(eight(ids), want)
    # random Gaussian weights are the worst case for 16 levels; 256 levels come several times closer
    assert err8 < 0.05 and err8 * 5 < relative_error(got, want) < 0.5


def test_fused_quantized_swiglu_equals_the_module_by_module_mlp():
    from lmforge.infer.quant_linear import QuantizedSwiGLU
    from lmforge.model.transformer import MLP

    model = quantize_model(tiny_llama(), bits=4, compute_dtype=torch.float32)
    mlp = model.layers[0].mlp
    assert type(mlp) is QuantizedSwiGLU
    x = torch.randn(2, 3, 64)
    with torch.inference_mode():
        fused = mlp(x)
        torch.testing.assert_close(fused, MLP.forward(mlp, x), rtol=1e-5, atol=1e-5)
    fast = quantize_model(tiny_llama(), bits=4)  # bfloat16 between the two products
    with torch.inference_mode():
        ref = MLP.forward(fast.layers[0].mlp, x)
        assert relative_error(fast.layers[0].mlp(x), ref) < BF16_RTOL


def test_quantize_model_turns_blas_linears_back_into_plain_ones():
    from lmforge.infer.layout import BlasLinear, use_numpy_blas, uses_numpy_blas

    model = use_numpy_blas(tiny_llama())
    assert uses_numpy_blas(model)
    quantize_model(model, bits=8, head_bits=None)
    assert not uses_numpy_blas(model) and not any(isinstance(m, BlasLinear) for m in model.modules())
    assert type(model.lm_head) is nn.Linear
    plain_float_linears(model)  # idempotent


def test_rtn_int4_groups_keep_min_and_max():
    w = torch.randn(16, 64)
    codes, scales, zeros = quantize_int4(w)
    groups = w.view(16, 2, 32)
    deq = (codes.float().view(16, 2, 32) - 8) * scales[..., None] + zeros[..., None]
    torch.testing.assert_close(deq.amin(-1), groups.amin(-1), rtol=0, atol=1e-5)
    torch.testing.assert_close(deq.amax(-1), groups.amax(-1), rtol=0, atol=1e-5)


def test_bad_requests_are_one_clear_error(q4_0_file):
    import lmforge
    from lmforge.infer.quant_gguf import load_gguf_quantized, load_quantized_model
    from lmforge.model.registry import resolve

    with pytest.raises(LmforgeError, match="4 or 8 bits"):
        quantize_model(tiny_llama(), bits=3)
    with pytest.raises(LmforgeError, match="4 or 8 bits"):
        load_gguf_quantized(q4_0_file, bits=2)
    with pytest.raises(LmforgeError, match="unknown --weights"):
        lmforge.load(str(q4_0_file), weights="q5")
    spec = resolve(str(q4_0_file))
    with pytest.raises(LmforgeError, match="CPU only"):
        load_quantized_model(spec, "q4", "meta")
    with pytest.raises(LmforgeError, match="float32"):
        load_quantized_model(spec, "q8", "cpu", torch.bfloat16)
    with pytest.raises(LmforgeError, match="divisible"):
        Int4Linear(48, 16)


def test_generate_command_has_a_weights_flag():
    from lmforge.cli import build_parser

    args = build_parser().parse_args(["generate", "--prompt", "hello", "--weights", "q4"])
    assert args.weights == "q4"
    assert build_parser().parse_args(["serve"]).weights == "float"


@pytest.mark.slow
def test_default_model_kept_4bit_answers_like_the_float_model():
    """The shipped Q4_1 file read straight into int4 modules (~20 s to load and answer)."""
    import lmforge

    lm = lmforge.load(weights="q4")
    qkv = lm.model.layers[0].attn.qkv
    assert isinstance(qkv, Int4Linear) and isinstance(lm.model.lm_head, Int8Linear)
    question = "What is the capital of France?"
    assert "Paris" in lm.chat(question, max_tokens=12, temperature=0)
    assert quantized_nbytes(lm.model)["quantized"] < 0.25 * 4 * sum(
        m.in_features * m.out_features for m in lm.model.modules() if isinstance(m, (Int4Linear, Int8Linear)))
