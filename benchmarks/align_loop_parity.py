"""DPO and reward-model runs on the training loop against the private driver they replaced.

The earlier driver (``PreferenceRun``) is read from the git history (commit given by
--old-commit), so both run side by side on the same tiny model, pairs and settings:
this prints the largest loss/margin differences per step and the wall-time ratio
(alternating rounds, medians), then one JSON line.

    python benchmarks/align_loop_parity.py [--rounds 3] [--steps 12]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import torch


def old_driver(commit: str):
    source = subprocess.run(["git", "show", f"{commit}:lmforge/align/train.py"], capture_output=True, text=True,
                            check=True).stdout
    path = Path(tempfile.mkdtemp()) / "old_align_train.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("old_align_train", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> None:
    from lmforge.align import train as new
    from lmforge.align.config import DPOConfig, PreferenceLossConfig, RewardConfig
    from lmforge.align.preference_data import PreferenceDataConfig, generate_pairs
    from lmforge.model.config import ModelConfig
    from lmforge.model.loading import resolve_tokenizer
    from lmforge.model.transformer import Transformer

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--old-commit", default="00a0139")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=12)
    args = parser.parse_args()
    old = old_driver(args.old_commit)
    tok = resolve_tokenizer(None)
    pairs = generate_pairs(PreferenceDataConfig(seed=0, arithmetic=40, format=0, json=0, harmful=0, benign=0,
                                                bias=0))["train"][:16]

    def tiny():
        torch.manual_seed(0)
        return Transformer(ModelConfig(vocab_size=tok.vocab_size, n_embd=64, n_head=4, n_layer=2,
                                       intermediate_size=128, tie_word_embeddings=True))

    def run(module, kind):
        out = tempfile.mkdtemp()
        cls = DPOConfig if kind == "dpo" else RewardConfig
        kw = dict(out=out, max_steps=args.steps, batch_size=4, lr=3e-3, warmup_steps=1, eval_interval=4,
                  max_length=64, save=False, plots=False, threads=1)
        if kind == "dpo":
            kw["loss"] = PreferenceLossConfig(beta=0.5)
        fn = module.train_dpo if kind == "dpo" else module.train_reward
        start = time.perf_counter()
        fn(cls(**kw), tiny(), tok, {"train": pairs, "validation": pairs}, progress=False, log=lambda _m: None)
        seconds = time.perf_counter() - start
        log = [json.loads(x) for x in (Path(out) / "logs" / "train.jsonl").read_text().splitlines()]
        return seconds, log

    result = {"load": os.getloadavg()[0]}
    for kind in ("dpo", "reward"):
        times = {"old": [], "new": []}
        logs = {}
        for _ in range(args.rounds):
            for name, module in (("old", old), ("new", new)):
                seconds, logs[name] = run(module, kind)
                times[name].append(seconds)
        train = {k: [r for r in v if r["kind"] == "train"] for k, v in logs.items()}
        evals = {k: [r for r in v if r["kind"] == "eval"] for k, v in logs.items()}
        d_loss = max(abs(a["loss"] - b["loss"]) for a, b in zip(train["old"], train["new"], strict=True))
        d_margin = max(abs(a["reward_margin"] - b["reward_margin"]) for a, b in zip(train["old"], train["new"], strict=True))
        d_eval = max(abs(a["loss"] - b["loss"]) for a, b in zip(evals["old"], evals["new"], strict=True))
        ratio = statistics.median(times["new"]) / statistics.median(times["old"])
        # Per optimizer step (the old driver logged "seconds", the loop "step_seconds"): the fixed
        # costs of a run (the loop's peak-FLOPs probe, its final checkpoint) are not in these.
        step_old = statistics.median(r["seconds"] for r in train["old"][1:])
        step_new = statistics.median(r["step_seconds"] for r in train["new"][1:])
        print(f"{kind}: {len(train['new'])} steps; max |train loss diff| {d_loss:.2e}, |margin diff| {d_margin:.2e}, "
              f"|held-out loss diff| {d_eval:.2e}; final loss old {train['old'][-1]['loss']:.5f} "
              f"new {train['new'][-1]['loss']:.5f}; wall time new/old {ratio:.2f} "
              f"(medians {statistics.median(times['new']):.2f} s / {statistics.median(times['old']):.2f} s); "
              f"per step new/old {step_new / step_old:.2f} ({1000 * step_new:.0f} ms / {1000 * step_old:.0f} ms)")
        result[kind] = {"max_train_loss_diff": d_loss, "max_margin_diff": d_margin, "max_heldout_loss_diff": d_eval,
                        "time_ratio_new_over_old": ratio, "step_time_ratio_new_over_old": step_new / step_old}
    result["load_after"] = os.getloadavg()[0]
    print(json.dumps(result))


if __name__ == "__main__":
    main()
