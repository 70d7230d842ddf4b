"""lmforge pretrain: recipes, schedules, exact resume after SIGKILL, DDP/FSDP parity, checkpoints.

The runs are tiny (2 layers, width 64, rows of 64 tokens, a 512-token BPE trained on the
news articles) so that every property is checked on real text in seconds.
"""

from __future__ import annotations

import json
import math
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from lmforge.errors import LmforgeError
from lmforge.train import checkpoint as ckpt
from lmforge.train.optim import build_optimizer, parameter_groups
from lmforge.train.recipe import load_recipe
from lmforge.train.schedule import lr_factor
from lmforge.train.telemetry import SpikeDetector

# The in-process runs train a 2-layer, width-64 model: one torch thread is as fast as two and
# does not stall when the cores are busy (the subprocess runs get OMP_NUM_THREADS=1 likewise).
pytestmark = pytest.mark.usefixtures("one_thread")

LMFORGE = [sys.executable, "-m", "lmforge"]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
TINY = {"model.n_layer": 2, "model.n_embd": 64, "model.n_head": 4, "model.n_kv_head": 2,
        "model.intermediate_size": 176, "train.max_steps": 12, "schedule.warmup_steps": 3,
        "train.eval_interval": 6, "train.eval_batches": 2, "train.save_interval": 3, "train.sample_tokens": 0,
        "train.log_interval": 1}


def flags(options: dict) -> list[str]:
    out = []
    for key, value in options.items():
        out += [f"--{key}", json.dumps(value) if not isinstance(value, str) else value]
    return out


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """A packed dataset built by the recipe path itself: news articles -> clean -> BPE(512) -> rows of 64."""
    from lmforge.train.data import ensure_dataset
    from lmforge.train.recipe import DataSection

    path = tmp_path_factory.mktemp("pretrain") / "news-512"
    ensure_dataset(DataSection(path=str(path), sources=["news"], tokenizer_vocab_size=512, seq_len=64,
                               val_fraction=0.1), log=lambda _m: None)
    return path


def run_cli(args: list[str], env_extra: dict | None = None, timeout: float = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env_extra or {})}
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=env)


def losses(out: Path, kind: str = "train") -> dict[int, float]:
    records = [json.loads(line) for line in (out / "logs" / "train.jsonl").read_text().splitlines()]
    key = "loss" if kind == "train" else "val_loss"
    return {r["step"]: r[key] for r in records if r["kind"] == kind}


def pretrain_cli(tiny_data: Path, out: Path, extra: dict | None = None, launcher=None, resume=False):
    options = {**TINY, "data.path": str(tiny_data), "train.out": str(out), **(extra or {})}
    base = (launcher + ["-m", "lmforge"]) if launcher else LMFORGE
    result = run_cli(base + ["pretrain", "--quiet"] + (["--resume"] if resume else []) + flags(options))
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.fixture(scope="session")
def reference_run(tiny_data, tmp_path_factory) -> Path:
    """One uninterrupted single-process run: batch 8, 12 steps, checkpoints every 3."""
    out = tmp_path_factory.mktemp("reference") / "run"
    pretrain_cli(tiny_data, out, {"train.batch_size": 8, "train.distributed": "none"})
    return out


# -- recipes -----------------------------------------------------------------------------------

@pytest.mark.parametrize("text, message", [
    ("train:\n  max_stepz: 3\n", "unknown field train.max_stepz"),
    ("optim:\n  lr: fast\n", "optim.lr must be float"),
    ("training:\n  max_steps: 3\n", "unknown section 'training'"),
    ("train:\n  batch_size: 0\n", "train.batch_size must be positive"),
    ("train: [1, 2\n", "not valid YAML"),
    ("schedule:\n  name: exponential\n", "schedule.name must be one of"),
])
def test_bad_recipe_fails_before_training(tmp_path, text, message):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(text)
    out = tmp_path / "out"
    result = run_cli(LMFORGE + ["pretrain", str(recipe), "--out", str(out)], timeout=60)
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("lmforge: error: "), result.stderr
    assert message in result.stderr
    assert not out.exists()


def test_missing_data_and_bad_flag_values(tmp_path, capsys):
    from lmforge.cli import main

    out = tmp_path / "out"
    result = run_cli(LMFORGE + ["pretrain", "--data.path", str(tmp_path / "nothing"), "--out", str(out)], timeout=60)
    assert result.returncode == 1 and "no packed dataset" in result.stderr and "Traceback" not in result.stderr
    assert not out.exists()
    # Recipe errors come before any training state exists: the command's own entry point, in
    # this process, gives the same exit code and message without a second interpreter start.
    assert main(["pretrain", "--train.max-steps", "many", "--out", str(out)]) == 1
    assert "train.max_steps must be int" in capsys.readouterr().err
    assert main(["pretrain", "no-such-recipe"]) == 1
    assert "no recipe named 'no-such-recipe'" in capsys.readouterr().err
    assert not out.exists()


def test_recipe_overrides_and_shipped_recipes():
    config = load_recipe(None, {"train.max_steps": 50, "optim.lr": "3e-4", "data.sources": ["wiki"]})
    assert config.train.max_steps == 50 and config.optim.lr == pytest.approx(3e-4) and config.data.sources == ["wiki"]
    with pytest.raises(LmforgeError, match="unknown option --bogus"):
        load_recipe(None, {"bogus": 1})
    from lmforge.cli.common import SHIPPED_RECIPES

    # The other verbs' recipes sit beside pretraining's, named by their verb; each recipe is
    # loaded with its own command's configuration in tests/test_recipes_shipped.py.
    load_recipe(SHIPPED_RECIPES / "tiny-llama.yaml")


# -- schedules, optimizer groups, spikes ------------------------------------------------------

def test_schedules_by_hand():
    kw = dict(total_steps=101, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_factor(0, name="cosine", **kw) == pytest.approx(0.1)  # (0+1)/10
    assert lr_factor(9, name="cosine", **kw) == pytest.approx(1.0)
    assert lr_factor(10, name="cosine", **kw) == pytest.approx(1.0)
    assert lr_factor(55, name="cosine", **kw) == pytest.approx(0.1 + 0.9 * 0.5)  # halfway: cos(pi/2) = 0
    assert lr_factor(100, name="cosine", **kw) == pytest.approx(0.1)
    assert lr_factor(55, name="linear", **kw) == pytest.approx(1 - 0.9 * 0.5)
    assert lr_factor(100, name="linear", **kw) == pytest.approx(0.1)
    assert lr_factor(70, name="constant", **kw) == 1.0
    # warmup-stable-decay: 20% of 101 steps = 20 decay steps, from step 81
    assert lr_factor(80, name="wsd", decay_fraction=0.2, **kw) == 1.0
    assert lr_factor(81, name="wsd", decay_fraction=0.2, **kw) == pytest.approx(1 - 0.9 / 20)
    assert lr_factor(100, name="wsd", decay_fraction=0.2, **kw) == pytest.approx(0.1)


def test_no_decay_for_norms_and_biases_and_l2_vs_decoupled():
    from lmforge.model.config import ModelConfig
    from lmforge.model.transformer import Transformer

    model = Transformer(ModelConfig(qkv_bias=True, tie_word_embeddings=True))
    decay, no_decay = parameter_groups(model, 0.1)
    assert all("norm" in n or n.endswith(".bias") for n in no_decay["names"]) and no_decay["names"]
    assert "embed.weight" in decay["names"] and "lm_head.weight" not in decay["names"]  # tied: counted once
    assert not any("norm" in n or n.endswith("bias") for n in decay["names"])
    decay, no_decay = parameter_groups(model, 0.1, decay_embeddings=False)
    assert "embed.weight" in no_decay["names"]

    # One step with a zero gradient isolates the decay term: AdamW shrinks w by lr * wd * w;
    # Adam + L2 turns wd * w into a gradient, which Adam's normalization makes ~lr * sign(w).
    w0 = torch.tensor([[2.0, -0.5]])
    for name, expected in (("adamw", w0 * (1 - 0.1 * 0.5)), ("adam_l2", w0 - 0.1 * torch.sign(w0))):
        layer = torch.nn.Linear(2, 1, bias=False)
        with torch.no_grad():
            layer.weight.copy_(w0)
        opt = build_optimizer(layer, name, lr=0.1, weight_decay=0.5)
        layer.weight.grad = torch.zeros_like(layer.weight)
        opt.step()
        assert torch.allclose(layer.weight.detach(), expected, atol=1e-6), (name, layer.weight)


def test_spike_detector():
    det = SpikeDetector(factor=3.0, window=50, min_history=20)
    rng = random.Random(0)
    assert all(det.check(3.0 + rng.uniform(-0.05, 0.05)) is None for _ in range(40))
    spike = det.check(4.5)
    assert spike is not None and spike["loss"] == 4.5 and abs(spike["mean"] - 3.0) < 0.05
    assert det.check(3.01) is None  # the spike did not enter the history
    assert det.check(float("nan")) is not None


# -- checkpoints --------------------------------------------------------------------------------

def test_reference_run_writes_layout_report_and_beats_nothing(reference_run):
    names = sorted(p.name for p in (reference_run / "checkpoints").iterdir())
    assert names == ["step-0000009", "step-0000012"]  # keep_last = 2
    final = reference_run / "checkpoints" / "step-0000012"
    for name in ("config.json", "model.safetensors", "tokenizer.json", "checkpoint.json",
                 "trainer_state/optimizer.safetensors", "trainer_state/rng.safetensors", "trainer_state/state.json"):
        assert (final / name).is_file(), name
    report = json.loads((reference_run / "report.json").read_text())
    assert report["steps"] == 12 and report["tokens"] == 12 * 8 * 64
    assert [e["step"] for e in report["validation"]] == [6, 12]
    assert report["final_train_loss"] < report["first_train_loss"] - 0.3
    assert math.isfinite(report["validation"][-1]["val_bpb"]) and report["unigram_baseline_loss"] > 0
    # FLOPs per token: 6 x parameters (the head is tied, so every parameter is in a matrix
    # product) plus 12 x n_layer x seq_len x q_size for attention; MFU is that rate over the peak.
    assert report["flops_per_token"] == 6 * report["parameters"] + 12 * 2 * 64 * 64
    expected_mfu = report["flops_per_token"] * report["tokens_per_s"] / (report["peak_tflops"] * 1e12)
    assert math.isclose(report["mfu"], expected_mfu, rel_tol=1e-9) and 0 < report["mfu"] < 1
    assert (reference_run / "plots" / "training.png").read_bytes()[:4] == b"\x89PNG"
    assert "| 12 |" in (reference_run / "report.md").read_text()
    assert "above 100%" not in (reference_run / "report.md").read_text()
    state = json.loads((final / "trainer_state" / "state.json").read_text())
    assert state["step"] == 12 and state["data_position"] == 12 * 8


def test_report_flags_an_impossible_mfu(reference_run):
    # A peak measured while other programs held the CPU is too low; the report says so.
    from lmforge.train.loop import format_report

    report = json.loads((reference_run / "report.json").read_text())
    report["peak_tflops"] = report["mfu"] * report["peak_tflops"] / 1.5
    report["mfu"] = 1.5
    line = next(x for x in format_report(report).splitlines() if "MFU" in x)
    assert "MFU 150.0%" in line and "above 100%" in line and "train.peak_tflops" in line


def test_invalid_checkpoints_are_never_loaded(reference_run, tmp_path):
    import shutil

    root = tmp_path / "checkpoints"
    shutil.copytree(reference_run / "checkpoints", root)
    assert ckpt.latest_checkpoint(root).name == "step-0000012"
    # A save that died before its rename leaves a hidden staging directory: ignored.
    staging = root / ".step-0000015.abcd"
    shutil.copytree(root / "step-0000012", staging)
    assert ckpt.latest_checkpoint(root).name == "step-0000012"
    # A final-named directory with a truncated file (or no manifest) is not valid either.
    broken = root / "step-0000018"
    shutil.copytree(root / "step-0000012", broken)
    with open(broken / "trainer_state" / "optimizer.safetensors", "r+b") as f:
        f.truncate(100)
    no_manifest = root / "step-0000021"
    shutil.copytree(root / "step-0000012", no_manifest)
    (no_manifest / "checkpoint.json").unlink()
    assert ckpt.latest_checkpoint(root).name == "step-0000012"
    with pytest.raises(LmforgeError, match="not a complete training checkpoint"):
        ckpt.load_checkpoint(broken)
    ckpt.prune(root, keep_last=1)
    assert sorted(p.name for p in root.iterdir()) == ["step-0000012", "step-0000018", "step-0000021"]


def test_fresh_run_refuses_to_overwrite_checkpoints(reference_run, tiny_data):
    before = (reference_run / "logs" / "train.jsonl").read_text()
    result = run_cli(LMFORGE + ["pretrain", "--data.path", str(tiny_data), "--out", str(reference_run)], timeout=60)
    assert result.returncode == 1 and "--resume" in result.stderr
    assert (reference_run / "logs" / "train.jsonl").read_text() == before


@pytest.mark.slow
def test_sigkill_at_a_random_step_then_resume_is_exact(tiny_data, reference_run, tmp_path):
    out = tmp_path / "killed"
    kill_after = random.Random().randint(4, 10)
    options = {**TINY, "data.path": str(tiny_data), "train.out": str(out), "train.batch_size": 8,
               "train.distributed": "none"}
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(LMFORGE + ["pretrain", "--quiet"] + flags(options), env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    log = out / "logs" / "train.jsonl"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and proc.poll() is None:
        if log.exists() and max(losses(out), default=0) >= kill_after:
            break
        time.sleep(0.01)
    assert proc.poll() is None, f"the run ended before step {kill_after}: {proc.stderr.read().decode()[-2000:]}"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = max(losses(out))
    assert killed_at < 12
    pretrain_cli(tiny_data, out, {"train.batch_size": 8, "train.distributed": "none"}, resume=True)
    expected, got = losses(reference_run), losses(out)
    assert sorted(got) == list(range(1, 13))
    assert got == expected, f"killed after step {killed_at}"  # bit-identical, every step
    assert losses(out, "eval") == losses(reference_run, "eval")


KILL_DURING_SAVE = textwrap.dedent("""
    import os, signal, sys
    import lmforge.model.checkpoint as mc
    from lmforge.cli import main
    original = mc.write_hf_files
    def dying(config, state, directory, tokenizer=None):
        original(config, state, directory, tokenizer)
        if directory.name.startswith(".step-0000006"):
            os.kill(os.getpid(), signal.SIGKILL)  # the model is written, trainer_state and manifest are not
    mc.write_hf_files = dying
    sys.exit(main(sys.argv[1:]))
""")


@pytest.mark.slow
def test_kill_in_the_middle_of_a_checkpoint_write(tiny_data, reference_run, tmp_path):
    out = tmp_path / "dies-saving"
    options = {**TINY, "data.path": str(tiny_data), "train.out": str(out), "train.batch_size": 8,
               "train.distributed": "none"}
    result = run_cli([sys.executable, "-c", KILL_DURING_SAVE, "pretrain", "--quiet"] + flags(options))
    assert result.returncode == -signal.SIGKILL
    root = out / "checkpoints"
    assert [p.name for p in root.iterdir() if p.name.startswith(".step-0000006")], "a half-written save remains"
    assert ckpt.latest_checkpoint(root).name == "step-0000003"
    pretrain_cli(tiny_data, out, {"train.batch_size": 8, "train.distributed": "none"}, resume=True)
    assert losses(out) == losses(reference_run)
    assert not [p for p in root.iterdir() if p.name.startswith(".")]  # cleaned up by the next save


# -- distributed ----------------------------------------------------------------------------------

@pytest.mark.slow
def test_fsdp_then_ddp_resume_match_one_process(tiny_data, reference_run, tmp_path):
    """2 processes x batch 4 = the reference's batch 8: FSDP for steps 1-6, then DDP resumes to 12."""
    out = tmp_path / "dist"
    pretrain_cli(tiny_data, out, {"train.batch_size": 4, "train.distributed": "fsdp", "train.stop_at_step": 6},
                 launcher=TORCHRUN)
    first = losses(out)
    assert sorted(first) == list(range(1, 7))
    pretrain_cli(tiny_data, out, {"train.batch_size": 4, "train.distributed": "ddp"}, launcher=TORCHRUN, resume=True)
    got, expected = losses(out), losses(reference_run)
    assert sorted(got) == list(range(1, 13))
    # Same rows, same weights; only the order of floating-point sums differs (gradients are
    # averaged across processes), so losses agree to float32 rounding, compounded over steps.
    for step in expected:
        assert got[step] == pytest.approx(expected[step], rel=1e-5, abs=1e-5), step
    for step, value in losses(reference_run, "eval").items():
        assert losses(out, "eval")[step] == pytest.approx(value, rel=1e-5)
    state = json.loads((out / "checkpoints" / "step-0000012" / "trainer_state" / "state.json").read_text())
    assert state["world_size"] == 2 and state["data_position"] == 12 * 8


# -- accumulation, activation checkpointing, precision ---------------------------------------------

def _in_process_losses(tiny_data, out, **extra):
    from lmforge.train.loop import pretrain

    options = {**TINY, "data.path": str(tiny_data), "train.out": str(out), "train.max_steps": 4,
               "train.eval_interval": 100, "train.save_interval": 100, "train.plots": False,
               "schedule.warmup_steps": 1, **extra}
    pretrain(load_recipe(None, options), progress=False)
    return losses(out)


def test_accumulation_and_activation_checkpointing_equal_one_batch(tiny_data, tmp_path):
    base = _in_process_losses(tiny_data, tmp_path / "a", **{"train.batch_size": 8})
    accumulated = _in_process_losses(tiny_data, tmp_path / "b", **{"train.batch_size": 4, "train.grad_accum": 2})
    recomputed = _in_process_losses(tiny_data, tmp_path / "c", **{"train.batch_size": 8,
                                                                  "train.gradient_checkpointing": True})
    for step in base:
        assert accumulated[step] == pytest.approx(base[step], rel=1e-5)
        assert recomputed[step] == pytest.approx(base[step], rel=1e-6)


def test_bf16_autocast_on_cpu(tiny_data, tmp_path):
    fp32 = _in_process_losses(tiny_data, tmp_path / "fp32", **{"train.batch_size": 8})
    bf16 = _in_process_losses(tiny_data, tmp_path / "bf16", **{"train.batch_size": 8, "train.precision": "bf16"})
    for step in fp32:
        # bf16 keeps 8 bits of mantissa: the loss moves by a few parts in a thousand, not more.
        assert bf16[step] == pytest.approx(fp32[step], rel=2e-2)


# -- the result is a model the rest of lmforge and transformers use ---------------------------------

def test_trained_checkpoint_loads_in_lmforge_and_transformers(reference_run):
    from transformers import AutoModelForCausalLM

    from lmforge.model.checkpoint import load_hf_model
    from lmforge.tokenizer import Tokenizer

    final = reference_run / "checkpoints" / "step-0000012"
    ours = load_hf_model(final)
    theirs = AutoModelForCausalLM.from_pretrained(final).eval()
    ids = torch.tensor([Tokenizer.from_pretrained_dir(final).encode("The minister said on Tuesday that")])
    with torch.no_grad():
        assert torch.allclose(ours(ids), theirs(input_ids=ids).logits, atol=1e-4)
    result = run_cli(LMFORGE + ["generate", str(final), "--prompt", "The minister said", "--max-tokens", "6",
                                "--temperature", "0", "--json"], timeout=120)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["completion_tokens"] >= 1


# -- scaling sweep ------------------------------------------------------------------------------------

@pytest.mark.slow  # starts the model or a process: seconds
def test_scaling_sweep_fits_and_resumes(tiny_data, tmp_path):
    from lmforge.train.sweep import run_sweep

    base = load_recipe(None, {**TINY, "data.path": str(tiny_data), "train.batch_size": 8, "train.plots": False,
                              "schedule.warmup_steps": 1})
    out = tmp_path / "sweep"
    messages: list[str] = []
    result = run_sweep(base, [16, 32, 64], [4], out, log=messages.append)
    assert result["law"] == "L(N)" and len(result["points"]) == 3
    ns = [p["params"] for p in result["points"]]
    assert ns == sorted(ns) and len(set(ns)) == 3  # wider models, more non-embedding parameters
    assert all(p["tokens"] == 4 * 8 * 64 for p in result["points"])
    fit = result["fit"]
    for p in result["points"]:  # the fitted curve passes near its points
        assert abs(fit["E"] + fit["A"] / p["params"] ** fit["alpha"] - p["loss"]) < 0.05
    assert (out / "scaling.png").read_bytes()[:4] == b"\x89PNG" and "| 64 | 4 |" in (out / "sweep.md").read_text()
    again: list[str] = []
    run_sweep(base, [16, 32, 64], [4], out, log=again.append)
    assert all("done before" in m for m in again)


# -- a task with its own loss --------------------------------------------------------------------

@pytest.mark.slow
def test_a_task_with_its_own_loss_trains_like_the_token_loss(tiny_data, tmp_path):
    """A task that supplies its loss (summed next-token loss over a batch's counted targets, plus a
    summed metric) trains exactly as pretraining does, with and without accumulation, and its
    metric is averaged over the step's items and logged."""
    from lmforge.train.loop import Batch, PretrainTask, Trainer, shutdown
    from lmforge.train.loss import causal_lm_loss

    class OwnLossTask(PretrainTask):
        def batch(self, position, count):
            rows = self.stream.rows(position, count)
            first_token = rows[:, :1].clone()
            return Batch(rows, tokens=rows.numel(), count=rows[:, 1:].numel(), extra={"first": first_token})

        def loss(self, model, batch):
            assert batch.extra["first"].equal(batch.input_ids[:, :1])  # extras travel with the batch
            loss_sum = causal_lm_loss(model, batch.input_ids, None, reduction="sum")
            return loss_sum, {"row_starts": float(batch.input_ids.shape[0])}

    def run(out, **extra):
        options = {**TINY, "data.path": str(tiny_data), "train.out": str(out), "train.max_steps": 4,
                   "train.eval_interval": 100, "train.save_interval": 100, "train.plots": False,
                   "schedule.warmup_steps": 1, **extra}
        config = load_recipe(None, options)
        trainer = Trainer(config, progress=False, task=OwnLossTask(config))
        try:
            trainer.run()
        finally:
            shutdown(trainer.runtime)
        return [json.loads(line) for line in (out / "logs" / "train.jsonl").read_text().splitlines()]

    base = _in_process_losses(tiny_data, tmp_path / "base", **{"train.batch_size": 8})
    own = run(tmp_path / "own", **{"train.batch_size": 8})
    accumulated = run(tmp_path / "acc", **{"train.batch_size": 4, "train.grad_accum": 2})
    for records in (own, accumulated):
        train = [r for r in records if r["kind"] == "train"]
        assert [r["step"] for r in train] == [1, 2, 3, 4]
        for r in train:
            assert r["loss"] == pytest.approx(base[r["step"]], rel=1e-5)
            # 8 rows per step over 8 x 63 targets: the metric is a per-item mean
            assert r["row_starts"] == pytest.approx(8 / (8 * 63))
