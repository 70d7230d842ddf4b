"""Preference records -> token ids -> right-padded pair batches.

A prompt is rendered the way the model will see it at inference: through the
tokenizer's chat template as one user turn plus the assistant header. The response is
whatever the template adds after that header for an assistant turn (for ChatML: the
text and ``<|im_end|>``), so the end-of-turn token is scored as well: a model learns to
stop where the preferred answer stops. Without a chat template the prompt is the raw
text followed by a newline and the response ends with the EOS token.

Prompt and response are tokenized separately and concatenated, so the chosen and the
rejected row of a pair share exactly the same prompt ids and only the response differs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from lmforge.align.dpo import PairBatch


@dataclass
class EncodedPair:
    prompt: list[int]
    chosen: list[int]
    rejected: list[int]


def render(tokenizer, prompt: str, response: str, system: str | None = None) -> tuple[str, str]:
    """(prompt text, response text) as the chat template writes them."""
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    if getattr(tokenizer, "chat_template", None):
        head = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": response}],
                                             add_generation_prompt=False)
        if full.startswith(head):
            return head, full[len(head):].rstrip("\n")
    eos = tokenizer.eos_token or ""
    return prompt + "\n", response + eos


def encode_pair(tokenizer, record: dict, max_length: int, system: str | None = None) -> EncodedPair:
    """Token ids of one record; longer rows keep the response start and drop the prompt's beginning."""
    head, chosen = render(tokenizer, record["prompt"], record["chosen"], system)
    _, rejected = render(tokenizer, record["prompt"], record["rejected"], system)
    prompt_ids = tokenizer.encode(head, add_special_tokens=False)
    chosen_ids = tokenizer.encode(chosen, add_special_tokens=False)
    rejected_ids = tokenizer.encode(rejected, add_special_tokens=False)
    longest = max(len(chosen_ids), len(rejected_ids))
    room = max(1, max_length - longest)
    prompt_ids = prompt_ids[-room:]
    keep = max(1, max_length - len(prompt_ids))
    return EncodedPair(prompt_ids, chosen_ids[:keep], rejected_ids[:keep])


def encode_single(tokenizer, prompt: str, response: str, max_length: int,
                  system: str | None = None) -> tuple[list[int], int]:
    """(ids, prompt length) of one prompt + response, for reward scoring."""
    head, tail = render(tokenizer, prompt, response, system)
    prompt_ids = tokenizer.encode(head, add_special_tokens=False)
    response_ids = tokenizer.encode(tail, add_special_tokens=False)
    response_ids = response_ids[:max(1, max_length - 1)]
    prompt_ids = prompt_ids[-max(1, max_length - len(response_ids)):]  # as encode_pair: keep the response start
    return prompt_ids + response_ids, len(prompt_ids)


def pad_rows(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids [N, L] and the real-token mask [N, L]."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, :len(r)] = 1
    return ids, mask


def collate_pairs(pairs: Sequence[EncodedPair], pad_id: int) -> PairBatch:
    """[chosen rows; rejected rows], right-padded, response tokens marked."""
    rows, masks = [], []
    for side in ("chosen", "rejected"):
        for p in pairs:
            response = getattr(p, side)
            rows.append(p.prompt + response)
            masks.append([0] * len(p.prompt) + [1] * len(response))
    ids, _ = pad_rows(rows, pad_id)
    response_mask, _ = pad_rows(masks, 0)
    return PairBatch(ids, response_mask)
