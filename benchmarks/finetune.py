"""LoRA fine-tuning tokens/s: lmforge vs peft + transformers on the same base, same run.

Both sides train the same LoRA (rank, alpha, targets; dropout 0) on the same frozen
float32 base with the same batches and `torch.optim.AdamW(fused=True)` over the trainable
parameters. The base is the default model (SmolLM2-135M-Instruct, GGUF, dequantized to
float32 by lmforge's loader); transformers gets the very same weights through lmforge's
Hugging Face name map (what `lmforge convert` writes), and peft gets lmforge's initial
adapter through `save_adapter` -> `PeftModel.from_pretrained(is_trainable=True)`. Each side
computes its loss the way its users do: lmforge through `causal_lm_loss` (what lmforge's
training code runs), transformers through `model(input_ids=ids, labels=ids).loss`. Before
timing, one loss and backward must agree: losses within 1e-4 and every LoRA gradient
within 1e-3 of its largest entry (B is nudged off zero first so that A has gradients).

What lmforge does differently (the method, not the measurement): the frozen base
computes no weight gradients in either library, but lmforge's q/k/v and gate/up are one
product each, and their LoRA is one product with the stacked A and one with the
block-laid B (targets.py, layers.py); the head's loss is computed in chunks without
keeping the logits (lmforge/train/fused_ce.py); there is less Python per step. In training,
each LoRA'd layer is one autograd function (lmforge/tune/peft/lora_kernel.py): the adapter's
product is added by the base product as it writes, the input gradient g W + (g s B) A is
one output, and the frozen W and W^T are kept in oneDNN's packed layout
(lmforge/train/frozen_weights.py) when `--pack-frozen` asks for them (they cost two more
copies of every adapted weight, so `PeftOptions.pack_frozen` is off by default); a frozen
(tied) head keeps its W^T packed for the loss. The model's RMSNorm, rotary q/k/v and
SwiGLU are one autograd function each with a hand-written backward while training
(lmforge/model/fused_ops.py): fewer passes over the activations, no cat/split copies.

`--variants unfused unpacked plain-model` also times, in the same rounds, lmforge without
those functions (plain autograd over the same products), with `--pack-frozen` the LoRA
function without the packed copies, and the model's norms, rotary embedding and SwiGLU
as plain autograd ops (`plain-model`, the path before lmforge/model/fused_ops.py); `--threads N` fixes the thread count (on a machine shared with other jobs, one
thread per side is the least disturbed). Besides wall-clock tokens/s the script reports
tokens per CPU second of the process and their ratio: under load the wall clock also
counts the time a side waited for a core.

Rounds alternate the order of the two sides; the table gives medians and spread, and the
JSON line the median ratio. `--memory` also runs LoRA and QLoRA training in child
processes and reports each one's resident memory after loading and its peak while
training (the kernel's peak mark is reset after loading, so the float32 load that QLoRA
quantizes does not count), and tokens/s.

    python benchmarks/finetune.py                       # 5 rounds, batch 4 x 128, all-linear r 8
    python benchmarks/finetune.py --targets q_proj v_proj --rounds 3 --memory
    python benchmarks/finetune.py --methods       # every method on a small random Llama, vs peft where it has one

`--methods` trains each method (LoRA, QLoRA, (IA)3, prompt, prefix, bottleneck, BitFit)
on a small random Llama (4 layers, width 256, 8192 words) with lmforge, and the four
PEFT also has (LoRA, (IA)3, prompt, prefix) with peft + transformers from lmforge's saved
adapter; rounds alternate the methods' order, and tokens/s count real tokens only.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from lmforge.io.progress import Progress  # noqa: E402
from lmforge.model.families import hf_config_from, lmforge_to_hf  # noqa: E402
from lmforge.train.loss import causal_lm_loss  # noqa: E402
from lmforge.tune.peft import PeftOptions, apply_peft, save_adapter, trainable_parameters  # noqa: E402


def load_base(dtype=torch.float32):
    from lmforge.model.loading import load_model
    from lmforge.model.registry import resolve

    return load_model(resolve(None), dtype=dtype).train()


def hf_copy(model):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = hf_config_from(model.config)
    for key in ("architectures", "model_type", "torch_dtype"):
        cfg.pop(key, None)
    with torch.device("meta"):
        theirs = LlamaForCausalLM(LlamaConfig(**cfg, attn_implementation="sdpa"))
    state = lmforge_to_hf(model.config, {k: v.detach().clone() for k, v in model.state_dict().items()})
    if model.config.tie_word_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    theirs.load_state_dict(state, strict=True, assign=True)
    theirs.tie_weights()
    theirs.model.rotary_emb = type(theirs.model.rotary_emb)(theirs.config)  # buffers were on meta
    return theirs.train()


def nudge(model, seed=5):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 1e-3)


def loss_fn(model, ids, hf: bool):
    return model(input_ids=ids, labels=ids).loss if hf else causal_lm_loss(model, ids)


def lora_grads(model, hf: bool) -> dict[str, torch.Tensor]:
    out = {}
    for name, p in model.named_parameters():
        if p.requires_grad and p.grad is not None:
            if hf:  # base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight
                out[name.replace(".default", "")] = p.grad
    return out


def check_agreement(ours, theirs, ids):
    from lmforge.tune.peft.api import adapter_state

    losses = []
    for model, hf in ((ours, False), (theirs, True)):
        loss = loss_fn(model, ids, hf)
        loss.backward()
        losses.append(float(loss.detach()))
    if abs(losses[0] - losses[1]) > 1e-4:
        raise SystemExit(f"first-step losses differ: lmforge {losses[0]:.6f}, peft {losses[1]:.6f}")
    # Gradients of lmforge's adapter under peft's names: adapter_state names the live tensors.
    from lmforge.tune.peft.layers import LoraLinear

    ours_grads = {}
    for m in ours.modules():
        if isinstance(m, LoraLinear):
            for p in m.parts:
                ours_grads[f"base_model.model.{p.path}.lora_A.weight"] = m.lora_A[p.leaf].grad
                ours_grads[f"base_model.model.{p.path}.lora_B.weight"] = m.lora_B[p.leaf].grad
    theirs_grads = lora_grads(theirs, True)
    assert set(ours_grads) == set(theirs_grads), (sorted(ours_grads)[:3], sorted(theirs_grads)[:3])
    assert adapter_state(ours)[1].keys() == ours_grads.keys()
    worst = 0.0
    for name, g in ours_grads.items():
        ref = theirs_grads[name]
        rel = float((g - ref).abs().max() / ref.abs().max().clamp_min(1e-12))
        worst = max(worst, rel)
        if rel > 1e-3:
            raise SystemExit(f"gradients of {name} differ: {rel:.2e} of the largest entry")
    ours.zero_grad(set_to_none=True), theirs.zero_grad(set_to_none=True)
    return losses, worst


# lmforge's training paths that `--variants` can time beside the default (each sets these
# switches of lmforge/tune/peft/lora_kernel.py, and `MODEL_ENABLED` that of
# lmforge/model/fused_ops.py, for its own steps only). `plain-model`: the model's norms,
# rotary embedding and SwiGLU as plain autograd ops (the path before fused_ops);
# `unfused`: plain autograd everywhere.
VARIANTS = {"default": {}, "unfused": {"ENABLED": False, "MODEL_ENABLED": False}, "unpacked": {"PACK_FROZEN": False},
            "plain-model": {"MODEL_ENABLED": False}}


def make_step(model, hf: bool, lr=1e-4, variant: str = "default"):
    from lmforge.model import fused_ops
    from lmforge.tune.peft import lora_kernel

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, fused=True)
    switches = {"ENABLED": True, "PACK_FROZEN": True, "MODEL_ENABLED": True, **VARIANTS[variant]}

    def step(ids):
        for name, value in switches.items():
            if name == "MODEL_ENABLED":
                fused_ops.ENABLED = value
            else:
                setattr(lora_kernel, name, value)
        loss = loss_fn(model, ids, hf)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    return step


def child(method: str, args) -> None:
    """Train `method` (lora or qlora) for a few steps and print peak RSS and tokens/s as JSON."""
    model = apply_peft(load_base(), PeftOptions(method=method, r=args.r, alpha=args.alpha,
                                                target_modules=args.targets, seed=0))
    gc.collect()
    after_load = _status_mib("VmRSS")
    reset = _reset_peak()  # from here on the peak is training's, not the loader's
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, model.config.vocab_size, (args.batch_size, args.seq_len), generator=gen)
    step = make_step(model, False)
    step(ids)
    start = time.perf_counter()
    for _ in range(args.steps):
        step(ids)
    rate = args.batch_size * args.seq_len * args.steps / (time.perf_counter() - start)
    trainable, total = trainable_parameters(model)
    peak = _status_mib("VmHWM") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"method": method, "rss_after_load_mib": after_load, "peak_rss_mib": peak,
                      "peak_is_training_only": reset, "tok_s": rate, "trainable": trainable, "total": total}))


def _status_mib(key: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _reset_peak() -> bool:
    """Reset the kernel's peak-RSS mark (Linux: 5 > /proc/self/clear_refs); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


METHOD_OPTIONS = {
    "lora": dict(r=8, alpha=16, target_modules=["all-linear"]),
    "qlora": dict(r=8, alpha=16, target_modules=["all-linear"]),
    "ia3": {},
    "prompt": dict(num_virtual_tokens=16),
    "prefix": dict(num_virtual_tokens=16),
    "bottleneck": dict(bottleneck_size=64),
    "bitfit": {},
}


def methods(args) -> None:
    """tokens/s of one training step per method, lmforge and (where it exists) peft."""
    import copy

    import peft

    from lmforge.model.config import ModelConfig
    from lmforge.model.transformer import Transformer

    config = ModelConfig(family="llama", n_layer=4, n_embd=256, n_head=4, n_kv_head=2, intermediate_size=688,
                         vocab_size=8192)
    torch.manual_seed(0)
    base = Transformer(config).train()
    hf = hf_copy(base)
    gen = torch.Generator().manual_seed(1)
    batch = torch.randint(0, config.vocab_size, (args.batch_size, args.seq_len), generator=gen)
    steps, counts = {}, {}
    for method, extra in METHOD_OPTIONS.items():
        ours = apply_peft(copy.deepcopy(base), PeftOptions(method=method, seed=0, **extra)).train()
        counts[method] = trainable_parameters(ours)
        steps[f"lmforge {method}"] = make_step(ours, False)
        if method in ("lora", "ia3"):
            with tempfile.TemporaryDirectory() as tmp:
                save_adapter(ours, tmp)
                theirs = peft.PeftModel.from_pretrained(copy.deepcopy(hf), tmp, is_trainable=True).train()
        elif method in ("prompt", "prefix"):  # peft loads saved prompt adapters only frozen: a fresh one
            kind = peft.PromptTuningConfig if method == "prompt" else peft.PrefixTuningConfig
            theirs = peft.get_peft_model(copy.deepcopy(hf), kind(num_virtual_tokens=16, task_type="CAUSAL_LM")).train()
        if method in ("lora", "ia3", "prompt", "prefix"):
            assert sum(p.numel() for p in theirs.parameters() if p.requires_grad) == counts[method][0]
            steps[f"peft {method}"] = make_step(theirs, True)
    rates: dict[str, list[float]] = {n: [] for n in steps}
    names = list(steps)
    load_before = os.getloadavg()[0]
    progress = Progress("PEFT methods", args.rounds, unit="rounds", log_every=0.0)
    for r in range(args.rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
            for _ in range(args.warmup):
                steps[name](batch)
            start = time.perf_counter()
            for _ in range(args.steps):
                steps[name](batch)
            rates[name].append(batch.numel() * args.steps / (time.perf_counter() - start))
        progress.update(r + 1)
    progress.close()
    print(f"{config.num_parameters() / 1e6:.1f}M-parameter random Llama, batch {args.batch_size} x {args.seq_len}, fp32, "
          f"{torch.get_num_threads()} threads; load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after")
    print(f"{'method':12}{'trainable':>12}{'lmforge tok/s':>15}{'peft tok/s':>12}{'ratio':>8}")
    rows = {}
    for method in METHOD_OPTIONS:
        ours = statistics.median(rates[f"lmforge {method}"])
        theirs = statistics.median(rates[f"peft {method}"]) if f"peft {method}" in rates else None
        ratio = statistics.median(a / b for a, b in zip(rates[f"lmforge {method}"], rates[f"peft {method}"])) if theirs else None
        rows[method] = {"trainable": counts[method][0], "lmforge_tok_s": ours, "peft_tok_s": theirs, "ratio": ratio}
        print(f"{method:12}{counts[method][0]:>12,}{ours:>15.0f}" + (f"{theirs:>12.0f}{ratio:>8.2f}" if theirs else f"{'-':>12}{'-':>8}"))
    print(json.dumps({"benchmark": "finetune-methods", "batch_size": args.batch_size, "seq_len": args.seq_len,
                      "rounds": args.rounds, "steps": args.steps, "methods": rows}))


def sft_batches(args, tokenizer):
    """The same conversations in each library's own batches: lmforge's packed rows, padded HF batches.

    The conversations are the generated `mixed` fine-tuning set (arithmetic, word problems,
    unit and date questions, JSON extraction, format following) rendered with the default
    model's chat template, loss on the assistant tokens only (lmforge.tune.sft_data). lmforge
    packs them into rows of `--sft-row` tokens (attention kept inside each conversation, what
    `lmforge finetune` does by default) and takes the loss on the labelled rows only; peft +
    transformers gets them `--batch-size` at a time, padded to the longest (right padding,
    attention mask, -100 labels on prompt and padding: what a chat collator such as trl's
    gives), in length-sorted batches (`group_by_length`, the least padding) unless
    `--sft-shuffled`.
    """
    from lmforge.train.loop import Batch
    from lmforge.tune.datasets import make_dataset
    from lmforge.tune.sft_data import IGNORE_INDEX, encode_dataset, pack_rows

    records = make_dataset("mixed", seed=0, sizes={"train": args.sft_conversations, "validation": 0, "test": 0})["train"]
    encoded, stats = encode_dataset(tokenizer, records, None)
    lengths = [len(e.ids) for e in encoded]
    pad = next(i for i in (tokenizer.pad_id, tokenizer.eos_id, 0) if i is not None)

    def collate(groups, packed):
        width = max(sum(lengths[i] for i in g) for g in groups)
        ids = torch.full((len(groups), width), pad, dtype=torch.long)
        labels = torch.full((len(groups), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(groups), width), dtype=torch.long)
        for r, g in enumerate(groups):
            at = 0
            for i in g:
                ids[r, at:at + lengths[i]] = torch.tensor(encoded[i].ids)
                labels[r, at:at + lengths[i]] = torch.tensor(encoded[i].labels)
                at += lengths[i]
            mask[r, :at] = 1
        if packed:
            return Batch(ids, labels, [[lengths[i] for i in g] for g in groups], int(mask.sum()))
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    rows = pack_rows(lengths, args.sft_row)
    ours = [collate(rows[i:i + args.sft_rows], True) for i in range(0, len(rows), args.sft_rows)]
    order = list(range(len(encoded)))
    if not args.sft_shuffled:
        order.sort(key=lambda i: (lengths[i], i))
    else:
        import random

        random.Random(0).shuffle(order)
    theirs = [collate([[i] for i in order[j:j + args.sft_hf_batch]], False)
              for j in range(0, len(order), args.sft_hf_batch)]
    padded = sum(int(b["input_ids"].numel()) for b in theirs)
    info = {"conversations": len(encoded), "tokens": stats.tokens, "loss_tokens": stats.loss_tokens,
            "lmforge_rows": len(rows), "lmforge_row_tokens": args.sft_row, "lmforge_steps": len(ours),
            "hf_batch": args.sft_hf_batch, "hf_steps": len(theirs), "hf_padded_tokens": padded,
            "length_sorted": not args.sft_shuffled}
    return ours, theirs, info


def sft_main(args, ours, theirs, trainable, peft, transformers) -> None:
    """Time one pass over the same conversations per round and side (see `sft_batches`)."""
    from lmforge.model.loading import resolve_tokenizer
    from lmforge.train.loop import packed_causal_lm_loss

    ours_batches, theirs_batches, info = sft_batches(args, resolve_tokenizer(None))
    # Agreement first: the same four conversations as one packed row and as one padded batch
    # must give the same token-mean loss (the loss tokens are the same ones).
    check_ours, check_theirs, _ = sft_batches(argparse.Namespace(**{**vars(args), "sft_conversations": 4,
                                                                  "sft_row": 4096, "sft_hf_batch": 4}),
                                              resolve_tokenizer(None))
    with torch.no_grad():
        a = float(packed_causal_lm_loss(ours, check_ours[0].input_ids, check_ours[0].labels, check_ours[0].lengths))
        b = float(theirs(**check_theirs[0]).loss)
    if abs(a - b) > 1e-4:
        raise SystemExit(f"losses of the same conversations differ: lmforge {a:.6f}, peft {b:.6f}")
    ours.zero_grad(set_to_none=True), theirs.zero_grad(set_to_none=True)

    def stepper(model, hf):
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, fused=True)

        def step(batch):
            loss = model(**batch).loss if hf else packed_causal_lm_loss(model, batch.input_ids, batch.labels, batch.lengths)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return step

    sides = {"lmforge": (stepper(ours, False), ours_batches), "peft": (stepper(theirs, True), theirs_batches)}
    for step, batches in sides.values():  # warm-up: a few steps each
        for batch in batches[:2]:
            step(batch)
    rates = {n: [] for n in sides}
    cpu_rates = {n: [] for n in sides}
    load_before = os.getloadavg()[0]
    progress = Progress("finetune benchmark (sft data)", args.rounds, unit="rounds", log_every=0.0)
    for r in range(args.rounds):
        for name in (list(sides) if r % 2 == 0 else list(sides)[::-1]):
            step, batches = sides[name]
            start, cpu_start = time.perf_counter(), time.process_time()
            for batch in batches:
                step(batch)
            rates[name].append(info["tokens"] / (time.perf_counter() - start))
            cpu_rates[name].append(info["tokens"] / (time.process_time() - cpu_start))
        progress.update(r + 1, info=", ".join(f"{n} {rates[n][-1]:.0f} tok/s" for n in sides))
    progress.close()
    load_after = os.getloadavg()[0]
    ratios = [x / y for x, y in zip(rates["lmforge"], rates["peft"])]
    cpu_ratios = [x / y for x, y in zip(cpu_rates["lmforge"], cpu_rates["peft"])]
    print(f"LoRA r={args.r} alpha={args.alpha:g} on {' '.join(args.targets)} of SmolLM2-135M (fp32), "
          f"{trainable[0]:,} trainable; {info['conversations']} generated chat conversations, {info['tokens']:,} "
          f"tokens, {info['loss_tokens']:,} with loss; lmforge {info['lmforge_rows']} packed rows of "
          f"{info['lmforge_row_tokens']} in {info['lmforge_steps']} steps, peft {info['hf_steps']} padded batches of "
          f"{info['hf_batch']} ({info['hf_padded_tokens']:,} positions, length-sorted {info['length_sorted']}); "
          f"{torch.get_num_threads()} threads; same-conversation loss {a:.6f} vs {b:.6f}")
    print(f"load average (1 min) {load_before:.1f} before, {load_after:.1f} after")
    for name in sides:
        print(f"{name:10} real tokens/s median {statistics.median(rates[name]):8.1f}, per CPU second "
              f"{statistics.median(cpu_rates[name]):8.1f}")
    print("per-round ratios: " + ", ".join(f"{x:.2f}" for x in ratios) + f"; median {statistics.median(ratios):.2f}")
    print("per-round CPU-time ratios: " + ", ".join(f"{x:.2f}" for x in cpu_ratios)
          + f"; median {statistics.median(cpu_ratios):.2f}")
    print(json.dumps({
        "benchmark": "finetune-lora-sft", "r": args.r, "alpha": args.alpha, "targets": args.targets, **info,
        "rounds": args.rounds, "threads": torch.get_num_threads(),
        "lmforge_tok_s": statistics.median(rates["lmforge"]), "peft_tok_s": statistics.median(rates["peft"]),
        "ratio": statistics.median(ratios), "ratios": [round(x, 3) for x in ratios],
        "cpu_ratio": statistics.median(cpu_ratios), "cpu_ratios": [round(x, 3) for x in cpu_ratios],
        "first_loss": [a, b], "load_avg": [round(load_before, 2), round(load_after, 2)],
        "torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
        "machine": platform.processor() or platform.machine(),
    }))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--r", type=int, default=8)
    ap.add_argument("--alpha", type=float, default=16.0)
    ap.add_argument("--targets", nargs="+", default=["all-linear"])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=3, help="timed steps per round and side")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps per round and side")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: PyTorch's default)")
    ap.add_argument("--variants", nargs="*", default=[], choices=[v for v in VARIANTS if v != "default"],
                    help="also time these lmforge paths in the same rounds (the ratio stays default vs peft)")
    ap.add_argument("--pack-frozen", action="store_true",
                    help="lmforge keeps oneDNN-packed copies of the frozen weights (PeftOptions.pack_frozen)")
    ap.add_argument("--memory", action="store_true", help="also peak RSS of LoRA vs QLoRA (child processes)")
    ap.add_argument("--methods", action="store_true", help="compare every PEFT method on a small random Llama")
    ap.add_argument("--data", choices=("random", "sft"), default="random",
                    help="random: full rows of random ids, loss everywhere; sft: generated chat conversations, "
                         "loss on the answers, each library batching them its own way")
    ap.add_argument("--sft-conversations", type=int, default=128, help="conversations per round (--data sft)")
    ap.add_argument("--sft-row", type=int, default=256, help="lmforge's packed row length (--data sft)")
    ap.add_argument("--sft-rows", type=int, default=4, help="lmforge's packed rows per step (--data sft)")
    ap.add_argument("--sft-hf-batch", type=int, default=16, help="conversations per padded peft batch (--data sft)")
    ap.add_argument("--sft-shuffled", action="store_true", help="peft batches in random order, not length-sorted")
    ap.add_argument("--child", choices=("lora", "qlora"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        return child(args.child, args)
    if args.methods:
        return methods(args)
    import peft
    import transformers

    ours = load_base()
    theirs_base = hf_copy(ours)
    options = PeftOptions(method="lora", r=args.r, alpha=args.alpha, target_modules=args.targets, seed=0,
                          pack_frozen=args.pack_frozen)
    ours = apply_peft(ours, options)
    nudge(ours)
    with tempfile.TemporaryDirectory() as tmp:
        save_adapter(ours, tmp)
        theirs = peft.PeftModel.from_pretrained(theirs_base, tmp, is_trainable=True).train()
    trainable = trainable_parameters(ours)
    theirs_trainable = sum(p.numel() for p in theirs.parameters() if p.requires_grad)
    assert trainable[0] == theirs_trainable, (trainable, theirs_trainable)
    gen = torch.Generator().manual_seed(1)
    vocab = ours.config.vocab_size
    batches = [torch.randint(0, vocab, (args.batch_size, args.seq_len), generator=gen) for _ in range(4)]
    first, grad_diff = check_agreement(ours, theirs, batches[0])
    if args.data == "sft":
        return sft_main(args, ours, theirs, trainable, peft, transformers)
    steps = {"lmforge": make_step(ours, False), "peft": make_step(theirs, True)}
    for variant in args.variants:  # the same adapted model; the steps differ in the path they take
        steps[f"lmforge {variant}"] = make_step(ours, False, variant=variant)
    load_before = os.getloadavg()[0]
    tokens = args.batch_size * args.seq_len
    rates: dict[str, list[float]] = {n: [] for n in steps}
    # Tokens per CPU second of this process as well: on a machine shared with other jobs the
    # wall clock also counts time the process waited for a core; CPU time counts the work.
    cpu_rates: dict[str, list[float]] = {n: [] for n in steps}
    progress = Progress("finetune benchmark", args.rounds, unit="rounds", log_every=0.0)
    for r in range(args.rounds):
        for name in (list(steps) if r % 2 == 0 else list(steps)[::-1]):
            step = steps[name]
            for i in range(args.warmup):
                step(batches[i % 4])
            start, cpu_start = time.perf_counter(), time.process_time()
            for i in range(args.steps):
                step(batches[i % 4])
            rates[name].append(tokens * args.steps / (time.perf_counter() - start))
            cpu_rates[name].append(tokens * args.steps / (time.process_time() - cpu_start))
        progress.update(r + 1, info=", ".join(f"{n} {rates[n][-1]:.0f} tok/s" for n in steps))
    progress.close()
    load_after = os.getloadavg()[0]
    ratios = [a / b for a, b in zip(rates["lmforge"], rates["peft"])]
    print(f"LoRA r={args.r} alpha={args.alpha:g} on {' '.join(args.targets)} of SmolLM2-135M (fp32), "
          f"{trainable[0]:,} trainable of {trainable[1]:,}; batch {args.batch_size} x {args.seq_len}, "
          f"{torch.get_num_threads()} threads; first loss {first[0]:.6f} vs {first[1]:.6f}, LoRA gradients within "
          f"{grad_diff:.1e} of their largest entry")
    print(f"load average (1 min) {load_before:.1f} before, {load_after:.1f} after")
    print(f"{'':18}{'median tok/s':>14}{'min':>10}{'max':>10}")
    for name in steps:
        v = rates[name]
        print(f"{name:18}{statistics.median(v):>14.1f}{min(v):>10.1f}{max(v):>10.1f}")
    print(f"{'ratio':18}{statistics.median(ratios):>14.2f}{min(ratios):>10.2f}{max(ratios):>10.2f}")
    for variant in args.variants:
        r = [a / b for a, b in zip(rates[f"lmforge {variant}"], rates["peft"])]
        print(f"{'ratio ' + variant:18}{statistics.median(r):>14.2f}{min(r):>10.2f}{max(r):>10.2f}")
    print("per-round ratios: " + ", ".join(f"{x:.2f}" for x in ratios))
    cpu_ratios = [a / b for a, b in zip(cpu_rates["lmforge"], cpu_rates["peft"])]
    print(f"tokens per CPU second: lmforge {statistics.median(cpu_rates['lmforge']):.1f}, peft "
          f"{statistics.median(cpu_rates['peft']):.1f}; CPU-time ratio {statistics.median(cpu_ratios):.2f} "
          f"(per round " + ", ".join(f"{x:.2f}" for x in cpu_ratios) + ")")
    for variant in args.variants:
        r = [a / b for a, b in zip(cpu_rates[f"lmforge {variant}"], cpu_rates["peft"])]
        print(f"CPU-time ratio {variant}: {statistics.median(r):.2f} (per round " + ", ".join(f"{x:.2f}" for x in r) + ")")
    memory = {}
    if args.memory:
        del ours, theirs, theirs_base, steps
        for method in ("lora", "qlora"):
            cmd = [sys.executable, __file__, "--child", method, "--batch-size", str(args.batch_size), "--seq-len",
                   str(args.seq_len), "--r", str(args.r), "--alpha", str(args.alpha), "--steps", str(args.steps),
                   "--targets", *args.targets]
            memory[method] = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1])
            m = memory[method]
            print(f"{method:6} RSS after loading {m['rss_after_load_mib']:7.0f} MiB, peak while training "
                  f"{m['peak_rss_mib']:7.0f} MiB, {m['tok_s']:6.1f} tok/s (one process, after a warm-up step)")
    print(json.dumps({
        "benchmark": "finetune-lora", "r": args.r, "alpha": args.alpha, "targets": args.targets, "pack_frozen": args.pack_frozen,
        "batch_size": args.batch_size, "seq_len": args.seq_len, "rounds": args.rounds, "steps": args.steps,
        "threads": torch.get_num_threads(), "trainable": trainable[0], "total": trainable[1],
        "lmforge_tok_s": statistics.median(rates["lmforge"]), "peft_tok_s": statistics.median(rates["peft"]),
        "ratio": statistics.median(ratios), "ratios": [round(x, 3) for x in ratios], "first_loss": first,
        "variants": {v: statistics.median(a / b for a, b in zip(rates[f"lmforge {v}"], rates["peft"]))
                     for v in args.variants},
        "cpu_ratio": statistics.median(cpu_ratios), "cpu_ratios": [round(x, 3) for x in cpu_ratios],
        "cpu_variants": {v: statistics.median(a / b for a, b in zip(cpu_rates[f"lmforge {v}"], cpu_rates["peft"]))
                         for v in args.variants},
        "grad_rel_diff": grad_diff, "load_avg": [round(load_before, 2), round(load_after, 2)], "memory": memory,
        "torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
        "machine": platform.processor() or platform.machine(),
    }))


if __name__ == "__main__":
    main()
