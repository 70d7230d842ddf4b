"""Settings of a vision training run (every field is a flag of ``lmforge vlm train``).

Kept apart from the training code so that the command line can build its flags without
importing torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lmforge.errors import LmforgeError
from lmforge.options import option

DEFAULT_DATA_DIR = "/usr/share/datasets/fashion-mnist"
KINDS = ("cnn", "vit", "clip")


@dataclass
class VisionTrainConfig:
    kind: str = option("vit", help="what to train: cnn, vit (supervised classifiers) or clip (dual encoder)", cli=False)
    out: str | None = option(None, help="checkpoint directory (default runs/vlm-KIND)")
    data_dir: str = option(DEFAULT_DATA_DIR, help="folder with the Fashion-MNIST idx .gz files")
    encoder: str = option("vit", choices=("vit", "cnn"), help="clip: the image tower")
    epochs: float = option(2.0, help="passes over the training images")
    max_steps: int | None = option(None, help="stop after this many steps (overrides --epochs)")
    batch_size: int = option(128, help="images per step (clip: pairs per contrastive batch)")
    lr: float = option(2e-3, help="peak learning rate (AdamW)")
    weight_decay: float = option(0.05, help="AdamW weight decay on matrices")
    warmup_steps: int = option(100, help="linear warm-up steps before the cosine decay")
    min_lr_ratio: float = option(0.05, help="final learning rate / peak")
    clip_grad_norm: float = option(1.0, help="clip the global gradient norm to this (0: off)")
    train_limit: int | None = option(None, help="train on the first N training images only")
    test_limit: int | None = option(None, help="evaluate on the first N test images only")
    patch_size: int = option(7, help="vit: patch side in pixels (a divisor of 28; 4 sees finer detail "
                                     "at about 4x the cost)")
    width: int = option(64, help="vit: model width")
    depth: int = option(4, help="vit: Transformer blocks")
    heads: int = option(4, help="vit: attention heads")
    pool: str = option("cls", choices=("cls", "mean"), help="vit: the class token's state or the mean of the patches")
    cnn_width: int = option(32, help="cnn: channels of the first stage (doubled at each of the next two)")
    text_width: int = option(64, help="clip: text encoder width")
    text_depth: int = option(2, help="clip: text encoder blocks")
    vocab_size: int = option(300, help="clip: WordPiece vocabulary trained on the training captions")
    embed_dim: int = option(64, help="clip: width of the shared embedding space")
    retrieval_size: int = option(1000, help="clip: test images (and their captions) in the retrieval set")
    log_interval: int = option(50, help="steps between log records")
    seed: int = option(0, help="random seed (weights, data order, captions)")
    threads: int | None = option(None, help="torch threads (default: torch's choice)")

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise LmforgeError(f"unknown model kind {self.kind!r}: use {', '.join(KINDS)}")
        if self.out is None:
            self.out = f"runs/vlm-{self.kind}"
        for name in ("batch_size", "width", "depth", "heads", "patch_size", "text_width", "text_depth", "embed_dim",
                     "cnn_width"):
            if getattr(self, name) < 1:
                raise LmforgeError(f"--{name.replace('_', '-')} must be at least 1")
        if 28 % self.patch_size:
            raise LmforgeError(f"--patch-size {self.patch_size} does not divide the 28-pixel image side")
        if self.width % self.heads:
            raise LmforgeError(f"--width {self.width} is not a multiple of --heads {self.heads}")
        if self.epochs <= 0 and not self.max_steps:
            raise LmforgeError("--epochs must be positive")

    @property
    def image_encoder(self) -> str:
        return self.encoder if self.kind == "clip" else self.kind

    def image_encoder_config(self) -> dict[str, Any]:
        if self.image_encoder == "vit":
            return dict(patch_size=self.patch_size, width=self.width, depth=self.depth, heads=self.heads,
                        mlp_ratio=2, pool=self.pool)
        return dict(widths=[self.cnn_width, 2 * self.cnn_width, 4 * self.cnn_width])
