"""The recipe of an encoder-decoder translation run (lmforge/tune/translation.py): one dataclass per
section, each YAML key a field and a ``--SECTION.FIELD`` flag. Kept apart from the training code so
that building the command line imports no torch."""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmforge.errors import LmforgeError
from lmforge.train.recipe import OptimSection, ScheduleSection, TrainSection, build_sections, read_recipe

SPECIAL_TOKENS = ("<unk>", "<pad>", "</s>")


@dataclass
class TranslationModelSection:
    """A Marian-style or T5-style model (see lmforge/model/seq2seq.py for every field).

    marian: post-norm LayerNorm, sinusoidal positions, biases, a final logits bias (the
    Hugging Face Marian layout has no pre-norm variant). t5: pre-norm RMSNorm, relative
    position buckets, no biases, unscaled attention, a gated MLP when ``gated_mlp`` (T5 v1.1),
    logits scaled by n_embd^-0.5 from the tied head; ``norm_position`` must be "pre" and
    ``scale_embedding`` false."""

    family: str = "marian"
    n_layer: int = 3
    n_decoder_layer: int = 3
    n_embd: int = 128
    n_head: int = 4
    intermediate_size: int = 512
    norm_position: str = "post"  # marian: post (its layout's only choice); t5: pre
    activation: str = "silu"  # t5: relu, or gelu_new with gated_mlp
    gated_mlp: bool = False  # t5 only
    max_position_embeddings: int = 256
    dropout: float = 0.1
    scale_embedding: bool = True


@dataclass
class TranslationDataSection:
    source: str = "kjv"  # a bible.py module key
    target: str = "rv1909"
    test_books: list[str] = field(default_factory=lambda: ["Ruth", "Proverbs", "Micah", "Mark", "Galatians", "I John"])
    validation_books: list[str] = field(default_factory=lambda: ["Esther", "Philippians", "James"])
    tokenizer_vocab_size: int = 6000  # one Unigram vocabulary shared by both languages
    max_len: int = 96  # tokens per side; longer verses are truncated
    cache: str = "runs/data/bible-translation"  # pairs and tokenizer, built once
    max_pairs: int | None = None  # use only the first N training pairs (tests)
    bucket_batches: int = 16  # batches per length-sorted pool (1: random batches)


@dataclass
class TranslationOptimSection(OptimSection):
    lr: float = 7e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    weight_decay: float = 0.01


@dataclass
class TranslationScheduleSection(ScheduleSection):
    warmup_steps: int = 200  # post-norm Transformers need a warmup
    min_lr_ratio: float = 0.05


@dataclass
class TranslationTrainSection(TrainSection):
    out: str = "runs/translate-en-es"
    max_steps: int = 2000
    batch_size: int = 32
    eval_interval: int = 250
    save_interval: int = 1000
    keep_last: int = 1
    sample_prompts: list[str] = field(default_factory=list)  # samples are the translations in the eval records


@dataclass
class TranslationEvalSection:
    validation_examples: int = 200  # verses translated greedily at each evaluation (BLEU, chrF)
    loss_examples: int = 400  # verses for the validation loss
    test_examples: int = 600  # test-book verses scored at the end (0: none)
    num_beams: int = 4  # for the final test scores (beside greedy)
    length_penalty: float = 1.0
    max_new_tokens: int = 96
    eval_batch: int = 50


@dataclass
class TranslationConfig:
    model: TranslationModelSection = field(default_factory=TranslationModelSection)
    data: TranslationDataSection = field(default_factory=TranslationDataSection)
    optim: TranslationOptimSection = field(default_factory=TranslationOptimSection)
    schedule: TranslationScheduleSection = field(default_factory=TranslationScheduleSection)
    train: TranslationTrainSection = field(default_factory=TranslationTrainSection)
    eval: TranslationEvalSection = field(default_factory=TranslationEvalSection)

    def validate(self) -> None:
        from lmforge.train.recipe import DataSection, PretrainConfig

        PretrainConfig(data=DataSection(seq_len=max(2, self.data.max_len)), optim=self.optim,
                       schedule=self.schedule, train=self.train).validate()
        if self.data.max_len < 2 or self.data.max_len > self.model.max_position_embeddings:
            raise LmforgeError("data.max_len must be at least 2 and at most model.max_position_embeddings")
        m = self.model
        if m.family not in ("marian", "t5"):
            raise LmforgeError(f"model.family must be marian or t5, got {m.family!r}")
        if m.family == "marian" and (m.norm_position != "post" or m.gated_mlp):
            raise LmforgeError("a marian translator is post-norm without a gated MLP (its Hugging Face layout has "
                               "no other variant): use model.family t5 for a pre-norm model")
        if m.family == "t5" and (m.norm_position != "pre" or m.scale_embedding):
            raise LmforgeError("a t5 translator needs model.norm_position pre and model.scale_embedding false")
        if m.family == "t5" and m.gated_mlp and m.activation != "gelu_new":
            raise LmforgeError("a gated t5 MLP uses model.activation gelu_new (T5 v1.1's gated-gelu)")
        if self.eval.num_beams < 1 or self.eval.max_new_tokens < 1:
            raise LmforgeError("eval.num_beams and eval.max_new_tokens must be at least 1")
        if set(self.data.test_books) & set(self.data.validation_books):
            raise LmforgeError("a book cannot be in both data.test_books and data.validation_books")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_CLASSES = {"model": TranslationModelSection, "data": TranslationDataSection, "optim": TranslationOptimSection,
            "schedule": TranslationScheduleSection, "train": TranslationTrainSection, "eval": TranslationEvalSection}


def load_translation_recipe(path: str | Path | None, overrides: dict[str, Any] | None = None) -> TranslationConfig:
    data, source = read_recipe(path, overrides, _CLASSES)
    config = TranslationConfig(**build_sections(data, _CLASSES, source))
    config.validate()
    return config


def option_names() -> list[str]:
    """Every ``section.field`` a flag can set."""
    return [f"{name}.{f}" for name, cls in _CLASSES.items() for f in typing.get_type_hints(cls)]
