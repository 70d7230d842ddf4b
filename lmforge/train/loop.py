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
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from lmforge.data.pack import PackedDataset
from lmforge.errors import LmforgeError
from lmforge.io.progress import Progress
from lmforge.train import checkpoint as ckpt
from lmforge.train.data import RowStream, dataset_tokenizer, ensure_dataset, token_byte_lengths
from lmforge.train.distributed import (Runtime, barrier, full_model_state, full_optimizer_state, init_runtime,
                                       load_full_state, mean_across, shutdown, sum_across, wrap_model)
from lmforge.train.optim import build_optimizer
from lmforge.train.recipe import PretrainConfig, to_yaml
from lmforge.train.schedule import lr_factor
from lmforge.train.telemetry import JsonlLog, SpikeDetector, peak_tflops, plot_run, read_log


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def resolve_precision(precision: str, device: torch.device) -> str:
    """fp32 | bf16 | fp16; "auto" follows lmforge's dtype policy (bf16 on GPUs that have it, else fp32)."""
    from lmforge.model.loading import pick_dtype

    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise LmforgeError("train.precision bf16 is not supported by this GPU; use fp16 or fp32")
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


class Trainer:
    def __init__(self, config: PretrainConfig, resume: bool = False, progress: bool = True,
                 log: Callable[[str], None] = _stderr) -> None:
        config.validate()
        self.config, self.progress_enabled = config, progress
        t = config.train
        if t.threads:
            torch.set_num_threads(t.threads)
        self.runtime: Runtime = init_runtime(t.distributed, t.device)
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

        # Data: built once (by rank 0) if the recipe names sources instead of a ready directory.
        if self.runtime.is_main:
            ensure_dataset(config.data, self.log)
        barrier(self.runtime)
        data_dir = Path(config.data.path)
        train_set = PackedDataset(data_dir, "train")
        self.seq_len = train_set.seq_len
        self.stream = RowStream(train_set, t.seed)
        self.tokenizer = dataset_tokenizer(data_dir, train_set.index, config.data.tokenizer)
        self.val_rows = self._validation_rows(data_dir)
        self.byte_lengths = torch.from_numpy(token_byte_lengths(self.tokenizer))

        torch.manual_seed(t.seed)  # the same initial weights on every process
        self.model = self._build_model()
        self.model.to(self.runtime.device)
        self.model.gradient_checkpointing = t.gradient_checkpointing
        self.model.train()
        self.wrapped = wrap_model(self.model, self.runtime)
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
        self.tokens_per_step = self.global_micro * t.grad_accum * self.seq_len
        from lmforge.train.estimate import training_flops_per_token

        self.flops_per_token = training_flops_per_token(self.model.config, self.seq_len)["total"]
        self.peak, self.peak_source = peak_tflops(self.runtime.device, self.precision, t.peak_tflops)
        self.jsonl = JsonlLog(self.out / "logs" / "train.jsonl", self.step if resume_dir is not None else None,
                              enabled=self.runtime.is_main)
        self.baseline = unigram_baseline(self.stream, self.val_rows, self.model.config.vocab_size) \
            if len(self.val_rows) else None
        if self.runtime.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            from lmforge.io.atomic import write_text_atomic

            write_text_atomic(self.out / "recipe.yaml", to_yaml(config))

    # -- setup -------------------------------------------------------------------------
    def _validation_rows(self, data_dir: Path) -> torch.Tensor:
        """The fixed validation rows: eval_batches x global micro-batch, a multiple of world size."""
        t, world = self.config.train, self.runtime.world_size
        try:
            val = PackedDataset(data_dir, "validation")
        except LmforgeError:
            self.log(f"{data_dir} has no validation split: no validation loss")
            return torch.zeros(0, self.seq_len, dtype=torch.int64)
        n = min(len(val), t.eval_batches * t.batch_size * world) // world * world
        if n == 0:
            return torch.zeros(0, self.seq_len, dtype=torch.int64)
        return torch.from_numpy(np.stack([val[i] for i in range(n)]).astype(np.int64))

    def _build_model(self):
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

    def _restore(self, directory: Path) -> None:
        saved = ckpt.load_checkpoint(directory)
        if saved["config"].to_dict() | {"extra": {}} != self.model.config.to_dict() | {"extra": {}}:
            raise LmforgeError(f"{directory} holds a different model architecture than the recipe")
        load_full_state(self.wrapped, self.optimizer, saved["model"], saved["optimizer"])
        state = saved["state"]
        self.step, self.tokens_seen, self.elapsed = state["step"], state["tokens_seen"], state["elapsed"]
        self.data_position = state["data_position"]
        self.spikes.load(state["spike_history"])
        if self.scaler is not None and state.get("grad_scaler"):
            self.scaler.load_state_dict(state["grad_scaler"])
        ckpt.set_rng_state(*saved["rng"])
        self.log(f"resumed from {directory} (step {self.step})")

    # -- one step ------------------------------------------------------------------------
    def _autocast(self):
        if self.precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        return torch.autocast(self.runtime.device.type, dtype=dtype)

    def _grad_sync(self, enabled: bool):
        """Skip DDP's all-reduce / FSDP's reduce-scatter on all but the last micro-batch."""
        if self.runtime.mode == "ddp" and not enabled:
            return self.wrapped.no_sync()
        if self.runtime.mode == "fsdp":
            self.wrapped.set_requires_gradient_sync(enabled)
        return contextlib.nullcontext()

    def train_step(self) -> dict[str, float]:
        t = self.config.train
        lr = self.config.optim.lr * lr_factor(self.step, t.max_steps, self.config.schedule.name,
                                              self.config.schedule.warmup_steps, self.config.schedule.min_lr_ratio,
                                              self.config.schedule.decay_fraction)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        total = torch.zeros((), device=self.runtime.device)
        for micro in range(t.grad_accum):
            position = self.data_position + micro * self.global_micro + self.runtime.rank * t.batch_size
            ids = self.stream.rows(position, t.batch_size).to(self.runtime.device, non_blocking=True)
            with self._grad_sync(micro == t.grad_accum - 1):
                with self._autocast():
                    loss = self.wrapped(ids)
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
        self.tokens_seen += self.tokens_per_step
        loss_value = float(mean_across(total / t.grad_accum, self.runtime))
        return {"loss": loss_value, "lr": lr, "grad_norm": float(norm)}

    # -- evaluation ----------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> dict[str, float] | None:
        if not len(self.val_rows):
            return None
        world, rank, batch = self.runtime.world_size, self.runtime.rank, self.config.train.batch_size
        mine = self.val_rows[rank::world]
        nats = torch.zeros((), dtype=torch.float64, device=self.runtime.device)
        tokens = torch.zeros((), dtype=torch.float64, device=self.runtime.device)
        nbytes = torch.zeros((), dtype=torch.float64, device=self.runtime.device)
        self.model.eval()
        try:
            for i in range(0, len(mine), batch):
                rows = mine[i:i + batch]
                with self._autocast():
                    loss = self.wrapped(rows.to(self.runtime.device), reduction="sum")
                nats += loss.double()
                tokens += rows[:, 1:].numel()
                nbytes += float(self.byte_lengths[rows[:, 1:]].sum())
        finally:
            self.model.train()
        nats, tokens, nbytes = (sum_across(v, self.runtime) for v in (nats, tokens, nbytes))
        val_loss = float(nats / tokens)
        return {"val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50.0)),
                "val_bpb": float(nats / math.log(2) / nbytes) if float(nbytes) else float("nan")}

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
            loop_state = {"tokens_seen": self.tokens_seen, "elapsed": self.elapsed,
                          "data_position": self.data_position,
                          "spike_history": self.spikes.state(), "world_size": self.runtime.world_size,
                          "grad_scaler": self.scaler.state_dict() if self.scaler is not None else None}
            path = ckpt.save_checkpoint(self.ckpt_root, self.step, self.model.config, model_state, optimizer_state,
                                        loop_state, self.tokenizer, self.config.train.keep_last)
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
        while self.step < stop:
            step_start = time.perf_counter()
            stats = self.train_step()
            seconds = time.perf_counter() - step_start
            self.elapsed += seconds
            window_tokens += self.tokens_per_step
            tokens_per_s = self.tokens_per_step / seconds
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
                result = self.evaluate()
                if result is not None:
                    self.jsonl.write({"kind": "eval", "step": self.step, **result})
                    if not progress.tty:
                        self.log(f"step {self.step}: validation loss {result['val_loss']:.4f}, "
                                 f"{result['val_bpb']:.3f} bits/byte")
                for sample in self.samples():
                    self.jsonl.write({"kind": "sample", "step": self.step, **sample})
            if self.step % t.save_interval == 0 or final or self.step == stop:
                last_checkpoint = self.save()
        progress.close()
        report = self.report(last_checkpoint)
        self.jsonl.close()
        return report

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
        }
        write_json_atomic(self.out / "report.json", report)
        write_text_atomic(self.out / "report.md", format_report(report))
        return report


def format_report(r: dict[str, Any]) -> str:
    lines = ["# Pretraining run", "",
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
    if r["validation"]:
        lines += ["", "| step | validation loss | perplexity | bits/byte |", "|---:|---:|---:|---:|"]
        lines += [f"| {e['step']} | {e['val_loss']:.4f} | {e['val_ppl']:.2f} | {e['val_bpb']:.4f} |" for e in r["validation"]]
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
