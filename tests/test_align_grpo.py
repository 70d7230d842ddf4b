"""GRPO: group-relative advantages, the clipped surrogate with the k3 KL penalty, and a tiny
run where sampling through the generation engine and updating raise the mean reward."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from lmforge.align.grpo import group_advantages, grpo_loss, grpo_update, sample_groups
from lmforge.errors import LmforgeError
from lmforge.model.config import ModelConfig
from lmforge.model.transformer import Transformer


def test_group_advantages():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0])
    adv = group_advantages(rewards, 4)
    std = math.sqrt(1 / 3)  # Bessel-corrected std of (1, 0, 0, 1)
    assert torch.allclose(adv[:4], torch.tensor([0.5, -0.5, -0.5, 0.5]) / (std + 1e-4))
    assert torch.equal(adv[4:], torch.zeros(4))  # a group that all agrees teaches nothing
    assert torch.allclose(group_advantages(rewards, 4, scale=False)[:4], torch.tensor([0.5, -0.5, -0.5, 0.5]))
    with pytest.raises(ValueError):
        group_advantages(rewards, 3)


def _reference_loss(logps, old, ref, adv, mask, eps, beta):
    """The formula written out token by token (trl's GRPOTrainer, loss_type="grpo")."""
    rows = []
    for b in range(logps.shape[0]):
        terms = []
        for t in range(logps.shape[1]):
            if not mask[b, t]:
                continue
            ratio = torch.exp(logps[b, t] - old[b, t])
            surrogate = torch.minimum(ratio * adv[b], torch.clamp(ratio, 1 - eps, 1 + eps) * adv[b])
            q = ref[b, t] - logps[b, t]
            terms.append(-surrogate + beta * (torch.exp(q) - q - 1))
        rows.append(torch.stack(terms).mean())
    return torch.stack(rows).mean()


def test_loss_values_gradients_and_clipping():
    gen = torch.Generator().manual_seed(0)
    base = -2 + 0.5 * torch.randn(3, 5, generator=gen, dtype=torch.float64)
    old = base + 0.4 * torch.randn(3, 5, generator=gen, dtype=torch.float64)  # ratios far enough from 1 to clip
    ref = base + 0.2 * torch.randn(3, 5, generator=gen, dtype=torch.float64)
    adv = torch.tensor([1.0, -0.5, 2.0], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 1, 1, 1, 0]])
    ours_in = base.clone().requires_grad_(True)
    out = grpo_loss(ours_in, old, ref, adv, mask, 0.2, 0.2, beta=0.1)
    out.loss.backward()
    theirs_in = base.clone().requires_grad_(True)
    expected = _reference_loss(theirs_in, old, ref, adv, mask, 0.2, 0.1)
    expected.backward()
    assert torch.allclose(out.loss, expected, atol=1e-12)
    assert torch.allclose(ours_in.grad, theirs_in.grad, atol=1e-12)
    assert 0 < out.clip_fraction < 1 and out.kl > 0
    # A clipped token (ratio above 1 + eps with a positive advantage) passes no policy gradient.
    logp = torch.tensor([[0.0]], requires_grad=True)
    grpo_loss(logp, torch.tensor([[-1.0]]), None, torch.tensor([1.0]), torch.ones(1, 1), beta=0.0).loss.backward()
    assert logp.grad.item() == 0.0
    with pytest.raises(LmforgeError):
        grpo_loss(base, old, ref, adv, mask, aggregation="mean")


@pytest.mark.slow
def test_tiny_grpo_run_raises_the_reward(one_thread):
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=16, n_embd=32, n_head=4, n_layer=1, intermediate_size=64,
                                    max_position_embeddings=32))
    reference = copy.deepcopy(model).eval()
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-2)
    prompts = [[1, 5, 6], [1, 7, 8]]

    def reward(index, text, token_ids):  # a verifiable rule: the share of responses' tokens that are 3
        return sum(t == 3 for t in token_ids) / 4

    history = []
    for step in range(12):
        sample = sample_groups(model, None, prompts, 8, 4, 1.0, reward, seed=step)
        assert sample.input_ids.shape[0] == 16 and sample.response_mask[:, :3].sum() == 0
        history.append(grpo_update(model, reference, optimizer, sample, 8, beta=0.04))
    first = sum(h["reward"] for h in history[:3]) / 3
    last = sum(h["reward"] for h in history[-3:]) / 3
    assert last > first + 0.3, [h["reward"] for h in history]
    assert history[0]["kl"] == 0.0 and history[-1]["kl"] > 0  # it moved away from the reference, and says so
