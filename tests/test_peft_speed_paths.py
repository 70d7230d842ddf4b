"""The fused LoRA training path (lmforge/tune/peft/lora_kernel.py) equals plain autograd:
outputs, input gradients and every adapter gradient, on tiny random models."""

from __future__ import annotations

import copy

import pytest
import torch

from lmforge.model.config import ModelConfig
from lmforge.model.transformer import Transformer
from lmforge.train.loss import causal_lm_loss
from lmforge.tune.peft import PeftOptions, apply_peft, lora_kernel
from lmforge.tune.peft.layers import LoraLinear

pytestmark = pytest.mark.skipif(not lora_kernel.available(), reason="oneDNN's linear op on packed weights is missing")


def _tiny(family="llama", **extra) -> Transformer:
    config = ModelConfig(family=family, n_layer=2, n_embd=64, n_head=4, n_kv_head=2, intermediate_size=96,
                         vocab_size=256, **extra)
    torch.manual_seed(0)
    return Transformer(config).train()


def _adapted(base, targets, r=4, alpha=7.0, **extra):
    model = apply_peft(copy.deepcopy(base), PeftOptions(method="lora", r=r, alpha=alpha, target_modules=targets,
                                                        seed=0, pack_frozen=True, **extra)).train()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # B off zero, so that A has gradients too
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def _loss_and_grads(model, ids, fused: bool, pack: bool = True):
    old = lora_kernel.ENABLED, lora_kernel.PACK_FROZEN
    lora_kernel.ENABLED, lora_kernel.PACK_FROZEN = fused, pack
    try:
        model.zero_grad(set_to_none=True)
        loss = causal_lm_loss(model, ids)
        loss.backward()
    finally:
        lora_kernel.ENABLED, lora_kernel.PACK_FROZEN = old
    return float(loss.detach()), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def _assert_grads_close(got, want):
    assert got.keys() == want.keys() and got
    for name, g in want.items():
        scale = float(g.abs().max())
        assert scale > 0, name  # every adapter matrix has a gradient to compare
        assert float((got[name] - g).abs().max()) <= 1e-5 * scale, name


@pytest.mark.parametrize("targets", [["all-linear"], ["q_proj", "v_proj"], ["k_proj"], ["up_proj", "down_proj"]])
@pytest.mark.parametrize("pack", [True, False])
def test_fused_lora_training_step_equals_autograd(targets, pack):
    model = _adapted(_tiny(), targets)
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))
    plain_loss, plain = _loss_and_grads(model, ids, fused=False)
    fused_loss, fused = _loss_and_grads(model, ids, fused=True, pack=pack)
    assert abs(fused_loss - plain_loss) <= 1e-5 * abs(plain_loss)
    _assert_grads_close(fused, plain)


def test_fused_layer_with_bias_and_partial_rows():
    """A Qwen2-style q/k/v bias, only k adapted (rows in the middle of the fused output): the
    layer's output and the gradients of its input and adapter match plain autograd."""
    model = _adapted(_tiny("qwen2", qkv_bias=True), ["k_proj"], r=3, alpha=5.0)
    layer = model.layers[0].attn.qkv
    assert isinstance(layer, LoraLinear) and layer.base.bias is not None
    x = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(2))
    g = torch.randn(2, 5, layer.out_features, generator=torch.Generator().manual_seed(4))
    results = []
    for fused in (False, True):
        lora_kernel.ENABLED = fused
        try:
            xi = x.clone().requires_grad_(True)
            layer.zero_grad(set_to_none=True)
            y = layer(xi)
            (y * g).sum().backward()
        finally:
            lora_kernel.ENABLED = True
        results.append((y.detach(), xi.grad, layer.lora_A["k_proj"].grad.clone(), layer.lora_B["k_proj"].grad.clone()))
    for plain, fused in zip(*results):
        assert torch.allclose(fused, plain, rtol=1e-5, atol=1e-5 * float(plain.abs().max()))


def test_fused_path_only_in_training_and_unchanged_inference():
    model = _adapted(_tiny(), ["all-linear"])
    layer = model.layers[0].mlp.fc
    x = torch.randn(3, 64)
    assert lora_kernel.usable(layer, x)
    with torch.no_grad():
        assert not lora_kernel.usable(layer, x)
    model.eval()
    assert not lora_kernel.usable(layer, x)
    ids = torch.randint(0, 256, (1, 9))
    with torch.no_grad():
        before = model(ids)
        lora_kernel.ENABLED = False
        try:
            plain = model(ids)
        finally:
            lora_kernel.ENABLED = True
    assert torch.equal(before, plain)  # generation never takes the training path


def test_packed_weights_follow_changes_of_the_base():
    """The packed copies are remade when the frozen weight changes in place (merge, load)."""
    model = _adapted(_tiny(), ["q_proj"])
    layer = model.layers[1].attn.qkv
    x = torch.randn(4, 64, requires_grad=True)
    first = layer(x).detach()
    with torch.no_grad():
        layer.base.weight.mul_(2.0)
    second = layer(x).detach()
    lora_kernel.ENABLED = False
    try:
        expected = layer(x).detach()
    finally:
        lora_kernel.ENABLED = True
    assert not torch.allclose(first, second)
    assert torch.allclose(second, expected, rtol=1e-5, atol=1e-5)


def test_dropout_keeps_the_plain_path():
    model = _adapted(_tiny(), ["v_proj"], dropout=0.5)
    ids = torch.randint(0, 256, (2, 8))
    loss = causal_lm_loss(model, ids)
    loss.backward()
    layer = model.layers[0].attn.qkv
    assert layer.lora_A["v_proj"].grad is not None and torch.isfinite(loss)
