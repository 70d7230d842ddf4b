"""Knowledge distillation (F5): `distill(config)` behind ``lmforge distill RECIPE``.

A small *student* learns from a large *teacher* by matching the teacher's whole next-token
distribution, not only the one token the data holds. At every position that carries a
target the loss is::

    alpha * T^2 * KL(softmax(z_t / T) || softmax(z_s / T))  +  (1 - alpha) * CE(z_s, label)

with z_t, z_s the teacher's and student's logits and T the temperature. T > 1 flattens both
distributions so the teacher's ranking of the unlikely tokens (its "dark knowledge") carries
weight; the gradient of the KL term with respect to z_s is (p_s - p_t) / T, so the T^2
factor keeps the soft term's gradients at the same scale as the hard term's whatever T is.
``kl: reverse`` swaps the arguments, KL(p_s || p_t): mode seeking (the student puts its mass
where the teacher is confident) instead of mass covering. ``top_k`` keeps only the teacher's
k most likely tokens per position (renormalised), against the student's full log-softmax
at those ids: the teacher's outputs then cost k instead of 49,152 numbers per position,
which is what makes caching them (``cache_teacher``) affordable.

Distillation is a task of the one training loop (lmforge/train/loop.py): the data stream
is pretraining's (packed Wikipedia rows, `PretrainTask`) or fine-tuning's (chat records with
loss on the assistant tokens only, `SftTask`), the loss is this module's, and checkpoints,
exact resume, DDP, telemetry, plots and the report are the loop's. The teacher is held by the
task, not by the trained module: it runs frozen, in eval mode, under ``no_grad``, and is
never part of a checkpoint or of a DDP gradient sync.

The student is a smaller decoder of the teacher's family with the teacher's tokenizer:

* ``student.init: layers`` copies the teacher's embeddings, final norm, head and the chosen
  blocks (``student.layers``, or every ``keep_every``-th block, or ``n_layer`` blocks evenly
  spaced from the first to the last), the initialisation of DistilBERT;
* ``student.init: random`` builds the teacher's configuration with the widths given
  (``n_layer``, ``n_embd``, ``n_head``, ``n_kv_head``, ``intermediate_size``) and random weights;
* a path or registered name starts from that model (its tokenizer must be the teacher's).

``distill.baseline`` trains the same student again with ``alpha = 0`` (hard labels only,
the same steps and data), so that `compare` can show what distillation itself gained:
parameters, size on disk, decode speed through lmforge's engine, held-out perplexity, top-1
agreement with the teacher, and greedy agreement as a draft model (lmforge has no
speculative decoder; the acceptance a greedy one would see is simulated from the student's
predictions along the teacher's own greedy continuations).

Output: ``OUT/model`` (the student, a Hugging Face directory), ``OUT/checkpoints``,
``OUT/report.{json,md}``, ``OUT/plots/``, ``OUT/logs/train.jsonl``; with the baseline the
same under ``OUT/baseline``; the comparison in ``OUT/comparison.{json,md}``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import time
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, Sequence

from lmforge.errors import LmforgeError
from lmforge.train.recipe import OptimSection, ScheduleSection, TrainSection, build_sections, read_recipe

if typing.TYPE_CHECKING:  # torch is imported where it is used: the CLI reads this module's recipe at start-up
    import torch

IGNORE_INDEX = -100
KL_DIRECTIONS = ("forward", "reverse")
STUDENT_INITS = ("layers", "random")
DATA_KINDS = ("text", "chat")


# -- the loss -----------------------------------------------------------------------------------------

class TopK(NamedTuple):
    """The teacher's k largest logits per position and their token ids ([N, k] each)."""

    values: torch.Tensor
    indices: torch.Tensor


def distillation_loss(student_logits: torch.Tensor, teacher: torch.Tensor | TopK | None, targets: torch.Tensor,
                      temperature: float = 2.0, alpha: float = 0.5, kl: str = "forward"
                      ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Summed distillation loss over the positions whose target is not -100.

    ``student_logits`` [N, V]; ``teacher`` the teacher's logits [N, V], or its `TopK`, or
    None when ``alpha == 0``; ``targets`` [N]. Returns ``(loss_sum, sums)`` where ``sums``
    holds the summed (unweighted) ``kl`` and ``ce`` and the count of positions where the
    student's top token is the teacher's (``agreement``), for logging.
    """
    import torch.nn.functional as F

    keep = targets != IGNORE_INDEX
    student_logits, targets = student_logits[keep].float(), targets[keep]
    ce = F.cross_entropy(student_logits, targets, reduction="sum") if len(targets) else student_logits.sum() * 0
    sums = {"ce": ce.detach()}
    if alpha == 0:
        return ce, sums
    if teacher is None:
        raise ValueError("alpha > 0 needs the teacher's logits")
    log_q = F.log_softmax(student_logits / temperature, dim=-1)
    if isinstance(teacher, TopK):
        if kl != "forward":
            raise ValueError("top-k teacher logits support only the forward KL")
        values, indices = teacher.values[keep].float(), teacher.indices[keep]
        log_p = F.log_softmax(values / temperature, dim=-1)
        # The teacher's mass outside its top k is taken as zero; the student keeps its full softmax.
        divergence = (log_p.exp() * (log_p - log_q.gather(-1, indices))).sum()
        teacher_top = indices[:, 0]
    else:
        teacher_logits = teacher[keep].float()
        log_p = F.log_softmax(teacher_logits / temperature, dim=-1)
        if kl == "forward":
            divergence = (log_p.exp() * (log_p - log_q)).sum()
        else:
            divergence = (log_q.exp() * (log_q - log_p)).sum()
        teacher_top = teacher_logits.argmax(-1)
    loss = alpha * temperature ** 2 * divergence + (1 - alpha) * ce
    sums["kl"] = divergence.detach()
    sums["agreement"] = (student_logits.detach().argmax(-1) == teacher_top).sum().float()
    return loss, sums


def token_logits(model, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits [N, V], targets [N]) of a micro-batch at every position that predicts a next
    token; targets are -100 where no loss is taken. Packed rows (``batch.lengths``) run with
    attention inside each sequence, as the loop's own loss does, and a sequence's last token
    predicts nothing."""
    import torch

    ids = batch.input_ids
    targets_of = ids if batch.labels is None else batch.labels
    if batch.lengths is None:
        hidden = model.hidden_states(ids)[:, :-1]
        return model.lm_head(hidden.reshape(-1, hidden.shape[-1])), targets_of[:, 1:].reshape(-1)
    pieces, targets, flat = [], [], []
    for row, lengths in enumerate(batch.lengths):
        used = sum(lengths)
        pieces.append(ids[row, :used])
        shifted = torch.full((used,), IGNORE_INDEX, dtype=torch.long, device=ids.device)
        shifted[:used - 1] = targets_of[row, 1:used]
        shifted[torch.tensor(lengths, device=ids.device).cumsum(0) - 1] = IGNORE_INDEX
        targets.append(shifted)
        flat += lengths
    hidden = model.encode_packed(torch.cat(pieces), flat)
    return model.lm_head(hidden), torch.cat(targets)


# -- the recipe -----------------------------------------------------------------------------------------

@dataclass
class TeacherSection:
    model: str | None = None  # registered name, HF directory or .gguf (None: the default model)


@dataclass
class StudentSection:
    """The student: ``init`` layers (from the teacher's blocks), random, or a model path/name."""

    init: str = "layers"
    layers: list[int] | None = None  # init layers: these teacher blocks, in order
    keep_every: int | None = 5  # init layers: blocks 0, k, 2k, ... (when layers is not given)
    n_layer: int | None = None  # init layers without layers/keep_every: this many, evenly spaced; random: depth
    n_embd: int | None = None  # random: width (None: the teacher's)
    n_head: int | None = None
    n_kv_head: int | None = None
    intermediate_size: int | None = None


@dataclass
class DistillDataSection:
    """``text``: packed rows of plain text (built from ``sources`` with the teacher's tokenizer,
    as pretraining does); ``chat``: chat records, loss on the assistant tokens only."""

    kind: str = "text"
    path: str = "runs/data/wiki-smollm2-128"  # text: the packed directory
    sources: list[str] = field(default_factory=lambda: ["wiki"])  # text: what to build it from when missing
    seq_len: int = 128  # text: tokens per row; chat: tokens per packed row
    val_fraction: float = 0.05
    max_docs: int | None = None
    train: str = "runs/data/arithmetic/train.jsonl"  # chat records
    validation: str | None = "runs/data/arithmetic/validation.jsonl"
    generate: str | None = "arithmetic"  # chat: write this generated dataset when the train file is missing
    generate_seed: int = 0
    generate_train: int = 2000
    chat_template: str | None = None
    max_len: int = 64  # chat: tokens per conversation
    pack: bool = True  # chat: several conversations per row
    max_records: int | None = None


@dataclass
class DistillLossSection:
    alpha: float = 0.5  # weight of the soft (teacher) term; 0 = hard labels only
    temperature: float = 2.0
    kl: str = "forward"  # forward: KL(teacher || student); reverse: KL(student || teacher)
    top_k: int | None = None  # only the teacher's k most likely tokens per position
    cache_teacher: bool = False  # keep the teacher's outputs per batch (for data seen more than once)
    cache_mb: int = 1024  # the cache's size limit
    baseline: bool = True  # also train the same student on hard labels (alpha 0), for the comparison


@dataclass
class DistillOptimSection(OptimSection):
    lr: float = 3e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    weight_decay: float = 0.0


@dataclass
class DistillScheduleSection(ScheduleSection):
    warmup_steps: int = 10
    min_lr_ratio: float = 0.1


@dataclass
class DistillTrainSection(TrainSection):
    out: str = "runs/distill"
    max_steps: int = 200
    batch_size: int = 4
    eval_interval: int = 50
    eval_batches: int = 4
    save_interval: int = 50
    keep_last: int = 1
    sample_prompts: list[str] = field(default_factory=list)


@dataclass
class DistillEvalSection:
    heldout: str | None = None  # JSONL ({"text": ...}) or text file (None: the text data's validation split)
    heldout_tokens: int = 8192  # held-out tokens scored (perplexity, top-1 agreement)
    window: int | None = None  # perplexity window (None: data.seq_len)
    prompts: list[str] = field(default_factory=lambda: [
        "The history of", "In 1998, the", "Astronomy is the study of", "The city is known for"])
    decode_tokens: int = 32  # tokens generated per prompt (speed, greedy agreement)
    decode_rounds: int = 3  # alternating teacher/student rounds; the median counts
    draft_tokens: int = 4  # draft length of the simulated greedy speculative decoding
    exact_match_examples: int = 0  # chat: greedy exact match on validation records
    max_new_tokens: int = 16
    loss_examples: int = 100  # chat: validation conversations for the validation loss


@dataclass
class DistillConfig:
    teacher: TeacherSection = field(default_factory=TeacherSection)
    student: StudentSection = field(default_factory=StudentSection)
    data: DistillDataSection = field(default_factory=DistillDataSection)
    distill: DistillLossSection = field(default_factory=DistillLossSection)
    optim: DistillOptimSection = field(default_factory=DistillOptimSection)
    schedule: DistillScheduleSection = field(default_factory=DistillScheduleSection)
    train: DistillTrainSection = field(default_factory=DistillTrainSection)
    eval: DistillEvalSection = field(default_factory=DistillEvalSection)

    def validate(self) -> None:
        from lmforge.train.recipe import DataSection, PretrainConfig

        d, k, s, e = self.data, self.distill, self.student, self.eval
        PretrainConfig(data=DataSection(seq_len=max(2, d.seq_len), val_fraction=d.val_fraction), optim=self.optim,
                       schedule=self.schedule, train=self.train).validate()
        if not 0 <= k.alpha <= 1:
            raise LmforgeError(f"distill.alpha must be in [0, 1], got {k.alpha}")
        if not k.temperature > 0 or not math.isfinite(k.temperature):
            raise LmforgeError(f"distill.temperature must be > 0, got {k.temperature}")
        if k.kl not in KL_DIRECTIONS:
            raise LmforgeError(f"distill.kl must be one of {', '.join(KL_DIRECTIONS)}, got {k.kl!r}")
        if k.top_k is not None and k.top_k < 1:
            raise LmforgeError("distill.top_k must be positive (or null: the whole vocabulary)")
        if k.top_k is not None and k.kl != "forward":
            raise LmforgeError("distill.top_k needs distill.kl forward (the reverse KL needs every teacher probability)")
        if k.cache_mb < 0:
            raise LmforgeError("distill.cache_mb must be >= 0")
        if d.kind not in DATA_KINDS:
            raise LmforgeError(f"data.kind must be one of {', '.join(DATA_KINDS)}, got {d.kind!r}")
        if d.max_len < 2 or d.seq_len < 2:
            raise LmforgeError("data.max_len and data.seq_len must be at least 2")
        if d.kind == "chat" and d.pack and d.max_len > d.seq_len:
            raise LmforgeError(f"data.max_len ({d.max_len}) must fit a packed row (data.seq_len {d.seq_len})")
        if s.init in STUDENT_INITS:
            for name in ("keep_every", "n_layer", "n_embd", "n_head", "n_kv_head", "intermediate_size"):
                value = getattr(s, name)
                if value is not None and value < 1:
                    raise LmforgeError(f"student.{name} must be positive")
            if s.init == "layers" and s.layers is not None and not s.layers:
                raise LmforgeError("student.layers must name at least one teacher layer")
            if s.init == "layers" and (s.n_embd or s.n_head or s.n_kv_head or s.intermediate_size):
                raise LmforgeError("student.init layers keeps the teacher's widths: n_embd, n_head, n_kv_head and "
                                   "intermediate_size apply to student.init random")
        if e.heldout_tokens < 0 or e.decode_tokens < 1 or e.decode_rounds < 1 or e.draft_tokens < 1:
            raise LmforgeError("eval.heldout_tokens must be >= 0; eval.decode_tokens, eval.decode_rounds and "
                               "eval.draft_tokens positive")
        if e.window is not None and e.window < 2:
            raise LmforgeError("eval.window must be at least 2")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_SECTIONS = {"teacher": TeacherSection, "student": StudentSection, "data": DistillDataSection,
             "distill": DistillLossSection, "optim": DistillOptimSection, "schedule": DistillScheduleSection,
             "train": DistillTrainSection, "eval": DistillEvalSection}


def option_names() -> list[str]:
    """Every ``section.field`` a flag can set."""
    return [f"{name}.{f}" for name, cls in _SECTIONS.items() for f in typing.get_type_hints(cls)]


def config_from_dict(data: dict[str, Any], source: str = "recipe") -> DistillConfig:
    config = DistillConfig(**build_sections(data, _SECTIONS, source))
    config.validate()
    return config


def load_distill_recipe(path: str | Path | None, overrides: dict[str, Any] | None = None) -> DistillConfig:
    """Read a YAML recipe (None: the defaults) and apply ``{"section.field": value}`` overrides."""
    return config_from_dict(*read_recipe(path, overrides, _SECTIONS))


def to_yaml(config: DistillConfig) -> str:
    import yaml

    return yaml.safe_dump(config.to_dict(), sort_keys=False, default_flow_style=False)


# -- teacher and student ------------------------------------------------------------------------------

def teacher_spec(config: DistillConfig) -> str:
    from lmforge.model.registry import DEFAULT_MODEL

    return config.teacher.model or DEFAULT_MODEL


def load_teacher(spec: str | None):
    """The frozen teacher (float32, eval mode, no gradients)."""
    import torch

    from lmforge.model.loading import load_model
    from lmforge.model.registry import resolve

    teacher = load_model(resolve(spec), torch.float32, "cpu").float().eval()
    teacher.requires_grad_(False)
    return teacher


def chosen_layers(section: StudentSection, n_teacher: int) -> list[int]:
    """The teacher blocks a layer-initialised student copies, in order."""
    if section.layers is not None:
        layers = list(section.layers)
    elif section.keep_every is not None:
        layers = list(range(0, n_teacher, section.keep_every))
    elif section.n_layer is not None:
        n = section.n_layer
        layers = [0] if n == 1 else [round(i * (n_teacher - 1) / (n - 1)) for i in range(n)]
    else:
        raise LmforgeError("student.init layers needs student.layers, student.keep_every or student.n_layer")
    bad = [i for i in layers if not 0 <= i < n_teacher]
    if bad:
        raise LmforgeError(f"student.layers: the teacher has layers 0..{n_teacher - 1}, not {bad[0]}")
    if len(set(layers)) != len(layers):
        raise LmforgeError(f"student.layers names a teacher layer twice: {layers}")
    return layers


def student_from_layers(teacher, layers: Sequence[int]):
    """A student of the teacher's configuration with ``len(layers)`` blocks, holding copies of
    the teacher's embeddings, final norm, head and blocks ``layers`` (DistilBERT's init)."""
    from lmforge.model.transformer import Transformer

    config = dataclasses.replace(teacher.config, n_layer=len(layers), extra=dict(teacher.config.extra))
    student = Transformer(config)
    source = teacher.state_dict()
    state = {}
    for name in student.state_dict():
        if name.startswith("layers."):
            index, rest = name.split(".", 2)[1:]
            state[name] = source[f"layers.{layers[int(index)]}.{rest}"]
        else:
            state[name] = source[name]
    student.load_state_dict(state)  # copies the values: training the student leaves the teacher as it is
    return student.float().train()


def random_student(teacher_config, section: StudentSection):
    """The teacher's configuration with the widths the section gives, random weights."""
    from lmforge.model.transformer import Transformer

    changes = {name: getattr(section, name) for name in ("n_layer", "n_embd", "n_head", "n_kv_head",
                                                         "intermediate_size") if getattr(section, name) is not None}
    if "n_head" in changes and "n_kv_head" not in changes:
        changes["n_kv_head"] = math.gcd(changes["n_head"], teacher_config.n_kv_head)
    if "n_embd" in changes or "n_head" in changes:
        changes["head_dim"] = None
    try:
        config = dataclasses.replace(teacher_config, extra=dict(teacher_config.extra), **changes)
    except ValueError as exc:
        raise LmforgeError(f"student: {exc}") from None
    return Transformer(config).float().train()


def check_same_tokenizer(student_tokenizer, teacher_tokenizer, where: str) -> None:
    """The student must read and write the teacher's token ids: same vocabulary, same encoding."""
    probe = "Distillation: 42 students, naïve café, 東京 — don't panic!\n\tx = y**2"
    same = (student_tokenizer.vocab_size == teacher_tokenizer.vocab_size
            and student_tokenizer.encode(probe, add_special_tokens=False)
            == teacher_tokenizer.encode(probe, add_special_tokens=False)
            and student_tokenizer.eos_id == teacher_tokenizer.eos_id)
    if not same:
        raise LmforgeError(f"{where} uses another tokenizer than the teacher ({student_tokenizer.vocab_size} vs "
                           f"{teacher_tokenizer.vocab_size} ids, or different token ids for the same text): "
                           "distillation compares distributions over the same vocabulary")


def build_student(section: StudentSection, teacher, teacher_tokenizer):
    """(student, description) for the section: copied layers, random, or a given model."""
    if section.init == "layers":
        layers = chosen_layers(section, teacher.config.n_layer)
        return student_from_layers(teacher, layers), {"init": "layers", "layers": layers}
    if section.init == "random":
        return random_student(teacher.config, section), {"init": "random"}
    import torch

    from lmforge.model.loading import load_model, load_tokenizer
    from lmforge.model.registry import resolve

    spec = resolve(section.init)
    student = load_model(spec, torch.float32, "cpu").float().train()
    if student.config.vocab_size != teacher.config.vocab_size:
        raise LmforgeError(f"student {section.init} has {student.config.vocab_size} token ids, the teacher "
                           f"{teacher.config.vocab_size}: the student needs the teacher's vocabulary")
    check_same_tokenizer(load_tokenizer(spec), teacher_tokenizer, f"student {section.init}")
    return student, {"init": section.init}


# -- the task -------------------------------------------------------------------------------------------

def _inner_text_config(config: DistillConfig):
    from lmforge.train.recipe import DataSection, PretrainConfig

    d = config.data
    return PretrainConfig(data=DataSection(path=d.path, sources=list(d.sources), tokenizer=teacher_spec(config),
                                           seq_len=d.seq_len, val_fraction=d.val_fraction, max_docs=d.max_docs),
                          optim=config.optim, schedule=config.schedule, train=config.train)


def _inner_chat_config(config: DistillConfig):
    from lmforge.tune.sft import EvalSection, FinetuneConfig, FinetuneDataSection, FinetuneModelSection

    d, e = config.data, config.eval
    return FinetuneConfig(
        model=FinetuneModelSection(init_from=teacher_spec(config)),
        data=FinetuneDataSection(train=d.train, validation=d.validation, generate=d.generate,
                                 generate_seed=d.generate_seed, generate_train=d.generate_train,
                                 chat_template=d.chat_template, max_len=d.max_len, pack=d.pack, seq_len=d.seq_len,
                                 max_records=d.max_records),
        optim=config.optim, schedule=config.schedule, train=config.train,
        eval=EvalSection(exact_match_examples=e.exact_match_examples, max_new_tokens=e.max_new_tokens,
                         loss_examples=e.loss_examples))


class DistillTask:
    """Distillation for the training loop (see lmforge/train/loop.py `TrainingTask`): the data
    stream of pretraining or fine-tuning, the student as the trained model, this module's loss."""

    title = "Distillation run"
    token_mean = True

    def __init__(self, config: DistillConfig, teacher=None) -> None:
        self.config = config
        self.teacher = teacher
        self.alpha = config.distill.alpha
        if config.data.kind == "text":
            from lmforge.train.loop import PretrainTask

            self.inner = PretrainTask(_inner_text_config(config))
        else:
            from lmforge.tune.sft import SftTask

            self.inner = SftTask(_inner_chat_config(config))
        self._cache: dict[str, Any] = {}
        self._cache_bytes = 0
        self.cache_hits = 0
        self._val_teacher_top: dict[int, torch.Tensor] = {}

    def setup(self, trainer) -> None:
        self.inner.setup(trainer)
        self.tokenizer = self.inner.tokenizer
        self.seq_len = self.inner.seq_len
        if self.teacher is None:
            self.teacher = load_teacher(teacher_spec(self.config))
        if self.teacher.config.vocab_size < self.tokenizer.vocab_size:
            raise LmforgeError(f"the teacher has {self.teacher.config.vocab_size} token ids, the data's tokenizer "
                               f"{self.tokenizer.vocab_size}")

    def build_model(self, trainer):
        student, self.student_info = build_student(self.config.student, self.teacher, self.tokenizer)
        self.teacher.to(trainer.runtime.device)
        trainer.log(f"teacher {self.teacher.num_parameters() / 1e6:.1f}M parameters "
                    f"({self.teacher.config.n_layer} layers); student {student.num_parameters() / 1e6:.1f}M "
                    f"({student.config.n_layer} layers, {self.student_info})")
        return student

    def batch(self, position: int, count: int):
        return self.inner.batch(position, count)

    # the loss ------------------------------------------------------------------------------
    def _teacher_outputs(self, batch) -> torch.Tensor | TopK:
        import torch

        k = self.config.distill
        key = None
        if k.cache_teacher:
            digest = hashlib.sha1(batch.input_ids.cpu().numpy().tobytes())
            digest.update(repr((tuple(batch.input_ids.shape), batch.lengths,
                                None if batch.labels is None else batch.labels.cpu().numpy().tobytes())).encode())
            key = digest.hexdigest()
            if key in self._cache:
                self.cache_hits += 1
                return self._cache[key]
        with torch.no_grad():
            logits, targets = token_logits(self.teacher, batch)
            logits = logits[targets != IGNORE_INDEX]  # the positions the loss counts, in the same order
            out: torch.Tensor | TopK
            if k.top_k is not None:
                top = logits.topk(min(k.top_k, logits.shape[-1]), dim=-1)
                out = TopK(top.values, top.indices)
            else:
                out = logits
        if key is not None:
            size = sum(t.numel() * t.element_size() for t in (out if isinstance(out, TopK) else (out,)))
            if self._cache_bytes + size <= k.cache_mb * 2 ** 20:
                self._cache[key] = out
                self._cache_bytes += size
        return out

    def loss(self, model, batch):
        k = self.config.distill
        logits, targets = token_logits(model, batch)
        teacher = None
        if self.alpha > 0:
            teacher = self._teacher_outputs(batch)
            keep = targets != IGNORE_INDEX
            logits, targets = logits[keep], targets[keep]
        return distillation_loss(logits, teacher, targets, k.temperature, self.alpha, k.kl)

    # evaluation ----------------------------------------------------------------------------
    def _validation_batches(self) -> list:
        from lmforge.train.loop import Batch

        size = self.config.train.batch_size
        if hasattr(self.inner, "val_rows"):
            rows = self.inner.val_rows
            return [Batch(rows[i:i + size]) for i in range(0, len(rows), size)]
        encoded = self.inner.val_encoded
        return [self.inner._collate([[j] for j in range(i, min(i + size, len(encoded)))], False, encoded)
                for i in range(0, len(encoded), size)]

    def agreement(self, model, device) -> float | None:
        """Share of validation positions where the model's top token is the teacher's."""
        import torch

        batches = self._validation_batches()
        if not batches:
            return None
        same = total = 0
        with torch.no_grad():
            for i, batch in enumerate(batches):
                batch = batch.to(device)
                logits, targets = token_logits(model, batch)
                keep = targets != IGNORE_INDEX
                if i not in self._val_teacher_top:
                    teacher_logits, _ = token_logits(self.teacher, batch)
                    self._val_teacher_top[i] = teacher_logits[keep].argmax(-1)
                same += int((logits[keep].argmax(-1) == self._val_teacher_top[i]).sum())
                total += int(keep.sum())
        return same / total if total else None

    def evaluate(self, trainer) -> dict[str, Any] | None:
        result = self.inner.evaluate(trainer) or {}
        if trainer.runtime.is_main and trainer.runtime.mode != "fsdp":
            agreement = self.agreement(trainer.model, trainer.runtime.device)
            if agreement is not None:
                result["val_top1_agreement"] = agreement
        return result or None

    def baseline(self, trainer) -> float | None:
        return self.inner.baseline(trainer)

    def report_extra(self, trainer) -> dict[str, Any]:
        k = self.config.distill
        return {"title": self.title if self.alpha > 0 else "Hard-label baseline run",
                "distill": {"alpha": k.alpha, "temperature": k.temperature, "kl": k.kl, "top_k": k.top_k,
                            "teacher": teacher_spec(self.config), "cache_hits": self.cache_hits},
                "student": {**self.student_info, "parameters": trainer.model.num_parameters()},
                "teacher_parameters": self.teacher.num_parameters(), "data_kind": self.config.data.kind}


# -- running ------------------------------------------------------------------------------------------

def _stderr(message: str) -> None:
    import sys

    print(message, file=sys.stderr, flush=True)


def train_student(config: DistillConfig, teacher=None, resume: bool = False, progress: bool = True,
                  log=_stderr, leave_group: bool = True) -> dict[str, Any]:
    """One run of the loop with `DistillTask`; writes OUT/model. Returns the report (rank 0).

    A resumed run whose report already covers ``train.max_steps`` is not run again. With
    ``leave_group=False`` a distributed run keeps its process group for a run that follows."""
    import json

    from lmforge.train.distributed import shutdown
    from lmforge.train.loop import Trainer

    out = Path(config.train.out)
    done = out / "report.json"
    if resume and done.is_file() and (out / "model" / "config.json").is_file():
        report = json.loads(done.read_text(encoding="utf-8"))
        if report.get("steps") == config.train.max_steps:
            log(f"{out}: already trained {report['steps']} steps")
            return report
    trainer = Trainer(config, resume=resume, progress=progress, log=log, task=DistillTask(config, teacher))
    try:
        report = trainer.run()
        if trainer.runtime.is_main:
            from lmforge.io.atomic import write_json_atomic, write_text_atomic
            from lmforge.model.checkpoint import save_hf_model

            report["output"] = str(save_hf_model(trainer.model, out / "model", trainer.tokenizer, overwrite=True))
            write_json_atomic(out / "report.json", report)
            write_text_atomic(out / "distill.yaml", to_yaml(config))
        return report
    finally:
        if leave_group:
            shutdown(trainer.runtime)


def baseline_config(config: DistillConfig) -> DistillConfig:
    """The same student, data and steps with hard labels only, under OUT/baseline."""
    return dataclasses.replace(config, distill=dataclasses.replace(config.distill, alpha=0.0, cache_teacher=False),
                               train=dataclasses.replace(config.train, out=str(Path(config.train.out) / "baseline")))


def distill(config: DistillConfig, resume: bool = False, progress: bool = True, log=_stderr) -> dict[str, Any]:
    """The distillation run, the hard-label baseline (``distill.baseline``) and the comparison.

    Returns ``{"distilled": report, "baseline": report or None, "comparison": {...}}`` (rank 0;
    other processes of a distributed run return {})."""
    from lmforge.io.atomic import write_json_atomic, write_text_atomic

    import torch.distributed as dist

    teacher = load_teacher(teacher_spec(config))
    try:
        # Every process trains both students (one process group for both runs); rank 0 compares.
        distilled = train_student(config, teacher, resume, progress, log, leave_group=False)
        baseline = None
        if config.distill.baseline and config.distill.alpha > 0:
            if distilled:
                log("training the same student on hard labels only (alpha 0), the baseline")
            baseline = train_student(baseline_config(config), teacher, resume, progress, log, leave_group=False)
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    if not distilled:  # not the main process of a distributed run
        return {}
    comparison = compare(config, teacher.cpu(), Path(distilled["output"]),
                         Path(baseline["output"]) if baseline else None, progress=progress, log=log)
    comparison["distilled_run"] = {k: distilled[k] for k in ("steps", "tokens", "train_seconds", "tokens_per_s")}
    if baseline:
        comparison["baseline_run"] = {k: baseline[k] for k in ("steps", "tokens", "train_seconds", "tokens_per_s")}
    out = Path(config.train.out)
    write_json_atomic(out / "comparison.json", comparison)
    write_text_atomic(out / "comparison.md", format_comparison(comparison))
    return {"distilled": distilled, "baseline": baseline, "comparison": comparison}


# -- the comparison -------------------------------------------------------------------------------------

def heldout_texts(config: DistillConfig) -> list[str]:
    """The held-out texts of the recipe (eval.heldout, else the text data's validation split)."""
    import json

    spec = config.eval.heldout
    path = Path(spec) if spec else Path(config.data.path) / "text" / "validation.jsonl"
    if not path.is_file():
        if spec:
            raise LmforgeError(f"eval.heldout: no such file {path}")
        return []
    if path.suffix in (".jsonl", ".json"):
        texts = []
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                try:
                    texts.append(str(json.loads(line)["text"]))
                except (ValueError, KeyError, TypeError):
                    raise LmforgeError(f"{path}:{number}: expected a JSON object with a 'text' field") from None
        return texts
    return [path.read_text(encoding="utf-8")]


def _limit_tokens(texts: list[str], tokenizer, budget: int) -> list[str]:
    """The first texts, the last one cut, holding about ``budget`` tokens."""
    kept, used = [], 0
    for text in texts:
        ids = tokenizer.encode(text, add_special_tokens=False)
        if used + len(ids) >= budget:
            if budget - used > 1:
                kept.append(tokenizer.decode(ids[:budget - used]))
            break
        kept.append(text)
        used += len(ids)
    return kept


def top1_agreement(models: dict[str, Any], reference, token_ids: list[int], window: int) -> dict[str, float]:
    """For each model, the share of positions of ``token_ids`` (read in disjoint windows) where its
    most likely next token equals ``reference``'s."""
    import torch

    same = {name: 0 for name in models}
    total = 0
    with torch.no_grad():
        for start in range(0, max(len(token_ids) - 1, 0), window):
            chunk = torch.tensor([token_ids[start:start + window]])
            if chunk.shape[1] < 2:
                break
            want = reference(chunk).argmax(-1)
            for name, model in models.items():
                same[name] += int((model(chunk).argmax(-1) == want).sum())
            total += chunk.shape[1]
    return {name: same[name] / total if total else float("nan") for name in models}


def simulated_acceptance(matches: Sequence[bool], draft: int) -> dict[str, float]:
    """Greedy speculative decoding along a target's greedy continuation, from whether the draft's
    greedy token equals the target's at each position (given the target's prefix).

    Each round the draft proposes ``draft`` tokens; the target verifies them in one forward pass,
    keeps the agreeing prefix and adds its own next token. Returns the share of drafted tokens
    accepted and the tokens produced per target forward pass (1 with no draft at all)."""
    position, rounds, proposed, accepted = 0, 0, 0, 0
    n = len(matches)
    while position < n:
        rounds += 1
        run = 0
        while run < draft and position + run < n and matches[position + run]:
            run += 1
        proposed += min(draft, n - position)
        accepted += run
        position += run + 1
    return {"acceptance": accepted / proposed if proposed else float("nan"),
            "tokens_per_target_pass": n / rounds if rounds else float("nan")}


def _weights_bytes(model) -> int:
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel() * p.element_size()
    return total


def _model_file_bytes(spec: str) -> tuple[int, str]:
    """Bytes of a model's weight files on disk, and their format."""
    from lmforge.model.registry import resolve

    resolved = resolve(spec)
    path = Path(resolved.path)
    if path.is_file():
        return path.stat().st_size, resolved.format
    return sum(f.stat().st_size for f in path.glob("*.safetensors")), "safetensors"


def _decode_speed(models: dict[str, Any], tokenizer, prompts: list[str], tokens: int, rounds: int,
                  log=_stderr) -> tuple[dict[str, dict[str, float]], dict[str, list]]:
    """Greedy decode tokens/s of each model through lmforge's engine, rounds alternating between the
    models on the same prompts; the median round counts. Also returns each model's completions."""
    from lmforge.infer import SamplingParams
    from lmforge.infer.engine import Generator

    params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
    rates: dict[str, list[float]] = {name: [] for name in models}
    completions: dict[str, list] = {}
    for _ in range(rounds):
        for name, model in models.items():
            start = time.perf_counter()
            done = Generator(model, tokenizer).generate(prompts, params)
            seconds = time.perf_counter() - start
            rates[name].append(sum(c.completion_tokens for c in done) / seconds)
            completions[name] = done
    return ({name: {"tokens_per_s": sorted(r)[len(r) // 2], "rounds": [round(x, 2) for x in r]}
             for name, r in rates.items()}, completions)


def greedy_agreement(teacher, students: dict[str, Any], prompts_ids: list[list[int]], continuations: list[list[int]],
                     draft: int) -> dict[str, dict[str, float]]:
    """Along the teacher's greedy continuations: how often each student's greedy token is the
    teacher's, and the simulated greedy speculative decoding with the student as draft."""
    import torch

    out = {}
    for name, student in students.items():
        matches: list[bool] = []
        per_prompt = []
        for prompt, generated in zip(prompts_ids, continuations):
            ids = torch.tensor([list(prompt) + list(generated)])
            with torch.no_grad():
                predicted = student(ids[:, :-1]).argmax(-1)[0, len(prompt) - 1:]
            agree = [bool(a == b) for a, b in zip(predicted.tolist(), generated)]
            matches += agree
            per_prompt.append(simulated_acceptance(agree, draft)["tokens_per_target_pass"])
        sim = simulated_acceptance(matches, draft)  # pooled token agreement
        out[name] = {"greedy_token_agreement": sum(matches) / len(matches) if matches else float("nan"),
                     "draft_acceptance": sim["acceptance"],
                     "tokens_per_teacher_pass": sum(per_prompt) / len(per_prompt) if per_prompt else float("nan")}
    return out


def compare(config: DistillConfig, teacher, student_dir: Path, baseline_dir: Path | None = None,
            progress: bool = True, log=_stderr) -> dict[str, Any]:
    """Teacher, distilled student and hard-label baseline side by side (see the module docstring)."""
    from lmforge.eval.perplexity import perplexity
    from lmforge.io.progress import Progress
    from lmforge.model.checkpoint import load_hf_model
    from lmforge.model.loading import load_tokenizer
    from lmforge.model.registry import resolve

    e = config.eval
    tokenizer = load_tokenizer(resolve(str(student_dir)))
    models = {"teacher": teacher.eval(), "student": load_hf_model(student_dir).eval()}
    if baseline_dir is not None:
        models["baseline"] = load_hf_model(baseline_dir).eval()
    steps = 2 + (1 if e.heldout_tokens else 0)
    bar = Progress("comparing", steps, unit="stages", enabled=progress)
    teacher_bytes, teacher_format = _model_file_bytes(teacher_spec(config))
    result: dict[str, Any] = {"teacher": teacher_spec(config), "models": {}}
    for name, model in models.items():
        entry = {"parameters": model.num_parameters(), "layers": model.config.n_layer,
                 "width": model.config.n_embd, "weights_bytes_fp32": _weights_bytes(model.float())}
        if name == "teacher":
            entry.update({"file_bytes": teacher_bytes, "file_format": teacher_format})
        else:
            directory = student_dir if name == "student" else baseline_dir
            entry.update({"file_bytes": (directory / "model.safetensors").stat().st_size,
                          "file_format": "safetensors", "path": str(directory)})
        result["models"][name] = entry

    # Held-out text: perplexity of each model and top-1 agreement with the teacher.
    window = e.window or config.data.seq_len
    texts = _limit_tokens(heldout_texts(config), tokenizer, e.heldout_tokens) if e.heldout_tokens else []
    if texts:
        ids: list[int] = []
        for text in texts:
            ids += tokenizer.encode(text, add_special_tokens=False)
        for name, model in models.items():
            scored = perplexity(model, texts, tokenizer=tokenizer, window=window, stride=max(1, window // 2))
            result["models"][name].update({"heldout_ppl": scored.ppl, "heldout_bpb": scored.bpb})
        agreement = top1_agreement({k: v for k, v in models.items() if k != "teacher"}, teacher, ids, window)
        for name, value in agreement.items():
            result["models"][name]["heldout_top1_agreement"] = value
        result["heldout"] = {"tokens": len(ids), "texts": len(texts), "window": window, "stride": max(1, window // 2)}
        bar.update(1, info="held-out text")
    else:
        result["heldout"] = None
        log("no held-out text (eval.heldout, or the text data's validation split): perplexity not measured")

    # Decode speed through the engine (same prompts, alternating rounds), and greedy agreement.
    speed, completions = _decode_speed(models, tokenizer, list(e.prompts), e.decode_tokens, e.decode_rounds, log)
    for name, figures in speed.items():
        result["models"][name]["decode_tokens_per_s"] = figures["tokens_per_s"]
        result["models"][name]["decode_rounds_tokens_per_s"] = figures["rounds"]
    bar.update(steps - 1, info="decode speed")
    prompt_ids = [tokenizer.encode(p) for p in e.prompts]
    continuations = [c.token_ids for c in completions["teacher"]]
    drafts = greedy_agreement(teacher, {k: v for k, v in models.items() if k != "teacher"}, prompt_ids,
                              continuations, e.draft_tokens)
    for name, figures in drafts.items():
        result["models"][name].update(figures)
    result["speculative"] = {"engine_has_speculative_decoding": False, "draft_tokens": e.draft_tokens,
                             "note": "lmforge's engine has no speculative decoder: acceptance is simulated from the "
                                     "student's greedy tokens along the teacher's greedy continuations"}
    result["decode"] = {"prompts": len(e.prompts), "tokens": e.decode_tokens, "rounds": e.decode_rounds,
                        "engine": "lmforge.infer.engine.Generator (greedy, ignore_eos)"}
    bar.update(steps, info="greedy agreement")
    bar.close()
    t = result["models"]["teacher"]
    for name in ("student", "baseline"):
        if name in result["models"]:
            m = result["models"][name]
            m["parameter_ratio"] = m["parameters"] / t["parameters"]
            m["decode_speedup"] = m["decode_tokens_per_s"] / t["decode_tokens_per_s"]
    return result


def format_comparison(c: dict[str, Any]) -> str:
    models = c["models"]
    names = list(models)
    title = {"teacher": "teacher", "student": "distilled student", "baseline": "hard-label baseline"}

    def row(label: str, key: str, fmt) -> str:
        cells = [fmt(models[n][key]) if models[n].get(key) is not None else "-" for n in names]
        return f"| {label} | " + " | ".join(cells) + " |"

    lines = [f"# Distillation: {c['teacher']} -> student", "",
             "| | " + " | ".join(title.get(n, n) for n in names) + " |", "|---|" + "---:|" * len(names),
             row("layers", "layers", str), row("parameters", "parameters", lambda v: f"{v / 1e6:.1f}M"),
             "| weights file | " + " | ".join(f"{models[n]['file_bytes'] / 2 ** 20:.0f} MiB ({models[n]['file_format']})"
                                               for n in names) + " |",
             row("weights (fp32)", "weights_bytes_fp32", lambda v: f"{v / 2 ** 20:.0f} MiB"),
             row("decode tokens/s (engine, greedy)", "decode_tokens_per_s", lambda v: f"{v:.1f}")]
    if c.get("heldout"):
        lines += [row("held-out perplexity", "heldout_ppl", lambda v: f"{v:.2f}"),
                  row("held-out bits/byte", "heldout_bpb", lambda v: f"{v:.3f}"),
                  row("held-out top-1 agreement with teacher", "heldout_top1_agreement", lambda v: f"{100 * v:.1f}%")]
    lines += [row("greedy token agreement (draft proxy)", "greedy_token_agreement", lambda v: f"{100 * v:.1f}%"),
              row(f"simulated draft acceptance (k={c['speculative']['draft_tokens']})", "draft_acceptance",
                  lambda v: f"{100 * v:.1f}%"),
              row("tokens per teacher pass (simulated)", "tokens_per_teacher_pass", lambda v: f"{v:.2f}")]
    lines += [""]
    if c.get("heldout"):
        h = c["heldout"]
        lines.append(f"Held-out text: {h['tokens']:,} tokens in {h['texts']} text(s), window {h['window']}, "
                     f"stride {h['stride']}.")
    d = c["decode"]
    lines.append(f"Decode: {d['prompts']} prompts x {d['tokens']} tokens, {d['rounds']} alternating rounds "
                 f"(median), {d['engine']}.")
    lines.append(c["speculative"]["note"] + ".")
    for key in ("distilled_run", "baseline_run"):
        if key in c:
            r = c[key]
            lines.append(f"{key.replace('_', ' ')}: {r['steps']} steps, {r['tokens']:,} tokens, "
                         f"{r['train_seconds']:.0f} s ({r['tokens_per_s']:.0f} tokens/s).")
    return "\n".join(lines) + "\n"
