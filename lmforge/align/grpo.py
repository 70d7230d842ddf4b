"""Group Relative Policy Optimisation (F7): RL with a verifiable reward and no value model.

For every prompt the policy samples a *group* of G responses; each is scored by a reward
function (here a checker: is the sum right?). A response's advantage is its reward
relative to its own group,

    A_i = (r_i - mean(r_group)) / (std(r_group) + 1e-4)        (std with Bessel's correction)

so no value network is needed: the group mean is the baseline. Every token of response i
shares A_i. The policy is updated with PPO's clipped surrogate per token, plus a KL
penalty to the frozen reference,

    ratio_t = pi(y_t) / pi_old(y_t)
    L_t     = -min(ratio_t A, clip(ratio_t, 1 - eps_low, 1 + eps_high) A) + beta * KL_t
    KL_t    = exp(q_t) - q_t - 1,   q_t = log pi_ref(y_t) - log pi(y_t)   (Schulman's k3: unbiased, >= 0)

and averaged per response and then over responses (``grpo``), over all tokens of the
batch (``bnpo``), or over responses x the token budget (``dr_grpo``, which removes the
length bias of the per-response mean). With one update per sampled batch pi_old equals
pi numerically (ratio 1, clipping inactive) and the gradient is the plain
policy-gradient one; the ratio matters when a batch is reused for several updates.

Sampling goes through lmforge's one generation engine (`lmforge.infer.engine.Generator`,
the continuous-batching scheduler's step); nothing here decodes on its own. The
conventions (advantage scaling, k3 KL, loss aggregation) follow trl's GRPOTrainer so
results can be compared.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from lmforge.align.dpo import token_logps
from lmforge.errors import LmforgeError

AGGREGATIONS = ("grpo", "bnpo", "dr_grpo")


def group_advantages(rewards: torch.Tensor, group_size: int, scale: bool = True) -> torch.Tensor:
    """Rewards [N * G] (groups consecutive) -> advantages [N * G] relative to each group."""
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not form groups of {group_size}")
    grouped = rewards.view(-1, group_size).float()
    centred = grouped - grouped.mean(1, keepdim=True)
    if scale:
        std = grouped.std(1, keepdim=True) if group_size > 1 else torch.zeros_like(grouped[:, :1])
        centred = centred / (std + 1e-4)
    return centred.reshape(-1)


@dataclass
class GRPOLossOutput:
    loss: torch.Tensor
    kl: float  # mean per-token KL to the reference over response tokens
    clip_fraction: float  # share of response tokens whose ratio was clipped


def grpo_loss(logps: torch.Tensor, old_logps: torch.Tensor, ref_logps: torch.Tensor | None,
              advantages: torch.Tensor, mask: torch.Tensor, epsilon_low: float = 0.2, epsilon_high: float = 0.2,
              beta: float = 0.04, aggregation: str = "grpo", max_tokens: int | None = None) -> GRPOLossOutput:
    """The clipped surrogate with a KL penalty, from per-token log-probabilities [B, T]
    (policy with gradient, the sampling policy, the reference), advantages [B] and the
    response-token mask [B, T]."""
    if aggregation not in AGGREGATIONS:
        raise LmforgeError(f"unknown GRPO aggregation {aggregation!r}; choose one of {', '.join(AGGREGATIONS)}")
    mask = mask.to(logps.dtype)
    ratio = torch.exp(logps - old_logps)
    clipped = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high)
    adv = advantages.unsqueeze(1)
    per_token = -torch.min(ratio * adv, clipped * adv)
    kl = torch.zeros_like(per_token)
    if ref_logps is not None and beta:
        q = ref_logps - logps
        kl = torch.exp(q) - q - 1
        per_token = per_token + beta * kl
    if aggregation == "grpo":
        loss = ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    elif aggregation == "bnpo":
        loss = (per_token * mask).sum() / mask.sum().clamp(min=1.0)
    else:
        loss = (per_token * mask).sum() / (per_token.shape[0] * (max_tokens or per_token.shape[1]))
    tokens = mask.sum().clamp(min=1.0)
    was_clipped = ((ratio < 1 - epsilon_low) & (adv < 0)) | ((ratio > 1 + epsilon_high) & (adv > 0))
    return GRPOLossOutput(loss, float((kl.detach() * mask).sum() / tokens),
                          float((was_clipped.to(mask.dtype) * mask).sum() / tokens))


# ---- one GRPO step ---------------------------------------------------------------------------

@dataclass
class GroupSample:
    """G responses to each of N prompts, as right-padded rows with their response mask."""

    input_ids: torch.Tensor  # [N*G, L]
    response_mask: torch.Tensor  # [N*G, L]
    texts: list[str]
    rewards: torch.Tensor  # [N*G]


def sample_groups(model, tokenizer, prompt_ids: Sequence[list[int]], group_size: int, max_tokens: int,
                  temperature: float, reward: Callable[[int, str, list[int]], float], seed: int,
                  pad_id: int = 0) -> GroupSample:
    """G samples per prompt through the generation engine, scored by ``reward(prompt_index, text, token_ids)``.

    A response that ended on an end-of-sequence token keeps it (the engine reports it
    apart from the text), so the update also teaches where to stop."""
    from lmforge.align.batching import pad_rows
    from lmforge.infer.engine import Generator
    from lmforge.infer.sampling import SamplingParams

    prompts = [list(p) for p in prompt_ids for _ in range(group_size)]
    params = [SamplingParams(max_tokens=max_tokens, temperature=temperature, seed=seed * 100003 + i)
              for i in range(len(prompts))]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            done = Generator(model, tokenizer).generate(prompts, params)
    finally:
        model.train(was_training)
    eos = getattr(tokenizer, "eos_id", None) if tokenizer is not None else model.config.eos_token_id
    eos = eos[0] if isinstance(eos, (list, tuple)) else eos
    responses = [c.token_ids + ([eos] if c.finish_reason == "stop" and eos is not None else []) for c in done]
    rows = [p + r for p, r in zip(prompts, responses)]
    masks = [[0] * len(p) + [1] * len(r) for p, r in zip(prompts, responses)]
    ids, _ = pad_rows(rows, pad_id)
    response_mask, _ = pad_rows(masks, 0)
    rewards = torch.tensor([float(reward(i // group_size, c.text, c.token_ids)) for i, c in enumerate(done)])
    return GroupSample(ids, response_mask, [c.text for c in done], rewards)


def _logps_and_entropy(model, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Token log-probabilities with gradient and, for lmforge's Transformer, the entropies (same pass)."""
    if hasattr(model, "hidden_states") and isinstance(getattr(model, "lm_head", None), torch.nn.Linear):
        from lmforge.align.ppo import policy_forward

        logps, _, entropy = policy_forward(model, None, ids, mask, with_entropy=True)
        return logps, entropy
    return token_logps(model, ids, mask), None


def grpo_update(model, reference, optimizer, sample: GroupSample, group_size: int, beta: float = 0.04,
                epsilon: float = 0.2, aggregation: str = "grpo", clip_grad_norm: float = 1.0,
                max_tokens: int | None = None) -> dict[str, float]:
    """One optimizer step on a sampled batch (pi_old = the policy that sampled it).

    ``reference`` None with LoRA adapters on ``model``: the reference is the base with the
    adapters switched off. ``max_tokens`` is dr_grpo's token budget per response."""
    from lmforge.align.ppo import adapters_disabled, masked_mean

    device = next(model.parameters()).device
    ids, mask = sample.input_ids.to(device), sample.response_mask.to(device)
    advantages = group_advantages(sample.rewards, group_size).to(device)
    with torch.no_grad():
        ref = None
        if beta and reference is not None:
            ref = token_logps(reference, ids, mask)
        elif beta:
            with adapters_disabled(model) as had:
                ref = token_logps(model, ids, mask) if had else None
    logps, entropy = _logps_and_entropy(model, ids, mask)
    # One update per sampled batch: pi_old is the policy as it is now (no second forward for it).
    old = logps.detach()
    out = grpo_loss(logps, old, ref, advantages, mask[:, 1:], epsilon, epsilon, beta, aggregation, max_tokens)
    out.loss.backward()
    norm = torch.nn.utils.clip_grad_norm_([p for group in optimizer.param_groups for p in group["params"]
                                           if p.requires_grad], clip_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    grouped = sample.rewards.view(-1, group_size)
    figures = {"loss": float(out.loss.detach()), "reward": float(sample.rewards.mean()), "kl": out.kl,
               "clip_fraction": out.clip_fraction, "grad_norm": float(norm),
               "groups_without_signal": float((grouped.std(1) == 0).float().mean()) if group_size > 1 else 1.0,
               "response_tokens": float(mask.sum(1).float().mean())}
    if entropy is not None:
        figures["entropy"] = float(masked_mean(entropy.detach(), mask[:, 1:]))
    return figures
