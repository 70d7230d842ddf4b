"""PPO: GAE against a direct reverse recursion, the clipped losses against hand computations,
KL-penalised rewards, the adaptive KL controller, the LoRA reference, and one PPO step on a
tiny model raising the reward of a trivially learnable task."""

from __future__ import annotations

import math

import pytest
import torch

from lmforge.align.ppo import (AdaptiveKLController, PPOSettings, ValueHead, adapters_disabled, clipped_policy_loss,
                               clipped_value_loss, gae, kl_rewards, policy_forward, ppo_update, whiten)
from lmforge.errors import LmforgeError
from lmforge.model.config import ModelConfig
from lmforge.model.transformer import Transformer


def _gae_by_hand(rewards: list[float], values: list[float], gamma: float, lam: float) -> tuple[list[float], list[float]]:
    """One episode: A_t = sum_k (gamma lam)^k delta_{t+k}, written as the textbook reverse loop."""
    advantages, running = [0.0] * len(rewards), 0.0
    for t in reversed(range(len(rewards))):
        next_value = values[t + 1] if t + 1 < len(rewards) else 0.0
        delta = rewards[t] + gamma * next_value - values[t]
        running = delta + gamma * lam * running
        advantages[t] = running
    return advantages, [a + v for a, v in zip(advantages, values)]


def test_gae_equals_the_reverse_recursion_per_response():
    gen = torch.Generator().manual_seed(0)
    rewards = torch.randn(3, 9, generator=gen, dtype=torch.float64)
    values = torch.randn(3, 9, generator=gen, dtype=torch.float64)
    # prompt columns, then the response run, then padding (what rollouts look like)
    spans = [(2, 7), (0, 9), (4, 5)]
    mask = torch.zeros(3, 9)
    for row, (a, b) in enumerate(spans):
        mask[row, a:b] = 1
    for gamma, lam in ((1.0, 0.95), (0.9, 0.5), (0.99, 1.0)):
        adv, ret = gae(rewards * mask, values * mask, mask, gamma, lam)
        for row, (a, b) in enumerate(spans):
            want_adv, want_ret = _gae_by_hand(rewards[row, a:b].tolist(), values[row, a:b].tolist(), gamma, lam)
            assert torch.allclose(adv[row, a:b], torch.tensor(want_adv, dtype=torch.float64), atol=1e-12)
            assert torch.allclose(ret[row, a:b], torch.tensor(want_ret, dtype=torch.float64), atol=1e-12)
        assert torch.all(adv[mask == 0] == 0) and torch.all(ret[mask == 0] == 0)
    # lambda = 1, gamma = 1: the advantage is the reward-to-go minus the value
    adv, _ = gae(rewards * mask, values * mask, mask, 1.0, 1.0)
    to_go = torch.flip(torch.cumsum(torch.flip(rewards[1], [0]), 0), [0])
    assert torch.allclose(adv[1], to_go - values[1], atol=1e-12)


def test_whiten_over_the_mask():
    x = torch.tensor([[5.0, 1.0, 2.0, 3.0], [9.0, 4.0, 0.0, 0.0]])
    mask = torch.tensor([[0, 1, 1, 1], [0, 1, 0, 0]])
    w = whiten(x, mask)
    picked = w[mask.bool()]
    assert abs(float(picked.mean())) < 1e-6 and abs(float(picked.std()) - 1) < 1e-6
    assert torch.all(w[~mask.bool()] == 0)
    vals = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert torch.allclose(picked, (vals - 2.5) / vals.std(), atol=1e-6)


def test_kl_rewards_penalise_every_token_and_score_the_last():
    logps = torch.tensor([[-1.0, -2.0, -0.5, 0.0], [-1.0, -1.0, -1.0, -1.0]])
    ref = torch.tensor([[-1.5, -1.0, -0.5, 0.0], [-2.0, -1.0, -1.0, -1.0]])
    mask = torch.tensor([[0, 1, 1, 0], [1, 1, 1, 1]])
    rewards, kl = kl_rewards(logps, ref, torch.tensor([3.0, -1.0]), mask, beta=0.1)
    assert torch.allclose(kl, torch.tensor([[0.0, -1.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]]))
    assert torch.allclose(rewards, torch.tensor([[0.0, 0.1, 3.0, 0.0], [-0.1, 0.0, 0.0, -1.0]]))


def test_clipped_policy_loss_by_hand():
    # ratios 1.5, 1.5, 0.5, 0.5 against advantages +1, -1, +1, -1 (eps 0.2):
    # per token max(-rA, -clip(r)A) = -1.2 (clipped), 1.5, -0.5, 0.8 (clipped)
    old = torch.zeros(1, 4)
    logps = torch.log(torch.tensor([[1.5, 1.5, 0.5, 0.5]])).requires_grad_(True)
    adv = torch.tensor([[1.0, -1.0, 1.0, -1.0]])
    out = clipped_policy_loss(logps, old, adv, torch.ones(1, 4), epsilon=0.2)
    assert math.isclose(float(out.loss.detach()), (-1.2 + 1.5 - 0.5 + 0.8) / 4, abs_tol=1e-6)
    assert out.clip_fraction == 0.5
    out.loss.backward()
    # clipped tokens pass no gradient; the others d(-rA)/dlogp / 4 = -r A / 4
    assert torch.allclose(logps.grad, torch.tensor([[0.0, 1.5 / 4, -0.5 / 4, 0.0]]), atol=1e-6)
    # masked tokens do not count
    masked = clipped_policy_loss(logps.detach(), old, adv, torch.tensor([[1, 1, 0, 0]]), epsilon=0.2)
    assert math.isclose(float(masked.loss), (-1.2 + 1.5) / 2, abs_tol=1e-6)


def test_clipped_value_loss_by_hand():
    values = torch.tensor([[1.0, 0.0, 0.5]], requires_grad=True)
    old = torch.tensor([[0.0, 0.0, 0.0]])
    returns = torch.tensor([[2.0, 1.0, 0.0]])
    loss, fraction = clipped_value_loss(values, old, returns, torch.ones(1, 3), clip=0.2)
    # token 0: plain (1-2)^2 = 1, clipped (0.2-2)^2 = 3.24 -> 3.24; token 1: 1 and 1 -> 1;
    # token 2: plain 0.25, clipped 0.04 -> 0.25
    assert math.isclose(float(loss.detach()), 0.5 * (3.24 + 1.0 + 0.25) / 3, abs_tol=1e-6)
    assert math.isclose(fraction, 1 / 3, abs_tol=1e-6)
    loss.backward()
    assert torch.allclose(values.grad, torch.tensor([[0.0, -1.0 / 3, 0.5 / 3]]), atol=1e-6)


def test_adaptive_kl_controller():
    fixed = AdaptiveKLController(0.1)
    assert fixed.update(5.0, 8) == 0.1
    ctl = AdaptiveKLController(0.1, target=1.0, horizon=100)
    assert math.isclose(ctl.update(2.0, 10), 0.1 * (1 + 0.2 * 10 / 100))  # error clipped at +0.2
    before = ctl.beta
    assert math.isclose(ctl.update(0.9, 10), before * (1 - 0.1 * 10 / 100))
    assert ctl.update(0.0, 10) < before


def _tiny(vocab: int = 16, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(ModelConfig(vocab_size=vocab, n_embd=32, n_head=4, n_layer=1, intermediate_size=64,
                                   max_position_embeddings=32))


def test_policy_forward_matches_token_logps_and_value_head_starts_at_zero():
    from lmforge.align.dpo import token_logps

    model = _tiny()
    ids = torch.randint(0, 16, (2, 7), generator=torch.Generator().manual_seed(1))
    mask = torch.tensor([[0, 0, 1, 1, 1, 0, 0], [0, 1, 1, 1, 1, 1, 1]])
    head = ValueHead(32)
    logps, values, entropy = policy_forward(model, head, ids, mask, with_entropy=True)
    assert torch.allclose(logps, token_logps(model, ids, mask), atol=1e-6)
    assert values.shape == (2, 6) and torch.all(values == 0)
    picked = entropy[mask[:, 1:].bool()]
    assert torch.all(picked > 0) and torch.all(picked <= math.log(16) + 1e-5)


def test_lora_reference_is_the_base_with_adapters_off():
    from lmforge.tune.peft import PeftOptions, apply_peft

    model = _tiny()
    ids = torch.randint(0, 16, (2, 6), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        base = model(ids).clone()
    model = apply_peft(model, PeftOptions(method="lora", r=2, target_modules=["q_proj", "v_proj"], seed=0))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_()
        moved = model(ids)
        with adapters_disabled(model) as had:
            off = model(ids)
    assert had and not torch.allclose(moved, base, atol=1e-4)
    assert torch.allclose(off, base, atol=1e-6)
    assert torch.allclose(model(ids), moved)  # the adapters are back
    with adapters_disabled(_tiny()) as had_none:
        assert not had_none


def test_settings_refuse_a_non_positive_clip_range():
    with pytest.raises(LmforgeError, match="epsilon"):
        PPOSettings(epsilon=0.0).validate()
    with pytest.raises(LmforgeError, match="value_clip"):
        PPOSettings(value_clip=-1).validate()


def test_one_ppo_step_raises_the_reward_of_a_learnable_task():
    """Reward = share of response tokens that are 3: after one PPO step (4 epochs of minibatches
    on one rollout) the policy puts more probability on token 3 where it sampled."""
    import copy

    from lmforge.align.grpo import sample_groups

    before_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = _tiny()
        reference = copy.deepcopy(model).eval()
        head = ValueHead(32)
        optimizer = torch.optim.AdamW([{"params": model.parameters(), "lr": 1e-2},
                                       {"params": head.parameters(), "lr": 1e-2}])

        def reward(index, text, token_ids):
            return sum(t == 3 for t in token_ids) / 4

        sample = sample_groups(model, None, [[1, 5, 6], [1, 7, 8]], 8, 4, 1.0, reward, seed=0)
        assert sample.rewards.std() > 0

        def expected_reward(m) -> float:
            """Mean probability of token 3 at the rollout's response positions (the reward's expectation there)."""
            with torch.no_grad():
                logits = m(sample.input_ids)[:, :-1]
                p3 = torch.softmax(logits, -1)[..., 3]
                mask = sample.response_mask[:, 1:].float()
                return float((p3 * mask).sum() / mask.sum())

        start = expected_reward(model)
        figures = ppo_update(model, head, reference, optimizer, sample.input_ids, sample.response_mask,
                             sample.rewards, beta=0.05, settings=PPOSettings(epochs=4, minibatch_size=4),
                             generator=torch.Generator().manual_seed(0))
        end = expected_reward(model)
        assert end > start + 0.05, (start, end)
        assert figures["kl"] == 0.0  # the rollout came from the reference itself
        assert figures["value_loss"] > 0 and 0 <= figures["clip_fraction"] <= 1 and figures["entropy"] > 0
        assert math.isclose(figures["score"], float(sample.rewards.mean()), abs_tol=1e-6)
        # the second rollout is judged against the moved policy: KL > 0
        second = sample_groups(model, None, [[1, 5, 6]], 8, 4, 1.0, reward, seed=1)
        again = ppo_update(model, head, reference, optimizer, second.input_ids, second.response_mask,
                           second.rewards, beta=0.05, settings=PPOSettings(epochs=1, minibatch_size=8))
        assert again["kl_per_response"] != 0.0
    finally:
        torch.set_num_threads(before_threads)
