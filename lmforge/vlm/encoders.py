"""Image encoders (V1) and the text encoder of the dual encoder.

`VisionTransformer` (ViT, Dosovitskiy et al. 2020): the image is cut into P x P patches,
each flattened and projected to the model width (one strided convolution does both), a
learned class token is prepended, learned position embeddings are added, and the tokens
run through bidirectional pre-norm Transformer blocks. The image's vector is the class
token's final state or the mean over the patch tokens. The blocks are lmforge's own
(`lmforge.model.transformer.Block`, built from a `ModelConfig` with ``causal=False``,
LayerNorm and a GELU MLP): the same attention and MLP code as the language models.

`ConvNet`: three 3x3 convolution stages (batch norm, ReLU, 2x2 max-pool after the first
two) and global average pooling, the classic baseline a ViT of this size has to beat.

`ImageClassifier` puts a linear head on either. `TextEncoder` is a small
`lmforge.model.Transformer` (``lm_head=False``): bidirectional and mean-pooled over the real
(non-padding) tokens, or, as in CLIP, causal and read at the EOS token ending every text.
With ``ViTConfig.pre_norm`` and cls pooling the ViT is CLIP's vision tower, so a dual encoder
built from these pieces can be written as a Hugging Face ``CLIPModel`` (hf_clip.py).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from lmforge.model.config import ModelConfig
from lmforge.model.transformer import Block, Transformer, make_norm

POOLS = ("cls", "mean")
# Initial gain of the pre-norm LayerNorm (ViTConfig.pre_norm). With a gain of 1 every embedding
# starts at unit scale per channel while the blocks' outputs start near zero (weights of std
# 0.02), so early steps barely move the residual stream; 0.1 starts it near the scale the
# embeddings have without the norm. Two-epoch dual-encoder runs on Fashion-MNIST: zero-shot
# 0.73-0.77 with 0.1 against 0.67-0.71 with 1 (docs/handbook/clip-contrastive-learning.md).
PRE_NORM_GAIN = 0.1


@dataclass
class ViTConfig:
    image_size: int = 28
    channels: int = 1
    patch_size: int = 4
    width: int = 64
    depth: int = 4
    heads: int = 4
    mlp_ratio: int = 2
    pool: str = "cls"  # cls: the class token's final state; mean: the average of the patch tokens
    # A LayerNorm on the embeddings before the first block (CLIP's vision tower has one; the
    # original ViT does not). Off by default so every earlier checkpoint is unchanged.
    pre_norm: bool = False
    norm_eps: float = 1e-6

    def __post_init__(self) -> None:
        if self.image_size % self.patch_size:
            raise ValueError(f"patch_size {self.patch_size} does not divide image_size {self.image_size}")
        if self.pool not in POOLS:
            raise ValueError(f"pool must be one of {POOLS}, got {self.pool!r}")

    @property
    def n_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    def block_config(self) -> ModelConfig:
        """The Transformer blocks' configuration: bidirectional, pre-norm LayerNorm, GELU MLP with biases."""
        return ModelConfig(family="vit", vocab_size=1, n_layer=self.depth, n_embd=self.width, n_head=self.heads,
                           intermediate_size=self.mlp_ratio * self.width, norm="layernorm", norm_eps=self.norm_eps,
                           mlp="gelu", gelu_approximate="none", position="learned", qkv_bias=True, out_bias=True,
                           mlp_bias=True, causal=False, lm_head=False, max_position_embeddings=self.n_patches + 1)


class VisionTransformer(nn.Module):
    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        self.patch = nn.Conv2d(c.channels, c.width, kernel_size=c.patch_size, stride=c.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, c.width))
        self.pos_embed = nn.Parameter(torch.randn(1, c.n_patches + 1, c.width) * 0.02)
        blocks = c.block_config()
        self.blocks = nn.ModuleList(Block(blocks) for _ in range(c.depth))
        self.norm = make_norm(blocks)
        self.pre_norm = make_norm(blocks) if c.pre_norm else None
        if self.pre_norm is not None:
            nn.init.constant_(self.pre_norm.weight, PRE_NORM_GAIN)
        self.width = c.width
        for module in self.blocks.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)

    def tokens(self, images: torch.Tensor, final_norm: bool = True) -> torch.Tensor:
        """States of the class token and every patch: [B, 1 + n_patches, width]. With
        ``final_norm`` False they are the last block's output before the final LayerNorm, the
        features LLaVA-style models take from a vision tower (its last hidden state)."""
        x = self.patch(images).flatten(2).transpose(1, 2)  # [B, n_patches, width], row-major patches
        x = torch.cat([self.cls_token.expand(len(x), -1, -1), x], dim=1) + self.pos_embed
        if self.pre_norm is not None:
            x = self.pre_norm(x)
        length = x.shape[1]
        for i, block in enumerate(self.blocks):
            x = block(x, None, None, None, i, 0, length)
        return self.norm(x) if final_norm else x

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.tokens(images)
        return x[:, 0] if self.config.pool == "cls" else x[:, 1:].mean(1)


@dataclass
class CNNConfig:
    channels: int = 1
    widths: tuple[int, int, int] = (32, 64, 128)


class ConvNet(nn.Module):
    def __init__(self, config: CNNConfig) -> None:
        super().__init__()
        self.config = config
        layers: list[nn.Module] = []
        previous = config.channels
        for i, w in enumerate(config.widths):
            layers += [nn.Conv2d(previous, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True)]
            if i < len(config.widths) - 1:
                layers.append(nn.MaxPool2d(2))
            previous = w
        self.features = nn.Sequential(*layers)
        self.width = previous

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.features(images).mean(dim=(2, 3))


def build_image_encoder(kind: str, config: dict) -> nn.Module:
    if kind == "vit":
        return VisionTransformer(ViTConfig(**config))
    if kind == "cnn":
        return ConvNet(CNNConfig(**{k: tuple(v) if k == "widths" else v for k, v in config.items()}))
    raise ValueError(f"unknown image encoder {kind!r}: use vit or cnn")


def encoder_config(encoder: nn.Module) -> dict:
    return asdict(encoder.config)


class ImageClassifier(nn.Module):
    """An image encoder and a linear head: logits [B, n_classes]."""

    def __init__(self, encoder: nn.Module, n_classes: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(encoder.width, n_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(images))


TEXT_POOLS = ("mean", "eos")


@dataclass
class TextConfig:
    """The text tower's shape. ``pool`` "mean" (with ``causal`` False: a bidirectional encoder
    averaged over its real tokens) is the first design and what a checkpoint without these
    keys means; "eos" is CLIP's: every text ends in ``eos_token_id`` and its vector is that
    last token's state, which with ``causal`` True has read the whole text and nothing after."""

    vocab_size: int = 256
    width: int = 64
    depth: int = 2
    heads: int = 4
    max_length: int = 24
    mlp_ratio: int = 2
    norm_eps: float = 1e-5
    causal: bool = False
    pool: str = "mean"
    eos_token_id: int | None = None

    def __post_init__(self) -> None:
        if self.pool not in TEXT_POOLS:
            raise ValueError(f"text pool must be one of {TEXT_POOLS}, got {self.pool!r}")
        if self.pool == "eos" and self.eos_token_id is None:
            raise ValueError("eos pooling needs eos_token_id")

    def model_config(self) -> ModelConfig:
        return ModelConfig(family="text-encoder", vocab_size=self.vocab_size, n_layer=self.depth, n_embd=self.width,
                           n_head=self.heads, intermediate_size=self.mlp_ratio * self.width, norm="layernorm",
                           norm_eps=self.norm_eps, mlp="gelu", gelu_approximate="none", position="learned",
                           qkv_bias=True, out_bias=True, mlp_bias=True, causal=self.causal, lm_head=False,
                           max_position_embeddings=self.max_length)


class TextEncoder(nn.Module):
    """Token ids [B, L] and their mask -> one vector per text [B, width]: the mean over the real
    tokens, or (pool "eos") the state of each row's last real token, the EOS that
    `lmforge.vlm.clip.encode_texts` appends."""

    def __init__(self, config: TextConfig) -> None:
        super().__init__()
        self.config = config
        self.transformer = Transformer(config.model_config())
        self.width = config.width

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        states = self.transformer.encode(input_ids, attention_mask)
        if self.config.pool == "eos":
            last = attention_mask.sum(1).clamp_min(1) - 1
            return states[torch.arange(len(states), device=states.device), last]
        mask = attention_mask.unsqueeze(-1).to(states.dtype)
        return (states * mask).sum(1) / mask.sum(1).clamp_min(1.0)
