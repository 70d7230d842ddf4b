"""The CPU precision policy (lmforge/model/precision.py), bf16 training products
(lmforge/model/onednn.py) and bf16 prefill with float32 decode (lmforge/infer/bf16_prefill.py).

The policy is tested with LMFORGE_CPU_BF16 forcing either answer, so the tests mean the
same on CPUs with and without bf16 units; the bf16 arithmetic itself runs anywhere
(slowly where the CPU lacks the units), so its tolerances are checked everywhere.
"""

from __future__ import annotations

import pytest
import torch

from lmforge.errors import LmforgeError
from lmforge.model import precision
from lmforge.model.config import ModelConfig
from lmforge.model.loading import pick_dtype, pick_prefill_dtype
from lmforge.model.transformer import Transformer

CPU = torch.device("cpu")


def tiny_config(**extra) -> ModelConfig:
    return ModelConfig(**{**dict(vocab_size=256, n_layer=2, n_embd=64, n_head=4, n_kv_head=2, intermediate_size=128,
                                 max_position_embeddings=128), **extra})


# -- the policy ----------------------------------------------------------------------------------

def test_cpu_flags_are_read_from_cpuinfo(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx512f avx512_bf16 amx_tile amx_bf16\n\n"
                    "processor\t: 1\nflags\t\t: fpu\n")
    flags = precision.cpu_flags(str(info))
    assert {"avx512_bf16", "amx_bf16"} <= flags and "fpu" in flags
    assert precision.cpu_flags(str(tmp_path / "missing")) == frozenset()


@pytest.mark.parametrize("units, expected", [((), "fp32"), (("avx512_bf16",), "bf16"), (("amx_bf16", "avx512_bf16"), "bf16")])
def test_auto_picks_bf16_only_with_the_hardware(monkeypatch, units, expected):
    monkeypatch.delenv(precision.ENV, raising=False)
    monkeypatch.setattr(precision, "_detected", lambda: units)
    plan = precision.auto_plan("cpu")
    assert plan.train == expected
    assert plan.prefill == ("bfloat16" if units else "float32")
    assert plan.weights == "float32"  # decode reads float32 weights either way
    assert pick_prefill_dtype("auto", CPU) == (torch.bfloat16 if units else torch.float32)
    assert pick_dtype("auto", CPU) == torch.float32


def test_override_wins_over_detection(monkeypatch):
    monkeypatch.setattr(precision, "_detected", lambda: ("amx_bf16",))
    monkeypatch.setenv(precision.ENV, "0")
    assert precision.auto_plan("cpu").train == "fp32" and not precision.cpu_has_fast_bf16()
    monkeypatch.setattr(precision, "_detected", lambda: ())
    monkeypatch.setenv(precision.ENV, "1")
    assert precision.auto_plan("cpu").train == "bf16" and precision.cpu_has_fast_bf16()
    monkeypatch.setenv(precision.ENV, "maybe")
    with pytest.raises(LmforgeError, match="LMFORGE_CPU_BF16"):
        precision.auto_plan("cpu")


def test_explicit_dtypes_are_honoured(monkeypatch):
    from lmforge.train.loop import resolve_precision

    monkeypatch.setenv(precision.ENV, "1")
    assert pick_prefill_dtype("float32", CPU) == torch.float32
    assert pick_prefill_dtype("fp32", CPU) == torch.float32
    assert pick_prefill_dtype(torch.float32, CPU) == torch.float32
    assert pick_prefill_dtype("bf16", CPU) == torch.bfloat16
    assert resolve_precision("fp32", CPU) == "fp32"
    assert resolve_precision("auto", CPU) == "bf16"
    monkeypatch.setenv(precision.ENV, "0")
    assert resolve_precision("auto", CPU) == "fp32"
    assert resolve_precision("bf16", CPU) == "bf16"  # asked for: given, even where it is slow


@pytest.mark.parametrize("override", ["0", "1"])
def test_an_explicit_prefill_choice_wins_over_the_cpu_rule(monkeypatch, override):
    monkeypatch.setenv(precision.ENV, override)
    auto = torch.bfloat16 if override == "1" else torch.float32
    assert pick_prefill_dtype("auto", CPU, "float32") == torch.float32
    assert pick_prefill_dtype("auto", CPU, "bf16") == torch.bfloat16
    assert pick_prefill_dtype("auto", CPU, "int8") == auto  # int8's own products aside, the rule decides
    assert pick_prefill_dtype("auto", CPU) == auto


def test_bf16_pays_only_for_large_layers():
    assert not precision.bf16_pays(Transformer(tiny_config()))
    big = tiny_config(n_embd=576, n_head=9, n_kv_head=3, intermediate_size=1536, n_layer=1)
    assert precision.bf16_pays(Transformer(big))


# -- bf16 training products -----------------------------------------------------------------------

def test_bf16_weight_copy_is_cached_until_the_weight_changes():
    from lmforge.model.onednn import bf16_weight

    w = torch.randn(32, 16)
    first = bf16_weight(w)
    assert first.dtype == torch.bfloat16 and bf16_weight(w) is first
    assert torch.equal(first, w.to(torch.bfloat16))
    with torch.no_grad():
        w.mul_(2)  # an optimizer step writes in place: the version counter moves
    second = bf16_weight(w)
    assert second is not first and torch.equal(second, w.to(torch.bfloat16))


def test_bf16_linear_values_and_gradients_are_close_to_float32():
    from lmforge.model.onednn import bf16_products, linear

    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 96, generator=g, requires_grad=True)
    w = torch.randn(80, 96, generator=g, requires_grad=True)
    b = torch.randn(80, generator=g, requires_grad=True)
    up = torch.randn(64, 80, generator=g)
    ref = torch.nn.functional.linear(x, w, b)
    ref_grads = torch.autograd.grad((ref * up).sum(), (x, w, b))
    with bf16_products():
        out = linear(x, w, b)
    assert out.dtype == torch.float32  # float32 handed on; only the product was bf16
    grads = torch.autograd.grad((out * up).sum(), (x, w, b))
    # inputs rounded to 8 mantissa bits: relative error ~2^-8 per factor, sums in float32
    assert (out - ref).abs().max() / ref.abs().max() < 1.5e-2
    assert (out - ref).abs().max() > 0  # the bf16 path really ran
    for got, want in zip(grads, ref_grads):
        assert got.dtype == torch.float32
        assert (got - want).abs().max() / want.abs().max() < 1.5e-2
    assert torch.allclose(grads[2], ref_grads[2])  # the bias gradient is a float32 sum


def _train_losses(bf16: bool, steps: int = 8) -> list[float]:
    from lmforge.model.onednn import bf16_products
    from lmforge.train.loss import causal_lm_loss

    torch.manual_seed(0)
    model = Transformer(tiny_config()).train()
    # fused, as the trainer builds it: its kernel writes the weights without moving their
    # version counters, so a bf16 copy kept across steps would go stale unnoticed
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, fused=True)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 256, (4, 32), generator=g) % 17  # a learnable pattern: few symbols
    out = []
    for _ in range(steps):
        with bf16_products(bf16):
            loss = causal_lm_loss(model, ids)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        out.append(float(loss.detach()))
    return out


def test_bf16_training_tracks_float32():
    fp32, bf16 = _train_losses(False), _train_losses(True)
    assert fp32[-1] < fp32[0] - 0.5 and bf16[-1] < bf16[0] - 0.5  # both learn
    for a, b in zip(fp32, bf16):
        # bf16 products moved each step's loss by about 1e-4 relative here; allowed 5e-3
        assert b == pytest.approx(a, rel=5e-3)
    assert fp32 != bf16


def test_auto_resolves_to_bf16_products_in_the_loop(monkeypatch):
    from lmforge.model.onednn import bf16_active
    from lmforge.train.loop import Trainer, resolve_precision

    monkeypatch.setenv(precision.ENV, "1")
    assert resolve_precision("auto", CPU) == "bf16"
    # The loop's precision context on a CPU: bf16 products (not torch.autocast); for a model
    # that fails `bf16_pays` the Trainer keeps "fp32" (tests/test_train_loop.py runs tiny ones).
    trainer = Trainer.__new__(Trainer)
    trainer.precision = "bf16"
    trainer.runtime = type("Runtime", (), {"device": CPU})()
    trainer.model = Transformer(tiny_config()).train()
    with trainer.autocast():
        assert bf16_active() and not torch.is_autocast_enabled("cpu")
    assert not bf16_active()
    trainer.precision = "fp32"
    with trainer.autocast():
        assert not bf16_active()


def test_bf16_training_with_activation_checkpointing():
    """Recomputation runs outside the loop's precision block; with checkpointing the loop
    uses autocast, whose state the recomputation restores, and gets the bf16 products."""
    from lmforge.model.onednn import bf16_active
    from lmforge.train.loop import Trainer
    from lmforge.train.loss import causal_lm_loss

    torch.manual_seed(0)
    model = Transformer(tiny_config()).train()
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(4))
    ref = torch.autograd.grad(causal_lm_loss(model, ids), list(model.parameters()))
    model.gradient_checkpointing = True
    trainer = Trainer.__new__(Trainer)
    trainer.precision, trainer.model = "bf16", model
    trainer.runtime = type("Runtime", (), {"device": CPU})()
    with trainer.autocast():
        assert torch.is_autocast_enabled("cpu") and bf16_active()
        loss = causal_lm_loss(model, ids)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    for got, want in zip(grads, ref):
        assert (got - want).abs().max() <= 3e-2 * want.abs().max() + 1e-6


# -- bf16 prefill, float32 decode ----------------------------------------------------------------

def _bf16_prefill_model(model):
    from lmforge.infer.bf16_prefill import Bf16PrefillLinear, use_bf16_prefill
    from lmforge.infer.layout import use_column_major_weights

    use_column_major_weights(model)  # as lmforge.load lays out CPU weights
    use_bf16_prefill(model, min_rows=8)
    for m in model.modules():
        if isinstance(m, Bf16PrefillLinear):
            m.min_weight_elements = 0  # a tiny model: take the bf16 path anyway
    return model


def test_bf16_prefill_then_float32_decode_matches_float32_greedy():
    from lmforge.infer import SamplingParams
    from lmforge.infer.engine import Generator

    torch.manual_seed(0)
    config = tiny_config(n_layer=3)
    ref = Transformer(config).eval()
    ours = _bf16_prefill_model(Transformer(config).eval())
    ours.load_state_dict(ref.state_dict())
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(3, 256, (n,), generator=g).tolist() for n in (24, 40, 33, 57, 20, 48)]
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    want = [c.token_ids for c in Generator(ref).generate(prompts, params)]
    got = [c.token_ids for c in Generator(ours).generate(prompts, params)]
    # A bf16 prefill shifts the logits by ~1e-2; a greedy choice changes only where two
    # tokens were that close. Measured: all rows agree; allowed: every first token and
    # 5 of 6 whole continuations.
    assert sum(a[0] == b[0] for a, b in zip(got, want)) == len(prompts)
    assert sum(a == b for a, b in zip(got, want)) >= len(prompts) - 1


def test_bf16_prefill_logits_close_and_cache_stays_float32():
    from lmforge.model.kv_cache import KVCache

    torch.manual_seed(0)
    config = tiny_config()
    from lmforge.infer.layout import use_column_major_weights

    ref = use_column_major_weights(Transformer(config).eval())  # the same layout: float32 sums in the same order
    ours = _bf16_prefill_model(Transformer(config).eval())
    ours.load_state_dict(ref.state_dict())
    ids = torch.randint(3, 256, (2, 40), generator=torch.Generator().manual_seed(3))
    caches = [KVCache.for_model(config, 2, 64, torch.float32, CPU) for _ in range(2)]
    from lmforge.infer.bf16_prefill import generation_products

    with torch.inference_mode():
        want = ref(ids, cache=caches[0], start=0)
        scored = ours(ids)  # outside generation (scoring, perplexity): float32 products
        with generation_products():
            got = ours(ids, cache=caches[1], start=0)
            one = ours(ids[:, :1], cache=None, start=0)  # a one-row-per-sequence product: float32 path
        one_ref = ref(ids[:, :1], cache=None, start=0)
    assert torch.equal(scored, want)
    assert got.dtype == torch.float32 and caches[1].k.dtype == torch.float32
    assert 0 < (got - want).abs().max() < 0.05 * want.abs().max()
    assert (caches[1].k - caches[0].k).abs().max() < 0.05 * caches[0].k.abs().max()
    assert torch.equal(one, one_ref)  # below min_rows nothing changes


@pytest.mark.parametrize("override, dtype, expected", [("1", "auto", True), ("1", "float32", False), ("0", "auto", False)])
def test_cpu_layout_gets_bf16_prefill_only_when_auto_picks_it(monkeypatch, override, dtype, expected):
    """What lmforge.load does on a CPU: the layout takes `pick_prefill_dtype`'s answer."""
    from lmforge.infer.bf16_prefill import uses_bf16_prefill
    from lmforge.infer.layout import optimize_for_cpu_decoding

    monkeypatch.setenv(precision.ENV, override)
    model = optimize_for_cpu_decoding(Transformer(tiny_config()).eval(), pick_prefill_dtype(dtype, CPU))
    assert uses_bf16_prefill(model) is expected
    ids = torch.randint(0, 256, (1, 40), generator=torch.Generator().manual_seed(5))
    with torch.inference_mode():
        assert torch.isfinite(model(ids)).all()


class Float32Only(torch.nn.Module):
    """A layer that takes float32 only (as an adapter-wrapped layer does): asserts its input's dtype."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        assert x.dtype == torch.float32
        return self.inner(x)


def test_bf16_prefill_attends_and_feeds_the_feed_forward_in_bf16_only_in_generation(monkeypatch):
    """A prepared model's long prompts attend on bf16 q/k/v and pass the feed-forward's bf16
    activation on, inside generation only; a second product that cannot read bf16 gets float32."""
    import torch.nn.functional as F

    from lmforge.infer.bf16_prefill import generation_products
    from lmforge.model import transformer

    torch.manual_seed(0)
    config = tiny_config(n_layer=2)
    model = _bf16_prefill_model(Transformer(config).eval())
    seen: list[torch.dtype] = []
    sdpa = F.scaled_dot_product_attention

    def spy(q, *args, **kwargs):
        seen.append(q.dtype)
        return sdpa(q, *args, **kwargs)

    monkeypatch.setattr(transformer.F, "scaled_dot_product_attention", spy)
    ids = torch.randint(3, 256, (1, 40), generator=torch.Generator().manual_seed(4))
    with torch.inference_mode():
        model(ids)
        assert seen == [torch.float32] * 2  # scoring: float32
        seen.clear()
        with generation_products():
            model(ids)
            assert seen == [torch.bfloat16] * 2
            seen.clear()
            model(ids[:, :4])  # shorter than min_rows: float32
            assert seen == [torch.float32] * 2

    mlp = model.layers[0].mlp
    assert mlp.fc.bf16_output
    x = torch.randn(1, 40, config.n_embd)
    with torch.inference_mode(), generation_products():
        want = mlp(x)
        mlp.proj = Float32Only(mlp.proj)
        got = mlp(x)
    assert want.dtype == got.dtype == torch.float32
    assert (got - want).abs().max() <= 0.02 * want.abs().max()


def test_bf16_prefill_attention_one_pass_and_bf16_output_product(monkeypatch):
    """In generation a long prompt's rotation, cache writes and bf16 copies run as one compiled
    pass (lmforge/model/cpu_ops.py) with the values of the separate operations; the attention's
    bf16 result goes to an output product that reads bf16, float32 to one that does not."""
    from lmforge.infer.bf16_prefill import generation_products
    from lmforge.model import cpu_ops
    from lmforge.model.kv_cache import KVCache

    if not cpu_ops.available():
        pytest.skip("compiled kernels not built here")
    torch.manual_seed(0)
    config = tiny_config(n_layer=2)
    model = _bf16_prefill_model(Transformer(config).eval())
    ids = torch.randint(3, 256, (2, 40), generator=torch.Generator().manual_seed(6))
    caches = [KVCache.for_model(config, 2, 64, torch.float32, CPU) for _ in range(2)]
    inputs: list[torch.dtype] = []
    hook = model.layers[0].attn.out.register_forward_pre_hook(lambda m, args: inputs.append(args[0].dtype))
    with torch.inference_mode(), generation_products():
        fused = model(ids, cache=caches[0], start=0)
        monkeypatch.setattr(cpu_ops, "ENABLED", False)
        separate = model(ids, cache=caches[1], start=0)
    hook.remove()
    assert inputs == [torch.bfloat16, torch.bfloat16]
    # the first layer's cache from the same inputs: rotation up to float32 rounding, values exact
    torch.testing.assert_close(caches[0].k[0], caches[1].k[0], rtol=1e-5, atol=1e-5)
    assert torch.equal(caches[0].v[0], caches[1].v[0])
    # after it the paths' roundings differ (a rotation's last bit may move a bf16 rounding of q or
    # k; SwiGLU's product is rounded once instead of twice)
    assert (fused - separate).abs().max() < 0.02 * separate.abs().max()

    monkeypatch.setattr(cpu_ops, "ENABLED", True)
    for layer in model.layers:
        layer.attn.out = Float32Only(layer.attn.out)
    with torch.inference_mode(), generation_products():
        wrapped = model(ids, cache=caches[0], start=0)
    assert (wrapped - fused).abs().max() < 0.02 * fused.abs().max()
