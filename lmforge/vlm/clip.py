"""A CLIP-style dual encoder (V2): contrastive image-text training, zero-shot
classification and retrieval recall@k.

Two towers map an image and a text to unit vectors in one space: an image encoder
(ViT or CNN, encoders.py) and a text encoder, each followed by a linear projection to
``embed_dim`` and L2 normalization. For a batch of N matching (image, caption) pairs the
similarity matrix is S = exp(t) * I T^T (cosines scaled by a learned temperature) and
the loss is symmetric InfoNCE: cross-entropy of each row of S against its diagonal
(image -> the right caption among N) averaged with the same for each column (caption ->
the right image). The temperature is learned through its logarithm t (initialized at
log(1/0.07), as in CLIP) and clamped after every optimizer step to t <= log(100), so the
logits scale never exceeds 100 (CLIP's guard against training instability).

Zero-shot classification embeds a few prompts per class ("this is a coat."), averages
them (prompt ensembling: the mean of unit vectors, normalized again) and picks the class
whose text vector is nearest to the image. Retrieval ranks every caption of a fixed test
set for each image (and the reverse) and counts how often the right one is in the top k.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .encoders import TextEncoder

INIT_TEMPERATURE = 0.07
MAX_LOGIT_SCALE = 100.0


class DualEncoder(nn.Module):
    def __init__(self, image_encoder: nn.Module, text_encoder: TextEncoder, embed_dim: int = 64) -> None:
        super().__init__()
        self.image_encoder, self.text_encoder = image_encoder, text_encoder
        self.image_proj = nn.Linear(image_encoder.width, embed_dim, bias=False)
        self.text_proj = nn.Linear(text_encoder.width, embed_dim, bias=False)
        self.log_scale = nn.Parameter(torch.tensor(math.log(1 / INIT_TEMPERATURE)))
        self.embed_dim = embed_dim

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.image_proj(self.image_encoder(images)), dim=-1)

    def encode_texts(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.text_proj(self.text_encoder(input_ids, attention_mask)), dim=-1)

    @property
    def eos_token_id(self) -> int | None:
        """The token every text must end in (an EOS-pooled text tower), else None."""
        config = self.text_encoder.config
        return config.eos_token_id if config.pool == "eos" else None

    def logit_scale(self) -> torch.Tensor:
        return self.log_scale.exp()

    @torch.no_grad()
    def clamp_scale(self) -> None:
        """Keep exp(log_scale) in [1, 100] (run after each optimizer step, as CLIP does)."""
        self.log_scale.clamp_(0.0, math.log(MAX_LOGIT_SCALE))

    def forward(self, images: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Symmetric InfoNCE loss of a batch of matching pairs."""
        return contrastive_loss(self.encode_images(images), self.encode_texts(input_ids, attention_mask),
                                self.logit_scale())


def contrastive_loss(image_embeds: torch.Tensor, text_embeds: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Mean of the image->text and text->image cross-entropies of the scaled similarity matrix
    (pair i of the batch is the positive of row i and of column i)."""
    logits = scale * image_embeds @ text_embeds.T
    targets = torch.arange(len(logits), device=logits.device)
    return 0.5 * (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets))


# ---- text batches -------------------------------------------------------------------------

def encode_texts(tokenizer, texts: Sequence[str], max_length: int,
                 eos_token_id: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids [B, L] and mask [B, L] (L: the longest text, at most ``max_length``).

    With ``eos_token_id`` every row ends in that token (after truncating the text to leave it
    room): an EOS-pooled text tower reads its vector there."""
    if eos_token_id is None:
        rows = [tokenizer.encode(t.lower())[:max_length] or [tokenizer.pad_id or 0] for t in texts]
    else:
        rows = [tokenizer.encode(t.lower())[:max_length - 1] + [eos_token_id] for t in texts]
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_id if tokenizer.pad_id is not None else 0
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r)
        mask[i, :len(r)] = 1
    return ids, mask


@torch.no_grad()
def embed_texts(model: DualEncoder, tokenizer, texts: Sequence[str], max_length: int,
                batch_size: int = 512) -> torch.Tensor:
    model.eval()
    out = []
    for i in range(0, len(texts), batch_size):
        ids, mask = encode_texts(tokenizer, texts[i:i + batch_size], max_length, model.eos_token_id)
        out.append(model.encode_texts(ids, mask))
    return torch.cat(out)


@torch.no_grad()
def embed_images(model: DualEncoder, images: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    model.eval()
    return torch.cat([model.encode_images(images[i:i + batch_size]) for i in range(0, len(images), batch_size)])


# ---- zero-shot and retrieval --------------------------------------------------------------

def class_embeddings(model: DualEncoder, tokenizer, class_prompts: Sequence[Sequence[str]],
                     max_length: int) -> torch.Tensor:
    """One unit vector per class: the normalized mean of its prompts' embeddings [C, D]."""
    flat = [p for prompts in class_prompts for p in prompts]
    embeds = embed_texts(model, tokenizer, flat, max_length)
    out, start = [], 0
    for prompts in class_prompts:
        out.append(F.normalize(embeds[start:start + len(prompts)].mean(0), dim=-1))
        start += len(prompts)
    return torch.stack(out)


def zero_shot_scores(image_embeds: torch.Tensor, class_embeds: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of every image to every class [N, C]."""
    return image_embeds @ class_embeds.T


@dataclass
class RetrievalResult:
    image_to_text: dict[int, float]  # k -> recall@k
    text_to_image: dict[int, float]


def recall_at_k(similarity: torch.Tensor, relevant: torch.Tensor, ks: Sequence[int] = (1, 5, 10)) -> dict[int, float]:
    """Fraction of queries (rows) with a relevant item among their top k columns.

    ``relevant`` [Q, N] bool marks the right items of each query (the diagonal for strict
    one-to-one retrieval)."""
    order = similarity.argsort(dim=1, descending=True)
    hits = relevant.gather(1, order)  # [Q, N], in rank order
    first = torch.where(hits.any(1), hits.float().argmax(1), torch.full((len(hits),), hits.shape[1]))
    return {k: float((first < k).float().mean()) for k in ks}


def retrieval(image_embeds: torch.Tensor, text_embeds: torch.Tensor, texts: Sequence[str] | None = None,
              ks: Sequence[int] = (1, 5, 10)) -> RetrievalResult:
    """Recall@k both ways for pairs (image i, text i). With ``texts``, a text identical to the
    pair's own counts as right too (generated captions repeat); without, only the pair itself."""
    n = len(image_embeds)
    if texts is None:
        relevant = torch.eye(n, dtype=torch.bool)
    else:
        codes = {t: i for i, t in enumerate(dict.fromkeys(texts))}
        ids = torch.tensor([codes[t] for t in texts])
        relevant = ids[:, None] == ids[None, :]
    similarity = image_embeds @ text_embeds.T
    return RetrievalResult(recall_at_k(similarity, relevant, ks), recall_at_k(similarity.T, relevant.T, ks))
