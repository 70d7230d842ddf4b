"""causal_lm_loss: loss and every parameter's gradient against straightforward references.

The fused path (chunked head + cross-entropy, oneDNN products in training mode) must
give what plain autograd gives: `F.cross_entropy` on `model(input_ids)` logits, and
transformers' `LlamaForCausalLM` holding the same weights.

Tolerances: both sides do the same float32 arithmetic, only summed in a different order
(chunks, kernels), which moves values by about 1e-6 relative. Gradients are compared as
max |g - g_ref| <= 1e-4 * max |g_ref| per parameter, losses to 1e-5 relative: a hundred
times that rounding, while any real mistake (a wrong shift, a counted ignored label, a
missing 1/N) is off by order 1.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from lmforge.model import onednn
from lmforge.model.config import ModelConfig
from lmforge.model.families import hf_config_from, lmforge_to_hf
from lmforge.model.transformer import Transformer
from lmforge.train import fused_ce
from lmforge.train.loss import IGNORE_INDEX, causal_lm_loss

GRAD_RTOL = 1e-4
LOSS_RTOL = 1e-5

CONFIGS = {
    # Grouped-query attention (4 query / 2 key-value heads), untied head.
    "gqa-untied": dict(vocab_size=320, n_embd=64, n_head=4, n_kv_head=2, n_layer=2, intermediate_size=96),
    # Plain multi-head attention, head tied to the embedding.
    "mha-tied": dict(vocab_size=320, n_embd=64, n_head=4, n_layer=2, intermediate_size=96, tie_word_embeddings=True),
}


def build(name: str, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(ModelConfig(**CONFIGS[name])).train()


def batch(vocab: int, ignored: bool, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor | None]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (3, 19), generator=gen)
    if not ignored:
        return ids, None
    labels = ids.clone()
    labels[0, :7] = IGNORE_INDEX  # a masked prompt
    labels[2, 5:9] = IGNORE_INDEX  # a masked stretch in the middle
    return ids, labels


def grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def loss_and_grads(model, fn) -> tuple[float, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = fn()
    loss.backward()
    return float(loss.detach()), grads(model)


def reference_loss(model, ids, labels, reduction):
    logits = model(ids)[:, :-1]
    targets = (ids if labels is None else labels)[:, 1:]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction=reduction)


def assert_grads_close(ours: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> None:
    assert ours.keys() == ref.keys()
    for name, g in ours.items():
        scale = float(ref[name].abs().max())
        assert scale > 0, name  # every parameter takes part
        err = float((g - ref[name]).abs().max())
        assert err <= GRAD_RTOL * scale, f"{name}: max diff {err:.3e}, largest entry {scale:.3e}"


def assert_same(ours: tuple[float, dict[str, torch.Tensor]], ref: tuple[float, dict[str, torch.Tensor]]) -> None:
    """(loss, gradients) from `loss_and_grads` agree: loss to LOSS_RTOL, every gradient as above."""
    assert math.isclose(ours[0], ref[0], rel_tol=LOSS_RTOL)
    assert_grads_close(ours[1], ref[1])


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("ignored", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_matches_plain_cross_entropy(name, ignored, reduction):
    model = build(name)
    ids, labels = batch(model.config.vocab_size, ignored)
    # The reference runs in eval mode: the model's own nn.Linear modules, no oneDNN path.
    model.eval()
    ref_loss, ref_grads = loss_and_grads(model, lambda: reference_loss(model, ids, labels, reduction))
    model.train()
    loss, ours = loss_and_grads(model, lambda: causal_lm_loss(model, ids, labels, reduction))
    assert math.isclose(loss, ref_loss, rel_tol=LOSS_RTOL)
    assert_grads_close(ours, ref_grads)


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("ignored", [False, True])
def test_matches_transformers_llama(name, ignored):
    from transformers import LlamaConfig, LlamaForCausalLM

    model = build(name)
    config = model.config
    hf_cfg = hf_config_from(config)
    for key in ("architectures", "model_type", "torch_dtype"):
        hf_cfg.pop(key, None)
    hf = LlamaForCausalLM(LlamaConfig(**hf_cfg, attn_implementation="sdpa")).train()
    hf.load_state_dict(lmforge_to_hf(config, model.state_dict()), strict=False)
    if config.tie_word_embeddings:
        assert hf.lm_head.weight is hf.model.embed_tokens.weight
    ids, labels = batch(config.vocab_size, ignored)
    hf_loss, hf_grads = loss_and_grads(hf, lambda: hf(input_ids=ids, labels=ids if labels is None else labels).loss)
    loss, ours = loss_and_grads(model, lambda: causal_lm_loss(model, ids, labels))
    assert math.isclose(loss, hf_loss, rel_tol=LOSS_RTOL)
    # Split our fused gradients (q/k/v, gate/up) the way the weights are split.
    ours_hf = lmforge_to_hf(config, ours)
    assert_grads_close(ours_hf, {n: hf_grads[n] for n in ours_hf})


def test_many_chunks_equal_one(monkeypatch):
    model = build("mha-tied")
    ids, labels = batch(model.config.vocab_size, True)
    one = loss_and_grads(model, lambda: causal_lm_loss(model, ids, labels))
    monkeypatch.setattr(fused_ce, "CHUNK_ELEMENTS", 7 * model.config.vocab_size)
    monkeypatch.setattr(fused_ce, "MIN_ROWS", 7)  # 54 counted rows -> 8 chunks, the last one short
    many = loss_and_grads(model, lambda: causal_lm_loss(model, ids, labels))
    assert_same(many, one)


@pytest.mark.parametrize("shape", [(54, 320, 64), (520, 320, 64), (40, 96, 64), (300, 64, 96)])
def test_weight_gradient_product_in_either_layout(shape):
    # dW = dy^T x is computed directly or as (x^T dy)^T, whichever copies less; both must
    # equal the float64 product up to float32 rounding.
    rows, n_out, n_in = shape
    gen = torch.Generator().manual_seed(3)
    dy, x = torch.randn(rows, n_out, generator=gen), torch.randn(rows, n_in, generator=gen)
    exact = dy.double().t() @ x.double()
    got = onednn.weight_grad(dy, x) if onednn.available() else torch.mm(dy.t(), x)
    assert got.shape == (n_out, n_in) and got.is_contiguous()
    assert float((got.double() - exact).abs().max()) <= 1e-5 * float(exact.abs().max())
    assert onednn.transposed_weight_grad_is_cheaper(rows, n_out, n_in) == (n_in * (rows + n_out) < rows * n_out)


@pytest.mark.parametrize("length", [19, 131])
@pytest.mark.parametrize("chunked", [False, True])
def test_head_gradient_in_both_layouts(monkeypatch, length, chunked):
    # 3 x 18 targets keep the head's weight gradient in its own layout, 3 x 130 sum it
    # transposed (see fused_ce); with and without several chunks.
    model = build("gqa-untied")
    vocab, width = model.config.vocab_size, model.config.n_embd
    rows = 3 * (length - 1)
    assert onednn.transposed_weight_grad_is_cheaper(rows, vocab, width) == (length > 100)
    ids = torch.randint(0, vocab, (3, length), generator=torch.Generator().manual_seed(5))
    model.eval()
    ref = loss_and_grads(model, lambda: reference_loss(model, ids, None, "mean"))
    model.train()
    if chunked:
        monkeypatch.setattr(fused_ce, "CHUNK_ELEMENTS", 7 * vocab)
        monkeypatch.setattr(fused_ce, "MIN_ROWS", 7)
    ours = loss_and_grads(model, lambda: causal_lm_loss(model, ids))
    assert_same(ours, ref)


def test_gradient_of_a_scaled_loss_is_scaled():
    # The head's gradients are computed in the forward pass for an upstream gradient of 1;
    # anything else (a loss weight, gradient accumulation's 1/k) must rescale them.
    model = build("gqa-untied")
    ids, labels = batch(model.config.vocab_size, True)
    _, base = loss_and_grads(model, lambda: causal_lm_loss(model, ids, labels))
    _, scaled = loss_and_grads(model, lambda: causal_lm_loss(model, ids, labels) * 0.25)
    assert_grads_close(scaled, {n: g * 0.25 for n, g in base.items()})


def test_kernels_do_not_change_gradients(monkeypatch):
    model = build("gqa-untied")
    ids, labels = batch(model.config.vocab_size, False)
    fast = loss_and_grads(model, lambda: causal_lm_loss(model, ids, labels))
    monkeypatch.setattr(onednn, "ENABLED", False)
    plain = loss_and_grads(model, lambda: causal_lm_loss(model, ids, labels))
    assert_same(fast, plain)


def test_gradient_checkpointing_gives_the_same_gradients():
    model = build("gqa-untied")
    ids, labels = batch(model.config.vocab_size, True)
    plain = loss_and_grads(model, lambda: causal_lm_loss(model, ids, labels))
    model.gradient_checkpointing = True
    recomputed = loss_and_grads(model, lambda: causal_lm_loss(model, ids, labels))
    assert_same(recomputed, plain)


def test_learned_positions_and_layernorm():
    torch.manual_seed(0)
    model = Transformer(ModelConfig(family="gpt2", vocab_size=300, n_embd=48, n_head=4, n_layer=2,
                                    intermediate_size=192, norm="layernorm", mlp="gelu", position="learned",
                                    qkv_bias=True, out_bias=True, mlp_bias=True, tie_word_embeddings=True))
    ids, labels = batch(300, True)
    model.eval()
    ref = loss_and_grads(model, lambda: reference_loss(model, ids, labels, "mean"))
    model.train()
    ours = loss_and_grads(model, lambda: causal_lm_loss(model, ids, labels))
    assert_same(ours, ref)


def test_no_grad_evaluation_matches():
    model = build("gqa-untied")
    ids, labels = batch(model.config.vocab_size, True)
    with torch.no_grad():
        ours = causal_lm_loss(model, ids, labels, "sum")
        ref = reference_loss(model, ids, labels, "sum")
    assert not ours.requires_grad
    assert math.isclose(float(ours), float(ref), rel_tol=LOSS_RTOL)


def test_all_targets_ignored():
    model = build("gqa-untied")
    ids, _ = batch(model.config.vocab_size, False)
    labels = torch.full_like(ids, IGNORE_INDEX)
    assert math.isnan(float(causal_lm_loss(model, ids, labels).detach()))  # as F.cross_entropy: 0 / 0
    total = causal_lm_loss(model, ids, labels, "sum")
    assert float(total.detach()) == 0.0
    total.backward()
    assert all(p.grad is None or not p.grad.any() for p in model.parameters())


def test_bad_reduction_is_refused():
    model = build("gqa-untied")
    ids, _ = batch(model.config.vocab_size, False)
    with pytest.raises(ValueError):
        causal_lm_loss(model, ids, reduction="none")


@pytest.mark.parametrize("chunked", [False, True])
def test_bf16_head_through_the_compiled_cross_entropy(monkeypatch, chunked):
    """With bf16 products the head's logits go through one compiled call that writes the gradient
    over them (lmforge/model/cpu_ops.py); loss and gradients match PyTorch's operations on the same
    bf16 logits up to bf16 rounding, in one chunk or several, with ignored targets."""
    from lmforge.model import cpu_ops
    from lmforge.model.onednn import bf16_products

    if not cpu_ops.available():
        pytest.skip("compiled kernels not built here")
    model = build("mha-tied")
    ids, labels = batch(model.config.vocab_size, True)
    if chunked:
        monkeypatch.setattr(fused_ce, "CHUNK_ELEMENTS", 7 * model.config.vocab_size)
        monkeypatch.setattr(fused_ce, "MIN_ROWS", 7)
    calls = []
    real = cpu_ops.cross_entropy_rows
    monkeypatch.setattr(cpu_ops, "cross_entropy_rows", lambda *a, **k: calls.append(a[0].shape) or real(*a, **k))

    def run():
        with bf16_products():
            return causal_lm_loss(model, ids, labels)

    compiled = loss_and_grads(model, run)
    assert calls and all(rows <= (14 if chunked else 54) for rows, _ in calls)
    assert sum(rows for rows, _ in calls) == int((labels[:, 1:] != IGNORE_INDEX).sum())
    monkeypatch.setattr(cpu_ops, "ENABLED", False)
    separate = loss_and_grads(model, run)
    assert math.isclose(compiled[0], separate[0], rel_tol=1e-5)
    for name, g in compiled[1].items():
        want = separate[1][name]
        assert float((g - want).abs().max()) <= 2e-2 * float(want.abs().max()), name
