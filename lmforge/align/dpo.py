"""Preference optimisation without a reward model (F8): DPO and its relatives.

DPO (Rafailov et al., 2023) reads a policy as its own reward model. For a prompt x and
a response y the implicit reward is

    r(x, y) = beta * (log pi(y | x) - log pi_ref(y | x))

where log pi(y | x) is the sum of the response tokens' log-probabilities (the prompt
is context, not scored) and pi_ref is a frozen copy of the starting policy. With a
chosen response y_w and a rejected one y_l, the Bradley-Terry likelihood of the
preference gives the loss ``-log sigmoid(r(x, y_w) - r(x, y_l))``. Nothing is sampled
and no value function is trained: it is a classification loss on fixed pairs.

The relatives differ only in what they do with the two log-ratios:

    sigmoid  -(1-e) log s(b D) - e log s(-b D)           D = chosen log-ratio - rejected log-ratio;
                                                         e > 0 is conservative DPO (labels flipped with prob. e)
    robust   (-(1-e) log s(b D) + e log s(-b D)) / (1-2e)   unbiased under flipped labels (Chowdhury et al., 2024)
    hinge    max(0, 1 - b D)                             SLiC-style margin
    ipo      (D_c/n_c - D_r/n_r - 1/(2b))^2              IPO (Azar et al., 2023): regresses the per-token
                                                         log-ratio gap to a fixed target instead of pushing it to infinity
    simpo    -(1-e) log s(b (m_c - m_r) - g) - e ...     SimPO (Meng et al., 2024): no reference model; m is the
                                                         mean log-probability per response token and g a target margin

``reference_free=True`` drops pi_ref from the DPO-family losses (the log-ratios become
plain log-probabilities). The conventions (which counts normalise IPO, how the rewards
are reported) follow trl's DPOTrainer and CPOTrainer so results can be compared; the
tests check the values and gradients against trl.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lmforge.align.config import LOSS_TYPES, PreferenceLossConfig

__all__ = ["LOSS_TYPES", "PreferenceLossConfig", "PreferenceOutput", "preference_loss", "sequence_logps", "token_logps"]

@dataclass
class PreferenceOutput:
    """Per-pair losses and implicit rewards (rewards carry no gradient)."""

    losses: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor

    @property
    def loss(self) -> torch.Tensor:
        return self.losses.mean()

    @property
    def accuracy(self) -> float:
        """Share of pairs whose chosen response has the higher implicit reward."""
        return float((self.chosen_rewards > self.rejected_rewards).float().mean())

    @property
    def margin(self) -> float:
        return float((self.chosen_rewards - self.rejected_rewards).mean())

    def metrics(self) -> dict[str, float]:
        return {"loss": float(self.loss.detach()), "reward_accuracy": self.accuracy, "reward_margin": self.margin,
                "chosen_reward": float(self.chosen_rewards.mean()), "rejected_reward": float(self.rejected_rewards.mean())}


# ---- log-probabilities of responses ------------------------------------------------------

def _logits_of(output) -> torch.Tensor:
    return output.logits if hasattr(output, "logits") else output


def token_logps(model: torch.nn.Module, input_ids: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """log p(input_ids[:, t] | input_ids[:, :t]) for every position t >= 1 with response_mask[:, t] set.

    Returns [B, L-1] (column t-1 holds token t), zero where the mask is off. Batches are
    right-padded (padding after the last real token changes nothing before it in a causal
    model), so no attention mask is needed. For lmforge's `Transformer` only the response
    positions go through the vocabulary head: prompts are often longer than responses,
    and the head is most of a small model's cost.
    """
    if input_ids.shape != response_mask.shape:
        raise ValueError(f"input_ids {tuple(input_ids.shape)} and response_mask {tuple(response_mask.shape)} differ")
    targets = input_ids[:, 1:]
    selected = response_mask[:, 1:].bool()
    head = getattr(model, "lm_head", None)
    if hasattr(model, "hidden_states") and isinstance(head, torch.nn.Linear):
        hidden = model.hidden_states(input_ids)[:, :-1]
        logits = head(hidden[selected])
    else:
        logits = _logits_of(model(input_ids))[:, :-1][selected]
    picked = torch.log_softmax(logits.float(), dim=-1).gather(-1, targets[selected].unsqueeze(-1)).squeeze(-1)
    out = torch.zeros(targets.shape, dtype=picked.dtype, device=picked.device)
    return out.masked_scatter(selected, picked)


def sequence_logps(model: torch.nn.Module, input_ids: torch.Tensor,
                   response_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of the response tokens' log-probabilities [B], number of response tokens [B])."""
    per_token = token_logps(model, input_ids, response_mask)
    return per_token.sum(-1), response_mask[:, 1:].sum(-1)


# ---- the losses ----------------------------------------------------------------------------

def _smoothed_sigmoid(logits: torch.Tensor, eps: float) -> torch.Tensor:
    return -(1 - eps) * F.logsigmoid(logits) - eps * F.logsigmoid(-logits)


def preference_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor,
                    ref_chosen: torch.Tensor | None = None, ref_rejected: torch.Tensor | None = None,
                    chosen_tokens: torch.Tensor | None = None, rejected_tokens: torch.Tensor | None = None,
                    config: PreferenceLossConfig | None = None) -> PreferenceOutput:
    """Per-pair preference losses from summed response log-probabilities [B].

    ``ref_*`` are the frozen reference's sums (needed unless the loss is reference-free);
    ``*_tokens`` the response lengths (needed by ipo and simpo).
    """
    c = config or PreferenceLossConfig()
    c.validate()
    beta, eps = c.beta, c.label_smoothing
    if c.loss_type in ("ipo", "simpo") and (chosen_tokens is None or rejected_tokens is None):
        raise ValueError(f"the {c.loss_type} loss needs the response lengths (chosen_tokens, rejected_tokens)")

    if c.loss_type == "simpo":
        chosen_mean = policy_chosen / chosen_tokens.clamp(min=1)
        rejected_mean = policy_rejected / rejected_tokens.clamp(min=1)
        losses = _smoothed_sigmoid(beta * (chosen_mean - rejected_mean) - c.simpo_gamma, eps)
        return PreferenceOutput(losses, beta * chosen_mean.detach(), beta * rejected_mean.detach())

    if c.needs_reference:
        if ref_chosen is None or ref_rejected is None:
            raise ValueError("this loss needs the reference log-probabilities (or reference_free=True)")
        chosen_ratio, rejected_ratio = policy_chosen - ref_chosen, policy_rejected - ref_rejected
    else:
        chosen_ratio, rejected_ratio = policy_chosen, policy_rejected
    delta = chosen_ratio - rejected_ratio
    if c.loss_type == "sigmoid":
        losses = _smoothed_sigmoid(beta * delta, eps)
    elif c.loss_type == "robust":
        losses = (-(1 - eps) * F.logsigmoid(beta * delta) + eps * F.logsigmoid(-beta * delta)) / (1 - 2 * eps)
    elif c.loss_type == "hinge":
        losses = torch.relu(1 - beta * delta)
    else:  # ipo: per-token log-ratios, so that beta means the same for short and long responses
        gap = chosen_ratio / chosen_tokens.clamp(min=1) - rejected_ratio / rejected_tokens.clamp(min=1)
        losses = (gap - 1 / (2 * beta)) ** 2
    return PreferenceOutput(losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach())


# ---- one batch of pairs through a model ----------------------------------------------------

@dataclass
class PairBatch:
    """Chosen and rejected rows stacked: input_ids / response_mask [2B, L], chosen first."""

    input_ids: torch.Tensor
    response_mask: torch.Tensor

    @property
    def pairs(self) -> int:
        return self.input_ids.shape[0] // 2

    def to(self, device) -> "PairBatch":
        return PairBatch(self.input_ids.to(device), self.response_mask.to(device))


def pair_logps(model: torch.nn.Module, batch: PairBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(chosen sums, rejected sums, chosen lengths, rejected lengths), one forward for both halves."""
    sums, counts = sequence_logps(model, batch.input_ids, batch.response_mask)
    n = batch.pairs
    return sums[:n], sums[n:], counts[:n], counts[n:]


def dpo_batch_loss(model: torch.nn.Module, batch: PairBatch, ref_chosen: torch.Tensor | None,
                   ref_rejected: torch.Tensor | None, config: PreferenceLossConfig) -> PreferenceOutput:
    """The preference loss of one batch: the policy's forward plus precomputed reference sums."""
    chosen, rejected, n_chosen, n_rejected = pair_logps(model, batch)
    return preference_loss(chosen, rejected, ref_chosen, ref_rejected, n_chosen, n_rejected, config)
