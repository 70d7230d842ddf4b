"""Attention probabilities recomputed from lmforge's layers: they reproduce each layer's output
and match transformers' eager attention weights on the same tiny checkpoints."""

from __future__ import annotations

import pytest
import torch

from lmforge.interpret.attention import attention_patterns, pattern_output
from lmforge.model.config import ModelConfig
from lmforge.model.loading import load_model
from lmforge.model.registry import resolve
from lmforge.model.transformer import Transformer


def _ids(vocab: int, length: int = 12, batch: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral", "gpt2"])
def test_probabilities_times_values_reproduce_the_attention_output(tiny_hf_dirs, family):
    path, _ = tiny_hf_dirs[family]
    model = load_model(resolve(str(path)))
    ids = _ids(model.config.vocab_size)  # 12 tokens: past mistral's 8-token sliding window
    patterns, outputs = attention_patterns(model, ids, keep_outputs=True)
    assert sorted(patterns) == list(range(model.config.n_layer))
    for layer, pattern in patterns.items():
        probs = pattern.probs
        assert probs.shape == (2, model.config.n_head, 12, 12)
        torch.testing.assert_close(probs.sum(-1), torch.ones(2, model.config.n_head, 12))
        assert float(probs.triu(1).abs().max()) == 0.0  # causal: no query sees a later key
        with torch.no_grad():
            recomputed = pattern_output(model.layers[layer].attn, pattern)
        assert float((recomputed - outputs[layer]).abs().max()) < 1e-5


@pytest.mark.parametrize("family", ["llama", "mistral", "gpt2"])
def test_probabilities_match_transformers_eager_attention(tiny_hf_dirs, family):
    path, reference = tiny_hf_dirs[family]
    model = load_model(resolve(str(path)))
    ids = _ids(model.config.vocab_size, seed=1)
    ours = attention_patterns(model, ids)
    with torch.no_grad():
        theirs = reference(ids, output_attentions=True).attentions
    assert len(theirs) == model.config.n_layer
    for layer, expected in enumerate(theirs):
        torch.testing.assert_close(ours[layer].probs, expected.float(), atol=1e-5, rtol=1e-4)
    if family == "mistral":  # the sliding window (8) hides keys more than 7 tokens back
        assert float(ours[0].probs[:, :, 11, :4].abs().max()) == 0.0


def test_selected_layers_and_grouped_heads_share_their_values():
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=50, n_embd=32, n_layer=3, n_head=4, n_kv_head=1, intermediate_size=48,
                         max_position_embeddings=64)
    model = Transformer(config).eval()
    patterns = attention_patterns(model, _ids(50, length=6, batch=1), layers=[1])
    assert list(patterns) == [1]
    values = patterns[1].values  # one KV head serves all four query heads
    for h in range(1, 4):
        torch.testing.assert_close(values[:, h], values[:, 0])
