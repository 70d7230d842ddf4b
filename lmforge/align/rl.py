"""RL runs from rewards: ``lmforge align ppo`` and ``lmforge align grpo``.

An RL step is *sample, then update*, which the one training loop (lmforge/train/loop.py:
a fixed data stream of batches, one loss per micro-batch) does not express: the batch of a
step is made by the policy of that step. So RL has this small driver of its own, and shares
the rest with the loop's runs:

- sampling goes through lmforge's one generation engine (`lmforge.align.grpo.sample_groups`
  drives the continuous-batching scheduler; the greedy accuracy checks too);
- the step's figures go one JSON object per line to ``OUT/logs/train.jsonl`` through the
  loop's `JsonlLog` (``kind`` train / eval, as the loop writes them), the progress line is
  `lmforge.io.progress.Progress`, every file is written atomically;
- the policy is saved in the Hugging Face layout (`save_hf_model`) or, with ``peft: lora``,
  as a PEFT adapter (`save_adapter`); loading is `lmforge.align.train`'s.

Per step: ``prompts_per_step`` prompts from the task, ``group_size`` sampled responses each,
scored by the checker or a reward model (lmforge/align/rl_tasks.py), then a PPO update
(lmforge/align/ppo.py: value head, GAE, several epochs over minibatches) or a GRPO update
(lmforge/align/grpo.py: group-relative advantages, no value head). Every ``eval_interval``
steps (and at the start and the end) the policy answers ``eval_prompts`` fixed prompts
greedily and the checked accuracy is logged. The run ends with OUT/report.json,
OUT/report.md and OUT/plots/rl.png (reward, KL and entropy / clip fraction against the step).

A run does not write resumable checkpoints: an RL run here lasts minutes, and its state
includes the adaptive beta and the sampling RNG that the loop's checkpoints do not hold.
"""

from __future__ import annotations

import copy
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

import torch

from lmforge.align.config import GRPOConfig, PPOConfig, RLConfig
from lmforge.errors import LmforgeError
from lmforge.io.progress import Progress


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _no_reward(index: int, text: str, token_ids: list[int]) -> float:
    return 0.0  # rewards are scored for the whole batch at once, after sampling


class RLRun:
    """The pieces of one run, built from its config (or given: a model, a tokenizer)."""

    def __init__(self, config: RLConfig, model=None, tokenizer=None, log: Callable[[str], None] = _stderr) -> None:
        from lmforge.align.ppo import ValueHead
        from lmforge.align.rl_tasks import RewardScorer, draw_prompts
        from lmforge.align.train import _load_policy, _pad_id, freeze_lower_layers

        config.validate()
        self.config, self.log = config, log
        if config.threads:
            torch.set_num_threads(config.threads)
        if model is None:
            model, tokenizer = _load_policy(config)
        if tokenizer is None:
            raise LmforgeError("an RL run needs the model's tokenizer")
        self.tokenizer, self.pad_id = tokenizer, _pad_id(tokenizer)
        torch.manual_seed(config.seed)
        method = config.peft.method
        if method not in ("none", "lora", "qlora"):
            raise LmforgeError(f"RL runs train the whole model or LoRA/QLoRA adapters, not {method!r}")
        if method == "none":
            self.trainable = freeze_lower_layers(model, config.trainable_layers)
            # A frozen copy of the start: the reference of the KL penalty.
            self.reference = copy.deepcopy(model).eval().requires_grad_(False)
        else:
            from lmforge.tune.peft import apply_peft, trainable_parameters

            options = copy.deepcopy(config.peft)
            options.seed = config.seed if options.seed is None else options.seed
            model = apply_peft(model, options)
            self.trainable = trainable_parameters(model)[0]
            self.reference = None  # the base, with the adapters switched off
        self.model = model.train()
        device = next(model.parameters()).device
        self.value_head = ValueHead(model.config.n_embd).to(device) if isinstance(config, PPOConfig) else None
        groups = [{"params": [p for p in model.parameters() if p.requires_grad], "lr": config.lr}]
        if self.value_head is not None:
            groups.append({"params": list(self.value_head.parameters()), "lr": config.value_lr})
        self.optimizer = torch.optim.AdamW(groups, lr=config.lr, weight_decay=config.weight_decay)
        self.scorer = RewardScorer(config.reward, tokenizer, config.reward_model, config.system,
                                   config.reward_max_length, device)
        self.eval_prompts = draw_prompts(config.task, config.eval_prompts, f"eval:{config.seed}", config.max_operand)
        self.generator = torch.Generator().manual_seed(config.seed)
        if isinstance(config, PPOConfig):  # PPO's update settings and its KL weight, adapted across steps
            from lmforge.align.ppo import AdaptiveKLController, PPOSettings

            self.ppo_settings = PPOSettings(
                epochs=config.ppo_epochs, minibatch_size=config.minibatch_size, epsilon=config.epsilon,
                value_clip=config.value_clip, vf_coef=config.vf_coef, entropy_coef=config.entropy_coef,
                gamma=config.gamma, lam=config.lam, whiten_advantages=config.whiten_advantages,
                clip_grad_norm=config.clip_grad_norm)
            self.kl_controller = AdaptiveKLController(config.beta, config.target_kl, config.kl_horizon)

    # ---- sampling and scoring ------------------------------------------------------------------
    def sample(self, prompts, group_size: int, temperature: float, seed: int):
        """The engine's responses to ``prompts`` (``group_size`` each), with rewards and checked correctness."""
        from lmforge.align.grpo import sample_groups
        from lmforge.align.rl_tasks import prompt_ids

        ids = [prompt_ids(self.tokenizer, p.text, self.config.system) for p in prompts]
        sample = sample_groups(self.model, self.tokenizer, ids, group_size, self.config.max_new_tokens, temperature,
                               _no_reward, seed, self.pad_id)
        repeated = [p for p in prompts for _ in range(group_size)]
        sample.rewards, correct = self.scorer(repeated, sample.texts)
        return sample, correct

    def evaluate(self, step: int) -> dict[str, Any] | None:
        if not self.eval_prompts:
            return None
        sample, correct = self.sample(self.eval_prompts, 1, 0.0, seed=0)
        return {"kind": "eval", "step": step, "accuracy": float(correct.mean()), "reward": float(sample.rewards.mean()),
                "examples": [{"prompt": p.text, "response": t} for p, t in zip(self.eval_prompts[:3], sample.texts)]}

    # ---- one step ----------------------------------------------------------------------------
    def step(self, step: int) -> dict[str, Any]:
        from lmforge.align.rl_tasks import draw_prompts

        c = self.config
        started = time.perf_counter()
        prompts = draw_prompts(c.task, c.prompts_per_step, f"{c.seed}:{step}", c.max_operand)
        sample, correct = self.sample(prompts, c.group_size, c.temperature, seed=c.seed * 100003 + step)
        sampled = time.perf_counter()
        if isinstance(c, PPOConfig):
            figures = self._ppo(sample)
        else:
            figures = self._grpo(sample)
        figures.pop("reward", None)
        return {"kind": "train", "step": step, "reward": float(sample.rewards.mean()),
                "reward_std": float(sample.rewards.std()) if sample.rewards.numel() > 1 else 0.0,
                "correct": float(correct.mean()), **figures,
                "sample_seconds": sampled - started, "update_seconds": time.perf_counter() - sampled,
                "example": sample.texts[0]}

    def _ppo(self, sample) -> dict[str, float]:
        from lmforge.align.ppo import ppo_update

        figures = ppo_update(self.model, self.value_head, self.reference, self.optimizer, sample.input_ids,
                             sample.response_mask, sample.rewards, self.kl_controller.beta, self.ppo_settings,
                             self.generator)
        self.kl_controller.update(figures["kl_per_response"], sample.input_ids.shape[0])
        return figures

    def _grpo(self, sample) -> dict[str, float]:
        from lmforge.align.grpo import grpo_update

        c: GRPOConfig = self.config  # type: ignore[assignment]
        return grpo_update(self.model, self.reference, self.optimizer, sample, c.group_size, c.beta, c.epsilon,
                           c.aggregation, c.clip_grad_norm, max_tokens=c.max_new_tokens + 1)

    # ---- saving ------------------------------------------------------------------------------
    def save(self, directory: Path) -> Path:
        if self.reference is None:
            from lmforge.tune.peft import save_adapter

            return save_adapter(self.model, directory, self.config.model)
        from lmforge.model.checkpoint import save_hf_model

        return save_hf_model(self.model, directory, self.tokenizer, overwrite=True)

    def save_value_head(self, path: Path) -> Path:
        from safetensors.torch import save_file

        from lmforge.io.atomic import atomic_path

        path.parent.mkdir(parents=True, exist_ok=True)
        state = {f"v_head.{k}": v.detach().cpu().contiguous() for k, v in self.value_head.state_dict().items()}
        with atomic_path(path, suffix=".safetensors") as tmp:
            save_file(state, str(tmp), metadata={"format": "pt"})
        return path


def train_rl(config: RLConfig, model=None, tokenizer=None, progress: bool = True,
             log: Callable[[str], None] = _stderr) -> dict[str, Any]:
    """A PPO run (``config`` a `PPOConfig`) or a GRPO run (`GRPOConfig`); the report (also in OUT)."""
    from lmforge.io.atomic import write_text_atomic
    from lmforge.train.telemetry import JsonlLog

    algorithm = "ppo" if isinstance(config, PPOConfig) else "grpo"
    started = time.perf_counter()
    run = RLRun(config, model, tokenizer, log)
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "config.json", json.dumps(asdict(config), indent=2) + "\n")
    jsonl = JsonlLog(out / "logs" / "train.jsonl")
    c = config
    log(f"{algorithm}: {c.max_steps} steps of {c.prompts_per_step} prompts x {c.group_size} responses "
        f"({c.task}, reward: {c.reward}); {run.trainable / 1e6:.2f}M trainable parameters"
        + (", LoRA (the reference is the base without adapters)" if run.reference is None else ""))
    records: list[dict[str, Any]] = []
    bar = Progress(algorithm, c.max_steps, unit="steps", enabled=progress, every=1)
    try:
        evaluation = run.evaluate(0)
        if evaluation:
            jsonl.write(evaluation)
            records.append(evaluation)
            log(f"step 0: greedy accuracy {evaluation['accuracy']:.3f} on {len(run.eval_prompts)} prompts")
        for step in range(1, c.max_steps + 1):
            record = run.step(step)
            jsonl.write(record)
            records.append(record)
            bar.update(step, info=f"reward {record['reward']:.3f}  kl {record['kl']:.4f}  "
                                  f"correct {record['correct']:.2f}")
            if step % c.eval_interval == 0 or step == c.max_steps:
                evaluation = run.evaluate(step)
                if evaluation:
                    jsonl.write(evaluation)
                    records.append(evaluation)
    finally:
        bar.close()
        jsonl.close()
    model_dir = run.save(out / "model") if c.save else None
    value_head = run.save_value_head(out / "value_head.safetensors") if c.save and run.value_head is not None else None
    plot = plot_rl_run(records, out / "plots" / "rl.png", algorithm.upper()) if c.plots else None
    report = summarise(records, algorithm, c, time.perf_counter() - started)
    report |= {"trainable_parameters": run.trainable, "model": str(model_dir) if model_dir else None,
               "adapter": run.reference is None, "value_head": str(value_head) if value_head else None,
               "plot": str(plot) if plot else None}
    write_text_atomic(out / "report.json", json.dumps(report, indent=2) + "\n")
    write_text_atomic(out / "report.md", format_report(report))
    return report


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def summarise(records: list[dict[str, Any]], algorithm: str, config: RLConfig, seconds: float) -> dict[str, Any]:
    """The run's figures: first and last quarter means of reward, KL and more; accuracy start -> end."""
    train = [r for r in records if r["kind"] == "train"]
    evals = [r for r in records if r["kind"] == "eval"]
    quarter = max(1, len(train) // 4)
    head, tail = train[:quarter], train[-quarter:]
    keys = ("reward", "correct", "kl", "entropy", "clip_fraction")
    report: dict[str, Any] = {"objective": algorithm, "steps": len(train), "seconds": seconds,
                              "first_quarter": {k: _mean([r[k] for r in head if k in r]) for k in keys},
                              "last_quarter": {k: _mean([r[k] for r in tail if k in r]) for k in keys},
                              "max_kl": max((r["kl"] for r in train), default=float("nan")),
                              "accuracy_start": evals[0]["accuracy"] if evals else None,
                              "accuracy_end": evals[-1]["accuracy"] if evals else None,
                              "evaluations": [{k: e[k] for k in ("step", "accuracy", "reward")} for e in evals],
                              "step_seconds": _mean([r["sample_seconds"] + r["update_seconds"] for r in train]),
                              "config": asdict(config)}
    if train and "value_loss" in train[0]:
        report["value_loss"] = {"first": train[0]["value_loss"], "last": train[-1]["value_loss"]}
        report["final_beta"] = train[-1]["beta"]
    return report


def format_report(r: dict[str, Any]) -> str:
    c, a, b = r["config"], r["first_quarter"], r["last_quarter"]
    lines = [f"# {r['objective'].upper()} run", "",
             f"- {r['steps']} steps of {c['prompts_per_step']} prompts x {c['group_size']} responses "
             f"({c['task']}, reward: {c['reward']}) in {r['seconds']:.0f} s ({r['step_seconds']:.1f} s per step)",
             f"- {r['trainable_parameters'] / 1e6:.2f}M trainable parameters"
             + (" (LoRA adapters; the reference is the base without them)" if r["adapter"] else ""),
             "", "| | first quarter | last quarter |", "|---|---:|---:|"]
    for key in ("reward", "correct", "kl", "entropy", "clip_fraction"):
        lines.append(f"| {key} | {a[key]:.4f} | {b[key]:.4f} |")
    lines += ["", f"- largest per-token KL to the reference in a step: {r['max_kl']:.4f}"]
    if "final_beta" in r:
        lines.append(f"- value loss {r['value_loss']['first']:.4f} -> {r['value_loss']['last']:.4f}; "
                     f"beta at the end {r['final_beta']:.4f}")
    if r["evaluations"]:
        lines += ["", "Greedy answers to the fixed evaluation prompts (checked accuracy):", "",
                  "| step | accuracy | mean reward |", "|---:|---:|---:|"]
        lines += [f"| {e['step']} | {e['accuracy']:.3f} | {e['reward']:.3f} |" for e in r["evaluations"]]
    if r["plot"]:
        lines += ["", f"![reward and KL](plots/{Path(r['plot']).name})"]
    if r["model"]:
        lines += ["", f"{'Adapter (PEFT layout)' if r['adapter'] else 'Model (Hugging Face layout)'}: `{r['model']}`"]
    return "\n".join(lines) + "\n"


def plot_rl_run(records: list[dict[str, Any]], out: Path, title: str = "RL") -> Path | None:
    """Reward (sampled, checked, greedy accuracy), KL to the reference, entropy and clip fraction
    against the step, as one PNG."""
    from lmforge.io.plots import pyplot

    plt = pyplot()
    if plt is None:
        return None
    from lmforge.io.atomic import atomic_path

    train = [r for r in records if r["kind"] == "train"]
    evals = [r for r in records if r["kind"] == "eval"]
    if not train:
        return None
    steps = [r["step"] for r in train]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    axes[0].plot(steps, [r["reward"] for r in train], lw=1, label="mean reward (samples)")
    if any(r["correct"] != r["reward"] for r in train):
        axes[0].plot(steps, [r["correct"] for r in train], lw=1, label="checked correct (samples)")
    if evals:
        axes[0].plot([e["step"] for e in evals], [e["accuracy"] for e in evals], "o-", label="greedy accuracy")
    axes[0].set(xlabel="step", title=f"{title}: reward")
    axes[1].plot(steps, [r["kl"] for r in train], lw=1)
    axes[1].set(xlabel="step", ylabel="nats per token", title="KL to the reference")
    axes[2].plot(steps, [r.get("entropy", float("nan")) for r in train], lw=1, label="entropy (nats)")
    axes[2].plot(steps, [r["clip_fraction"] for r in train], lw=1, label="clip fraction")
    axes[2].set(xlabel="step", title="entropy and clipping")
    for ax in (axes[0], axes[2]):
        ax.legend()
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
    return out


def train_ppo(config: PPOConfig, model=None, tokenizer=None, progress: bool = True,
              log: Callable[[str], None] = _stderr) -> dict[str, Any]:
    return train_rl(config, model, tokenizer, progress, log)


def train_grpo(config: GRPOConfig, model=None, tokenizer=None, progress: bool = True,
               log: Callable[[str], None] = _stderr) -> dict[str, Any]:
    return train_rl(config, model, tokenizer, progress, log)
