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
    pre_norm: bool = option(True, help="clip with a vit: a LayerNorm before the first block, as in CLIP's vision tower "
                                       "(--no-pre-norm: the earlier design without it; the vit classifier never "
                                       "has one)")
    cnn_width: int = option(32, help="cnn: channels of the first stage (doubled at each of the next two)")
    text_width: int = option(64, help="clip: text encoder width")
    text_depth: int = option(2, help="clip: text encoder blocks")
    text_pool: str = option("eos", choices=("eos", "mean"),
                            help="clip: eos: a causal text tower read at the EOS token ending every caption (CLIP's "
                                 "design, exportable as a Hugging Face CLIPModel); mean: the earlier bidirectional "
                                 "tower averaged over the caption's tokens")
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
            config = dict(patch_size=self.patch_size, width=self.width, depth=self.depth, heads=self.heads,
                          mlp_ratio=2, pool=self.pool)
            if self.kind == "clip" and self.pre_norm:
                config["pre_norm"] = True
            return config
        return dict(widths=[self.cnn_width, 2 * self.cnn_width, 4 * self.cnn_width])


TASKS = ("caption", "vqa")
CONNECTORS = ("mlp", "resampler")


@dataclass
class CaptionTrainConfig:
    """A vision-language model (ViT -> connector -> decoder LM) trained on generated scenes
    (lmforge/vlm/scenes.py) to caption them or answer questions about them."""

    task: str = option("caption", choices=TASKS, help="caption: describe the image; vqa: answer a question about it")
    out: str | None = option(None, help="checkpoint directory (default runs/vlm-TASK)")
    steps: int = option(1500, help="training steps (each a batch of freshly sampled captions/questions)")
    batch_size: int = option(64, help="images per step")
    lr: float = option(1e-3, help="peak learning rate (AdamW)")
    weight_decay: float = option(0.05, help="AdamW weight decay on matrices")
    warmup_steps: int = option(100, help="linear warm-up steps before the cosine decay")
    min_lr_ratio: float = option(0.05, help="final learning rate / peak")
    clip_grad_norm: float = option(1.0, help="clip the global gradient norm to this (0: off)")
    train_scenes: int = option(20000, help="scenes in the training split")
    val_scenes: int = option(200, help="validation scenes (loss logged every --eval-interval steps)")
    test_scenes: int = option(1000, help="test scenes the final metrics are computed on")
    test_questions: int = option(3, help="vqa: questions per test scene")
    image_size: int = option(64, help="rendered image side in pixels")
    patch_size: int = option(16, help="ViT patch side in pixels (a divisor of --image-size; at 64 px, 16 gives "
                                      "16 patches, one per object column and row band)")
    vit_width: int = option(64, help="ViT width")
    vit_depth: int = option(2, help="ViT blocks")
    vit_heads: int = option(4, help="ViT attention heads")
    connector: str = option("mlp", choices=CONNECTORS,
                            help="mlp: every patch state projected to a visual token (LLaVA); resampler: "
                                 "--queries learned queries read the patches (Q-Former idea)")
    queries: int = option(16, help="resampler: visual tokens")
    vision_features: str | None = option(None, choices=("last_block", "normed"),
                                         help="what the connector reads: the last ViT block's output (LLaVA; the "
                                              "mlp default, exportable) or the final normalized states (the "
                                              "resampler default and the earlier mlp design)")
    projector_width: int | None = option(None, help="mlp: projector hidden width (default: the LM width, as in "
                                                    "LLaVA; the earlier design used 2x)")
    lm_width: int = option(96, help="language model width")
    lm_layers: int = option(2, help="language model blocks")
    lm_heads: int = option(4, help="language model attention heads")
    vocab_size: int = option(200, help="WordPiece vocabulary trained on the generated texts (at most; 155 "
                                       "entries cover every word whole)")
    num_beams: int = option(1, help="test decoding: 1 greedy, more for beam search")
    init: str | None = option(None, metavar="CHECKPOINT",
                              help="start from this caption/vqa checkpoint's weights and tokenizer (two-stage "
                                   "training: captioning aligns image and words, then VQA); its shape flags win")
    eval_interval: int = option(500, help="steps between validation losses")
    log_interval: int = option(50, help="steps between log records")
    seed: int = option(0, help="random seed (weights, data order, sampled captions and questions)")
    threads: int | None = option(None, help="torch threads (default: torch's choice)")

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise LmforgeError(f"unknown task {self.task!r}: use {', '.join(TASKS)}")
        if self.connector not in CONNECTORS:
            raise LmforgeError(f"unknown connector {self.connector!r}: use {', '.join(CONNECTORS)}")
        if self.out is None:
            self.out = f"runs/vlm-{self.task}"
        for name in ("steps", "batch_size", "train_scenes", "test_scenes", "val_scenes", "image_size", "patch_size",
                     "vit_width", "vit_depth", "vit_heads", "lm_width", "lm_layers", "lm_heads", "queries",
                     "num_beams", "test_questions", "eval_interval", "log_interval"):
            if getattr(self, name) < 1:
                raise LmforgeError(f"--{name.replace('_', '-')} must be at least 1")
        if self.image_size % self.patch_size:
            raise LmforgeError(f"--patch-size {self.patch_size} does not divide --image-size {self.image_size}")
        if self.projector_width is not None and self.projector_width < 1:
            raise LmforgeError("--projector-width must be at least 1")
        if self.vit_width % self.vit_heads or self.lm_width % self.lm_heads:
            raise LmforgeError("--vit-width and --lm-width must be multiples of their heads")


@dataclass
class CaptionDecodeOptions:
    """How ``lmforge vlm caption`` and ``lmforge vlm ask`` decode."""

    num_beams: int = option(1, help="1: greedy; more: beam search with this many beams")
    max_new_tokens: int = option(40, help="most tokens generated")
    length_penalty: float = option(1.0, help="beam search: score = sum log p / length ** this")

    def __post_init__(self) -> None:
        if self.num_beams < 1 or self.max_new_tokens < 1:
            raise LmforgeError("--num-beams and --max-new-tokens must be at least 1")
