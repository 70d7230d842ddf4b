"""Truncated back-propagation through time for recurrent language models (M10).

A recurrent LM reads the training text as a few long streams. The token stream is cut
into ``batch_size`` contiguous pieces, one per batch row; each step feeds the next
``bptt`` tokens of every piece, starting from the state the previous step ended with, and
back-propagates only through those ``bptt`` steps (the state is *detached*: its value
carries over, its gradient does not). The model so sees context far longer than
``bptt`` at the cost of gradients that stop at the truncation.

Why this is not `lmforge.train.loop.Trainer`: that loop's contract is that a micro-batch
is a pure function of the data position (rows drawn in a seeded shuffled order, for exact
resume and data parallelism) and that the model is a `Transformer` (its config is written
as Hugging Face files, its FLOPs estimated from it, its samples drawn by the engine).
Truncated BPTT needs the opposite: consecutive, unshuffled chunks and a hidden state
that lives from one step to the next. What can be shared is shared: the optimizer and its
parameter groups (`build_optimizer`), the learning-rate schedule (`lr_factor`), the JSONL
log, the progress line and atomic writes.

The trainer writes ``OUT/model`` (the model's own ``save``), ``OUT/logs/train.jsonl``
(train and eval records) and ``OUT/report.json``. It does not resume an interrupted run:
these runs last minutes.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from lmforge.errors import LmforgeError
from lmforge.io.progress import Progress
from lmforge.train.optim import build_optimizer
from lmforge.train.schedule import SCHEDULES, lr_factor
from lmforge.train.telemetry import JsonlLog


@dataclass
class BPTTConfig:
    out: str = "runs/bptt"
    batch_size: int = 32  # parallel streams
    bptt: int = 64  # tokens back-propagated through per step
    max_steps: int = 500
    lr: float = 3e-3
    betas: tuple[float, float] = (0.9, 0.99)
    weight_decay: float = 0.01
    schedule: str = "cosine"
    warmup_steps: int = 20
    min_lr_ratio: float = 0.1
    clip_grad_norm: float | None = 0.5
    eval_interval: int = 50
    seed: int = 0
    threads: int | None = None
    progress: bool = True

    def validate(self) -> None:
        for name in ("batch_size", "bptt", "max_steps", "eval_interval"):
            if getattr(self, name) < 1:
                raise LmforgeError(f"{name} must be positive, got {getattr(self, name)}")
        if self.schedule not in SCHEDULES:
            raise LmforgeError(f"unknown schedule {self.schedule!r}; choose one of {', '.join(SCHEDULES)}")
        if self.lr <= 0:
            raise LmforgeError("the learning rate must be positive")


def stream_batches(tokens: np.ndarray, batch_size: int) -> torch.Tensor:
    """The token stream as ``batch_size`` contiguous rows (the tail that does not divide is dropped)."""
    per_row = len(tokens) // batch_size
    if per_row < 2:
        raise LmforgeError(f"{len(tokens)} training tokens are too few for {batch_size} streams")
    return torch.from_numpy(np.asarray(tokens[:per_row * batch_size], dtype=np.int64).reshape(batch_size, per_row))


def detach_state(state: Any) -> Any:
    if state is None:
        return None
    if isinstance(state, tuple):
        return tuple(s.detach() for s in state)
    return state.detach()


@torch.no_grad()
def rows_nll(model: torch.nn.Module, rows: torch.Tensor, batch_size: int = 32) -> tuple[float, int]:
    """Summed nats and count of the next-token targets ``rows[:, 1:]``, each row read from a fresh
    (zero) state: the same targets and the same context limit as a Transformer scoring the rows."""
    was_training = model.training
    model.eval()
    nats, count = 0.0, 0
    try:
        for i in range(0, len(rows), batch_size):
            chunk = rows[i:i + batch_size]
            logits, _ = model(chunk[:, :-1])
            nats += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), chunk[:, 1:].reshape(-1),
                                          reduction="sum"))
            count += chunk[:, 1:].numel()
    finally:
        model.train(was_training)
    return nats, count


def train_bptt(model: torch.nn.Module, train_tokens: np.ndarray, val_rows: torch.Tensor | None,
               config: BPTTConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Train ``model`` (``forward(ids, state) -> (logits, state)``) on the stream ``train_tokens``;
    returns (and writes) the report: steps, tokens, seconds, throughput, validation curve."""
    config.validate()
    threads = torch.get_num_threads()
    if config.threads:
        torch.set_num_threads(config.threads)
    try:
        return _train(model, train_tokens, val_rows, config, log)
    finally:
        torch.set_num_threads(threads)


def _train(model: torch.nn.Module, train_tokens: np.ndarray, val_rows: torch.Tensor | None,
           config: BPTTConfig, log: Callable[[str], None]) -> dict[str, Any]:
    torch.manual_seed(config.seed)
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    data = stream_batches(train_tokens, config.batch_size)
    optimizer = build_optimizer(model, "adamw", config.lr, config.betas, weight_decay=config.weight_decay,
                                fused=False)
    jsonl = JsonlLog(out / "logs" / "train.jsonl")
    progress = Progress("bptt", config.max_steps, unit="steps", enabled=config.progress, every=10)
    curve: list[dict[str, float]] = []
    elapsed, tokens_seen, position, state, epoch = 0.0, 0, 0, None, 0

    def evaluate(step: int) -> None:
        if val_rows is None or not len(val_rows):
            return
        nats, count = rows_nll(model, val_rows)
        record = {"step": step, "seconds": elapsed, "tokens": tokens_seen, "val_loss": nats / count,
                  "val_ppl": math.exp(min(nats / count, 50.0))}
        curve.append(record)
        jsonl.write({"kind": "eval", **record})

    model.train()
    evaluate(0)
    for step in range(config.max_steps):
        started = time.perf_counter()
        if position + 2 > data.shape[1]:  # the streams are used up: a new epoch from fresh states
            position, state, epoch = 0, None, epoch + 1
        chunk = data[:, position:position + config.bptt + 1]
        inputs, targets = chunk[:, :-1], chunk[:, 1:]
        position += inputs.shape[1]
        lr = config.lr * lr_factor(step, config.max_steps, config.schedule, config.warmup_steps,
                                   config.min_lr_ratio)
        for group in optimizer.param_groups:
            group["lr"] = lr
        logits, state = model(inputs, detach_state(state))
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
        loss.backward()
        max_norm = config.clip_grad_norm if config.clip_grad_norm is not None else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        seconds = time.perf_counter() - started
        elapsed += seconds
        tokens_seen += targets.numel()
        jsonl.write({"kind": "train", "step": step + 1, "loss": loss.item(), "lr": lr, "grad_norm": float(norm),
                     "tokens": tokens_seen, "step_seconds": seconds, "epoch": epoch})
        progress.update(step + 1, info=f"loss {loss.item():.4f}  {tokens_seen / max(elapsed, 1e-9):,.0f} tok/s")
        if (step + 1) % config.eval_interval == 0 or step + 1 == config.max_steps:
            evaluate(step + 1)
    progress.close()
    jsonl.close()
    saved = model.save(out / "model") if hasattr(model, "save") else None
    report = {"steps": config.max_steps, "tokens": tokens_seen, "train_seconds": elapsed,
              "tokens_per_s": tokens_seen / elapsed if elapsed else 0.0, "epochs": epoch,
              "parameters": sum(p.numel() for p in model.parameters()), "validation": curve,
              "checkpoint": str(saved) if saved else None}
    from lmforge.io.atomic import write_json_atomic

    write_json_atomic(out / "report.json", report)
    return report
