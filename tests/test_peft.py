"""PEFT adapters on lmforge's fused Transformer against Hugging Face peft, both ways, on tiny random models."""

from __future__ import annotations

import json
import math

import pytest
import torch

from lmforge.errors import LmforgeError
from lmforge.model.checkpoint import load_hf_model
from lmforge.tune.peft import (PeftOptions, apply_peft, load_adapter, merge, merge_and_unload, save_adapter,
                               trainable_parameters, unmerge)

peft = pytest.importorskip("peft")
T = pytest.importorskip("transformers")

P = 5  # virtual tokens


@pytest.fixture(scope="module")
def llama(tiny_hf_dirs):
    return tiny_hf_dirs["llama"][0]


@pytest.fixture(scope="module")
def ids():
    return torch.randint(3, 320, (2, 13), generator=torch.Generator().manual_seed(7))


def hf_model(path):
    return T.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def perturb(model, scale=0.3, seed=3):
    """Move every trainable tensor away from its neutral init, so that the adapter matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * scale)


def peft_logits(peft_model, ids, method):
    with torch.no_grad():
        logits = peft_model(input_ids=ids).logits
    return logits[:, P:] if method == "prompt" else logits  # peft returns the virtual positions too


OPTIONS = {
    "lora": PeftOptions(method="lora", r=4, alpha=8, target_modules=["q_proj", "v_proj", "up_proj", "down_proj"]),
    "ia3": PeftOptions(method="ia3"),
    "prompt": PeftOptions(method="prompt", num_virtual_tokens=P),
    "prefix": PeftOptions(method="prefix", num_virtual_tokens=P),
}


@pytest.mark.parametrize("method", list(OPTIONS))
def test_lmforge_adapter_loads_in_peft(method, llama, ids, tmp_path):
    model = apply_peft(load_hf_model(llama), OPTIONS[method])
    perturb(model)
    save_adapter(model, tmp_path, base_model_name_or_path=str(llama))
    with torch.no_grad():
        ours = model.eval()(ids)
        base = hf_model(llama)(input_ids=ids).logits
    theirs = peft_logits(peft.PeftModel.from_pretrained(hf_model(llama), tmp_path).eval(), ids, method)
    assert (theirs - base).abs().max() > 1e-2  # the adapter changes the output ...
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)  # ... the same way in both


def peft_made(method, llama):
    torch.manual_seed(11)
    configs = {
        "lora": peft.LoraConfig(r=4, lora_alpha=16, target_modules=["k_proj", "o_proj", "gate_proj"],
                                init_lora_weights=False, task_type="CAUSAL_LM"),
        "ia3": peft.IA3Config(target_modules=["q_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"],
                              init_ia3_weights=False, task_type="CAUSAL_LM"),
        "prompt": peft.PromptTuningConfig(num_virtual_tokens=P, task_type="CAUSAL_LM"),
        "prefix": peft.PrefixTuningConfig(num_virtual_tokens=P, task_type="CAUSAL_LM"),
    }
    model = peft.get_peft_model(hf_model(llama), configs[method])
    if method == "lora":  # B random as well (init_lora_weights=False randomizes only some)
        perturb(model, 0.2)
    return model.eval()


@pytest.mark.parametrize("method", list(OPTIONS))
def test_peft_adapter_loads_in_lmforge(method, llama, ids, tmp_path):
    theirs_model = peft_made(method, llama)
    theirs_model.save_pretrained(tmp_path)
    theirs = peft_logits(peft.PeftModel.from_pretrained(hf_model(llama), tmp_path).eval(), ids, method)
    model = load_adapter(load_hf_model(llama), tmp_path)
    assert model.peft_options.method == method
    with torch.no_grad():
        ours = model.eval()(ids)
        base = load_hf_model(llama)(ids)
    assert (ours - base).abs().max() > 1e-2
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)


def test_lora_merge_is_base_plus_scaled_product_on_the_fused_slice(llama, ids):
    config = load_hf_model(llama).config
    model = apply_peft(load_hf_model(llama), PeftOptions(method="lora", r=4, alpha=8, target_modules=["k_proj", "up_proj"]))
    perturb(model)
    layer = model.layers[1].attn.qkv
    before = layer.weight.detach().clone()
    fc_before = model.layers[1].mlp.fc.weight.detach().clone()
    with torch.no_grad():
        unmerged = model(ids)
    merge(model)
    q, kv = config.q_size, config.kv_size
    expected_k = before[q:q + kv] + 2.0 * layer.lora_B["k_proj"] @ layer.lora_A["k_proj"]
    torch.testing.assert_close(layer.weight[q:q + kv], expected_k, atol=1e-6, rtol=0)
    assert torch.equal(layer.weight[:q], before[:q]) and torch.equal(layer.weight[q + kv:], before[q + kv:])
    fc = model.layers[1].mlp.fc
    inter = config.intermediate_size
    assert torch.equal(fc.weight[:inter], fc_before[:inter])  # gate rows untouched
    torch.testing.assert_close(fc.weight[inter:], fc_before[inter:] + 2.0 * fc.lora_B["up_proj"] @ fc.lora_A["up_proj"],
                               atol=1e-6, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(model(ids), unmerged, atol=1e-5, rtol=0)
    unmerge(model)
    torch.testing.assert_close(layer.weight, before, atol=1e-6, rtol=0)
    plain = merge_and_unload(model)
    assert type(plain.layers[1].attn.qkv) is torch.nn.Linear
    with torch.no_grad():
        torch.testing.assert_close(plain(ids), unmerged, atol=1e-5, rtol=0)


def test_ia3_merge_scales_rows_and_bias(tiny_hf_dirs, ids):
    path = tiny_hf_dirs["qwen2"][0]  # q/k/v carry biases, which (IA)3 scales with the rows
    model = apply_peft(load_hf_model(path), PeftOptions(method="ia3"))
    perturb(model)
    with torch.no_grad():
        before = model(ids)
    merge(model)
    with torch.no_grad():
        torch.testing.assert_close(model(ids), before, atol=1e-5, rtol=0)
    unmerge(model)
    with torch.no_grad():
        torch.testing.assert_close(model(ids), before, atol=1e-5, rtol=0)


def test_rslora_and_all_linear_match_peft(llama, ids, tmp_path):
    options = PeftOptions(method="lora", r=16, alpha=8, rslora=True, target_modules=["all-linear"])
    model = apply_peft(load_hf_model(llama), options)
    layer = model.layers[0].attn.qkv
    assert layer.scaling == pytest.approx(8 / math.sqrt(16))
    assert [p.leaf for p in layer.parts] == ["q_proj", "k_proj", "v_proj"]
    trainable, total = trainable_parameters(model)
    c = model.config
    per_layer = 16 * (c.n_embd * 3 + c.q_size + 2 * c.kv_size)  # q, k, v: A [r, d] + B [rows, r]
    per_layer += 16 * (c.q_size + c.n_embd)  # o_proj
    per_layer += 16 * (2 * c.n_embd + 2 * c.intermediate_size)  # gate, up
    per_layer += 16 * (c.intermediate_size + c.n_embd)  # down
    assert trainable == c.n_layer * per_layer and total == c.num_parameters() + trainable
    perturb(model, 0.1)
    save_adapter(model, tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["use_rslora"] is True and set(saved["target_modules"]) == {
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    theirs = peft_logits(peft.PeftModel.from_pretrained(hf_model(llama), tmp_path).eval(), ids, "lora")
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(ids), theirs, atol=1e-4, rtol=0)


def test_only_adapters_train_and_the_loss_falls(llama, ids):
    model = apply_peft(load_hf_model(llama), PeftOptions(method="lora", r=4, target_modules=["q_proj", "v_proj"], seed=0))
    base = {k: v.detach().clone() for k, v in model.state_dict().items() if "lora_" not in k}
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(("lora_" in n) == p.requires_grad for n, p in model.named_parameters())
    opt = torch.optim.AdamW(trainable, lr=1e-2)
    model.train()
    losses = []
    for _ in range(8):
        logits = model(ids[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in base.items())


def test_bert_lora_both_ways(tmp_path):
    torch.manual_seed(5)
    config = T.BertConfig(vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                          intermediate_size=48, max_position_embeddings=64)
    hf = T.BertModel(config, add_pooling_layer=False).eval()
    base_dir = tmp_path / "bert"
    hf.save_pretrained(base_dir)
    ids = torch.randint(0, 120, (2, 9))

    def hf_states(adapter_dir):
        m = peft.PeftModel.from_pretrained(T.BertModel.from_pretrained(base_dir, add_pooling_layer=False).eval(),
                                           adapter_dir).eval()
        with torch.no_grad():
            return m(input_ids=ids).last_hidden_state

    ours = apply_peft(load_hf_model(base_dir), PeftOptions(method="lora", r=4, target_modules=["query", "key", "value"]))
    perturb(ours)
    save_adapter(ours, tmp_path / "ours")
    with torch.no_grad():
        torch.testing.assert_close(ours.eval().encode(ids), hf_states(tmp_path / "ours"), atol=1e-4, rtol=0)
        # The packed inference path (fused oneDNN products) must not bypass the adapter.
        packed = ours.encode_packed(ids.reshape(-1), [ids.shape[1]] * ids.shape[0]).view(*ids.shape, -1)
        torch.testing.assert_close(packed, hf_states(tmp_path / "ours"), atol=1e-4, rtol=0)

    theirs = peft.get_peft_model(T.BertModel.from_pretrained(base_dir, add_pooling_layer=False),
                                 peft.LoraConfig(r=4, target_modules=["query", "value"], init_lora_weights=False))
    perturb(theirs, 0.2)
    theirs.save_pretrained(tmp_path / "theirs")
    loaded = load_adapter(load_hf_model(base_dir), tmp_path / "theirs")
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval().encode(ids), hf_states(tmp_path / "theirs"), atol=1e-4, rtol=0)


def test_clear_errors(llama, tiny_hf_dirs, tmp_path):
    with pytest.raises(LmforgeError, match="rank must be at least 1"):
        apply_peft(load_hf_model(llama), PeftOptions(method="lora", r=0))
    with pytest.raises(LmforgeError, match="unknown target module.*qproj.*q_proj"):
        apply_peft(load_hf_model(llama), PeftOptions(method="lora", target_modules=["qproj"]))
    with pytest.raises(LmforgeError, match="unknown PEFT method"):
        apply_peft(load_hf_model(llama), PeftOptions(method="dora"))
    with pytest.raises(LmforgeError, match="feed-forward module up_proj is one slice"):
        apply_peft(load_hf_model(llama), PeftOptions(method="ia3", target_modules=["up_proj"], feedforward_modules=["up_proj"]))

    model = apply_peft(load_hf_model(llama), PeftOptions(method="lora", r=4))
    save_adapter(model, tmp_path / "a", base_model_name_or_path="org/llama-tiny")
    with pytest.raises(LmforgeError, match="already has an adapter"):
        apply_peft(model, PeftOptions(method="lora"))
    with pytest.raises(LmforgeError, match="adapter for org/llama-tiny, not org/other"):
        load_adapter(load_hf_model(llama), tmp_path / "a", base_model_name_or_path="org/other")
    # Another base: the Mistral model has 1 KV head, so k/v rows differ; GPT-2 has no q_proj at all.
    other = apply_peft(load_hf_model(tiny_hf_dirs["mistral"][0]), PeftOptions(method="lora", r=4, target_modules=["v_proj"]))
    save_adapter(other, tmp_path / "m")
    with pytest.raises(LmforgeError, match=r"shape \(16, 4\), this model needs \(32, 4\).*another base"):
        load_adapter(load_hf_model(llama), tmp_path / "m")
    with pytest.raises(LmforgeError, match="does not have.*another base"):
        load_adapter(load_hf_model(tiny_hf_dirs["gpt2"][0]), tmp_path / "a")

    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    for change, message in (({"peft_type": "LOHA"}, "unsupported adapter type 'LOHA'"),
                            ({"use_dora": True}, "unsupported LORA option use_dora"),
                            ({"modules_to_save": ["lm_head"]}, "unsupported LORA option modules_to_save")):
        (tmp_path / "a" / "adapter_config.json").write_text(json.dumps({**config, **change}))
        with pytest.raises(LmforgeError, match=message):
            load_adapter(load_hf_model(llama), tmp_path / "a")
    with pytest.raises(LmforgeError, match="no adapter_config.json"):
        load_adapter(load_hf_model(llama), tmp_path / "missing")
    with pytest.raises(LmforgeError, match="cannot be merged"):
        merge(apply_peft(load_hf_model(llama), PeftOptions(method="prefix", num_virtual_tokens=2)))
