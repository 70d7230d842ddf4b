"""int8 prefill products (W8A8, dynamic per-token activations, smoothing): lmforge/infer/int8_prefill.py."""

from __future__ import annotations

import pytest
import torch

from lmforge.errors import LmforgeError
from lmforge.infer.int8_prefill import (Int8PrefillLinear, Int8Weights, calibrate_int8_prefill, calibration_rows,
                                        default_calibration_texts, int8_mm_supported, output_error, quantize_rows,
                                        smoothing, uses_int8_prefill)
from lmforge.model.config import ModelConfig
from lmforge.model.transformer import Transformer

pytestmark = pytest.mark.skipif(not int8_mm_supported(), reason="this PyTorch has no CPU int8 matrix product")


def tiny_config(**extra) -> ModelConfig:
    return ModelConfig(**{**dict(vocab_size=256, n_layer=2, n_embd=64, n_head=4, n_kv_head=2, intermediate_size=128,
                                 max_position_embeddings=128), **extra})


def test_per_token_codes_round_to_the_nearest_level():
    x = torch.randn(16, 96, generator=torch.Generator().manual_seed(0)) * torch.logspace(-2, 2, 16).unsqueeze(1)
    codes, scale = quantize_rows(x)
    assert codes.dtype == torch.int8 and scale.shape == (16, 1)
    assert codes.abs().max() == 127  # each row's largest value takes the top code
    err = (codes.float() * scale - x).abs()
    assert (err <= scale / 2 * (1 + 1e-5)).all()  # at most half a step of that row's own scale


def _outlier_inputs(rows=512, features=128, seed=0):
    """Activations like an LLM's: most features small, a few channels 50x larger on every token."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, features, generator=g)
    x[:, :3] *= 50.0
    return x, torch.randn(96, features, generator=g) * 0.05


def test_smoothing_cancels_exactly_before_rounding_and_reduces_the_error():
    x, w = _outlier_inputs()
    s = smoothing(x.abs().amax(0), w, 0.5)
    assert torch.allclose((x / s) @ (w * s).t(), x @ w.t(), rtol=1e-4, atol=1e-4)
    ref = x @ w.t()
    plain = output_error(x, ref, Int8Weights(w, None, 0.0))
    smooth = output_error(x, ref, Int8Weights(w, s, 0.5))
    assert smooth < 0.5 * plain  # the outlier channels no longer take every token's int8 range
    assert plain < 1e-2  # and int8 is close to float32 either way


def test_int8_product_matches_float32_within_rounding():
    x, w = torch.randn(64, 256), torch.randn(192, 256)
    got, ref = Int8Weights(w, None, 0.0).matmul(x), x @ w.t()
    # Two int8 roundings (about 1/254 of each row's range): the sums' relative error is about 1%.
    assert ((got - ref).norm() / ref.norm()).item() < 0.02


def _calibrated(config, seed=0, **options):
    from lmforge.infer.layout import use_column_major_weights

    torch.manual_seed(seed)
    ref = use_column_major_weights(Transformer(config).eval())
    ours = use_column_major_weights(Transformer(config).eval())
    ours.load_state_dict(ref.state_dict())
    g = torch.Generator().manual_seed(seed + 1)
    report = calibrate_int8_prefill(ours, [torch.randint(3, 256, (1, 48), generator=g) for _ in range(3)], **options)
    for m in ours.modules():
        if isinstance(m, Int8PrefillLinear):
            m.min_rows = 8
    return ref, ours, report


def test_calibration_converts_the_chosen_block_linears_only():
    config = tiny_config()
    ref, ours, report = _calibrated(config)
    converted = sorted(n for n, m in ours.named_modules() if isinstance(m, Int8PrefillLinear))
    assert converted == sorted(report) == sorted(f"layers.{i}.{k}" for i in range(config.n_layer)
                                                 for k in ("attn.qkv", "attn.out", "mlp.fc"))
    assert uses_int8_prefill(ours) and {r["alpha"] for r in report.values()} == {0.7}
    assert torch.equal(ours.state_dict()["layers.0.attn.qkv.weight"], ref.state_dict()["layers.0.attn.qkv.weight"])
    with pytest.raises(LmforgeError, match="no linear layer named"):
        calibrate_int8_prefill(Transformer(config).eval(), [torch.randint(3, 256, (1, 16))], kinds=("mlp.nope",))


def test_a_grid_of_strengths_picks_the_smallest_error_per_layer():
    _, _, report = _calibrated(tiny_config(), alphas=(0.0, 0.5, 0.9), kinds=("attn.qkv", "mlp.proj"))
    assert len(report) == 4
    for r in report.values():
        assert r["alpha"] in (0.0, 0.5, 0.9)
        assert r["error"] <= r["error_plain"] + 1e-12  # no smoothing is a candidate: the choice is never worse


def test_int8_prefill_only_inside_generation_and_only_for_many_rows():
    from lmforge.infer.bf16_prefill import generation_products
    from lmforge.model.kv_cache import KVCache

    config = tiny_config()
    ref, ours, _ = _calibrated(config)
    ids = torch.randint(3, 256, (2, 40), generator=torch.Generator().manual_seed(3))
    caches = [KVCache.for_model(config, 2, 64, torch.float32, torch.device("cpu")) for _ in range(2)]
    with torch.inference_mode():
        want = ref(ids, cache=caches[0], start=0)
        scored = ours(ids)  # scoring and perplexity: float32 products, the same values
        with generation_products():
            got = ours(ids, cache=caches[1], start=0)
            one = ours(ids[:, :1])  # a row per sequence: below min_rows, float32
        one_ref = ref(ids[:, :1])
    assert torch.equal(scored, want) and torch.equal(one, one_ref)
    assert caches[1].k.dtype == torch.float32
    assert 0 < (got - want).abs().max() < 0.05 * want.abs().max()


def test_int8_prefill_then_float32_decode_tracks_float32_greedy():
    from lmforge.infer import SamplingParams
    from lmforge.infer.engine import Generator

    config = tiny_config(n_layer=3)
    ref, ours, _ = _calibrated(config, seed=4)
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(3, 256, (n,), generator=g).tolist() for n in (24, 40, 33, 57, 20, 48)]
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    want = [c.token_ids for c in Generator(ref).generate(prompts, params)]
    got = [c.token_ids for c in Generator(ours).generate(prompts, params)]
    # int8 moves the prefill's logits by about 1% of their range: a greedy choice can flip only
    # where two tokens were that close. Allowed: 5 of 6 first tokens and 4 of 6 continuations.
    assert sum(a[0] == b[0] for a, b in zip(got, want)) >= len(prompts) - 1
    assert sum(a == b for a, b in zip(got, want)) >= len(prompts) - 2


def test_a_changed_weight_needs_a_new_calibration():
    from lmforge.infer.bf16_prefill import generation_products

    _, ours, _ = _calibrated(tiny_config())
    with torch.no_grad():
        ours.layers[0].mlp.fc.weight.mul_(2.0)
    with torch.inference_mode(), generation_products(), pytest.raises(LmforgeError, match="calibrate again"):
        ours(torch.randint(3, 256, (1, 20)))


def test_calibration_text_ships_with_the_package():
    texts = default_calibration_texts()
    assert len(texts) > 20 and sum(map(len, texts)) > 100_000
    rows = calibration_rows(_Chars(), texts, tokens=1000, length=256)
    assert [r.shape for r in rows] == [(1, 256)] * 3
    with pytest.raises(LmforgeError, match="at least 32 tokens"):
        calibration_rows(_Chars(), ["short"])


def test_load_refuses_bad_prefill_choices():
    import lmforge

    with pytest.raises(LmforgeError, match="unknown prefill precision"):
        lmforge.load("nonexistent-model", prefill="int4")


class _Chars:
    def encode(self, text):
        return [3 + ord(c) % 250 for c in text]


def test_load_time_calibration_is_cached_by_weights_and_text(tmp_path, monkeypatch):
    from lmforge.infer import int8_prefill

    monkeypatch.setenv("LMFORGE_CACHE", str(tmp_path))
    config = tiny_config()
    texts = ["some calibration text about caches and attention " * 20]
    torch.manual_seed(0)
    first = Transformer(config).eval()
    int8_prefill.calibrate_for_generation(first, _Chars(), texts, tokens=256, length=64)
    files = list((tmp_path / "int8-prefill").glob("*.safetensors"))
    assert len(files) == 1

    second = Transformer(config).eval()
    second.load_state_dict(first.state_dict())
    real = int8_prefill.activation_stats
    monkeypatch.setattr(int8_prefill, "activation_stats", lambda *a, **k: pytest.fail("the cache was not used"))
    int8_prefill.calibrate_for_generation(second, _Chars(), texts, tokens=256, length=64)
    a, b = first.layers[1].mlp.fc.int8_weights, second.layers[1].mlp.fc.int8_weights
    assert torch.equal(a.codes, b.codes) and torch.equal(a.inv_s, b.inv_s)

    # other weights (or other text) miss the cache; a damaged file is recalibrated, not trusted
    monkeypatch.setattr(int8_prefill, "activation_stats", real)
    third = Transformer(config).eval()
    int8_prefill.calibrate_for_generation(third, _Chars(), texts, tokens=256, length=64)
    assert len(list((tmp_path / "int8-prefill").glob("*.safetensors"))) == 2
    files[0].write_bytes(b"not a safetensors file")
    int8_prefill.calibrate_for_generation(second, _Chars(), texts, tokens=256, length=64)
    assert torch.equal(second.layers[1].mlp.fc.int8_weights.codes, a.codes)


def test_int8_units_are_read_from_the_cpu_flags(monkeypatch):
    from lmforge.infer.int8_prefill import cpu_int8_units
    from lmforge.model import precision

    monkeypatch.setattr(precision, "cpu_flags", lambda path="/proc/cpuinfo": frozenset({"avx2", "avx512_vnni", "amx_int8"}))
    assert cpu_int8_units() == ("amx_int8", "avx512_vnni")
    monkeypatch.setattr(precision, "cpu_flags", lambda path="/proc/cpuinfo": frozenset({"avx2"}))
    assert cpu_int8_units() == ()


def test_calibration_includes_chat_prompts_when_the_tokenizer_has_a_template():
    from lmforge.infer.int8_prefill import chat_rows
    from lmforge.model.loading import load_tokenizer
    from lmforge.model.registry import resolve

    tokenizer = load_tokenizer(resolve(None))
    texts = default_calibration_texts()[:3]
    rows = chat_rows(tokenizer, texts, tokens=600, piece_chars=400)
    assert sum(r.shape[1] for r in rows) >= 600 and all(r.shape[0] == 1 for r in rows)
    first = tokenizer.decode(rows[0][0].tolist(), skip_special_tokens=False)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": texts[0][:400]}], add_generation_prompt=True)
    assert first == prompt  # a whole chat prompt: template, system text, the piece as the user's message
    assert chat_rows(_Chars(), texts, tokens=600) == []  # no template: plain rows only
