"""Reward models (F6): the one Transformer with a scalar head, trained on preference pairs.

A reward model reads a prompt and a response and returns one number. It is the decoder
itself (no vocabulary head) plus ``score``, a linear map from the final hidden state of
the last real token to a scalar: in a causal model only that position has seen the whole
sequence.

Training uses the Bradley-Terry model of pairwise preferences: the probability that a
human prefers y_w to y_l is sigmoid(r(x, y_w) - r(x, y_l)), so the loss is

    -log sigmoid(r_chosen - r_rejected)     (optionally minus a required margin)

Only differences of rewards matter, so a reward model's absolute level is arbitrary;
``center_coefficient`` adds a small (r_chosen + r_rejected)^2 penalty that keeps it
near 0 (as trl's RewardTrainer does). A ranking of K answers gives C(K, 2) pairs
(`ranking_to_pairs`).

Saved directories use the Hugging Face sequence-classification layout (e.g.
``LlamaForSequenceClassification``: the backbone's ``model.*`` weights and
``score.weight`` [1, d], ``num_labels`` 1), so transformers loads them as they are. Its
rule for the scored position is "the last token that is not the pad token"; lmforge
scores the last token of each row's real length, and `encode_for_reward` drops trailing
pad-id tokens (a tokenizer whose pad is its end-of-turn token) so that both rules agree.
"""

from __future__ import annotations

from itertools import combinations
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.errors import LmforgeError
from lmforge.tune.heads import ClassifierModel, backbone_of, load_classifier, save_classifier


class RewardModel(ClassifierModel):
    """``forward(input_ids, lengths)`` -> rewards [B] of right-padded rows: the one-output,
    last-token case of lmforge/tune/heads.py's sequence classifier, without dropout."""

    def __init__(self, backbone: nn.Module, pad_token_id: int | None = None) -> None:
        super().__init__(backbone, ["LABEL_0"], "sequence", "last", dropout=0.0, pad_token_id=pad_token_id,
                         init_std=1.0 / (backbone.config.n_embd + 1) ** 0.5)

    def forward(self, input_ids: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """Rewards of rows whose real tokens are input_ids[i, :lengths[i]] (None: full rows)."""
        batch, width = input_ids.shape
        if lengths is None:
            last = torch.full((batch,), width - 1, device=input_ids.device)
        else:
            if bool((lengths < 1).any()) or bool((lengths > width).any()):
                raise ValueError("every row needs between 1 and the batch width real tokens")
            last = lengths.to(input_ids.device) - 1
        # A causal model: padding after a row's end changes nothing before it.
        hidden = self.backbone.hidden_states(input_ids)
        picked = hidden[torch.arange(batch, device=input_ids.device), last]
        return self.score(picked).squeeze(-1).float()


# ---- loss and metrics --------------------------------------------------------------------

def bradley_terry_loss(chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor | float | None = None,
                       center_coefficient: float = 0.0) -> torch.Tensor:
    """Mean of -log sigmoid(r_chosen - r_rejected - margin) (+ centring penalty)."""
    diff = chosen - rejected
    if margin is not None:
        diff = diff - margin
    loss = -F.logsigmoid(diff).mean()
    if center_coefficient:
        loss = loss + center_coefficient * ((chosen + rejected) ** 2).mean()
    return loss


def pair_accuracy(chosen: torch.Tensor, rejected: torch.Tensor) -> float:
    return float((chosen > rejected).float().mean())


def ranking_to_pairs(prompt: str, ranked: Sequence[str]) -> list[dict]:
    """Responses best first -> the C(K, 2) (chosen, rejected) pairs the ranking implies."""
    if len(ranked) < 2:
        raise LmforgeError("a ranking needs at least two responses")
    if len(set(ranked)) != len(ranked):
        raise LmforgeError("a ranking lists the same response twice")
    return [{"prompt": prompt, "chosen": ranked[i], "rejected": ranked[j], "margin_rank": j - i}
            for i, j in combinations(range(len(ranked)), 2)]


# ---- encoding ------------------------------------------------------------------------------

def encode_for_reward(tokenizer, prompt: str, response: str, max_length: int, system: str | None = None) -> list[int]:
    from lmforge.align.batching import encode_single

    ids, _ = encode_single(tokenizer, prompt, response, max_length, system)
    pad = tokenizer.pad_id
    while pad is not None and len(ids) > 1 and ids[-1] == pad:
        ids = ids[:-1]
    return ids


def score_rows(model: RewardModel, rows: Sequence[Sequence[int]], pad_id: int, batch_size: int = 16) -> torch.Tensor:
    """Rewards of token rows, in batches, without gradients."""
    from lmforge.align.batching import pad_rows

    out = []
    device = next(model.parameters()).device
    with torch.no_grad():
        for i in range(0, len(rows), batch_size):
            ids, mask = pad_rows(rows[i:i + batch_size], pad_id)
            out.append(model(ids.to(device), mask.sum(1).to(device)))
    return torch.cat(out) if out else torch.zeros(0)


# ---- Hugging Face directories --------------------------------------------------------------

def from_language_model(model: nn.Module, pad_token_id: int | None = None, seed: int = 0) -> RewardModel:
    """A reward model on the weights of a causal LM (its vocabulary head is dropped)."""
    backbone = backbone_of(model)
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        reward = RewardModel(backbone, pad_token_id)
    finally:
        torch.random.set_rng_state(generator_state)
    return reward.to(next(model.parameters()).device)


def save_reward_model(model: RewardModel, directory: str | Path, tokenizer=None, overwrite: bool = False) -> Path:
    """Write a Hugging Face sequence-classification directory (num_labels 1), atomically: the
    classifier's own layout (lmforge/tune/heads.py)."""
    return save_classifier(model, directory, tokenizer, overwrite)


def load_reward_model(directory: str | Path, dtype: torch.dtype = torch.float32, device="cpu") -> RewardModel:
    """A sequence-classification directory with one label (ours or one transformers saved)."""
    try:
        classifier = load_classifier(directory, dtype, device)
    except LmforgeError as exc:
        raise LmforgeError(f"{directory} is not a reward model (a sequence classifier with one label): {exc}") from None
    if classifier.task != "sequence" or classifier.num_labels != 1 or classifier.pooler is not None:
        found = f"a {classifier.task} classifier of {classifier.num_labels} labels"
        raise LmforgeError(f"{directory} is not a reward model (a sequence classifier with one label): {found}")
    model = RewardModel(classifier.backbone, classifier.pad_token_id)
    model.score = classifier.score
    return model.to(device).eval()
