"""PPO for language models (F7): a policy, a value head, GAE and the clipped objective.

RLHF as Ziegler et al. (2019) and InstructGPT run it treats a response as an episode: the
state at response token t is the prompt plus the tokens before it, the action is token t.
One PPO step is

1. *rollout*: sample responses to a batch of prompts through lmforge's one generation
   engine (`lmforge.align.grpo.sample_groups` drives `lmforge.infer.engine.Generator`) and
   score each finished response once (a verifiable checker or a reward model);
2. *per-token rewards*: a KL penalty to the frozen reference at every token and the score
   at the last one,

       r_t = -beta * (log pi_old(y_t) - log pi_ref(y_t))  (+ score if t is the last token)

3. *advantages*: generalised advantage estimation on the value head's estimates V_t,

       delta_t = r_t + gamma * V_{t+1} - V_t          (V after the last token is 0)
       A_t     = delta_t + gamma * lambda * A_{t+1},   returns R_t = A_t + V_t

   then whitened (zero mean, unit variance over the batch's response tokens);
4. *updates*: ``epochs`` passes over shuffled minibatches of the rollout, each minimising

       L = -mean min(rho_t A_t, clip(rho_t, 1 - eps, 1 + eps) A_t)             (policy)
           + vf_coef * 0.5 * mean max((V_t - R_t)^2, (clip(V_t, V_old +- eps_v) - R_t)^2)
           - entropy_coef * mean H(pi(. | s_t))

   with rho_t = pi(y_t) / pi_old(y_t) and means over the response tokens of the minibatch.

The value head is a separate linear map (hidden size -> 1) on the policy's own final
hidden states, as trl's ``AutoModelForCausalLMWithValueHead``: one forward gives both the
token log-probabilities and the values, and memory holds one body, not two. A separate
critic initialised from the reward model would start with a better value estimate but
doubles the memory and compute of the update, which on two CPU cores decides. The price
of sharing is that the value loss also moves the body; ``vf_coef`` weighs it.

The reference is a frozen copy of the starting policy or, with LoRA adapters, the same
model with the adapters switched off (`adapters_disabled`): no second copy in memory.
The adaptive KL controller (Ziegler et al.) moves beta so that the per-response KL to the
reference approaches ``target_kl``. Conventions (k1 KL in the reward, whitening, value
clipping) follow trl's PPO trainer so results can be compared.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from lmforge.errors import LmforgeError


# ---- the math, on tensors -------------------------------------------------------------------

def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mask = mask.to(x.dtype)
    return (x * mask).sum() / mask.sum().clamp(min=1.0)


def whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """(x - mean) / std over the masked entries (variance with Bessel's correction); zero elsewhere."""
    m = mask.to(x.dtype)
    n = m.sum().clamp(min=1.0)
    mean = (x * m).sum() / n
    var = (((x - mean) ** 2) * m).sum() / (n - 1).clamp(min=1.0)
    out = (x - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        out = out + mean
    return out * m


def kl_rewards(logps: torch.Tensor, ref_logps: torch.Tensor, scores: torch.Tensor, mask: torch.Tensor,
               beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards [B, T] and the per-token KL estimate log pi - log pi_ref [B, T] (k1), both
    zero outside ``mask``; the score of each row is added at its last masked position."""
    m = mask.to(logps.dtype)
    kl = (logps - ref_logps) * m
    rewards = -beta * kl
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    last = torch.where(mask.bool(), positions, torch.full_like(positions, -1)).max(1).values
    has = last >= 0
    rows = torch.arange(mask.shape[0], device=mask.device)[has]
    rewards[rows, last[has]] += scores[has].to(rewards.dtype)
    return rewards, kl


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimates and returns [B, T] for rows whose masked positions are one
    contiguous run (a response after its prompt, padding after it). The value after a row's last
    masked position is 0: the episode ends there."""
    m = mask.to(values.dtype)
    advantages = torch.zeros_like(values)
    running = torch.zeros_like(values[:, 0])
    width = values.shape[1]
    for t in reversed(range(width)):
        following = m[:, t + 1] if t + 1 < width else torch.zeros_like(running)
        next_value = values[:, t + 1] * following if t + 1 < width else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = (delta + gamma * lam * running * following) * m[:, t]
        advantages[:, t] = running
    return advantages, (advantages + values) * m


@dataclass
class PolicyLoss:
    loss: torch.Tensor
    clip_fraction: float  # share of response tokens where the clipped term was the one used
    approx_kl: float  # k3 estimate of KL(pi_old || pi) over the response tokens


def clipped_policy_loss(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor,
                        mask: torch.Tensor, epsilon: float = 0.2) -> PolicyLoss:
    """PPO's clipped surrogate, as a loss: mean over masked tokens of max(-rho A, -clip(rho) A)."""
    ratio = torch.exp(logps - old_logps)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1 - epsilon, 1 + epsilon)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    log_ratio = (logps - old_logps).detach()
    return PolicyLoss(loss, float(masked_mean((clipped > unclipped).float(), mask)),
                      float(masked_mean(torch.exp(log_ratio) - 1 - log_ratio, mask)))


def clipped_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
                       mask: torch.Tensor, clip: float = 0.2) -> tuple[torch.Tensor, float]:
    """0.5 * mean over masked tokens of max((V - R)^2, (V_old + clip(V - V_old, +-clip) - R)^2), and
    the share of tokens where the clipped error was the larger."""
    clipped_values = old_values + torch.clamp(values - old_values, -clip, clip)
    plain, limited = (values - returns) ** 2, (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(plain, limited), mask)
    return loss, float(masked_mean((limited > plain).float(), mask))


class AdaptiveKLController:
    """beta_{k+1} = beta_k * (1 + clip(KL / target - 1, -0.2, 0.2) * n / horizon) (Ziegler et al., 2019),
    with KL the mean per-response KL to the reference and n the responses of the step."""

    def __init__(self, beta: float, target: float | None = None, horizon: float = 10000.0) -> None:
        self.beta, self.target, self.horizon = beta, target, horizon

    def update(self, kl: float, n: int) -> float:
        if self.target:
            error = min(max(kl / self.target - 1.0, -0.2), 0.2)
            self.beta *= 1.0 + error * n / self.horizon
        return self.beta


# ---- the model side ---------------------------------------------------------------------------

class ValueHead(nn.Module):
    """A scalar per position from the policy's final hidden states (zero-initialised output:
    every value starts at 0, so the first advantages are the plain returns)."""

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.summary = nn.Linear(hidden_size, 1)
        nn.init.zeros_(self.summary.weight)
        nn.init.zeros_(self.summary.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.summary(hidden.to(self.summary.weight.dtype)).squeeze(-1)


def policy_forward(model: nn.Module, value_head: ValueHead | None, input_ids: torch.Tensor,
                   response_mask: torch.Tensor, with_entropy: bool = False
                   ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(token log-probabilities [B, L-1], values [B, L-1] or None, entropies [B, L-1] or None)
    from one pass through the body; column t-1 belongs to token t, as in `token_logps`. Only
    response positions go through the vocabulary head."""
    head = getattr(model, "lm_head", None)
    if not hasattr(model, "hidden_states") or head is None:
        raise LmforgeError("PPO needs a causal LM with a vocabulary head on its hidden states "
                           "(lmforge's Transformer, plain or with LoRA adapters)")
    hidden = model.hidden_states(input_ids)[:, :-1]
    selected = response_mask[:, 1:].bool()
    targets = input_ids[:, 1:]
    logits = head(hidden[selected]).float()
    log_probs = torch.log_softmax(logits, dim=-1)
    picked = log_probs.gather(-1, targets[selected].unsqueeze(-1)).squeeze(-1)
    logps = torch.zeros(targets.shape, dtype=picked.dtype, device=picked.device).masked_scatter(selected, picked)
    values = value_head(hidden) if value_head is not None else None
    entropy = None
    if with_entropy:
        per = -(log_probs.exp() * log_probs).sum(-1)
        entropy = torch.zeros(targets.shape, dtype=per.dtype, device=per.device).masked_scatter(selected, per)
    return logps, values, entropy


@contextlib.contextmanager
def adapters_disabled(model: nn.Module):
    """The base model under LoRA adapters: every adapter's scale set to 0 for the duration."""
    saved = []
    for module in model.modules():
        if hasattr(module, "lora_A") and hasattr(module, "scaling"):
            saved.append((module, module.scaling))
            module.scaling = 0.0
    try:
        yield bool(saved)
    finally:
        for module, scaling in saved:
            module.scaling = scaling


@dataclass
class PPOSettings:
    """The constants of one PPO update (see lmforge/align/config.py `PPOConfig` for their flags)."""

    epochs: int = 4
    minibatch_size: int = 4
    epsilon: float = 0.2
    value_clip: float = 0.2
    vf_coef: float = 0.1
    entropy_coef: float = 0.0
    gamma: float = 1.0
    lam: float = 0.95
    whiten_advantages: bool = True
    clip_grad_norm: float = 1.0

    def validate(self) -> None:
        if not self.epsilon > 0:
            raise LmforgeError(f"epsilon (the PPO clip range) must be positive, got {self.epsilon}")
        if not self.value_clip > 0:
            raise LmforgeError(f"value_clip must be positive, got {self.value_clip}")
        if self.epochs < 1 or self.minibatch_size < 1:
            raise LmforgeError("ppo_epochs and minibatch_size must be positive")
        if not (0 <= self.gamma <= 1 and 0 <= self.lam <= 1):
            raise LmforgeError("gamma and lam must lie in [0, 1]")


def reference_logps(model: nn.Module, reference: nn.Module | None, input_ids: torch.Tensor,
                    response_mask: torch.Tensor) -> torch.Tensor:
    """The frozen reference's token log-probabilities: ``reference`` or, when it is None, ``model``
    with its LoRA adapters switched off."""
    from lmforge.align.dpo import token_logps

    with torch.no_grad():
        if reference is not None:
            return token_logps(reference, input_ids, response_mask)
        with adapters_disabled(model) as had:
            if not had:
                raise LmforgeError("no reference model: pass one, or train LoRA adapters (the base is the reference)")
            return token_logps(model, input_ids, response_mask)


def ppo_update(model: nn.Module, value_head: ValueHead, reference: nn.Module | None, optimizer,
               input_ids: torch.Tensor, response_mask: torch.Tensor, scores: torch.Tensor, beta: float,
               settings: PPOSettings, generator: torch.Generator | None = None) -> dict[str, float]:
    """One PPO step on a sampled batch (rows: prompt + response, right-padded): rewards, GAE,
    then ``settings.epochs`` passes of minibatch updates. Returns the step's figures."""
    settings.validate()
    device = next(model.parameters()).device
    ids, rmask = input_ids.to(device), response_mask.to(device)
    mask = rmask[:, 1:].float()
    was_training = model.training
    model.eval()
    with torch.no_grad():
        old_logps, old_values, _ = policy_forward(model, value_head, ids, rmask)
        ref = reference_logps(model, reference, ids, rmask)
        rewards, kl = kl_rewards(old_logps, ref, scores.to(device), mask, beta)
        advantages, returns = gae(rewards, old_values * mask, mask, settings.gamma, settings.lam)
        if settings.whiten_advantages:
            advantages = whiten(advantages, mask)
    model.train(was_training)
    params = [p for group in optimizer.param_groups for p in group["params"] if p.requires_grad]
    figures: dict[str, list[float]] = {k: [] for k in ("policy_loss", "value_loss", "entropy", "clip_fraction",
                                                       "value_clip_fraction", "approx_kl", "grad_norm")}
    n = ids.shape[0]
    for _ in range(settings.epochs):
        order = torch.randperm(n, generator=generator)
        for start in range(0, n, settings.minibatch_size):
            rows = order[start:start + settings.minibatch_size].to(device)
            logps, values, entropy = policy_forward(model, value_head, ids[rows], rmask[rows], with_entropy=True)
            m = mask[rows]
            policy = clipped_policy_loss(logps, old_logps[rows], advantages[rows], m, settings.epsilon)
            value_loss, value_clipped = clipped_value_loss(values, old_values[rows], returns[rows], m,
                                                           settings.value_clip)
            mean_entropy = masked_mean(entropy, m)
            loss = policy.loss + settings.vf_coef * value_loss - settings.entropy_coef * mean_entropy
            loss.backward()
            norm = torch.nn.utils.clip_grad_norm_(params, settings.clip_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            for key, value in (("policy_loss", float(policy.loss.detach())), ("value_loss", float(value_loss.detach())),
                               ("entropy", float(mean_entropy.detach())), ("clip_fraction", policy.clip_fraction),
                               ("value_clip_fraction", value_clipped), ("approx_kl", policy.approx_kl),
                               ("grad_norm", float(norm))):
                figures[key].append(value)
    out = {k: sum(v) / len(v) for k, v in figures.items()}
    tokens = mask.sum(1)
    out |= {"score": float(scores.mean()), "kl": float(kl.sum() / mask.sum().clamp(min=1.0)),
            "kl_per_response": float(kl.sum(1).mean()), "beta": beta,
            "non_score_reward": float((-beta * kl).sum(1).mean()), "returns": float(masked_mean(returns, mask)),
            "values": float(masked_mean(old_values, mask)), "response_tokens": float(tokens.mean())}
    if not all(math.isfinite(v) for v in out.values()):
        raise LmforgeError(f"PPO step produced non-finite figures: {out}")
    return out
