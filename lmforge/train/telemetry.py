"""Training telemetry (P9): JSONL log, loss-spike detection, throughput and MFU, plots.

Everything the loop measures goes, one JSON object per line, to ``logs/train.jsonl``
(``{"kind": "train" | "eval" | "spike" | "sample", "step": ..., ...}``). Plots and the
final report are drawn from that file, so they can be re-made from a finished run.
"""

from __future__ import annotations

import json
import math
import time
from collections import deque
from pathlib import Path
from typing import Any

import torch

# Dense bf16 peak TFLOP/s of common accelerators (vendor figures, no sparsity), for MFU.
GPU_PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0, "A10": 125.0,
                   "RTX 4090": 165.0, "RTX 3090": 71.0, "V100": 125.0, "T4": 65.0}


class JsonlLog:
    """Append-only JSONL file; on resume, records after the resumed step are dropped first,
    so the log of a resumed run reads as if the run had never stopped."""

    def __init__(self, path: Path, resume_step: int | None = None, enabled: bool = True) -> None:
        self.path, self.enabled = path, enabled
        if not enabled:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            path.write_text("", encoding="utf-8")
        elif path.exists():
            kept = [line for line in path.read_text(encoding="utf-8").splitlines()
                    if line.strip() and _step_of(line) <= resume_step]
            from lmforge.io.atomic import write_text_atomic

            write_text_atomic(path, "".join(line + "\n" for line in kept))
        self._file = open(path, "a", encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        if self.enabled:
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()

    def close(self) -> None:
        if self.enabled:
            self._file.close()


def _step_of(line: str) -> int:
    try:
        return int(json.loads(line).get("step", 0))
    except (ValueError, AttributeError):
        return 0


def read_log(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


class SpikeDetector:
    """Flags a step whose loss is far above the recent ones.

    Keeps the last ``window`` losses; once it has ``min_history`` of them, a loss above
    mean + factor x std (and more than 10% above the mean, so that a very flat stretch
    does not flag noise) is a spike. Spikes are kept out of the history, so one bad batch
    does not raise the bar for the next. Its state is saved in checkpoints.
    """

    def __init__(self, factor: float = 3.0, window: int = 50, min_history: int = 20) -> None:
        self.factor, self.window, self.min_history = factor, window, min_history
        self.history: deque[float] = deque(maxlen=window)

    def check(self, loss: float) -> dict[str, float] | None:
        spike = None
        if not math.isfinite(loss):
            spike = {"loss": loss, "mean": float("nan"), "std": float("nan")}
        elif len(self.history) >= self.min_history:
            mean = sum(self.history) / len(self.history)
            std = math.sqrt(sum((x - mean) ** 2 for x in self.history) / len(self.history))
            if loss > mean + self.factor * std and loss > 1.1 * mean:
                spike = {"loss": loss, "mean": mean, "std": std}
        if spike is None:
            self.history.append(loss)
        return spike

    def state(self) -> list[float]:
        return list(self.history)

    def load(self, values: list[float]) -> None:
        self.history = deque(values, maxlen=self.window)


def measured_cpu_tflops(size: int = 1536, repeats: int = 6) -> float:
    """Best fp32 matrix-multiply rate of this CPU (TFLOP/s): the practical peak MFU is relative to.

    Timed with each kernel the training step may use, PyTorch's default (`torch.mm`) and
    oneDNN's (lmforge/model/onednn.py), and the faster one counts: on a CPU where MKL
    runs a slow code path, its rate alone would put MFU above 100%.
    """
    from lmforge.model import onednn

    a, b = torch.randn(size, size), torch.randn(size, size)
    kernels = [lambda: torch.mm(a, b)]
    if onednn.available():
        kernels.append(lambda: onednn.mm_nt(a, b))
    best = float("inf")
    for kernel in kernels:
        kernel()  # first call: allocation, kernel selection
        for _ in range(repeats):
            start = time.perf_counter()
            kernel()
            best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e12


def peak_tflops(device: torch.device, precision: str, configured: float | None) -> tuple[float, str]:
    """(peak TFLOP/s, where the number comes from) for MFU."""
    if configured:
        return configured, "train.peak_tflops"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, value in GPU_PEAK_TFLOPS.items():
            if key in name:
                return (value if precision in ("bf16", "fp16") else value / 2), f"{key} datasheet"
    return measured_cpu_tflops(), "measured fp32 matmul"


def plot_run(records: list[dict[str, Any]], out: Path, baseline: float | None = None) -> Path | None:
    """loss (train and validation), learning rate and throughput against the step, as one PNG."""
    from lmforge.io.plots import pyplot

    plt = pyplot()
    if plt is None:
        return None
    from lmforge.io.atomic import atomic_path

    train = [r for r in records if r["kind"] == "train"]
    evals = [r for r in records if r["kind"] == "eval"]
    spikes = [r for r in records if r["kind"] == "spike"]
    if not train:
        return None
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    ax = axes[0]
    ax.plot([r["step"] for r in train], [r["loss"] for r in train], label="train", lw=1)
    if evals:
        ax.plot([r["step"] for r in evals], [r["val_loss"] for r in evals], "o-", label="validation")
    if baseline is not None:
        ax.axhline(baseline, color="grey", ls="--", lw=1, label=f"unigram baseline {baseline:.2f}")
    if spikes:
        ax.plot([r["step"] for r in spikes], [r["loss"] for r in spikes], "rx", label="spike")
    ax.set(xlabel="step", ylabel="loss (nats/token)", title="loss")
    ax.legend()
    axes[1].plot([r["step"] for r in train], [r["lr"] for r in train])
    axes[1].set(xlabel="step", ylabel="learning rate", title="schedule")
    axes[2].plot([r["step"] for r in train], [r["tokens_per_s"] for r in train])
    axes[2].set(xlabel="step", ylabel="tokens/s", title="throughput")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
    return out

