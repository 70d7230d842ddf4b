"""Mixture of experts vs a dense model of equal active parameters, same data, recipe and budget.

Trains the shipped recipes tiny-moe (4 experts of width 176, top-2, per block) and
tiny-dense-matched (one SwiGLU of width 352) side by side: both trainers are built from
their recipes (lmforge/train/loop.py's `Trainer`, the one training step) and take turns step
by step, so load on a shared machine lands on both alike. Every `--eval-interval` steps both
are evaluated on the same validation rows (pure cross-entropy: router losses only enter the
training loss). After every MoE step the tokens each expert of each layer received are read
(`Transformer.expert_load`) for the utilization plot.

Writes OUT/result.json (curves, per-step expert load, step times, parameter counts) and
two plots: loss curves (train and validation against tokens, validation against CPU
seconds) and expert utilization per layer over training.

    nice -n 10 env OMP_NUM_THREADS=1 python benchmarks/moe_vs_dense.py             # 300 steps x 8 rows x 256 tokens
    python benchmarks/moe_vs_dense.py --steps 20 --eval-interval 10 --out /tmp/moe  # a quick look
    nice -n 10 env OMP_NUM_THREADS=1 python benchmarks/moe_vs_dense.py --aux-per-layer --tag=-per-layer \
        --out runs/moe-vs-dense-per-layer                                           # balance each layer
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

SIDES = ("tiny-moe", "tiny-dense-matched")


def build(name: str, args) -> "object":
    from lmforge.cli.common import SHIPPED_RECIPES
    from lmforge.train.loop import Trainer
    from lmforge.train.recipe import load_recipe

    config = load_recipe(SHIPPED_RECIPES / f"{name}.yaml")
    t = config.train
    t.out = str(Path(args.out) / name)
    t.max_steps, t.batch_size = args.steps, args.batch_size
    t.eval_interval, t.save_interval, t.threads = args.eval_interval, args.steps, args.threads
    config.schedule.warmup_steps = min(config.schedule.warmup_steps, max(1, args.steps // 10))
    if args.aux_coef is not None and config.model.num_experts:
        config.model.router_aux_loss_coef = args.aux_coef
    if args.aux_per_layer and config.model.num_experts:
        config.model.router_aux_per_layer = True
    return Trainer(config, progress=False, log=lambda m: print(f"[{name}] {m}", file=sys.stderr))


def plot(result: dict, path_curves: Path, path_load: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for name, side in result["sides"].items():
        tokens = [r["tokens"] for r in side["train"]]
        a.plot(tokens, side["smoothed_train_loss"], label=f"{name} train (20-step mean)", alpha=0.8)
        a.plot([e["tokens"] for e in side["eval"]], [e["val_loss"] for e in side["eval"]], "o-", label=f"{name} validation")
        b.plot([e["cpu_seconds"] for e in side["eval"]], [e["val_loss"] for e in side["eval"]], "o-", label=name)
    a.set_xlabel("training tokens"), a.set_ylabel("cross-entropy (nats/token)"), a.legend(fontsize=8)
    a.set_title("loss vs tokens (equal active parameters)")
    b.set_xlabel("training CPU seconds"), b.set_ylabel("validation loss"), b.legend(fontsize=8)
    b.set_title("validation loss vs compute spent")
    fig.tight_layout()
    fig.savefig(path_curves, dpi=110)
    plt.close(fig)

    load = torch.tensor(result["sides"]["tiny-moe"]["expert_load"], dtype=torch.float64)  # [steps, L, E]
    fractions = load / load.sum(-1, keepdim=True)
    steps, layers, experts = fractions.shape
    fig, axes = plt.subplots(1, layers, figsize=(3.2 * layers, 3.2), sharey=True)
    for layer, ax in enumerate(axes):
        for e in range(experts):
            ax.plot(range(1, steps + 1), fractions[:, layer, e].tolist(), label=f"expert {e}")
        ax.axhline(1 / experts, color="gray", linestyle=":", linewidth=1)
        ax.set_title(f"layer {layer}"), ax.set_xlabel("step")
    axes[0].set_ylabel("share of routed tokens")
    axes[-1].legend(fontsize=7)
    fig.suptitle("tiny-moe: expert utilization per layer (dotted: uniform)")
    fig.tight_layout()
    fig.savefig(path_load, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--eval-interval", type=int, default=25)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="runs/moe-vs-dense")
    parser.add_argument("--figures", default="docs/images", help="where the two PNG plots go")
    parser.add_argument("--tag", default="", help="suffix of the plot names (e.g. for a variant run)")
    parser.add_argument("--aux-coef", type=float, default=None,
                        help="override tiny-moe's router_aux_loss_coef (default: the recipe's 0.01)")
    parser.add_argument("--aux-per-layer", action="store_true",
                        help="balance each layer on its own (router_aux_per_layer) instead of the pool over layers")
    args = parser.parse_args()

    from lmforge.io.atomic import write_json_atomic
    from lmforge.io.progress import Progress

    trainers = {name: build(name, args) for name in SIDES}
    sides = {name: {"train": [], "eval": [], "expert_load": [], "cpu_seconds": 0.0, "wall_seconds": 0.0,
                    "parameters": tr.model.num_parameters(),
                    "active_parameters": tr.model.config.num_parameters(active=True)}
             for name, tr in trainers.items()}
    trainers["tiny-moe"].model.expert_load(reset=True)

    def evaluate(name):
        tr = trainers[name]
        tr.model.eval()
        result = tr.evaluate()
        tr.model.train()
        tr.model.expert_load(reset=True)  # validation forwards are not training traffic
        sides[name]["eval"].append({"step": tr.step, "tokens": tr.tokens_seen,
                                    "cpu_seconds": sides[name]["cpu_seconds"], **result})

    for name in SIDES:
        evaluate(name)
    progress = Progress("moe-vs-dense", args.steps, unit="steps")
    for step in range(1, args.steps + 1):
        order = SIDES if step % 2 else SIDES[::-1]
        for name in order:
            tr, side = trainers[name], sides[name]
            cpu, wall = time.process_time(), time.perf_counter()
            stats = tr.train_step()
            side["cpu_seconds"] += time.process_time() - cpu
            side["wall_seconds"] += time.perf_counter() - wall
            side["train"].append({"step": tr.step, "tokens": tr.tokens_seen, **stats})
            if tr.model.config.num_experts:
                side["expert_load"].append(tr.model.expert_load(reset=True).tolist())
            if step % args.eval_interval == 0 or step == args.steps:
                evaluate(name)
        moe, dense = (sides[n]["train"][-1]["loss"] for n in SIDES)
        progress.update(step, info=f"loss moe {moe:.3f} dense {dense:.3f}")
    progress.close()
    for name, tr in trainers.items():
        tr.save()
        losses = [r["loss"] for r in sides[name]["train"]]
        sides[name]["smoothed_train_loss"] = [statistics.fmean(losses[max(0, i - 19):i + 1]) for i in range(len(losses))]

    moe_config = trainers["tiny-moe"].model.config
    result = {"steps": args.steps, "router_aux_loss_coef": moe_config.router_aux_loss_coef,
              "router_aux_per_layer": moe_config.router_aux_per_layer, "batch_size": args.batch_size, "seq_len": trainers["tiny-moe"].seq_len,
              "threads": args.threads, "cpu": platform.processor() or platform.machine(),
              "load_average": os.getloadavg(), "sides": sides}
    out = Path(args.out)
    write_json_atomic(out / "result.json", result)
    figures = Path(args.figures)
    figures.mkdir(parents=True, exist_ok=True)
    plot(result, figures / f"moe-vs-dense-loss{args.tag}.png", figures / f"moe-expert-load{args.tag}.png")

    final = {n: sides[n]["eval"][-1]["val_loss"] for n in SIDES}
    speed = {n: sides[n]["train"][-1]["tokens"] / sides[n]["cpu_seconds"] for n in SIDES}
    last = torch.tensor(sides["tiny-moe"]["expert_load"][-20:], dtype=torch.float64).sum(0)
    shares = (last / last.sum(-1, keepdim=True)).tolist()
    print(f"{'model':<20} {'params':>9} {'active':>9} {'val loss':>9} {'tok/CPU-s':>10}")
    for n in SIDES:
        print(f"{n:<20} {sides[n]['parameters']:>9,} {sides[n]['active_parameters']:>9,} {final[n]:>9.4f} {speed[n]:>10.0f}")
    print("expert shares over the last 20 steps, per layer:",
          "; ".join(" ".join(f"{s:.2f}" for s in layer) for layer in shares))
    print(json.dumps({"benchmark": "moe_vs_dense", "steps": args.steps, "val_loss_moe": final["tiny-moe"],
                      "val_loss_dense": final["tiny-dense-matched"],
                      "cpu_speed_ratio_moe_over_dense": speed["tiny-moe"] / speed["tiny-dense-matched"],
                      "load_average": os.getloadavg()}))


if __name__ == "__main__":
    main()
