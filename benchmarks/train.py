"""Training tokens/s: lmforge vs transformers on the same Llama config, same machine, same run.

Both models start from the same weights (lmforge's random init copied into a
`LlamaForCausalLM`) and train with the same plain loop: loss, backward, torch AdamW
step, zero_grad. The optimizer is the one lmforge's trainer builds (lmforge/train/optim.py:
`torch.optim.AdamW(..., fused=True)`), here with lr 1e-4 and the other defaults, and
transformers gets exactly the same. float32 on CPU. Each side computes
its loss the way its users do: lmforge through `lmforge.train.loss.causal_lm_loss` (what
lmforge's training code runs), transformers through `model(input_ids=ids, labels=ids).loss`.
Before timing, one loss and backward on each side must agree: losses within 1e-4, and
every parameter's gradient within 1e-3 of that gradient's largest entry (float32
rounding over sums of a few thousand terms is around 1e-5 of it; a wrong gradient is off
by order 1), so the two sides compute the same thing.

Each round gives each side `--warmup` untimed and `--steps` timed steps. With
`--interleave rounds` (the default) a side runs its steps as one block and the order of
the two blocks alternates by round; with `--interleave steps` the two sides take turns
step by step inside the round (each step timed on its own), so a burst of load on a
shared machine lands on both sides nearly equally instead of on one side's block. The
table reports the median and the spread over rounds, and the JSON line the median ratio.
The process first calls what lmforge's trainer calls on a CPU, `keep_freed_memory(large_blocks=True)`
(lmforge/io/allocator.py: freed memory stays in the process for the next step); both sides
run under it (``--no-keep-freed-memory`` leaves malloc as it is).

    python benchmarks/train.py                  # 5 rounds, small Llama, batch 4 x 128
    python benchmarks/train.py --interleave steps
    python benchmarks/train.py --preset smollm2-135m --seq-len 64
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from lmforge.io.progress import Progress  # noqa: E402
from lmforge.model.config import ModelConfig  # noqa: E402
from lmforge.model.families import hf_config_from, lmforge_to_hf  # noqa: E402
from lmforge.model.transformer import Transformer  # noqa: E402
from lmforge.train.loss import causal_lm_loss  # noqa: E402

PRESETS = {
    # A small Llama: GQA, SwiGLU, RoPE, untied head (about 7M parameters).
    "small-llama": dict(n_layer=4, n_embd=256, n_head=4, n_kv_head=2, intermediate_size=688, vocab_size=8192),
    # SmolLM2-135M's shapes (30 layers, width 576, 9/3 heads, tied 49152 vocabulary).
    "smollm2-135m": dict(n_layer=30, n_embd=576, n_head=9, n_kv_head=3, intermediate_size=1536, vocab_size=49152,
                         tie_word_embeddings=True, rope_theta=100000.0),
}


def build_pair(config: ModelConfig):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    ours = Transformer(config)
    hf_cfg = hf_config_from(config)
    hf_cfg.pop("architectures", None), hf_cfg.pop("model_type", None), hf_cfg.pop("torch_dtype", None)
    theirs = LlamaForCausalLM(LlamaConfig(**hf_cfg, attn_implementation="sdpa"))
    missing, unexpected = theirs.load_state_dict(lmforge_to_hf(config, ours.state_dict()), strict=False)
    if unexpected or [m for m in missing if not (config.tie_word_embeddings and m == "lm_head.weight")]:
        raise SystemExit(f"weight copy failed: missing {missing}, unexpected {unexpected}")
    return ours.train(), theirs.train()


def loss_fn(model, ids: torch.Tensor, hf: bool) -> torch.Tensor:
    return model(input_ids=ids, labels=ids).loss if hf else causal_lm_loss(model, ids)


def check_agreement(config: ModelConfig, ours, theirs, ids: torch.Tensor) -> tuple[float, float, float]:
    """One loss + backward per side; exits unless losses and all gradients agree. Returns (loss, loss, worst)."""
    losses = []
    for model, hf in ((ours, False), (theirs, True)):
        loss = loss_fn(model, ids, hf)
        loss.backward()
        losses.append(float(loss.detach()))
    if abs(losses[0] - losses[1]) > 1e-4:
        raise SystemExit(f"first-step losses differ: lmforge {losses[0]:.6f}, transformers {losses[1]:.6f}")
    # lmforge_to_hf splits fused gradients (qkv, gate/up) the way it splits the weights.
    ours_grads = lmforge_to_hf(config, {n: p.grad for n, p in ours.named_parameters()})
    theirs_grads = dict(theirs.named_parameters())
    worst = 0.0
    for name, g in ours_grads.items():
        ref = theirs_grads[name].grad
        rel = float((g - ref).abs().max() / ref.abs().max().clamp_min(1e-12))
        worst = max(worst, rel)
        if rel > 1e-3:
            raise SystemExit(f"gradients of {name} differ: max abs diff {rel:.2e} of the largest entry")
    ours.zero_grad(set_to_none=True), theirs.zero_grad(set_to_none=True)
    return losses[0], losses[1], worst


def make_step(model, hf: bool):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)  # what lmforge's trainer uses; same for both

    def step(ids: torch.Tensor) -> float:
        loss = loss_fn(model, ids, hf)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    return step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="small-llama", choices=sorted(PRESETS))
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=5, help="timed steps per round and side")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps per round and side")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--interleave", choices=("rounds", "steps"), default="rounds",
                    help="alternate the two sides by round (blocks of steps) or step by step")
    ap.add_argument("--no-keep-freed-memory", action="store_true", help="leave glibc's malloc at its defaults")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.no_keep_freed_memory:
        from lmforge.io.allocator import keep_freed_memory

        keep_freed_memory(large_blocks=True)
    import transformers

    config = ModelConfig(**PRESETS[args.preset], max_position_embeddings=max(2048, args.seq_len))
    ours, theirs = build_pair(config)
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, config.vocab_size, (args.batch_size, args.seq_len), generator=gen) for _ in range(4)]
    *first, grad_diff = check_agreement(config, ours, theirs, batches[0])
    steps = {"lmforge": make_step(ours, False), "transformers": make_step(theirs, True)}
    load_before = os.getloadavg()[0]  # other work on the machine, reported beside the figures
    tokens_per_step = args.batch_size * args.seq_len
    rates: dict[str, list[float]] = {name: [] for name in steps}
    progress = Progress("train benchmark", args.rounds, unit="rounds", log_every=0.0)
    for r in range(args.rounds):
        order = list(steps) if r % 2 == 0 else list(steps)[::-1]
        if args.interleave == "rounds":
            for name in order:
                step = steps[name]
                for i in range(args.warmup):
                    step(batches[i % len(batches)])
                start = time.perf_counter()
                for i in range(args.steps):
                    step(batches[i % len(batches)])
                rates[name].append(tokens_per_step * args.steps / (time.perf_counter() - start))
        else:
            for i in range(args.warmup):
                for name in order:
                    steps[name](batches[i % len(batches)])
            spent = dict.fromkeys(steps, 0.0)
            for i in range(args.steps):
                for name in order:
                    start = time.perf_counter()
                    steps[name](batches[i % len(batches)])
                    spent[name] += time.perf_counter() - start
            for name in steps:
                rates[name].append(tokens_per_step * args.steps / spent[name])
        progress.update(r + 1, info=", ".join(f"{n} {rates[n][-1]:.0f} tok/s" for n in steps))
    progress.close()
    ratios = [a / b for a, b in zip(rates["lmforge"], rates["transformers"])]
    print(f"{config.num_parameters() / 1e6:.1f}M-parameter Llama ({args.preset}), batch {args.batch_size} x {args.seq_len}, "
          f"fp32 CPU, {torch.get_num_threads()} threads; first-step loss {first[0]:.6f} vs {first[1]:.6f}, "
          f"gradients within {grad_diff:.1e} of their largest entry")
    load_after = os.getloadavg()[0]
    print(f"load average (1 min) {load_before:.1f} before, {load_after:.1f} after")
    print(f"{'':14}{'median tok/s':>14}{'min':>10}{'max':>10}")
    for name in steps:
        v = rates[name]
        print(f"{name:14}{statistics.median(v):>14.0f}{min(v):>10.0f}{max(v):>10.0f}")
    print(f"{'ratio':14}{statistics.median(ratios):>14.2f}{min(ratios):>10.2f}{max(ratios):>10.2f}")
    print("per-round ratios: " + ", ".join(f"{r:.2f}" for r in ratios))
    print(json.dumps({
        "benchmark": "train", "preset": args.preset, "interleave": args.interleave, "params": config.num_parameters(), "batch_size": args.batch_size,
        "seq_len": args.seq_len, "rounds": args.rounds, "steps": args.steps, "threads": torch.get_num_threads(),
        "lmforge_tok_s": statistics.median(rates["lmforge"]), "transformers_tok_s": statistics.median(rates["transformers"]),
        "ratio": statistics.median(ratios), "ratios": [round(r, 3) for r in ratios], "ratio_min": min(ratios), "ratio_max": max(ratios),
        "first_loss": list(first), "load_avg": [round(load_before, 2), round(load_after, 2)], "grad_rel_diff": grad_diff, "torch": torch.__version__, "transformers": transformers.__version__,
        "machine": platform.processor() or platform.machine(),
    }))


if __name__ == "__main__":
    main()
