"""The pretraining loop (P1-P5, P7, P9): `pretrain(config)` behind ``lmforge pretrain``.

One optimizer step, read top to bottom in `Trainer.train_step`:

1. set the learning rate from the (stateless) schedule;
2. for each of ``grad_accum`` micro-batches: take the next rows of the data stream,
   run forward under autocast, compute next-token cross-entropy, and backward
   ``loss / grad_accum`` (gradients add up, so accumulation equals one larger batch);
   under DDP/FSDP the gradient sync runs only on the last micro-batch;
3. clip the global gradient norm, step AdamW, clear the gradients.

Around it: periodic validation loss and bits per byte, sample generations, throughput
and MFU, loss-spike detection, a progress line, ``logs/train.jsonl``, checkpoints
every ``save_interval`` steps (atomic, keep-last-N, see checkpoint.py) and a final report
with plots. ``--resume`` restores weights, optimizer moments, RNG states, the data
position and the loop's counters from the newest complete checkpoint, so a run killed at
any point continues with exactly the losses it would have had.

One loop for every objective. What differs between pretraining and fine-tuning is a
*task* (`TrainingTask`): it makes the model, hands out the micro-batches of an endless,
seeded stream (`Batch`: input ids, labels with -100 where no loss is taken, optional
packed-sequence lengths) as a pure function of the data position, and evaluates. The loop
owns everything else: wrapping for DDP/FSDP, precision, accumulation, clipping, the
schedule, checkpoints and exact resume, telemetry, spike detection, plots and the report.
`PretrainTask` is pretraining on packed token rows; lmforge/tune/sft.py is supervised
fine-tuning on chat data; alignment objectives reuse the loop the same way::

    trainer = Trainer(config, task=MyTask(...))   # config: .train/.optim/.schedule sections
    report = trainer.run()

A task with ``token_mean = True`` has its loss averaged over the counted target tokens of
the whole optimizer step (all micro-batches, all processes): micro-batches of different
numbers of targets then weigh by their tokens, and accumulation still equals one larger
batch. Pretraining rows all have the same number of targets, so a mean of means is the
same thing there and its path stays as it was.

A task whose objective is not next-token loss (preference pairs, a reward head) defines
``loss(model, batch) -> (loss_sum, metric_sums)``: the loss summed over the batch's
``count`` items (``Batch.count``; pairs, say) and a dict of per-item metrics summed the
same way. Its batches may carry any tensors in ``Batch.extra`` (response masks,
precomputed reference log-probabilities). The loop then averages loss and metrics over the
items of the whole optimizer step, as for a token-mean task, and logs the metrics with the
loss; the loss runs inside the wrapped (DDP/FSDP) call like the token loss does.
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol

import numpy as np
import torch

from lmforge.data.pack import PackedDataset
from lmforge.errors import LmforgeError
from lmforge.io.allocator import keep_freed_memory
from lmforge.io.progress import Progress
from lmforge.train import checkpoint as ckpt
from lmforge.train.data import RowStream, dataset_tokenizer, ensure_dataset, token_byte_lengths
from lmforge.train.fused_ce import linear_cross_entropy
from lmforge.train.loss import IGNORE_INDEX, with_router_loss
from lmforge.train.distributed import (Runtime, TrainingObjective, barrier, full_model_state, full_optimizer_state,
                                       init_runtime, load_full_state, mean_across, shutdown, sum_across, wrap_model)
from lmforge.train.optim import build_optimizer
from lmforge.train.recipe import PretrainConfig, to_yaml
from lmforge.train.schedule import lr_factor
from lmforge.train.telemetry import JsonlLog, SpikeDetector, peak_tflops, plot_run, read_log


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def resolve_precision(precision: str, device: torch.device) -> str:
    """fp32 | bf16 | fp16; "auto" follows lmforge's precision policy (lmforge/model/precision.py):
    bf16 on GPUs that have it and on CPUs with bf16 units (AMX, AVX512-BF16), else fp32."""
    from lmforge.model.loading import pick_dtype

    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise LmforgeError("train.precision bf16 is not supported by this GPU; use fp16 or fp32")
    if precision in (None, "auto") and device.type == "cpu":
        from lmforge.model.precision import auto_plan

        return auto_plan("cpu").train
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[pick_dtype(precision, device)]


def unigram_baseline(train: RowStream, val_rows: torch.Tensor, vocab_size: int, max_rows: int = 4096) -> float:
    """Cross-entropy (nats/token) on the validation targets of a unigram model of the training
    rows (add-one smoothing): the loss of a model that ignores context altogether."""
    n = min(len(train.dataset), max_rows)
    counts = np.bincount(np.concatenate([train.dataset[i] for i in range(n)]).astype(np.int64),
                         minlength=vocab_size).astype(np.float64) + 1.0
    logp = np.log(counts / counts.sum())
    targets = val_rows[:, 1:].reshape(-1).numpy()
    return float(-logp[targets].mean())


# -- the task interface -----------------------------------------------------------------------

@dataclass
class Batch:
    """One micro-batch for one process.

    ``labels`` are the targets (None: ``input_ids`` themselves); position t is trained to
    predict ``labels[:, t+1]``, and -100 marks positions that carry no loss (prompts,
    padding). ``lengths`` (None: one sequence per row) lists, for each row, the lengths of
    the sequences packed end to end in it: attention and next-token targets stay inside
    each sequence, and whatever follows the last one in a row is padding. ``tokens`` is the
    number of real (non-padding) tokens, for throughput.
    """

    input_ids: torch.Tensor
    labels: torch.Tensor | None = None
    lengths: list[list[int]] | None = None
    tokens: int = 0
    extra: dict[str, torch.Tensor] | None = None  # a task's own tensors (see the module docstring)
    count: int | None = None  # items a task's own loss is summed over (None: counted targets)

    def to(self, device: torch.device) -> "Batch":
        labels = None if self.labels is None else self.labels.to(device, non_blocking=True)
        extra = None if self.extra is None else {k: v.to(device, non_blocking=True) for k, v in self.extra.items()}
        return Batch(self.input_ids.to(device, non_blocking=True), labels, self.lengths, self.tokens, extra, self.count)

    def target_count(self) -> int:
        """Positions whose next-token target counts (what a token-mean loss divides by); for a
        task with its own loss, ``count``."""
        if self.count is not None:
            return self.count
        targets = (self.input_ids if self.labels is None else self.labels)[:, 1:]
        if self.lengths is None:
            return int((targets != IGNORE_INDEX).sum())
        count = 0
        for row, lengths in enumerate(self.lengths):
            start = 0
            for n in lengths:  # the target after a sequence's last token belongs to the next one
                count += int((targets[row, start:start + n - 1] != IGNORE_INDEX).sum())
                start += n
        return count


class TrainingTask(Protocol):
    """What the loop asks of an objective (see the module docstring).

    ``setup`` runs once per process after the runtime is known (rank 0 may build data
    there; a barrier follows). ``build_model`` runs after the seed is set, so every process
    builds the same weights. ``batch(position, count)`` returns stream items
    position..position+count-1 and must depend on nothing else (exact resume, and the same
    rows on 1 or N processes). ``evaluate`` runs on every process (it may use collectives)
    and returns the validation record or None.
    """

    title: str  # the report's heading
    token_mean: bool  # average the loss over the step's counted targets (see the module docstring)
    tokenizer: Any
    seq_len: int  # the longest row, for the FLOPs estimate

    def setup(self, trainer: "Trainer") -> None: ...
    def build_model(self, trainer: "Trainer") -> torch.nn.Module: ...
    def batch(self, position: int, count: int) -> Batch: ...
    def evaluate(self, trainer: "Trainer") -> dict[str, float] | None: ...
    def baseline(self, trainer: "Trainer") -> float | None: ...
    def report_extra(self, trainer: "Trainer") -> dict[str, Any]: ...
    # Optional: ``checkpoint_state(trainer, model_state) -> state`` of a plain Transformer for the
    # checkpoint's Hugging Face files (e.g. adapters merged into the base weights).
    # Optional: ``checkpoint_extra(trainer, model_state) -> {file name: tensors}`` (weights the
    # Hugging Face files cannot name, saved beside them) and ``restore_state(directory, model_state)
    # -> model_state`` (adds them back on resume).
    # Optional: ``write_model_files(trainer, model_state, directory)`` writes the checkpoint's model
    # files for a model that is not a decoder-only Transformer (encoder-decoder translators).
    # Optional: ``loss(model, batch) -> (loss_sum, metric_sums)``, the task's own objective;
    # ``evaluate_at_start = True`` (evaluate the starting model as step 0);
    # ``format_report(report) -> markdown`` for report.md.


def packed_causal_lm_loss(model: torch.nn.Module, input_ids: torch.Tensor, labels: torch.Tensor | None,
                          lengths: list[list[int]], reduction: str = "mean") -> torch.Tensor:
    """`causal_lm_loss` for rows that each hold several sequences end to end.

    The real tokens of all rows become one packed stream, which the model runs with
    attention confined to each sequence and positions restarting at 0 in each
    (`Transformer.encode_packed`); each sequence's last token predicts nothing. The result
    equals the sum (or token mean) of the sequences' losses computed one by one.
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    targets_of = input_ids if labels is None else labels
    ids, targets, flat = [], [], []
    for row, row_lengths in enumerate(lengths):
        used = sum(row_lengths)
        ids.append(input_ids[row, :used])
        shifted = torch.full((used,), IGNORE_INDEX, dtype=torch.long, device=input_ids.device)
        shifted[:used - 1] = targets_of[row, 1:used]
        ends = torch.tensor(row_lengths, device=input_ids.device).cumsum(0) - 1
        shifted[ends] = IGNORE_INDEX
        targets.append(shifted)
        flat += row_lengths
    hidden = model.encode_packed(torch.cat(ids), flat)
    head = model.lm_head
    targets = torch.cat(targets)
    loss = linear_cross_entropy(hidden, head.weight, targets, ignore_index=IGNORE_INDEX, reduction=reduction)
    return with_router_loss(model, loss, targets, reduction)


class SequenceObjective(TrainingObjective):
    """`TrainingObjective` that also takes packed rows: ``objective(ids, labels, lengths=...)``."""

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None, reduction: str = "mean",
                lengths: list[list[int]] | None = None):
        if lengths is None:
            return super().forward(input_ids, labels, reduction=reduction)
        return packed_causal_lm_loss(self.model, input_ids, labels, lengths, reduction)


class TaskObjective(SequenceObjective):
    """The model and a task's own loss as one module (what DDP/FSDP wrap): ``objective(batch)``
    runs the task's loss; called with ids it is still the next-token loss (for evaluation)."""

    def __init__(self, model: torch.nn.Module, task: Any) -> None:
        super().__init__(model)
        self.task_loss = task.loss

    def forward(self, batch, *args, **kwargs):
        if isinstance(batch, Batch):
            return self.task_loss(self.model, batch)
        return super().forward(batch, *args, **kwargs)


class PretrainTask:
    """Pretraining: packed token rows of ``config.data`` (built on first use), next-token loss on
    every position; validation loss, perplexity and bits per byte on fixed validation rows."""

    title = "Pretraining run"
    token_mean = False

    def __init__(self, config: PretrainConfig) -> None:
        self.config = config

    def setup(self, trainer: "Trainer") -> None:
        config, t = self.config, self.config.train
        # Data: built once (by rank 0) if the recipe names sources instead of a ready directory.
        if trainer.runtime.is_main:
            ensure_dataset(config.data, trainer.log)
        barrier(trainer.runtime)
        data_dir = Path(config.data.path)
        train_set = PackedDataset(data_dir, "train")
        self.seq_len = train_set.seq_len
        self.stream = RowStream(train_set, t.seed)
        self.tokenizer = dataset_tokenizer(data_dir, train_set.index, config.data.tokenizer)
        self.val_rows = self._validation_rows(data_dir, trainer)
        self.byte_lengths = torch.from_numpy(token_byte_lengths(self.tokenizer))

    def _validation_rows(self, data_dir: Path, trainer: "Trainer") -> torch.Tensor:
        """The fixed validation rows: eval_batches x global micro-batch, a multiple of world size."""
        t, world = self.config.train, trainer.runtime.world_size
        try:
            val = PackedDataset(data_dir, "validation")
        except LmforgeError:
            trainer.log(f"{data_dir} has no validation split: no validation loss")
            return torch.zeros(0, self.seq_len, dtype=torch.int64)
        n = min(len(val), t.eval_batches * t.batch_size * world) // world * world
        if n == 0:
            return torch.zeros(0, self.seq_len, dtype=torch.int64)
        return torch.from_numpy(np.stack([val[i] for i in range(n)]).astype(np.int64))

    def build_model(self, trainer: "Trainer"):
        from lmforge.model.transformer import Transformer
        from lmforge.train.recipe import model_config_of

        m = self.config.model
        vocab = self.tokenizer.vocab_size
        if m.init_from:
            from lmforge.model.loading import load_model
            from lmforge.model.registry import resolve

            model = load_model(resolve(m.init_from), torch.float32, "cpu")
            if model.config.vocab_size < vocab:
                raise LmforgeError(f"model.init_from has {model.config.vocab_size} token ids, the data's tokenizer {vocab}")
            return model.float()
        return Transformer(model_config_of(m, vocab, self.seq_len, self.tokenizer.bos_id, self.tokenizer.eos_id))

    def batch(self, position: int, count: int) -> Batch:
        rows = self.stream.rows(position, count)
        return Batch(rows, tokens=rows.numel())

    def baseline(self, trainer: "Trainer") -> float | None:
        return unigram_baseline(self.stream, self.val_rows, trainer.model.config.vocab_size) \
            if len(self.val_rows) else None

    @torch.no_grad()
    def evaluate(self, trainer: "Trainer") -> dict[str, float] | None:
        if not len(self.val_rows):
            return None
        runtime = trainer.runtime
        world, rank, batch = runtime.world_size, runtime.rank, self.config.train.batch_size
        mine = self.val_rows[rank::world]
        nats = torch.zeros((), dtype=torch.float64, device=runtime.device)
        tokens = torch.zeros((), dtype=torch.float64, device=runtime.device)
        nbytes = torch.zeros((), dtype=torch.float64, device=runtime.device)
        for i in range(0, len(mine), batch):
            rows = mine[i:i + batch]
            with trainer.autocast():
                loss = trainer.wrapped(rows.to(runtime.device), reduction="sum")
            nats += loss.double()
            tokens += rows[:, 1:].numel()
            nbytes += float(self.byte_lengths[rows[:, 1:]].sum())
        nats, tokens, nbytes = (sum_across(v, runtime) for v in (nats, tokens, nbytes))
        val_loss = float(nats / tokens)
        return {"val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50.0)),
                "val_bpb": float(nats / math.log(2) / nbytes) if float(nbytes) else float("nan")}

    def report_extra(self, trainer: "Trainer") -> dict[str, Any]:
        return {}


def default_task(config: PretrainConfig) -> TrainingTask:
    """The task a pretraining recipe's objective names: next-token `PretrainTask`, or masked LM."""
    objective = getattr(config, "objective", None)
    if objective is not None and objective.name == "mlm":
        from lmforge.train.mlm import MaskedLMTask

        return MaskedLMTask(config)
    return PretrainTask(config)


class Trainer:
    def __init__(self, config: PretrainConfig, resume: bool = False, progress: bool = True,
                 log: Callable[[str], None] = _stderr, task: TrainingTask | None = None) -> None:
        config.validate()
        self.config, self.progress_enabled = config, progress
        self.task: TrainingTask = task if task is not None else default_task(config)
        t = config.train
        if t.threads:
            torch.set_num_threads(t.threads)
        self.runtime: Runtime = init_runtime(t.distributed, t.device)
        if self.runtime.device.type == "cpu":
            keep_freed_memory(large_blocks=True)  # each step's large tensors reuse the last step's memory
        self.log = log if self.runtime.is_main else (lambda _m: None)
        self.out = Path(t.out)
        self.ckpt_root = self.out / "checkpoints"
        self.precision = resolve_precision(t.precision, self.runtime.device)

        resume_dir = ckpt.latest_checkpoint(self.ckpt_root) if resume else None
        if not resume and ckpt.list_checkpoints(self.ckpt_root):
            raise LmforgeError(f"{self.out} already holds checkpoints: pass --resume to continue the run, "
                               "or choose another --train.out")
        if resume and resume_dir is None:
            self.log(f"no complete checkpoint in {self.ckpt_root}: starting from step 0")

        self.task.setup(self)
        self.seq_len = self.task.seq_len
        self.tokenizer = self.task.tokenizer

        torch.manual_seed(t.seed)  # the same initial weights on every process
        self.model = self.task.build_model(self)
        self.model.to(self.runtime.device)
        if t.precision == "auto" and self.precision == "bf16" and self.runtime.device.type == "cpu":
            from lmforge.model.precision import bf16_pays

            if not bf16_pays(self.model):  # a small model: the casts would cost more than bf16 saves
                self.precision = "fp32"
        self.model.gradient_checkpointing = t.gradient_checkpointing
        self.model.train()
        self.own_loss = callable(getattr(self.task, "loss", None))
        self.wrapped = wrap_model(self.model, self.runtime, TaskObjective(self.model, self.task) if self.own_loss
                                  else SequenceObjective(self.model))
        o = config.optim
        self.optimizer = build_optimizer(self.model, o.name, o.lr, o.betas, o.eps, o.weight_decay, o.decay_embeddings,
                                         fused=self.runtime.mode != "fsdp")
        self.scaler = torch.amp.GradScaler(self.runtime.device.type) if self.precision == "fp16" else None
        self.spikes = SpikeDetector(t.spike_factor)
        self.step = 0
        self.data_position = 0  # training rows consumed from the stream, by all processes
        self.tokens_seen = 0
        self.elapsed = 0.0  # training seconds over all attempts (checkpointed)
        if resume_dir is not None:
            self._restore(resume_dir)
        self.global_micro = t.batch_size * self.runtime.world_size
        self.tokens_per_step = self.global_micro * t.grad_accum * self.seq_len  # the most a step can hold
        from lmforge.train.estimate import training_flops_per_token

        self.flops_per_token = training_flops_per_token(self.model.config, self.seq_len)["total"]
        self.peak, self.peak_source = peak_tflops(self.runtime.device, self.precision, t.peak_tflops)
        self.jsonl = JsonlLog(self.out / "logs" / "train.jsonl", self.step if resume_dir is not None else None,
                              enabled=self.runtime.is_main)
        self.baseline = self.task.baseline(self)
        if self.runtime.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            from lmforge.io.atomic import write_text_atomic

            write_text_atomic(self.out / "recipe.yaml", to_yaml(config))

    # -- setup -------------------------------------------------------------------------
    def _restore(self, directory: Path) -> None:
        saved = ckpt.load_checkpoint(directory)
        if saved["config"].to_dict() | {"extra": {}} != self.model.config.to_dict() | {"extra": {}}:
            raise LmforgeError(f"{directory} holds a different model architecture than the recipe")
        model_state = saved["model"]
        restore = getattr(self.task, "restore_state", None)  # weights kept outside the HF files (see save)
        if restore is not None:
            model_state = restore(directory, model_state)
        load_full_state(self.wrapped, self.optimizer, model_state, saved["optimizer"])
        state = saved["state"]
        self.step, self.tokens_seen, self.elapsed = state["step"], state["tokens_seen"], state["elapsed"]
        self.data_position = state["data_position"]
        self.spikes.load(state["spike_history"])
        if self.scaler is not None and state.get("grad_scaler"):
            self.scaler.load_state_dict(state["grad_scaler"])
        ckpt.set_rng_state(*saved["rng"])
        self.log(f"resumed from {directory} (step {self.step})")

    # -- one step ------------------------------------------------------------------------
    def autocast(self):
        if self.precision == "fp32":
            return contextlib.nullcontext()
        if self.precision == "bf16" and self.runtime.device.type == "cpu" and not self.model.gradient_checkpointing:
            # On CPU only the products go to bf16 (float32 weights, norms, attention and
            # loss): lmforge/model/onednn.py's `bf16_products`, faster there than autocast.
            # Activation checkpointing recomputes blocks during backward, outside this block,
            # and restores only autocast's state there: with it, plain autocast below.
            from lmforge.model.onednn import bf16_products

            return bf16_products()
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        return torch.autocast(self.runtime.device.type, dtype=dtype)

    _autocast = autocast

    def _grad_sync(self, enabled: bool):
        """Skip DDP's all-reduce / FSDP's reduce-scatter on all but the last micro-batch."""
        if self.runtime.mode == "ddp" and not enabled:
            return self.wrapped.no_sync()
        if self.runtime.mode == "fsdp":
            self.wrapped.set_requires_gradient_sync(enabled)
        return contextlib.nullcontext()

    def loss(self, batch: Batch, reduction: str = "mean") -> torch.Tensor:
        """The wrapped objective on one micro-batch (already on the device)."""
        if batch.labels is None and batch.lengths is None:
            return self.wrapped(batch.input_ids, reduction=reduction)
        return self.wrapped(batch.input_ids, batch.labels, reduction=reduction, lengths=batch.lengths)

    def train_step(self) -> dict[str, float]:
        t = self.config.train
        lr = self.config.optim.lr * lr_factor(self.step, t.max_steps, self.config.schedule.name,
                                              self.config.schedule.warmup_steps, self.config.schedule.min_lr_ratio,
                                              self.config.schedule.decay_fraction)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        batches = [self.task.batch(self.data_position + micro * self.global_micro + self.runtime.rank * t.batch_size,
                                   t.batch_size) for micro in range(t.grad_accum)]
        total = torch.zeros((), device=self.runtime.device)
        metric_sums: dict[str, torch.Tensor] = {}
        token_mean = self.task.token_mean or self.own_loss
        if token_mean:
            # Every process divides its summed loss by the step's targets on all processes;
            # data-parallel gradient averaging divides by the world size again, hence the factor.
            count = sum_across(torch.tensor(float(sum(b.target_count() for b in batches)),
                                            device=self.runtime.device), self.runtime)
            divisor = max(float(count), 1.0) / self.runtime.world_size
        for micro, batch in enumerate(batches):
            batch = batch.to(self.runtime.device)
            with self._grad_sync(micro == t.grad_accum - 1):
                with self.autocast():
                    if self.own_loss:
                        loss, metrics = self.wrapped(batch)
                        scaled = loss / divisor
                        for key, value in metrics.items():
                            value = torch.as_tensor(value, dtype=torch.float32).detach().to(self.runtime.device)
                            metric_sums[key] = metric_sums.get(key, 0.0) + value
                    elif self.task.token_mean:
                        loss = self.loss(batch, reduction="sum")
                        scaled = loss / divisor
                    else:
                        loss = self.loss(batch)
                        scaled = loss / t.grad_accum
                (self.scaler.scale(scaled) if self.scaler else scaled).backward()
            total += loss.detach().float()
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        # With no clipping the norm is still measured (an infinite bound changes nothing), for the log.
        max_norm = t.clip_grad_norm if t.clip_grad_norm is not None else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
        if hasattr(norm, "full_tensor"):
            norm = norm.full_tensor()
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.data_position += t.grad_accum * self.global_micro
        if token_mean:
            step_tokens = int(sum_across(torch.tensor(float(sum(b.tokens for b in batches)),
                                                      device=self.runtime.device), self.runtime))
            loss_value = float(sum_across(total, self.runtime)) / max(float(count), 1.0)
        else:
            step_tokens = self.tokens_per_step
            loss_value = float(mean_across(total / t.grad_accum, self.runtime))
        self.tokens_seen += step_tokens
        means = {key: float(sum_across(value, self.runtime)) / max(float(count), 1.0)
                 for key, value in metric_sums.items()}
        # A mixture of experts' router losses of the last micro-batch (unweighted), for the log.
        router_losses = getattr(self.model, "router_losses", None)
        means.update({k: float(v.detach()) for k, v in (router_losses() if callable(router_losses) else {}).items()
                      if k != "router_loss"})
        return {"loss": loss_value, **{k: v for k, v in means.items() if k != "loss"}, "lr": lr,
                "grad_norm": float(norm), "step_tokens": step_tokens}

    # -- evaluation ----------------------------------------------------------------------
    def evaluate(self) -> dict[str, float] | None:
        """The task's validation record, with the model in eval mode."""
        self.model.eval()
        try:
            return self.task.evaluate(self)
        finally:
            self.model.train()

    def samples(self) -> list[dict[str, str]]:
        """Greedy continuations of the recipe's prompts (rank 0; not under FSDP, whose shards need every rank)."""
        t = self.config.train
        if not t.sample_prompts or not t.sample_tokens or self.runtime.mode == "fsdp" or not self.runtime.is_main:
            return []
        from lmforge.infer import SamplingParams
        from lmforge.infer.engine import Generator

        model = self.model
        model.eval()
        try:
            with torch.no_grad():
                params = SamplingParams(max_tokens=t.sample_tokens, temperature=0.0)
                done = Generator(model, self.tokenizer).generate(list(t.sample_prompts), params)
        finally:
            model.train()
        return [{"prompt": p, "completion": c.text} for p, c in zip(t.sample_prompts, done)]

    # -- checkpoints -----------------------------------------------------------------------
    def save(self) -> Path | None:
        model_state = full_model_state(self.wrapped)  # collective: every rank takes part
        optimizer_state = full_optimizer_state(self.wrapped, self.optimizer)
        path = None
        if self.runtime.is_main:
            # A task whose model is not a plain Transformer (adapters) says what the checkpoint's model files hold.
            # A task may keep weights its model family's files have no names for in extra
            # safetensors files ({file name: tensors}); its ``restore_state`` reads them back.
            extra_of = getattr(self.task, "checkpoint_extra", None)
            extra = extra_of(self, model_state) if extra_of is not None else None
            to_files = getattr(self.task, "checkpoint_state", None)
            if to_files is not None:
                model_state = to_files(self, model_state)
            loop_state = {"tokens_seen": self.tokens_seen, "elapsed": self.elapsed,
                          "data_position": self.data_position,
                          "spike_history": self.spikes.state(), "world_size": self.runtime.world_size,
                          "grad_scaler": self.scaler.state_dict() if self.scaler is not None else None}
            # A task whose model is not a decoder-only Transformer writes its own model files.
            writer = getattr(self.task, "write_model_files", None)
            write_model = (lambda directory: writer(self, model_state, directory)) if writer is not None else None
            path = ckpt.save_checkpoint(self.ckpt_root, self.step, self.model.config, model_state, optimizer_state,
                                        loop_state, self.tokenizer, self.config.train.keep_last, extra, write_model)
        barrier(self.runtime)
        return path

    # -- the run ---------------------------------------------------------------------------
    def mfu(self, tokens_per_s: float) -> float:
        """Model FLOPs utilisation at a rate of ``tokens_per_s`` (all processes together)."""
        return self.flops_per_token * tokens_per_s / (self.peak * 1e12 * self.runtime.world_size)

    def run(self) -> dict[str, Any]:
        t, rt = self.config.train, self.runtime
        n_params = self.model.num_parameters()
        self.log(f"training {n_params / 1e6:.2f}M parameters on {rt.world_size} process(es) ({rt.mode}, "
                 f"{rt.device.type}, {self.precision}); {self.tokens_per_step:,} tokens per step, "
                 f"steps {self.step}..{t.max_steps}")
        started_at_step = self.step
        progress = Progress("train", t.max_steps, unit="steps", enabled=self.progress_enabled and rt.is_main,
                            every=t.log_interval, initial=started_at_step)
        last_checkpoint = None
        window_start, window_tokens = time.perf_counter(), 0
        stop = t.stop_at_step or t.max_steps
        if self.step == 0 and getattr(self.task, "evaluate_at_start", False):
            self._evaluate_and_log(progress)
        while self.step < stop:
            step_start = time.perf_counter()
            stats = self.train_step()
            step_tokens = stats.pop("step_tokens")
            seconds = time.perf_counter() - step_start
            self.elapsed += seconds
            window_tokens += step_tokens
            tokens_per_s = step_tokens / seconds
            record = {"kind": "train", "step": self.step, **stats, "tokens": self.tokens_seen,
                      "tokens_per_s": tokens_per_s, "mfu": self.mfu(tokens_per_s), "step_seconds": seconds}
            self.jsonl.write(record)
            spike = self.spikes.check(stats["loss"])
            if spike is not None:
                self.jsonl.write({"kind": "spike", "step": self.step, **spike})
                self.log(f"loss spike at step {self.step}: {spike['loss']:.4f} (recent mean {spike['mean']:.4f})")
            running = max(1e-9, time.perf_counter() - window_start)
            remaining = (stop - self.step) * running / (self.step - started_at_step)
            rate = window_tokens / running
            final = self.step == t.max_steps
            progress.update(self.step, info=f"loss {stats['loss']:.4f}  lr {stats['lr']:.2e}  {rate / 1000:.1f}k tok/s",
                            eta=remaining, force=final)
            if self.step % t.eval_interval == 0 or final:
                self._evaluate_and_log(progress)
                for sample in self.samples():
                    self.jsonl.write({"kind": "sample", "step": self.step, **sample})
            if self.step % t.save_interval == 0 or final or self.step == stop:
                last_checkpoint = self.save()
        progress.close()
        report = self.report(last_checkpoint)
        self.jsonl.close()
        return report

    def _evaluate_and_log(self, progress: Progress) -> None:
        result = self.evaluate()
        if result is not None:
            self.jsonl.write({"kind": "eval", "step": self.step, **result})
            if not progress.tty:
                self.log(f"step {self.step}: validation loss {result['val_loss']:.4f}, "
                         + (f"{result['val_bpb']:.3f} bits/byte" if "val_bpb" in result else
                            ", ".join(f"{k} {v:.4f}" for k, v in result.items()
                                      if k not in ("val_loss", "val_ppl") and isinstance(v, float))))

    def report(self, last_checkpoint: Path | None) -> dict[str, Any]:
        """report.json + report.md + plots/training.png, from the run's JSONL log (rank 0)."""
        if not self.runtime.is_main:
            return {}
        from lmforge.io.atomic import write_json_atomic, write_text_atomic

        records = read_log(self.jsonl.path)
        train = [r for r in records if r["kind"] == "train"]
        evals = [r for r in records if r["kind"] == "eval"]
        samples = [r for r in records if r["kind"] == "sample" and r["step"] == self.step]
        spikes = [r for r in records if r["kind"] == "spike"]
        rates = sorted(r["tokens_per_s"] for r in train[1:]) or [r["tokens_per_s"] for r in train]
        median_rate = rates[len(rates) // 2] if rates else 0.0
        mean_rate = self.tokens_seen / self.elapsed if self.elapsed else 0.0  # what the run actually achieved
        plot = plot_run(records, self.out / "plots" / "training.png", self.baseline) if self.config.train.plots else None
        cfg = self.model.config
        report = {
            "steps": self.step, "tokens": self.tokens_seen, "parameters": self.model.num_parameters(),
            "model": {k: getattr(cfg, k) for k in ("family", "vocab_size", "n_layer", "n_embd", "n_head", "n_kv_head",
                                                   "intermediate_size", "max_position_embeddings")},
            "seq_len": self.seq_len, "tokens_per_step": self.tokens_per_step, "world_size": self.runtime.world_size,
            "distributed": self.runtime.mode, "device": self.runtime.device.type, "precision": self.precision,
            "train_seconds": self.elapsed, "tokens_per_s": mean_rate, "median_step_tokens_per_s": median_rate,
            "mfu": self.mfu(mean_rate),
            "peak_tflops": self.peak, "peak_source": self.peak_source, "flops_per_token": self.flops_per_token,
            "final_train_loss": train[-1]["loss"] if train else None,
            "first_train_loss": train[0]["loss"] if train else None,
            "validation": evals, "unigram_baseline_loss": self.baseline, "spikes": spikes, "samples": samples,
            "checkpoint": str(last_checkpoint) if last_checkpoint else None,
            "plot": str(plot) if plot else None,
            **self.task.report_extra(self),
        }
        write_json_atomic(self.out / "report.json", report)
        write_text_atomic(self.out / "report.md", getattr(self.task, "format_report", format_report)(report))
        return report


def format_report(r: dict[str, Any]) -> str:
    lines = [f"# {r.get('title', 'Pretraining run')}", "",
             f"- model: {r['model']['family']}, {r['parameters'] / 1e6:.2f}M parameters "
             f"({r['model']['n_layer']} layers, width {r['model']['n_embd']}, vocabulary {r['model']['vocab_size']})",
             f"- trained {r['steps']} steps, {r['tokens']:,} tokens ({r['tokens_per_step']:,} per step, "
             f"rows of {r['seq_len']}), {r['world_size']} process(es) ({r['distributed']}), {r['device']}, {r['precision']}",
             f"- throughput {r['tokens_per_s']:,.0f} tokens/s over {r['train_seconds']:.0f} s of training "
             f"(median step {r['median_step_tokens_per_s']:,.0f}); MFU {100 * r['mfu']:.1f}% "
             f"of {r['peak_tflops']:.3f} TFLOP/s ({r['peak_source']})"
             + (" - above 100%, so that peak is too low (measured while the machine was busy?); "
                "set train.peak_tflops" if r["mfu"] > 1 else ""),
             f"- train loss {r['first_train_loss']:.4f} at step 1 -> {r['final_train_loss']:.4f} at step {r['steps']}"]
    if r["unigram_baseline_loss"] is not None:
        lines.append(f"- unigram baseline (no context) on the validation rows: {r['unigram_baseline_loss']:.4f} nats/token")
    lines.append(f"- loss spikes detected: {len(r['spikes'])}")
    if r["validation"] and "val_bpb" in r["validation"][0]:
        lines += ["", "| step | validation loss | perplexity | bits/byte |", "|---:|---:|---:|---:|"]
        lines += [f"| {e['step']} | {e['val_loss']:.4f} | {e['val_ppl']:.2f} | {e['val_bpb']:.4f} |" for e in r["validation"]]
    elif r["validation"]:  # another task's figures: one column each
        keys = [k for k in r["validation"][0] if k not in ("kind", "step")]
        lines += ["", "| step | " + " | ".join(k.replace("_", " ") for k in keys) + " |",
                  "|---:|" + "---:|" * len(keys)]
        lines += ["| " + " | ".join([str(e["step"])] + [f"{e[k]:.4f}" if isinstance(e.get(k), float) else str(e.get(k))
                                                       for k in keys]) + " |" for e in r["validation"]]
    if r["plot"]:
        lines += ["", f"![training curves](plots/{Path(r['plot']).name})"]
    if r["samples"]:
        lines += ["", "## Samples (greedy)", ""]
        lines += [f"- **{s['prompt']}**{s['completion']}" for s in r["samples"]]
    if r["checkpoint"]:
        lines += ["", f"Final checkpoint (Hugging Face layout): `{r['checkpoint']}`"]
    return "\n".join(lines) + "\n"


def pretrain(config: PretrainConfig, resume: bool = False, progress: bool = True) -> dict[str, Any]:
    trainer = Trainer(config, resume=resume, progress=progress)
    try:
        return trainer.run()
    finally:
        shutdown(trainer.runtime)
