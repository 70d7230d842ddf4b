"""Supervised fine-tuning (F1): `finetune(config)` behind ``lmforge finetune RECIPE``.

Fine-tuning runs in the one training loop (lmforge/train/loop.py): `SftTask` is the task
that gives it chat data and evaluates, everything else (DDP/FSDP, precision, accumulation,
clipping, schedule, checkpoints and exact resume, JSONL logs, plots, spike detection) is
the loop's own. A recipe has the loop's sections plus its own::

    model:    init_from (a registered name, HF directory or .gguf; default: the default
              model, dequantised to float32)
    data:     JSON-lines chat files (lmforge/tune/sft_data.py), the chat template, per-
              conversation truncation, packing (or --data.no-pack), or a generated dataset
              (lmforge/tune/datasets.py) to write first
    optim / schedule / train:  the pretraining sections (lmforge/train/recipe.py), with
              defaults for fine-tuning (lower learning rate, short warmup, no samples)
    eval:     validation loss on the assistant tokens, and exact match of greedy answers on
              the validation split through the generation engine (lmforge/infer/)
    peft:     a method from lmforge/tune/peft (LoRA, QLoRA, IA3, prompt/prefix tuning, ...);
              "none" trains every weight

The loss is the token mean over the step's assistant tokens (`TrainingTask.token_mean`):
a conversation with a long answer counts for more than one with a short answer, the way
every target token counts once in pretraining.

The result: ``OUT/model`` (a Hugging Face directory with the tokenizer and its chat
template, which ``lmforge generate --model OUT/model`` loads) or, with a PEFT method,
``OUT/adapter`` (PEFT's layout); checkpoints under ``OUT/checkpoints`` for ``--resume``;
``OUT/report.{json,md}``, ``OUT/plots/training.png``, ``OUT/logs/train.jsonl``.
"""

from __future__ import annotations

import dataclasses
import math
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmforge.errors import LmforgeError
from lmforge.train.recipe import OptimSection, ScheduleSection, TrainSection, build_sections, read_recipe

# -- the recipe ---------------------------------------------------------------------------------------


@dataclass
class FinetuneModelSection:
    init_from: str | None = None  # registered model, HF directory or .gguf (None: the default model)


@dataclass
class FinetuneDataSection:
    """Chat records (see lmforge/tune/sft_data.py)."""

    train: str = "runs/data/arithmetic/train.jsonl"
    validation: str | None = "runs/data/arithmetic/validation.jsonl"
    generate: str | None = "arithmetic"  # when the train file is missing: write this generated dataset there
    generate_seed: int = 0
    generate_train: int = 2000  # training items to generate
    chat_template: str | None = None  # a Jinja template or a file holding one (None: the tokenizer's)
    max_len: int = 64  # tokens per conversation; longer ones are truncated
    pack: bool = True  # several conversations per row, attention kept inside each
    seq_len: int = 128  # tokens per packed row
    max_records: int | None = None  # use only the first N training records


@dataclass
class FinetuneOptimSection(OptimSection):
    lr: float = 5e-5
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 0.0


@dataclass
class FinetuneScheduleSection(ScheduleSection):
    warmup_steps: int = 10
    min_lr_ratio: float = 0.0


@dataclass
class FinetuneTrainSection(TrainSection):
    out: str = "runs/finetune"
    max_steps: int = 200
    batch_size: int = 4
    eval_interval: int = 50
    eval_batches: int = 8
    save_interval: int = 100
    keep_last: int = 1
    sample_prompts: list[str] = field(default_factory=list)


@dataclass
class EvalSection:
    """What validation measures besides the loss."""

    exact_match_examples: int = 100  # validation conversations answered greedily (0: no exact match)
    max_new_tokens: int = 32
    loss_examples: int = 200  # validation conversations for the validation loss


def _peft_class():
    try:
        from lmforge.tune.peft import PeftOptions
    except ImportError:  # pragma: no cover - the adapters package ships with lmforge
        return None
    return PeftOptions


@dataclass
class FinetuneConfig:
    model: FinetuneModelSection = field(default_factory=FinetuneModelSection)
    data: FinetuneDataSection = field(default_factory=FinetuneDataSection)
    optim: FinetuneOptimSection = field(default_factory=FinetuneOptimSection)
    schedule: FinetuneScheduleSection = field(default_factory=FinetuneScheduleSection)
    train: FinetuneTrainSection = field(default_factory=FinetuneTrainSection)
    eval: EvalSection = field(default_factory=EvalSection)
    peft: Any = None  # PeftOptions (lmforge/tune/peft), None: full fine-tuning

    def validate(self) -> None:
        from lmforge.train.recipe import DataSection, PretrainConfig

        # The loop's own sections are checked by the pretraining recipe's rules.
        PretrainConfig(data=DataSection(seq_len=max(2, self.data.seq_len)), optim=self.optim,
                       schedule=self.schedule, train=self.train).validate()
        d, e = self.data, self.eval
        if d.max_len < 2 or d.seq_len < 2:
            raise LmforgeError("data.max_len and data.seq_len must be at least 2")
        if d.pack and d.max_len > d.seq_len:
            raise LmforgeError(f"data.max_len ({d.max_len}) must fit a packed row (data.seq_len {d.seq_len})")
        if d.max_records is not None and d.max_records < 1:
            raise LmforgeError("data.max_records must be positive")
        if e.exact_match_examples < 0 or e.loss_examples < 0 or e.max_new_tokens < 1:
            raise LmforgeError("eval.exact_match_examples and eval.loss_examples must be >= 0, "
                               "eval.max_new_tokens >= 1")
        if self.peft_method in ("prompt", "prefix") and d.pack:
            raise LmforgeError("prompt and prefix tuning add virtual tokens to each row: use --data.no-pack")

    @property
    def peft_method(self) -> str:
        return getattr(self.peft, "method", "none") if self.peft is not None else "none"

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: dataclasses.asdict(getattr(self, f.name)) for f in dataclasses.fields(self) if f.name != "peft"}
        if self.peft is not None:
            out["peft"] = dataclasses.asdict(self.peft)
        return out


_SECTIONS = {"model": FinetuneModelSection, "data": FinetuneDataSection, "optim": FinetuneOptimSection,
             "schedule": FinetuneScheduleSection, "train": FinetuneTrainSection, "eval": EvalSection}


def _section_classes() -> dict[str, type]:
    peft = _peft_class()
    return {**_SECTIONS, **({"peft": peft} if peft is not None else {})}


def option_names() -> list[str]:
    """Every ``section.field`` a flag can set."""
    return [f"{name}.{f}" for name, cls in _section_classes().items() for f in typing.get_type_hints(cls)]


def config_from_dict(data: dict[str, Any], source: str = "recipe") -> FinetuneConfig:
    """A `FinetuneConfig` from nested dicts (a parsed YAML recipe), strictly checked."""
    classes = _section_classes()
    if isinstance(data, dict) and "peft" in data and "peft" not in classes:
        raise LmforgeError(f"{source}: unknown section 'peft' (the adapters package is not available)")
    config = FinetuneConfig(**build_sections(data, classes, source, optional=("peft",)))
    config.validate()
    return config


def load_finetune_recipe(path: str | Path | None, overrides: dict[str, Any] | None = None) -> FinetuneConfig:
    """Read a YAML recipe (None: the defaults) and apply ``{"section.field": value}`` overrides."""
    return config_from_dict(*read_recipe(path, overrides, _section_classes()))


def to_yaml(config: FinetuneConfig) -> str:
    import yaml

    return yaml.safe_dump(config.to_dict(), sort_keys=False, default_flow_style=False)


# -- answers ----------------------------------------------------------------------------------------

def normalize_answer(text: str) -> str:
    """Whitespace collapsed, surrounding spaces and a final period removed (exact match compares these)."""
    return re.sub(r"\s+", " ", text).strip().rstrip(".").strip()


def answer_in_output(reference: str, output: str) -> bool:
    """The reference appears in the output as a whole token (``85`` in "= 85." but not in "185")."""
    ref = normalize_answer(reference)
    return bool(ref) and re.search(r"(?<![\w.-])" + re.escape(ref) + r"(?![\w-])", output) is not None


TRANSLATION_TASKS = ("bible-en-es",)  # records scored by BLEU and chrF as well


def exact_match(model, tokenizer, records: list[dict[str, Any]], max_new_tokens: int = 32,
                chat_template: str | None = None, batch: int = 16, progress: bool = False) -> dict[str, Any]:
    """Greedy answers of ``model`` to each record's prompt (everything before its last assistant
    turn), scored by exact match against ``answer`` (or that turn's content) and by whether the
    reference appears in the output at all. Generation runs through lmforge's engine."""
    import torch

    from lmforge.infer import SamplingParams
    from lmforge.infer.engine import Generator
    from lmforge.io.progress import Progress
    from lmforge.tune.sft_data import messages_of, prompt_ids, prompt_messages

    if not records:
        raise LmforgeError("no records to answer")
    prompts, references = [], []
    for number, rec in enumerate(records, 1):
        messages = messages_of(rec, f"record {number}")
        _, last = prompt_messages(messages)
        prompts.append(prompt_ids(tokenizer, messages, chat_template))
        references.append(str(rec.get("answer", last)))
    params = SamplingParams(max_tokens=max_new_tokens, temperature=0.0)
    was_training = model.training
    model.eval()
    outputs: list[str] = []
    bar = Progress("answering", len(prompts), unit="answers", enabled=progress)
    try:
        with torch.no_grad():
            generator = Generator(model, tokenizer)
            for start in range(0, len(prompts), batch):
                outputs += [c.text for c in generator.generate(prompts[start:start + batch], params, max_batch=batch)]
                bar.update(len(outputs))
    finally:
        model.train(was_training)
        bar.close()
    exact = [normalize_answer(o) == normalize_answer(r) for o, r in zip(outputs, references)]
    contained = [answer_in_output(r, o) for o, r in zip(outputs, references)]
    scores = {"examples": len(records), "exact_match": sum(exact) / len(exact),
              "answer_in_output": sum(contained) / len(contained),
              "samples": [{"reference": r, "output": o} for r, o in list(zip(references, outputs))[:5]]}
    if any(rec.get("task") in TRANSLATION_TASKS for rec in records):
        # exact match says little about a translation: corpus BLEU and chrF (sacrebleu) beside it
        from lmforge.eval.metrics.sacre import bleu, chrf

        hypotheses = [o.strip() for o in outputs]
        scores["bleu"] = bleu(hypotheses, references)["score"]
        scores["chrf"] = chrf(hypotheses, references)["score"]
    return scores


# -- the task ---------------------------------------------------------------------------------------

def read_template(spec: str | None) -> str | None:
    """``data.chat_template``: a file holding a template, or the template text itself."""
    if not spec:
        return None
    if "{" not in spec:
        path = Path(spec).expanduser()
        if not path.is_file():
            raise LmforgeError(f"data.chat_template: no such template file {path}")
        return path.read_text(encoding="utf-8")
    return spec


def ensure_generated(section: FinetuneDataSection, log=print) -> None:
    """Write the generated dataset the recipe names when its training file does not exist yet."""
    train = Path(section.train)
    if train.is_file() or not section.generate:
        return
    from lmforge.tune.datasets import write_dataset

    log(f"writing the generated {section.generate!r} dataset into {train.parent}")
    write_dataset(section.generate, train.parent, section.generate_seed, {"train": section.generate_train})
    if not train.is_file():
        raise LmforgeError(f"{train} was not written by the {section.generate!r} dataset (it writes train.jsonl)")


class SftTask:
    """Chat data for the training loop (see lmforge/train/loop.py `TrainingTask`)."""

    title = "Fine-tuning run"
    token_mean = True

    def __init__(self, config: FinetuneConfig) -> None:
        self.config = config

    # setup ------------------------------------------------------------------------------
    def setup(self, trainer) -> None:
        from lmforge.model.loading import resolve_tokenizer
        from lmforge.train.distributed import barrier
        from lmforge.tune.sft_data import encode_dataset, pack_rows, read_jsonl

        d = self.config.data
        if trainer.runtime.is_main:
            ensure_generated(d, trainer.log)
        barrier(trainer.runtime)
        self.tokenizer = resolve_tokenizer(self.config.model.init_from)
        self.chat_template = read_template(d.chat_template)
        if self.chat_template:
            self.tokenizer.chat_template = self.chat_template  # saved with the model, used by generate
        records = read_jsonl(d.train)
        if d.max_records:
            records = records[:d.max_records]
        self.train, self.stats = encode_dataset(self.tokenizer, records, d.max_len, self.chat_template, d.train)
        s = self.stats
        trainer.log(f"{d.train}: {s.kept} conversations ({s.truncated} truncated, {s.dropped_no_assistant} without "
                    f"an assistant turn, {s.dropped_truncated} left without loss), {s.tokens:,} tokens of which "
                    f"{s.loss_tokens:,} carry loss")
        lengths = [len(e.ids) for e in self.train]
        if d.pack:
            self.rows = pack_rows(lengths, d.seq_len)
            self.seq_len = d.seq_len
            fill = sum(lengths) / (len(self.rows) * d.seq_len)
            trainer.log(f"packed into {len(self.rows)} rows of {d.seq_len} tokens ({100 * fill:.0f}% filled)")
        else:
            # Rows of similar length together: sorted, cut into batches; batches are shuffled per epoch.
            order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
            self.rows = [[i] for i in order]
            self.seq_len = max(lengths)
        self.pad_id = next(i for i in (self.tokenizer.pad_id, self.tokenizer.eos_id, 0) if i is not None)
        self.seed = self.config.train.seed
        self.batch_size = self.config.train.batch_size
        self._orders: dict[int, Any] = {}
        self.validation: list[dict[str, Any]] = []
        self.val_encoded = []
        if d.validation:
            self.validation = read_jsonl(d.validation)
            self.val_encoded, _ = encode_dataset(self.tokenizer, self.validation[:self.config.eval.loss_examples or 1],
                                                 d.max_len, self.chat_template, d.validation)
            if not self.config.eval.loss_examples:
                self.val_encoded = []

    def build_model(self, trainer):
        import torch

        from lmforge.model.loading import load_model
        from lmforge.model.registry import resolve

        model = load_model(resolve(self.config.model.init_from), torch.float32, "cpu").float()
        if model.config.vocab_size < self.tokenizer.vocab_size:
            raise LmforgeError(f"the model has {model.config.vocab_size} token ids, its tokenizer {self.tokenizer.vocab_size}")
        if self.config.peft_method != "none":
            from lmforge.tune.peft import apply_peft, memory_report

            model = apply_peft(model, self.config.peft)
            trainer.log(memory_report(model))
        return model

    # the stream ----------------------------------------------------------------------------
    def _order(self, epoch: int):
        import numpy as np

        if epoch not in self._orders:
            rng = np.random.default_rng([self.seed, epoch])
            n = len(self.rows)
            if self.config.data.pack:
                order = rng.permutation(n)
            else:  # shuffle whole length-sorted batches, not rows
                groups = [np.arange(i, min(i + self.batch_size, n)) for i in range(0, n, self.batch_size)]
                order = np.concatenate([groups[g] for g in rng.permutation(len(groups))])
            self._orders = {epoch: order}
        return self._orders[epoch]

    def _collate(self, rows: list[list[int]], packed: bool, encoded=None):
        import torch

        from lmforge.train.loop import Batch
        from lmforge.tune.sft_data import IGNORE_INDEX

        encoded = self.train if encoded is None else encoded
        width = max(sum(len(encoded[i].ids) for i in row) for row in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        lengths, tokens = [], 0
        for r, row in enumerate(rows):
            at, row_lengths = 0, []
            for i in row:
                e = encoded[i]
                n = len(e.ids)
                ids[r, at:at + n] = torch.tensor(e.ids)
                labels[r, at:at + n] = torch.tensor(e.labels)
                at += n
                row_lengths.append(n)
            lengths.append(row_lengths)
            tokens += at
        return Batch(ids, labels, lengths if packed else None, tokens)

    def batch(self, position: int, count: int):
        n = len(self.rows)
        rows = [self.rows[int(self._order(k // n)[k % n])] for k in range(position, position + count)]
        return self._collate(rows, self.config.data.pack)

    # evaluation ----------------------------------------------------------------------------
    def baseline(self, trainer) -> float | None:
        return None

    def evaluate(self, trainer) -> dict[str, Any] | None:
        import torch

        from lmforge.train.distributed import sum_across

        runtime, result = trainer.runtime, {}
        if self.val_encoded:
            mine = list(range(len(self.val_encoded)))[runtime.rank::runtime.world_size]
            nats = torch.zeros((), dtype=torch.float64, device=runtime.device)
            count = torch.zeros((), dtype=torch.float64, device=runtime.device)
            with torch.no_grad():
                for i in range(0, len(mine), self.batch_size):
                    batch = self._collate([[j] for j in mine[i:i + self.batch_size]], False, self.val_encoded)
                    with trainer.autocast():
                        nats += trainer.loss(batch.to(runtime.device), reduction="sum").double()
                    count += batch.target_count()
            nats, count = sum_across(nats, runtime), sum_across(count, runtime)
            val_loss = float(nats / count)
            result = {"val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50.0))}
        n = self.config.eval.exact_match_examples
        if n and self.validation and runtime.is_main and runtime.mode != "fsdp":
            scores = exact_match(trainer.model, self.tokenizer, self.validation[:n], self.config.eval.max_new_tokens,
                                 self.chat_template)
            result.update({"exact_match": scores["exact_match"], "answer_in_output": scores["answer_in_output"]})
            self.last_samples = scores["samples"]
        return result or None

    def checkpoint_state(self, trainer, model_state: dict) -> dict:
        """With an adapter, checkpoints hold the merged model (loadable as is); the adapter itself
        is written to OUT/adapter at the end."""
        if self.config.peft_method == "none":
            return model_state
        import copy

        from lmforge.tune.peft import merge_and_unload

        return merge_and_unload(copy.deepcopy(trainer.model)).state_dict()

    def report_extra(self, trainer) -> dict[str, Any]:
        return {"title": self.title, "data": {"train": self.config.data.train, **self.stats.to_dict(),
                                              "rows": len(self.rows), "packed": self.config.data.pack},
                "answer_samples": getattr(self, "last_samples", []), "peft": self.config.peft_method}


def finetune(config: FinetuneConfig, resume: bool = False, progress: bool = True, log=None) -> dict[str, Any]:
    """Run the recipe; write the model (or adapter) and the report. Returns the report (rank 0)."""
    from lmforge.train.distributed import shutdown
    from lmforge.train.loop import Trainer

    kwargs = {"log": log} if log is not None else {}
    if resume and config.peft_method != "none":
        from lmforge.train import checkpoint as ckpt

        if ckpt.list_checkpoints(Path(config.train.out) / "checkpoints"):
            raise LmforgeError("--resume is not supported for adapter (PEFT) runs yet: their checkpoints hold the "
                               "merged model, not the adapter; start a new run")
    trainer = Trainer(config, resume=resume, progress=progress, task=SftTask(config), **kwargs)
    try:
        report = trainer.run()
        if trainer.runtime.is_main:
            report["output"] = str(export(trainer, config))
            from lmforge.io.atomic import write_json_atomic, write_text_atomic

            write_json_atomic(Path(config.train.out) / "report.json", report)
            write_text_atomic(Path(config.train.out) / "finetune.yaml", to_yaml(config))
        return report
    finally:
        shutdown(trainer.runtime)


def export(trainer, config: FinetuneConfig) -> Path:
    """OUT/model (full fine-tuning) or OUT/adapter (a PEFT method), written atomically."""
    out = Path(config.train.out)
    if config.peft_method != "none":
        from lmforge.tune.peft import save_adapter

        base = config.model.init_from or "default model"
        target = out / "adapter"
        save_adapter(trainer.model, target, base_model_name_or_path=base)
        return target
    from lmforge.model.checkpoint import save_hf_model

    return save_hf_model(trainer.model, out / "model", trainer.tokenizer, overwrite=True)
