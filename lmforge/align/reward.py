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

import dataclasses
import json
from itertools import combinations
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.errors import LmforgeError
from lmforge.io.atomic import atomic_directory
from lmforge.tune.heads import ClassifierModel, backbone_of, hf_head_architecture


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
    """Write a Hugging Face sequence-classification directory (num_labels 1), atomically."""
    from safetensors.torch import save_file

    from lmforge.model.families import hf_config_from, lmforge_to_hf

    target = Path(directory)
    if target.exists() and not overwrite:
        raise LmforgeError(f"{target} already exists (choose another path or remove it)")
    config = model.config
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.backbone.state_dict().items()
             if not k.startswith("lm_head.")}
    hf_state = lmforge_to_hf(dataclasses.replace(config, lm_head=False), state)
    hf_state.pop("lm_head.weight", None)
    hf_state["score.weight"] = model.score.weight.detach().to("cpu").clone()
    hf_config = hf_config_from(config)
    hf_config.update(architectures=[hf_head_architecture(config, "sequence")], num_labels=1,
                     id2label={"0": "LABEL_0"}, label2id={"LABEL_0": 0},
                     torch_dtype=str(hf_state["score.weight"].dtype).removeprefix("torch."))
    if model.pad_token_id is not None:
        hf_config["pad_token_id"] = model.pad_token_id
    with atomic_directory(target) as staging:
        save_file(hf_state, staging / "model.safetensors", metadata={"format": "pt"})
        (staging / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n", encoding="utf-8")
        if tokenizer is not None:
            tokenizer.save(staging)
    return target


def load_reward_model(directory: str | Path, dtype: torch.dtype = torch.float32, device="cpu") -> RewardModel:
    """A sequence-classification directory with one label (ours or one transformers saved)."""
    from lmforge.model.checkpoint import build_model, read_hf_config, read_safetensors
    from lmforge.model.families import hf_to_lmforge

    directory = Path(directory)
    hf = json.loads((directory / "config.json").read_text(encoding="utf-8")) \
        if (directory / "config.json").is_file() else {}
    config = dataclasses.replace(read_hf_config(directory), lm_head=False)
    state = read_safetensors(directory)
    score = state.pop("score.weight", None)
    if score is None or score.shape[0] != 1:
        found = "no score.weight" if score is None else f"score.weight of {score.shape[0]} labels"
        raise LmforgeError(f"{directory} is not a reward model (a sequence classifier with one label): {found}")
    backbone = build_model(config, hf_to_lmforge(config, state), dtype, device)
    model = RewardModel(backbone, hf.get("pad_token_id"))
    with torch.no_grad():
        model.score.weight.copy_(score.to(dtype))
    return model.to(device).eval()
