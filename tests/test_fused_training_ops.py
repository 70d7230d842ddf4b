"""The model's training-path functions (lmforge/model/fused_ops.py) equal the plain ops:
outputs and every gradient, alone and inside a tiny model; inference keeps the plain ops."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from lmforge.model import fused_ops
from lmforge.model.config import ModelConfig
from lmforge.model.rope import RotaryTable, apply_rotary
from lmforge.model.transformer import Transformer
from lmforge.train.loss import causal_lm_loss
from lmforge.tune.peft import PeftOptions, apply_peft


def _close(a, b, tol):
    assert a.shape == b.shape
    scale = float(b.abs().max().clamp_min(1e-12))
    assert float((a - b).abs().max()) <= tol * scale, float((a - b).abs().max()) / scale


def _grads(fn, inputs, upstream):
    inputs = [t.detach().clone().requires_grad_(t.requires_grad) for t in inputs]
    outs = fn(*inputs)
    outs = outs if isinstance(outs, tuple) else (outs,)
    torch.autograd.backward([o for o, u in zip(outs, upstream) if u is not None], [u for u in upstream if u is not None])
    return [o.detach() for o in outs], [t.grad for t in inputs if t.requires_grad]


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 2e-6)])
@pytest.mark.parametrize("weighted,weight_trains", [(True, False), (True, True), (False, False)])
def test_rms_norm_matches_plain(dtype, tol, weighted, weight_trains):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 7, 48, generator=g, dtype=dtype).requires_grad_()
    w = (torch.randn(48, generator=g, dtype=dtype) + 1).requires_grad_(weight_trains) if weighted else None
    up = torch.randn(3, 7, 48, generator=g, dtype=dtype)
    inputs = [x] if w is None else [x, w]
    ours = _grads(lambda x, w=None: fused_ops.rms_norm(x, w, 1e-5), inputs, [up])
    ref = _grads(lambda x, w=None: F.rms_norm(x, (48,), w, 1e-5), inputs, [up])
    _close(ours[0][0], ref[0][0], tol)
    assert len(ours[1]) == len(ref[1]) == (2 if weight_trains else 1)
    for a, b in zip(ours[1], ref[1]):
        _close(a, b, tol)


def test_rms_norm_gradcheck():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 8, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(8, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w: fused_ops.rms_norm(x, w, 1e-6), (x, w))


def _plain_rotary_qkv(qkv, cos, sin, n_head, n_kv, d):
    b, length, _ = qkv.shape
    heads = qkv.view(b, length, n_head + 2 * n_kv, d).transpose(1, 2)
    qk, v = heads.split((n_head + n_kv, n_kv), dim=1)
    q, k = apply_rotary(qk, cos, sin).split((n_head, n_kv), dim=1)
    return q, k, v


@pytest.mark.parametrize("per_row", [False, True])
@pytest.mark.parametrize("used", ["qkv", "qk", "v"])
def test_rotary_qkv_matches_plain(per_row, used):
    n_head, n_kv, d, b, length = 4, 2, 16, 2, 9
    table = RotaryTable(d, 10000.0, None, 32)
    if per_row:  # rows at different offsets: tables [B, 1, L, d]
        cos, sin = table(torch.tensor([[3 + i for i in range(length)], [i for i in range(length)]]), torch.float64)
    else:
        cos, sin = table.slice(5, length, torch.float64)
    g = torch.Generator().manual_seed(2)
    qkv = torch.randn(b, length, (n_head + 2 * n_kv) * d, generator=g, dtype=torch.float64, requires_grad=True)
    ups = [torch.randn(b, n, length, d, generator=g, dtype=torch.float64) for n in (n_head, n_kv, n_kv)]
    ups = [u if name in used else None for u, name in zip(ups, "qkv")]
    ours = _grads(lambda t: fused_ops.rotary_qkv(t, cos, sin, n_head, n_kv, d), [qkv], ups)
    ref = _grads(lambda t: _plain_rotary_qkv(t, cos, sin, n_head, n_kv, d), [qkv], ups)
    for a, r in zip(ours[0], ref[0]):
        _close(a, r, 1e-14)
    _close(ours[1][0], ref[1][0], 1e-14)
    assert ours[1][0].is_contiguous()


def test_swiglu_matches_plain_and_gradcheck():
    g = torch.Generator().manual_seed(3)
    for dtype, tol in ((torch.float64, 1e-14), (torch.float32, 1e-6)):
        h = torch.randn(2, 5, 2 * 24, generator=g, dtype=dtype, requires_grad=True)
        up = torch.randn(2, 5, 24, generator=g, dtype=dtype)

        def plain(t):
            gate, u = t.chunk(2, dim=-1)
            return F.silu(gate) * u
        ours, ref = _grads(fused_ops.swiglu, [h], [up]), _grads(plain, [h], [up])
        _close(ours[0][0], ref[0][0], tol)
        _close(ours[1][0], ref[1][0], tol)
    h = torch.randn(2, 3, 8, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(fused_ops.swiglu, (h,))


def _tiny(**extra) -> Transformer:
    config = ModelConfig(family="llama", n_layer=2, n_embd=64, n_head=4, n_kv_head=2, intermediate_size=96,
                         vocab_size=256, **extra)
    torch.manual_seed(0)
    return Transformer(config).train()


def _graph_nodes(loss) -> set[str]:
    seen, names, todo = set(), set(), [loss.grad_fn]
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.add(type(node).__name__)
        todo.extend(n for n, _ in node.next_functions)
    return names


def test_training_forward_takes_the_fused_functions():
    model = _tiny()
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(4))
    names = _graph_nodes(causal_lm_loss(model, ids))
    assert {"_RMSNormBackward", "_RotaryQKVBackward", "_SwiGLUBackward"} <= names
    assert not {"CatBackward0", "SplitWithSizesBackward0", "SiluBackward0"} & names, names


def _step(model, ids, fused: bool):
    old, fused_ops.ENABLED = fused_ops.ENABLED, fused
    try:
        model.zero_grad(set_to_none=True)
        loss = causal_lm_loss(model, ids)
        loss.backward()
        return float(loss.detach()), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    finally:
        fused_ops.ENABLED = old


@pytest.mark.parametrize("lora", [False, True])
def test_model_training_step_matches_plain_ops(lora):
    """Full fine-tuning (every weight, norms included) and LoRA (frozen base, frozen embeddings)."""
    model = _tiny()
    if lora:
        model = apply_peft(model, PeftOptions(method="lora", r=4, alpha=8.0, target_modules=["all-linear"], seed=0))
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.randn(p.shape) * 0.1)
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(4))
    loss, grads = _step(model, ids, True)
    ref_loss, ref_grads = _step(model, ids, False)
    assert abs(loss - ref_loss) <= 1e-5 * abs(ref_loss)
    assert grads.keys() == ref_grads.keys() and grads
    assert any("norm" in n for n in grads) != lora  # norms train only in full fine-tuning
    for name, g in grads.items():
        _close(g, ref_grads[name], 1e-4)


def test_inference_path_keeps_plain_ops():
    """No grad (generation, evaluation): the fused functions are not used, outputs are bit-identical."""
    model = _tiny().eval()
    ids = torch.randint(0, 256, (2, 10), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        logits = model(ids)
    old, fused_ops.ENABLED = fused_ops.ENABLED, False
    try:
        with torch.no_grad():
            plain = model(ids)
    finally:
        fused_ops.ENABLED = old
    assert torch.equal(logits, plain)
    with torch.no_grad():
        assert not fused_ops.wants_grad(torch.ones(2, requires_grad=True))


def test_gradient_checkpointing_with_fused_ops():
    model = _tiny()
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(6))
    _, grads = _step(model, ids, True)
    ckpt = copy.deepcopy(model)
    ckpt.gradient_checkpointing = True
    _, ckpt_grads = _step(ckpt, ids, True)
    for name, g in grads.items():
        _close(ckpt_grads[name], g, 1e-5)


@pytest.mark.parametrize("mode", ["bfloat16", "autocast"])
def test_bfloat16_and_autocast_training_steps_match_plain_ops(mode):
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(7))
    results = {}
    for fused in (True, False):
        model = _tiny()
        if mode == "bfloat16":
            model = model.to(torch.bfloat16)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode == "autocast"):
            results[fused] = _step(model, ids, fused)
    (loss, grads), (ref_loss, ref_grads) = results[True], results[False]
    assert abs(loss - ref_loss) <= 1e-3 * abs(ref_loss)
    assert grads.keys() == ref_grads.keys()
    for name, g in grads.items():  # bfloat16 rounding (8 bits of mantissa), not a different gradient
        _close(g.float(), ref_grads[name].float(), 3e-2)
