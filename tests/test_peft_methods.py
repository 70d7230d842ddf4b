"""QLoRA's NF4 base, bottleneck adapters and BitFit (the methods peft cannot load or reads differently)."""

from __future__ import annotations

import json

import pytest
import torch

from lmforge.infer.nf4 import NF4_CODE, NF4Linear, dequantize_nf4, nf4_nbytes, quantize_nf4
from lmforge.model.checkpoint import load_hf_model, save_hf_model
from lmforge.tune.peft import (PeftOptions, apply_peft, load_adapter, memory_report, merge, merge_and_unload,
                               save_adapter, trainable_parameters)


@pytest.fixture(scope="module")
def llama(tiny_hf_dirs):
    return tiny_hf_dirs["llama"][0]


@pytest.fixture(scope="module")
def ids():
    return torch.randint(3, 320, (2, 11), generator=torch.Generator().manual_seed(9))


def perturb(model, scale=0.3, seed=4):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * scale)


def test_nf4_codes_round_trip_exactly_and_errors_stay_within_half_a_gap():
    code = torch.tensor(NF4_CODE)
    assert code.numel() == 16 and code[7] == 0 and code[0] == -1 and code[-1] == 1
    exact = (code * 0.37).repeat(4)  # one 64-weight block whose absmax is 0.37
    q = quantize_nf4(exact, double_quant=False)
    assert torch.equal(dequantize_nf4(q), exact)
    w = torch.randn(96, 200, generator=torch.Generator().manual_seed(0))
    for double in (False, True):
        q = quantize_nf4(w, double_quant=double)
        back = dequantize_nf4(q)
        assert back.shape == w.shape
        err = (back - w).abs().view(-1, 64)
        half_gap = ((code[1:] - code[:-1]).max() / 2).item()
        absmax = w.view(-1, 64).abs().amax(1, keepdim=True)
        slack = 1.02 if double else 1.0 + 1e-6  # 8-bit scales move each block's grid a little
        assert bool((err <= absmax * half_gap * slack).all())
        rel = ((back - w).norm() / w.norm()).item()
        assert 0.05 < rel < 0.12  # about 0.094 for normal weights
    assert nf4_nbytes(quantize_nf4(w)) / w.numel() == pytest.approx(4.127 / 8, abs=0.002)
    assert nf4_nbytes(quantize_nf4(w, double_quant=False)) / w.numel() == pytest.approx(4.5 / 8)


def test_nf4_linear_forward_and_input_gradient_use_the_dequantized_weight():
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 40)
    q = NF4Linear(lin)
    x = torch.randn(3, 64, requires_grad=True)
    y = q(x)
    reference = torch.nn.functional.linear(x, q.weight, lin.bias)
    torch.testing.assert_close(y, reference)
    (g,) = torch.autograd.grad(y.square().sum(), x)
    (g_ref,) = torch.autograd.grad(reference.square().sum(), x)
    torch.testing.assert_close(g, g_ref)
    assert not any(p.requires_grad for p in q.parameters())


def test_qlora_is_lora_on_the_dequantized_base(llama, ids, tmp_path):
    options = PeftOptions(method="qlora", r=4, target_modules=["q_proj", "v_proj", "down_proj"], seed=1)
    qlora = apply_peft(load_hf_model(llama), options)
    assert all(type(qlora.get_submodule(f"layers.0.{m}")).__name__ in ("NF4Linear", "LoraLinear")
               for m in ("attn.qkv", "attn.out", "mlp.fc", "mlp.proj"))
    perturb(qlora)
    # The same LoRA on a full-precision model whose linear weights are the dequantized NF4 ones.
    plain = load_hf_model(llama)
    with torch.no_grad():
        for name, module in qlora.named_modules():
            if isinstance(module, NF4Linear):
                plain.get_submodule(name.removesuffix(".base")).weight.copy_(module.weight)
    save_adapter(qlora, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["peft_type"] == "LORA"
    lora = load_adapter(plain, tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(qlora.eval()(ids), lora.eval()(ids), atol=1e-5, rtol=0)
        reloaded = load_adapter(load_hf_model(llama), tmp_path, qlora=True)
        torch.testing.assert_close(reloaded.eval()(ids), qlora(ids), atol=1e-6, rtol=0)
    trainable, total = trainable_parameters(qlora)
    assert total == load_hf_model(llama).num_parameters() + trainable
    assert "NF4" in memory_report(qlora)
    qlora.train()
    loss = qlora(ids).logsumexp(-1).mean()
    loss.backward()
    grads = {n for n, p in qlora.named_parameters() if p.grad is not None}
    assert grads and all("lora_" in n for n in grads)
    merged = merge_and_unload(qlora)  # a quantized base is merged in float32
    with torch.no_grad():
        torch.testing.assert_close(merged.eval()(ids), lora(ids), atol=1e-5, rtol=0)


@pytest.mark.parametrize("style,count", [("houlsby", 2), ("pfeiffer", 1)])
def test_bottleneck_adapters_start_as_the_base_and_save_in_lmforge_format(style, count, llama, ids, tmp_path):
    base = load_hf_model(llama)
    with torch.no_grad():
        expected = base(ids)
    model = apply_peft(load_hf_model(llama), PeftOptions(method="bottleneck", bottleneck_size=8, bottleneck_style=style))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), expected, atol=0, rtol=0)
    trainable, _ = trainable_parameters(model)
    c = model.config
    assert trainable == count * c.n_layer * (2 * 8 * c.n_embd + 8 + c.n_embd)
    perturb(model, 0.1)
    save_adapter(model, tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LMFORGE_BOTTLENECK" and cfg["bottleneck_style"] == style
    loaded = load_adapter(load_hf_model(llama), tmp_path)
    with torch.no_grad():
        out = model(ids)
        assert (out - expected).abs().max() > 1e-3
        torch.testing.assert_close(loaded(ids), out, atol=0, rtol=0)


def test_bitfit_trains_biases_and_the_result_loads_in_transformers(llama, ids, tmp_path):
    T = pytest.importorskip("transformers")
    model = apply_peft(load_hf_model(llama), PeftOptions(method="bitfit"))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), load_hf_model(llama)(ids), atol=0, rtol=0)
    assert all(n.endswith(".bias") == p.requires_grad for n, p in model.named_parameters())
    perturb(model, 0.05)
    save_adapter(model, tmp_path / "adapter")
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["peft_type"] == "LMFORGE_BITFIT"
    loaded = load_adapter(load_hf_model(llama), tmp_path / "adapter")
    with torch.no_grad():
        ours = model(ids)
        torch.testing.assert_close(loaded(ids), ours, atol=0, rtol=0)
    save_hf_model(merge_and_unload(model), tmp_path / "merged")
    hf = T.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(input_ids=ids).logits, ours, atol=1e-4, rtol=0)
    merge(loaded)  # nothing to fold: the biases are the model's own
