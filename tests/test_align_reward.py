"""Reward model: rewards equal transformers' LlamaForSequenceClassification on the same weights
(both ways through a saved directory), Bradley-Terry loss values, rankings, a tiny training run."""

from __future__ import annotations

import math

import pytest
import torch

from lmforge.align.reward import (RewardModel, bradley_terry_loss, from_language_model, load_reward_model,
                                  pair_accuracy, ranking_to_pairs, save_reward_model)
from lmforge.errors import LmforgeError
from lmforge.model.config import ModelConfig
from lmforge.model.transformer import Transformer

VOCAB = 96
PAD = 0


def _tiny_lm(seed: int = 0, tied: bool = False) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(ModelConfig(vocab_size=VOCAB, n_embd=32, n_head=4, n_kv_head=2, n_layer=2,
                                   intermediate_size=64, tie_word_embeddings=tied, pad_token_id=PAD))


def _rows(seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([7, 3, 11, 5])
    ids = torch.full((4, 11), PAD)
    for i, n in enumerate(lengths.tolist()):
        ids[i, :n] = torch.randint(3, VOCAB, (n,), generator=gen)
    return ids, lengths


@pytest.mark.parametrize("tied", [False, True])
def test_rewards_match_transformers_both_ways(tmp_path, tied):
    from transformers import AutoModelForSequenceClassification, LlamaForSequenceClassification

    model = from_language_model(_tiny_lm(tied=tied), pad_token_id=PAD).eval()
    with torch.no_grad():
        model.score.weight.normal_()
    ids, lengths = _rows()
    ours = model(ids, lengths)
    path = save_reward_model(model, tmp_path / "rm")
    hf = AutoModelForSequenceClassification.from_pretrained(path).eval()
    assert isinstance(hf, LlamaForSequenceClassification) and hf.config.num_labels == 1
    with torch.no_grad():
        theirs = hf(input_ids=ids, attention_mask=(torch.arange(11) < lengths[:, None]).long()).logits.squeeze(-1)
    assert torch.allclose(ours, theirs, atol=1e-5), (ours, theirs)
    # transformers' own save loads into lmforge with the same rewards.
    hf.save_pretrained(tmp_path / "hf")
    again = load_reward_model(tmp_path / "hf")
    with torch.no_grad():
        assert torch.allclose(again(ids, lengths), theirs, atol=1e-5)
    # The reward depends on the response: change one real token of row 0.
    changed = ids.clone()
    changed[0, 6] = (changed[0, 6] + 1) % VOCAB + 3
    with torch.no_grad():
        assert not torch.isclose(model(changed, lengths)[0], ours[0])
        assert torch.allclose(model(changed, lengths)[1:], ours[1:])


def test_not_a_reward_model(tmp_path):
    from lmforge.model.checkpoint import save_hf_model

    save_hf_model(_tiny_lm(), tmp_path / "lm")
    with pytest.raises(LmforgeError, match="not a reward model"):
        load_reward_model(tmp_path / "lm")


def test_bradley_terry_values():
    chosen, rejected = torch.tensor([2.0, 0.0]), torch.tensor([1.0, 1.0])
    expected = (math.log1p(math.exp(-1.0)) + math.log1p(math.exp(1.0))) / 2
    assert math.isclose(float(bradley_terry_loss(chosen, rejected)), expected, rel_tol=1e-6)
    assert math.isclose(float(bradley_terry_loss(chosen, rejected, margin=1.0)),
                        (math.log(2) + math.log1p(math.exp(2.0))) / 2, rel_tol=1e-6)
    centred = bradley_terry_loss(chosen, rejected, center_coefficient=0.1)
    assert math.isclose(float(centred), expected + 0.1 * (9 + 1) / 2, rel_tol=1e-6)
    assert pair_accuracy(chosen, rejected) == 0.5


def test_ranking_to_pairs():
    pairs = ranking_to_pairs("q", ["best", "mid", "worst", "awful"])
    assert len(pairs) == 6
    assert {(p["chosen"], p["rejected"]) for p in pairs} >= {("best", "awful"), ("mid", "worst")}
    with pytest.raises(LmforgeError):
        ranking_to_pairs("q", ["only"])
    with pytest.raises(LmforgeError):
        ranking_to_pairs("q", ["a", "a"])


def test_tiny_reward_model_learns_a_preference(one_thread):
    # Chosen rows end in token 5, rejected in token 6: a rule the model can find from the last token.
    torch.manual_seed(0)
    model = RewardModel(Transformer(ModelConfig(vocab_size=VOCAB, n_embd=32, n_head=4, n_layer=1,
                                                intermediate_size=64, lm_head=False)))
    gen = torch.Generator().manual_seed(0)
    body = torch.randint(7, VOCAB, (16, 6), generator=gen)
    chosen = torch.cat([body, torch.full((16, 1), 5)], 1)
    rejected = torch.cat([body, torch.full((16, 1), 6)], 1)
    optim = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = None
    for _ in range(30):
        loss = bradley_terry_loss(model(chosen), model(rejected))
        first = first if first is not None else float(loss.detach())
        optim.zero_grad()
        loss.backward()
        optim.step()
    with torch.no_grad():
        assert pair_accuracy(model(chosen), model(rejected)) == 1.0
    assert float(loss.detach()) < first / 4
