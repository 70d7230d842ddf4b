"""Task fine-tuning with a head (F2): `classify(config)` behind ``lmforge finetune classify RECIPE``.

A pretrained body (an encoder such as all-MiniLM-L6-v2, or the default decoder) gets a
fresh classification head (lmforge/tune/heads.py) and both are trained on labelled data in
the one training loop (lmforge/train/loop.py): `ClassificationTask` supplies the data, its
own loss (cross-entropy, optionally class-weighted or focal) and the held-out metrics; the
loop brings the optimizer, schedule, clipping, precision, DDP, logs, checkpoints and plots.

Two heads, two datasets that ship offline:

- ``sentiment`` (sequence classification): the Pang & Lee polarity sentences of gensim's
  test data, split by lmforge/tune/datasets.py (stratified, 140 / 20 / 40 sentences); the
  text is the review sentence alone, the label positive or negative.
- ``entities`` (token classification): sentences generated here from templates whose slots
  are filled from lists of person names, cities, dates and quantities with units, so every
  tag is known by construction: BIO tags PER, LOC, DATE, QTY on whitespace words. A
  sentence appears once, in one split; the test split also draws its names and cities
  from lists that training never sees (``entities_unseen_names``), so the score measures
  tagging, not memorising names.
- a directory with ``train.jsonl`` / ``validation.jsonl`` / ``test.jsonl``: records
  ``{"text": ..., "label": ...}`` (sequence) or ``{"tokens": [...], "tags": [...]}`` (token).

Word pieces: each word is encoded on its own (a space before every word after the first,
which WordPiece ignores and byte-level BPE needs) between the tokenizer's own special
tokens; the word's tag goes on its first piece and -100 on its other pieces and on the
special tokens, as in Hugging Face's token-classification recipe. Predictions are read
back at first pieces, so metrics are per word.

The result: ``OUT/model`` (a Hugging Face classification directory transformers loads),
``OUT/metrics.json`` (the test split: accuracy, macro/micro F1, per-class precision and
recall, the confusion matrix; entity F1 for tags), ``OUT/metrics.md``,
``OUT/plots/confusion.png``, ``OUT/report.{json,md}``, ``OUT/plots/training.png``.
"""

from __future__ import annotations

import dataclasses
import random
import time
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from lmforge.errors import LmforgeError
from lmforge.train.recipe import OptimSection, ScheduleSection, TrainSection, build_sections, read_recipe

DATASETS = ("sentiment", "entities")
ENTITY_TYPES = ("PER", "LOC", "DATE", "QTY")

# -- the recipe ---------------------------------------------------------------------------------------


@dataclass
class ClassifyModelSection:
    init_from: str = "all-minilm-l6-v2"  # registered name, HF directory or .gguf (an encoder or a decoder)


@dataclass
class ClassifyDataSection:
    dataset: str = "sentiment"  # sentiment | entities | a directory with train/validation/test.jsonl
    seed: int = 0  # split and generation seed
    max_len: int = 64  # tokens per text (special tokens included); longer texts are cut
    entities_train: int = 2000  # generated tagging sentences per split
    entities_validation: int = 200
    entities_test: int = 400
    entities_unseen_names: bool = True  # test names and cities come from lists training never sees
    max_records: int | None = None  # use only the first N training records


@dataclass
class HeadSection:
    task: str = "auto"  # sequence | token | auto (token for tagged data)
    pooling: str = "auto"  # sequence heads: auto (decoder: last token, encoder: [CLS] pooler) | last | cls | mean
    dropout: float = 0.1  # on the pooled / token vectors before the head
    class_weights: list[float] | None = None  # one weight per label (label order of the report)
    balanced_weights: bool = False  # weights n / (C n_c) from the training labels (rare classes weigh more)
    focal_gamma: float = 0.0  # focal loss exponent (0: cross-entropy)
    trainable_layers: int = 0  # train only the top N blocks of the body (0: all); the head always trains


@dataclass
class ClassifyOptimSection(OptimSection):
    lr: float = 5e-5
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 0.01


@dataclass
class ClassifyScheduleSection(ScheduleSection):
    warmup_steps: int = 20
    min_lr_ratio: float = 0.0


@dataclass
class ClassifyTrainSection(TrainSection):
    out: str = "runs/classify"
    max_steps: int = 200
    batch_size: int = 16
    eval_interval: int = 100
    save_interval: int = 1000000  # the run's end; a classifier is small to retrain
    keep_last: int = 1
    precision: str = "fp32"
    sample_prompts: list[str] = field(default_factory=list)
    sample_tokens: int = 0


@dataclass
class ClassifyEvalSection:
    validation_examples: int | None = None  # validation records scored at each evaluation (None: all)
    test: bool = True  # score the test split at the end (metrics.json, confusion matrix)
    at_start: bool = False  # also score the validation split before the first step
    batch_size: int = 32


def _peft_class():
    from lmforge.tune.peft import PeftOptions

    return PeftOptions


@dataclass
class ClassifyConfig:
    model: ClassifyModelSection = field(default_factory=ClassifyModelSection)
    data: ClassifyDataSection = field(default_factory=ClassifyDataSection)
    head: HeadSection = field(default_factory=HeadSection)
    optim: ClassifyOptimSection = field(default_factory=ClassifyOptimSection)
    schedule: ClassifyScheduleSection = field(default_factory=ClassifyScheduleSection)
    train: ClassifyTrainSection = field(default_factory=ClassifyTrainSection)
    eval: ClassifyEvalSection = field(default_factory=ClassifyEvalSection)
    peft: Any = None  # PeftOptions on the body (LoRA, ...); the head trains fully; None: full fine-tuning

    def validate(self) -> None:
        from lmforge.train.recipe import DataSection, PretrainConfig
        from lmforge.tune.heads import POOLINGS

        PretrainConfig(data=DataSection(seq_len=max(2, self.data.max_len)), optim=self.optim,
                       schedule=self.schedule, train=self.train).validate()
        d, h = self.data, self.head
        if d.max_len < 3:
            raise LmforgeError("data.max_len must be at least 3")
        if min(d.entities_train, d.entities_test) < 1 or d.entities_validation < 0:
            raise LmforgeError("data.entities_train and data.entities_test must be positive")
        if h.task not in ("auto", "sequence", "token"):
            raise LmforgeError(f"head.task must be auto, sequence or token, got {h.task!r}")
        if h.pooling not in POOLINGS:
            raise LmforgeError(f"head.pooling must be one of {', '.join(POOLINGS)}, got {h.pooling!r}")
        if not 0.0 <= h.dropout < 1.0 or h.focal_gamma < 0 or h.trainable_layers < 0:
            raise LmforgeError("head.dropout must be in [0, 1), head.focal_gamma and head.trainable_layers >= 0")
        if h.class_weights is not None and (h.balanced_weights or any(w < 0 for w in h.class_weights)):
            raise LmforgeError("head.class_weights: non-negative numbers, and not together with head.balanced_weights")
        if self.peft_method in ("prompt", "prefix"):
            raise LmforgeError("prompt and prefix tuning are not supported under a classification head; use lora")
        if self.eval.batch_size < 1:
            raise LmforgeError("eval.batch_size must be positive")

    @property
    def peft_method(self) -> str:
        return getattr(self.peft, "method", "none") if self.peft is not None else "none"

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: dataclasses.asdict(getattr(self, f.name)) for f in dataclasses.fields(self) if f.name != "peft"}
        if self.peft is not None:
            out["peft"] = dataclasses.asdict(self.peft)
        return out


_SECTIONS = {"model": ClassifyModelSection, "data": ClassifyDataSection, "head": HeadSection,
             "optim": ClassifyOptimSection, "schedule": ClassifyScheduleSection, "train": ClassifyTrainSection,
             "eval": ClassifyEvalSection}


def _section_classes() -> dict[str, type]:
    return {**_SECTIONS, "peft": _peft_class()}


def option_names() -> list[str]:
    """Every ``section.field`` a flag can set."""
    return [f"{name}.{f}" for name, cls in _section_classes().items() for f in typing.get_type_hints(cls)]


def load_classify_recipe(path: str | Path | None, overrides: dict[str, Any] | None = None) -> ClassifyConfig:
    """Read a YAML recipe (None: the defaults) and apply ``{"section.field": value}`` overrides."""
    data, source = read_recipe(path, overrides, _section_classes())
    config = ClassifyConfig(**build_sections(data, _section_classes(), source, optional=("peft",)))
    config.validate()
    return config


def to_yaml(config: ClassifyConfig) -> str:
    import yaml

    return yaml.safe_dump(config.to_dict(), sort_keys=False, default_flow_style=False)


# -- data ---------------------------------------------------------------------------------------------

def sentiment_splits(seed: int = 0) -> dict[str, list[dict[str, Any]]]:
    """The Pang & Lee sentences as ``{"text", "label", "source"}`` in lmforge's sentiment splits."""
    from lmforge.tune.datasets import make_dataset

    # The chat record asks a question first; the sentence is what follows the blank line.
    return {split: [{"text": r["messages"][0]["content"].partition("\n\n")[2], "label": r["answer"],
                     "source": r["source"]} for r in records]
            for split, records in make_dataset("sentiment", seed).items()}


# Fillers of the generated tagging set. Names and cities come in two disjoint lists: the
# test split can draw from the second so that names seen in training do not help there.
_FIRST = ["Ana", "Ben", "Chen", "Dara", "Eli", "Fatima", "Goran", "Hana", "Ivan", "Jun", "Kofi", "Lena", "Mateo",
          "Nia", "Omar", "Priya", "Quinn", "Rosa", "Sami", "Tara"]
_FIRST_UNSEEN = ["Uma", "Victor", "Wen", "Yusuf", "Zoe", "Amara", "Bruno", "Celia", "Diego", "Esther", "Farid",
                 "Greta", "Hugo", "Ines", "Jonas"]
_LAST = ["Lopez", "Novak", "Okafor", "Tanaka", "Silva", "Meyer", "Haddad", "Kowalski", "Nguyen", "Rossi"]
_LAST_UNSEEN = ["Ivanova", "Mensah", "Larsen", "Costa", "Sato", "Dubois", "Moreau", "Fischer"]
_CITY = ["Lisbon", "Nairobi", "Osaka", "Lima", "Oslo", "Cairo", "Quito", "Hanoi", "Porto", "Accra", "Buenos Aires",
         "New Delhi"]
_CITY_UNSEEN = ["Tbilisi", "Seville", "Bergen", "Krakow", "Valparaiso", "Dakar", "Kyoto", "Rio de Janeiro"]
_MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
           "November", "December"]
_UNITS = ["km", "kg", "litres", "minutes", "hours", "metres", "grams", "miles", "euros", "days"]
_TEMPLATES = [
    "{PER} flew to {LOC} on {DATE} .",
    "On {DATE} , {PER} walked {QTY} around {LOC} .",
    "{PER} and {PER} met in {LOC} .",
    "The parcel sent from {LOC} weighed {QTY} .",
    "{PER} paid for {QTY} of rice on {DATE} .",
    "The meeting in {LOC} lasted {QTY} .",
    "{PER} moved from {LOC} to {LOC} on {DATE} .",
    "Nobody expected the rain that afternoon .",
    "According to {PER} , the train to {LOC} takes {QTY} .",
    "The report was due on {DATE} but {PER} finished it early .",
    "We drove {QTY} before we reached {LOC} .",
    "{PER} called from {LOC} to say the shop closes on {DATE} .",
    "The river near the old mill was calm .",
    "Her brother bought {QTY} of flour for the bakery .",
]


def _entity(kind: str, rng: random.Random, unseen: bool) -> list[str]:
    if kind == "PER":
        first = rng.choice(_FIRST_UNSEEN if unseen else _FIRST)
        return [first] if rng.random() < 0.5 else [first, rng.choice(_LAST_UNSEEN if unseen else _LAST)]
    if kind == "LOC":
        return rng.choice(_CITY_UNSEEN if unseen else _CITY).split()
    if kind == "DATE":
        year, month, day = rng.randint(1990, 2030), rng.randint(1, 12), rng.randint(1, 28)
        style = rng.randrange(3)
        if style == 0:
            return [f"{year}-{month:02d}-{day:02d}"]
        if style == 1:
            return [str(day), _MONTHS[month - 1], str(year)]
        return [_MONTHS[month - 1], str(day)]
    amount = rng.choice([str(rng.randint(1, 500)), f"{rng.randint(1, 99)}.{rng.randint(1, 9)}"])
    return [amount, rng.choice(_UNITS)]


def entity_sentence(rng: random.Random, unseen: bool = False) -> dict[str, Any]:
    """One templated sentence: whitespace words and their BIO tags (known by construction)."""
    tokens, tags = [], []
    for word in rng.choice(_TEMPLATES).split():
        kind = word[1:-1] if word.startswith("{") and word.endswith("}") else None
        if kind is None:
            tokens.append(word)
            tags.append("O")
            continue
        filler = _entity(kind, rng, unseen)
        tokens += filler
        tags += [f"B-{kind}"] + [f"I-{kind}"] * (len(filler) - 1)
    return {"tokens": tokens, "tags": tags}


def entity_splits(seed: int = 0, sizes: dict[str, int] | None = None,
                  unseen_names: bool = True) -> dict[str, list[dict[str, Any]]]:
    """The generated tagging set: each sentence text once, in one split (test first, then
    validation, then training, so held-out sets never depend on the training size)."""
    sizes = {"train": 2000, "validation": 200, "test": 400, **(sizes or {})}
    rng = random.Random(f"{seed}:entities")
    seen: set[str] = set()
    out: dict[str, list[dict[str, Any]]] = {}
    for split in ("test", "validation", "train"):
        records, misses = [], 0
        while len(records) < sizes[split]:
            rec = entity_sentence(rng, unseen=unseen_names and split == "test")
            text = " ".join(rec["tokens"])
            if text in seen:
                misses += 1
                if misses > 100 * sizes[split] + 1000:
                    raise LmforgeError(f"entities: cannot draw {sizes[split]} distinct {split} sentences")
                continue
            seen.add(text)
            records.append({**rec, "source": f"generated by lmforge.tune.classify (templates, seed {seed})"})
        out[split] = records
    return {s: out[s] for s in ("train", "validation", "test")}


def _read_directory(directory: Path) -> dict[str, list[dict[str, Any]]]:
    from lmforge.tune.sft_data import read_jsonl

    if not (directory / "train.jsonl").is_file():
        raise LmforgeError(f"data.dataset: {directory} has no train.jsonl (or name a dataset: {', '.join(DATASETS)})")
    return {s: read_jsonl(directory / f"{s}.jsonl") if (directory / f"{s}.jsonl").is_file() else []
            for s in ("train", "validation", "test")}


def load_splits(d: ClassifyDataSection) -> dict[str, list[dict[str, Any]]]:
    if d.dataset == "sentiment":
        return sentiment_splits(d.seed)
    if d.dataset == "entities":
        return entity_splits(d.seed, {"train": d.entities_train, "validation": d.entities_validation,
                                      "test": d.entities_test}, d.entities_unseen_names)
    directory = Path(d.dataset).expanduser()
    if not directory.is_dir():
        raise LmforgeError(f"data.dataset: {d.dataset!r} is neither {' nor '.join(DATASETS)} nor a directory")
    return _read_directory(directory)


def task_of(splits: dict[str, list[dict[str, Any]]]) -> str:
    first = splits["train"][0] if splits["train"] else {}
    if "tokens" in first and "tags" in first:
        return "token"
    if "text" in first and "label" in first:
        return "sequence"
    raise LmforgeError("training records need text + label (sequence) or tokens + tags (token classification)")


def labels_of(records: Sequence[dict[str, Any]], task: str) -> list[str]:
    """The label set in a stable order: sorted names; for BIO tags O first, then B-/I- per type."""
    if task == "sequence":
        return sorted({str(r["label"]) for r in records})
    types = sorted({t[2:] for r in records for t in r["tags"] if t != "O"})
    return ["O"] + [f"{p}-{k}" for k in types for p in ("B", "I")]


@dataclass
class Encoded:
    ids: list[int]
    target: int | list[int]  # a class index (sequence) or one per token, -100 where none
    word_starts: list[int] | None = None  # token tasks: the first piece of each word kept


def special_tokens(tokenizer) -> tuple[list[int], list[int]]:
    """The ids a tokenizer puts before and after a text ([CLS] / [SEP] for BERT; often none)."""
    inner = tokenizer.encode("a", add_special_tokens=False)
    full = tokenizer.encode("a")
    for i in range(len(full) - len(inner) + 1):
        if full[i:i + len(inner)] == inner:
            return full[:i], full[i + len(inner):]
    return [], []


def encode_text(tokenizer, text: str, max_len: int, specials=None) -> list[int]:
    before, after = specials or special_tokens(tokenizer)
    inner = tokenizer.encode(text, add_special_tokens=False)
    return before + inner[:max(1, max_len - len(before) - len(after))] + after


def encode_words(tokenizer, words: Sequence[str], tags: Sequence[int], max_len: int,
                 specials=None) -> Encoded:
    """Word pieces of whitespace words with each word's tag on its first piece, -100 elsewhere;
    words that no longer fit ``max_len`` are left out (their tags count as O when scored)."""
    from lmforge.tune.heads import IGNORE_INDEX

    before, after = specials or special_tokens(tokenizer)
    ids, labels, starts = list(before), [IGNORE_INDEX] * len(before), []
    room = max_len - len(after)
    for i, (word, tag) in enumerate(zip(words, tags)):
        pieces = tokenizer.encode(word if i == 0 else " " + word, add_special_tokens=False) or \
            tokenizer.encode(word, add_special_tokens=False)
        if not pieces or len(ids) + len(pieces) > room:
            break
        starts.append(len(ids))
        ids += pieces
        labels += [tag] + [IGNORE_INDEX] * (len(pieces) - 1)
    return Encoded(ids + list(after), labels + [IGNORE_INDEX] * len(after), starts)


def encode_records(tokenizer, records: Sequence[dict[str, Any]], labels: Sequence[str], task: str,
                   max_len: int, where: str = "data") -> list[Encoded]:
    index = {name: i for i, name in enumerate(labels)}
    specials = special_tokens(tokenizer)
    out = []
    for number, r in enumerate(records, 1):
        try:
            if task == "sequence":
                label = str(r["label"])
                if label not in index:
                    raise LmforgeError(f"{where}: record {number} has the label {label!r}, unknown to training "
                                       f"({', '.join(labels)})")
                out.append(Encoded(encode_text(tokenizer, str(r["text"]), max_len, specials), index[label]))
            else:
                words, tags = list(r["tokens"]), list(r["tags"])
                if len(words) != len(tags) or not words:
                    raise LmforgeError(f"{where}: record {number} has {len(words)} tokens and {len(tags)} tags")
                unknown = [t for t in tags if t not in index]
                if unknown:
                    raise LmforgeError(f"{where}: record {number} has the tag {unknown[0]!r}, unknown to training")
                out.append(encode_words(tokenizer, words, [index[t] for t in tags], max_len, specials))
        except (KeyError, TypeError):
            need = "text and label" if task == "sequence" else "tokens and tags"
            raise LmforgeError(f"{where}: record {number} lacks {need}") from None
    return out


# -- the task -----------------------------------------------------------------------------------------

class ClassificationTask:
    """Labelled texts for the training loop (lmforge/train/loop.py `TrainingTask`), with its own
    loss: the summed (weighted / focal) cross-entropy over the step's items (texts, or tagged
    words), which the loop averages."""

    token_mean = True

    def __init__(self, config: ClassifyConfig, splits: dict[str, list[dict[str, Any]]] | None = None) -> None:
        config.validate()
        self.config = config
        self.splits = splits
        self.evaluate_at_start = config.eval.at_start

    # setup ------------------------------------------------------------------------------
    def setup(self, trainer) -> None:
        from lmforge.model.loading import resolve_tokenizer

        c = self.config
        self.started = time.perf_counter()
        splits = self.splits if self.splits is not None else load_splits(c.data)
        if not splits.get("train"):
            raise LmforgeError("no training records")
        if c.data.max_records:
            splits = {**splits, "train": splits["train"][:c.data.max_records]}
        self.splits = splits
        found = task_of(splits)
        if c.head.task not in ("auto", found):
            raise LmforgeError(f"head.task is {c.head.task} but the data is for {found} classification")
        self.task = found
        self.title = "Token classification run" if found == "token" else "Sequence classification run"
        self.labels = labels_of(splits["train"], found)
        self.tokenizer = resolve_tokenizer(c.model.init_from)
        self.pad_id = next(i for i in (self.tokenizer.pad_id, self.tokenizer.eos_id, 0) if i is not None)
        self.encoded = {s: encode_records(self.tokenizer, recs, self.labels, found, c.data.max_len, f"{s} split")
                        for s, recs in splits.items()}
        self.seq_len = max(len(e.ids) for e in self.encoded["train"])
        counts = self.label_counts(self.encoded["train"])
        if c.head.class_weights is not None:
            if len(c.head.class_weights) != len(self.labels):
                raise LmforgeError(f"head.class_weights has {len(c.head.class_weights)} numbers for "
                                   f"{len(self.labels)} labels ({', '.join(self.labels)})")
            self.class_weights = list(c.head.class_weights)
        elif c.head.balanced_weights:
            from lmforge.tune.heads import balanced_class_weights

            self.class_weights = balanced_class_weights(counts)
        else:
            self.class_weights = None
        self._orders: dict[int, list[int]] = {}
        trainer.log(f"{found} classification, {len(self.labels)} labels ({', '.join(self.labels)}); "
                    + ", ".join(f"{s} {len(v)}" for s, v in self.encoded.items())
                    + f"; training label counts {dict(zip(self.labels, counts))}")

    def label_counts(self, encoded: Sequence[Encoded]) -> list[int]:
        counts = [0] * len(self.labels)
        for e in encoded:
            for t in ([e.target] if isinstance(e.target, int) else e.target):
                if t >= 0:
                    counts[t] += 1
        return counts

    def build_model(self, trainer):
        import torch

        from lmforge.model.loading import load_model
        from lmforge.model.registry import resolve
        from lmforge.tune.heads import classifier_from_model, pretrained_pooler

        c = self.config
        spec = resolve(c.model.init_from)
        body = load_model(spec, torch.float32, "cpu", need_lm_head=False).float()
        if body.config.vocab_size < self.tokenizer.vocab_size:
            raise LmforgeError(f"the model has {body.config.vocab_size} token ids, its tokenizer {self.tokenizer.vocab_size}")
        pooler = pretrained_pooler(spec.path) if spec.format == "hf" and not body.config.causal else None
        model = classifier_from_model(body, self.labels, self.task, c.head.pooling, c.head.dropout,
                                      self.pad_id if body.config.causal else None, c.train.seed, pooler)
        if c.head.trainable_layers:
            from lmforge.align.train import freeze_lower_layers

            freeze_lower_layers(model, c.head.trainable_layers)
        if c.peft_method != "none":
            from lmforge.tune.peft import apply_peft

            model.backbone = apply_peft(model.backbone, c.peft)
        for module in (model.score, model.pooler):  # the new head always trains in full
            if module is not None:
                module.requires_grad_(True)
        from lmforge.tune.peft import trainable_parameters

        self.trainable, self.total = trainable_parameters(model)
        trainer.log(f"{self.trainable:,} of {self.total:,} parameters trainable "
                    f"({100 * self.trainable / self.total:.2f}%)")
        return model

    # the stream ----------------------------------------------------------------------------
    def _index(self, k: int) -> int:
        n = len(self.encoded["train"])
        epoch = k // n
        if epoch not in self._orders:
            order = list(range(n))
            random.Random(f"{self.config.train.seed}:{epoch}").shuffle(order)
            self._orders = {epoch: order}
        return self._orders[epoch][k % n]

    def collate(self, items: Sequence[Encoded]):
        import torch

        from lmforge.train.loop import Batch
        from lmforge.tune.heads import IGNORE_INDEX

        width = max(len(e.ids) for e in items)
        ids = torch.full((len(items), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(items), width), dtype=torch.long)
        if self.task == "sequence":
            targets = torch.tensor([e.target for e in items], dtype=torch.long)
        else:
            targets = torch.full((len(items), width), IGNORE_INDEX, dtype=torch.long)
        for r, e in enumerate(items):
            ids[r, :len(e.ids)] = torch.tensor(e.ids)
            mask[r, :len(e.ids)] = 1
            if self.task == "token":
                targets[r, :len(e.ids)] = torch.tensor(e.target)
        count = len(items) if self.task == "sequence" else int((targets != IGNORE_INDEX).sum())
        return Batch(ids, tokens=int(mask.sum()), extra={"attention_mask": mask, "targets": targets}, count=count)

    def batch(self, position: int, count: int):
        return self.collate([self.encoded["train"][self._index(k)] for k in range(position, position + count)])

    def loss(self, model, batch):
        import torch

        from lmforge.tune.heads import IGNORE_INDEX, classification_loss

        logits = model(batch.input_ids, batch.extra["attention_mask"])
        targets = batch.extra["targets"]
        weights = None if self.class_weights is None else torch.tensor(self.class_weights)
        loss = classification_loss(logits, targets, weights, self.config.head.focal_gamma, "sum")
        counted = targets != IGNORE_INDEX
        right = ((logits.detach().argmax(-1) == targets) & counted).float().sum()
        return loss, {"accuracy": right}

    # evaluation ----------------------------------------------------------------------------
    def predict(self, model, encoded: Sequence[Encoded], batch_size: int | None = None):
        """(predicted class per item, summed loss, counted targets) without gradients; for
        token tasks a list of predicted tag indices per word."""
        import torch

        from lmforge.tune.heads import classification_loss

        batch_size = batch_size or self.config.eval.batch_size
        device = next(model.parameters()).device
        was_training = model.training
        model.eval()
        predictions, total, counted = [], 0.0, 0
        try:
            with torch.no_grad():
                for i in range(0, len(encoded), batch_size):
                    items = encoded[i:i + batch_size]
                    batch = self.collate(items).to(device)
                    logits = model(batch.input_ids, batch.extra["attention_mask"])
                    total += float(classification_loss(logits, batch.extra["targets"]))
                    counted += batch.count
                    best = logits.argmax(-1).cpu()
                    if self.task == "sequence":
                        predictions += best.tolist()
                    else:
                        predictions += [[int(best[r, s]) for s in e.word_starts] for r, e in enumerate(items)]
        finally:
            model.train(was_training)
        return predictions, total, counted

    def score(self, model, split: str, limit: int | None = None) -> dict[str, Any]:
        """Loss and metrics of ``model`` on a split (see lmforge/eval/metrics/classification.py)."""
        from lmforge.eval.metrics.classification import classification_report, entity_scores

        encoded, records = self.encoded[split][:limit], self.splits[split][:limit]
        if not encoded:
            raise LmforgeError(f"the {split} split is empty")
        predictions, total, counted = self.predict(model, encoded)
        result: dict[str, Any] = {"loss": total / max(1, counted), "examples": len(encoded)}
        if self.task == "sequence":
            truth = [e.target for e in encoded]
            result.update(classification_report(truth, predictions, self.labels))
        else:
            true_tags = [list(r["tags"]) for r in records]
            pred_tags = [[self.labels[p] for p in pred] + ["O"] * (len(tags) - len(pred))
                         for pred, tags in zip(predictions, true_tags)]
            result.update(entity_scores(true_tags, pred_tags))
            index = {name: i for i, name in enumerate(self.labels)}
            flat_true = [index[t] for tags in true_tags for t in tags]
            flat_pred = [index[t] for tags in pred_tags for t in tags]
            words = classification_report(flat_true, flat_pred, self.labels)
            result.update({"tag_macro_f1": words["macro_f1"], "tag_report": words,
                           "confusion_matrix": words["confusion_matrix"], "labels": self.labels,
                           "samples": [{"tokens": r["tokens"], "tags": t, "predicted": p}
                                       for r, t, p in list(zip(records, true_tags, pred_tags))[:5]]})
        return result

    def evaluate(self, trainer) -> dict[str, Any] | None:
        if not self.encoded.get("validation"):
            return None
        r = self.score(trainer.model, "validation", self.config.eval.validation_examples)
        keys = ("accuracy", "macro_f1", "micro_f1") if self.task == "sequence" else \
            ("entity_f1", "entity_precision", "entity_recall", "token_accuracy")
        return {"val_loss": r["loss"], **{k: r[k] for k in keys}}

    def baseline(self, trainer) -> float | None:
        return None

    def checkpoint_state(self, trainer, model_state: dict) -> dict:
        """Checkpoint files hold the body (merged when adapted); the head is in OUT/model."""
        if self.config.peft_method == "none":
            return {k.removeprefix("backbone."): v for k, v in model_state.items() if k.startswith("backbone.")}
        import copy

        from lmforge.tune.peft import merge_and_unload

        return merge_and_unload(copy.deepcopy(trainer.model.backbone)).state_dict()

    def report_extra(self, trainer) -> dict[str, Any]:
        return {"title": self.title, "task": self.task, "labels": self.labels,
                "data": {"dataset": self.config.data.dataset, **{s: len(v) for s, v in self.encoded.items()}},
                "class_weights": self.class_weights, "focal_gamma": self.config.head.focal_gamma,
                "trainable_parameters": self.trainable, "total_parameters": self.total,
                "trainable_fraction": self.trainable / self.total, "peft": self.config.peft_method,
                "pooling": trainer.model.pooling if self.task == "sequence" else None}


def classify(config: ClassifyConfig, resume: bool = False, progress: bool = True, log=None,
             splits: dict[str, list[dict[str, Any]]] | None = None) -> dict[str, Any]:
    """Train the recipe's head; write the model, test metrics and plots. Returns the report (rank 0)."""
    from lmforge.io.atomic import write_json_atomic, write_text_atomic
    from lmforge.train.distributed import shutdown
    from lmforge.train.loop import Trainer

    if resume:
        raise LmforgeError("--resume is not supported for classification runs (their checkpoints hold the body, "
                           "not the head); start a new run")
    kwargs = {"log": log} if log is not None else {}
    task = ClassificationTask(config, splits)
    trainer = Trainer(config, resume=False, progress=progress, task=task, **kwargs)
    try:
        report = trainer.run()
        if not trainer.runtime.is_main:
            return report
        out = Path(config.train.out)
        model = trainer.model
        if config.peft_method != "none":
            from lmforge.tune.peft import merge_and_unload

            model.backbone = merge_and_unload(model.backbone)
        from lmforge.tune.heads import save_classifier

        report["output"] = str(save_classifier(model, out / "model", task.tokenizer, overwrite=True))
        if config.eval.test and task.encoded.get("test"):
            report["test"] = write_metrics(task.score(model, "test"), out, task.task)
        write_json_atomic(out / "report.json", report)
        write_text_atomic(out / "report.md", format_report(report))
        write_text_atomic(out / "classify.yaml", to_yaml(config))
        return report
    finally:
        shutdown(trainer.runtime)


def format_report(report: dict[str, Any]) -> str:
    """The loop's run report with the trainable share and the test split's headline figures."""
    from lmforge.train.loop import format_report as loop_report

    lines = [loop_report(report).rstrip("\n"), "",
             f"Trainable: {report['trainable_parameters']:,} of {report['total_parameters']:,} parameters "
             f"({100 * report['trainable_fraction']:.2f}%, peft {report['peft']})."]
    test = report.get("test")
    if test and report["task"] == "sequence":
        lines.append(f"Test split ({test['examples']} texts): accuracy {test['accuracy']:.4f}, "
                     f"macro F1 {test['macro_f1']:.4f}; details in [metrics.md](metrics.md).")
    elif test:
        lines.append(f"Test split ({test['examples']} sentences): entity F1 {test['entity_f1']:.4f}, word accuracy "
                     f"{test['token_accuracy']:.4f}; details in [metrics.md](metrics.md).")
    return "\n".join(lines) + "\n"


def write_metrics(result: dict[str, Any], out: Path, task: str) -> dict[str, Any]:
    """OUT/metrics.json, OUT/metrics.md and OUT/plots/confusion.png of a split's scores."""
    from lmforge.eval.metrics.classification import format_confusion, format_report, plot_confusion
    from lmforge.io.atomic import write_json_atomic, write_text_atomic

    labels = result["labels"]
    plot = plot_confusion(result["confusion_matrix"], labels, out / "plots" / "confusion.png",
                          "test split" + (" (words, BIO tags)" if task == "token" else ""))
    result["confusion_plot"] = str(plot) if plot else None
    lines = ["# Test split", ""]
    if task == "token":
        lines += [f"entity F1 {result['entity_f1']:.3f} (precision {result['entity_precision']:.3f}, recall "
                  f"{result['entity_recall']:.3f}) over {result['entities']} entities in {result['examples']} "
                  f"sentences; word tag accuracy {result['token_accuracy']:.3f}", "",
                  "| entity type | precision | recall | F1 | support |", "|---|---:|---:|---:|---:|"]
        lines += [f"| {k} | {v['precision']:.3f} | {v['recall']:.3f} | {v['f1']:.3f} | {v['support']} |"
                  for k, v in result["per_type"].items()]
        lines += ["", "Per tag (words):", "", format_report(result["tag_report"])]
    else:
        lines += [format_report(result)]
    lines += ["", "Confusion matrix:", "", format_confusion(result["confusion_matrix"], labels)]
    if plot:
        lines += ["", "![confusion matrix](plots/confusion.png)"]
    write_json_atomic(out / "metrics.json", result)
    write_text_atomic(out / "metrics.md", "\n".join(lines) + "\n")
    return {k: v for k, v in result.items() if k not in ("tag_report", "samples")}




def describe_splits(splits: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Counts and label balance of each split (for ``lmforge finetune data``-style summaries)."""
    task = task_of(splits)
    out: dict[str, Any] = {"task": task, "counts": {s: len(v) for s, v in splits.items()}}
    if task == "sequence":
        out["class_balance"] = {s: {lab: sum(str(r["label"]) == lab for r in v) for lab in labels_of(v, task)}
                                for s, v in splits.items() if v}
    else:
        out["entities"] = {s: sum(t.startswith("B-") for r in v for t in r["tags"]) for s, v in splits.items()}
    return out


def write_splits(splits: dict[str, list[dict[str, Any]]], out: str | Path) -> dict[str, Any]:
    """``out/{train,validation,test}.jsonl`` and ``out/dataset.json``."""
    from lmforge.tune.datasets import write_splits as write

    return write(splits, out, describe_splits(splits))


class SequenceClassifier:
    """A saved sequence classifier (``OUT/model`` of a run) with its tokenizer, scoring texts.

        clf = SequenceClassifier("runs/classify-intents-minilm/model")
        clf.probabilities(["where is my order A10042?"])   # [N, labels] softmax rows
    """

    def __init__(self, directory: str | Path, max_len: int = 64) -> None:
        from lmforge.model.loading import resolve_tokenizer
        from lmforge.tune.heads import load_classifier

        directory = Path(directory)
        self.model = load_classifier(directory)
        if self.model.task != "sequence":
            raise LmforgeError(f"{directory} is a token classifier; a sequence classifier is needed here")
        self.tokenizer = resolve_tokenizer(str(directory))
        self.labels = list(self.model.labels)
        self.max_len = max_len
        self.pad_id = next(i for i in (self.tokenizer.pad_id, self.tokenizer.eos_id, 0) if i is not None)
        self._specials = special_tokens(self.tokenizer)

    def probabilities(self, texts: Sequence[str], batch_size: int = 32):
        """Softmax probabilities [N, labels] as a numpy array."""
        import numpy as np
        import torch

        rows = []
        with torch.no_grad():
            for start in range(0, len(texts), batch_size):
                encoded = [encode_text(self.tokenizer, str(t), self.max_len, self._specials)
                           for t in texts[start:start + batch_size]]
                width = max(len(e) for e in encoded)
                ids = torch.full((len(encoded), width), self.pad_id, dtype=torch.long)
                mask = torch.zeros((len(encoded), width), dtype=torch.long)
                for r, e in enumerate(encoded):
                    ids[r, :len(e)] = torch.tensor(e)
                    mask[r, :len(e)] = 1
                rows.append(torch.softmax(self.model(ids, mask).float(), dim=-1).numpy())
        return np.concatenate(rows) if rows else np.zeros((0, len(self.labels)), np.float32)
