"""Where one LoRA training step spends its time: lmforge vs peft + transformers, per kind of op.

Builds the two sides exactly as benchmarks/finetune.py does (same base, adapter, batch,
loss, fused AdamW), runs warm-up steps, then profiles `--steps` steps of each side with
torch.profiler on CPU and sorts every leaf op (self CPU time) into a category: forward
products, backward input-gradient products, LoRA weight-gradient products, attention
forward/backward, norms, SiLU, elementwise/copies, the loss, the optimizer, and what is
left (Python, autograd bookkeeping, allocation). The categories come from the op names
and from whether the op ran inside an autograd backward node.

    python benchmarks/finetune_profile.py --threads 1 --batch-size 2 --seq-len 128
    python benchmarks/finetune_profile.py --small      # a small random Llama, seconds not minutes

Self CPU times on one thread are the least disturbed by other work on a shared machine;
the table's `ms/step` column is per profiled step.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections import defaultdict

import torch

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import finetune as bench  # noqa: E402
from lmforge.tune.peft import PeftOptions, apply_peft, save_adapter  # noqa: E402

CATEGORIES = ("fwd GEMM", "bwd input-grad GEMM", "bwd weight-grad GEMM", "attention fwd", "attention bwd",
              "norm fwd", "norm bwd", "SiLU/GELU fwd+bwd", "rope", "elementwise fwd", "elementwise bwd",
              "copy/reshape", "loss/head", "embedding", "optimizer", "other ops")


COPIES = {"clone", "contiguous", "cat", "pad", "constant_pad_nd", "view", "reshape", "transpose", "permute", "expand",
          "slice", "select", "split", "split_with_sizes", "chunk", "as_strided", "unsqueeze", "squeeze", "narrow",
          "stack", "t", "to", "_to_copy", "new_zeros", "new_empty", "new_full", "detach", "alias", "_unsafe_view",
          "unbind", "resize_", "full", "zeros", "ones", "scatter", "gather", "masked_fill", "where"}


def category(name: str, chain: str, backward: bool, in_loss: bool, in_optim: bool) -> str:
    """`chain`: the op's enclosing ranges and autograd nodes, lower case, which name the module-level op
    (an RMSNorm backward runs as plain muls and sums under its node)."""
    n = name.lower()
    if in_optim:
        return "optimizer"
    if in_loss:
        return "loss/head"
    if any(k in chain for k in ("attention", "flash", "sdpa")):
        return "attention bwd" if backward else "attention fwd"
    if any(k in chain for k in ("rms_norm", "rmsnorm", "layer_norm", "layernorm")):
        return "norm bwd" if backward else "norm fwd"
    if "silu" in chain or "gelu" in chain:
        return "SiLU/GELU fwd+bwd"
    if "embedding" in chain:
        return "embedding"
    if any(k in n for k in ("mm", "linear", "matmul", "addmm", "bmm")):
        return "bwd input-grad GEMM" if backward else "fwd GEMM"
    base = n.removeprefix("aten::").removeprefix("mkldnn::")
    if base in COPIES or base.startswith(("copy", "empty", "zero", "fill", "index")):
        return "copy/reshape"
    return "elementwise bwd" if backward else "elementwise fwd"


def profile_side(step, batches, steps: int) -> tuple[dict[str, float], float, float]:
    """Self CPU microseconds per category (summed over `steps`), the total, and the wall time."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        start = time.perf_counter()
        for i in range(steps):
            step(batches[i % len(batches)])
        wall = time.perf_counter() - start
    events = prof.events()
    by_cat: dict[str, float] = defaultdict(float)
    # Parents of each event: we tag ops by the nearest enclosing marker range (our record_function
    # labels "loss", "optimizer") and by whether any ancestor is an autograd backward node.
    for ev in events:
        if ev.device_type != torch.autograd.DeviceType.CPU:
            continue
        name = ev.name
        if name.startswith("ProfilerStep") or name in ("lmforge.step.loss", "lmforge.step.optimizer"):
            continue
        ancestors, node = [], ev.cpu_parent
        while node is not None:
            ancestors.append(node.name)
            node = node.cpu_parent
        backward = any("Backward" in a or "evaluate_function" in a for a in ancestors + [name])
        in_optim = any(a == "lmforge.step.optimizer" for a in ancestors)
        in_loss = any(a == "lmforge.step.loss" for a in ancestors) or "CrossEntropy" in name \
            or any("LinearCrossEntropy" in a or "nll_loss" in a or "log_softmax" in a for a in ancestors + [name])
        chain = " ".join(a for a in ancestors if not a.startswith("lmforge.step")).lower() + " " + name.lower()
        cat = category(name, chain, backward, in_loss, in_optim)
        if cat in ("fwd GEMM", "bwd input-grad GEMM") and backward and _is_weight_grad(ev):
            cat = "bwd weight-grad GEMM"
        by_cat[cat] += ev.self_cpu_time_total
    total = sum(by_cat.values())
    return by_cat, total, wall, prof


def _is_weight_grad(ev) -> bool:
    """A backward product whose output is a (LoRA) weight: [r, in] or [out, r] with a small side."""
    shapes = getattr(ev, "input_shapes", None) or []
    dims = [tuple(s) for s in shapes if s]
    if len(dims) >= 2 and len(dims[0]) == 2 and len(dims[1]) == 2:
        (a0, a1), (b0, b1) = dims[0], dims[1]
        # grad^T @ x: contraction over tokens (a large inner dimension), result small.
        return a1 == b0 and a1 >= 64 and min(a0, b1) <= 64 and a0 * b1 < a1 * max(a0, b1)
    return False


def labelled_step(model, hf: bool, lr=1e-4):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, fused=True)
    from torch.profiler import record_function

    def step(ids):
        with record_function("lmforge.step.train"):
            loss = bench.loss_fn(model, ids, hf)
            loss.backward()
        with record_function("lmforge.step.optimizer"):
            opt.step()
            opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    return step


def build(small: bool, r: int, alpha: float, targets: list[str], pack_frozen: bool = False):
    import peft

    if small:
        from lmforge.model.config import ModelConfig
        from lmforge.model.transformer import Transformer

        config = ModelConfig(family="llama", n_layer=4, n_embd=256, n_head=4, n_kv_head=2, intermediate_size=688,
                             vocab_size=8192)
        torch.manual_seed(0)
        ours = Transformer(config).train()
    else:
        ours = bench.load_base()
    theirs_base = bench.hf_copy(ours)
    ours = apply_peft(ours, PeftOptions(method="lora", r=r, alpha=alpha, target_modules=targets, seed=0,
                                               pack_frozen=pack_frozen))
    bench.nudge(ours)
    with tempfile.TemporaryDirectory() as tmp:
        save_adapter(ours, tmp)
        theirs = peft.PeftModel.from_pretrained(theirs_base, tmp, is_trainable=True).train()
    return ours, theirs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--r", type=int, default=8)
    ap.add_argument("--alpha", type=float, default=16.0)
    ap.add_argument("--targets", nargs="+", default=["all-linear"])
    ap.add_argument("--steps", type=int, default=2, help="profiled steps per side")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--small", action="store_true", help="a small random Llama instead of the default model")
    ap.add_argument("--pack-frozen", action="store_true",
                    help="lmforge keeps oneDNN-packed copies of the frozen weights (PeftOptions.pack_frozen)")
    ap.add_argument("--top", type=int, default=0, help="also print the N ops with most self CPU time per side")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    ours, theirs = build(args.small, args.r, args.alpha, args.targets, args.pack_frozen)
    gen = torch.Generator().manual_seed(1)
    vocab = ours.config.vocab_size
    batches = [torch.randint(0, vocab, (args.batch_size, args.seq_len), generator=gen) for _ in range(2)]
    bench.check_agreement(ours, theirs, batches[0])
    sides = {"lmforge": labelled_step(ours, False), "peft": labelled_step(theirs, True)}
    results = {}
    for name, step in sides.items():
        for i in range(args.warmup):
            step(batches[i % 2])
        results[name] = profile_side(step, batches, args.steps)
    print(f"load average {os.getloadavg()[0]:.1f}; {args.threads} thread(s); batch {args.batch_size} x {args.seq_len}; "
          f"self CPU ms per step")
    print(f"{'category':24}{'lmforge':>10}{'peft':>10}")
    for cat in CATEGORIES:
        a, b = (results[n][0].get(cat, 0.0) / 1e3 / args.steps for n in ("lmforge", "peft"))
        if a or b:
            print(f"{cat:24}{a:>10.1f}{b:>10.1f}")
    ta, tb = (results[n][1] / 1e3 / args.steps for n in ("lmforge", "peft"))
    wa, wb = (results[n][2] * 1e3 / args.steps for n in ("lmforge", "peft"))
    print(f"{'all ops (self CPU)':24}{ta:>10.1f}{tb:>10.1f}")
    print(f"{'wall (profiled)':24}{wa:>10.1f}{wb:>10.1f}")
    for name in ("lmforge", "peft") if args.top else ():
        print(f"--- {name}: top {args.top} ops by self CPU (all profiled steps)")
        table = results[name][3].key_averages(group_by_input_shape=True).table(sort_by="self_cpu_time_total",
                                                                               row_limit=args.top, max_name_column_width=40)
        print(table)


if __name__ == "__main__":
    main()
