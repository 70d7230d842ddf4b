"""bf16 where the CPU has it: prefill and training speed and quality against float32, same run.

Prefill (``--part prefill``): the default model, time to the first token of a
``--prefill-tokens`` prompt, in alternating rounds (medians), for
  lmforge fp32 (``dtype="float32"``), lmforge auto (float32 weights, bf16 prefill products
  where lmforge/model/precision.py finds AMX/AVX512-BF16; forced on with --force-bf16),
  transformers fp32 and transformers with bf16 weights;
plus batch-1 decode of lmforge fp32 and auto (decode stays float32: should be equal), the
memory the bf16 copies take, and perplexity / bits per byte of both lmforge variants on
held-out text (this repository's handbook pages, written after the model was trained).
With ``--int8`` a third lmforge variant: int8 prefill products (lmforge/infer/int8_prefill.py,
``lmforge.load(prefill="int8")``), calibrated here on ``--int8-calib-tokens`` tokens of the
offline Wikipedia excerpt's training side rather than on the handbook text it is scored on.

Training (``--part train``): two copies of one random init at a preset's shapes
(benchmarks/train.py's presets), trained on the same token rows (the handbook text,
tokenized with the default tokenizer), one fp32 and one with bf16 products
(`lmforge.model.onednn.bf16_products`, what ``train.precision: auto`` runs on such a CPU),
step by step in turns so load hits both alike. Reports the tokens/s of each (after two
warm-up steps), their ratio and the median per-step ratio, the loss curves and their
largest relative gap; writes a PNG of the curves. Like lmforge's trainer on a CPU, it first
calls `keep_freed_memory(large_blocks=True)` (lmforge/io/allocator.py), for both sides.

    python benchmarks/precision.py --part prefill --rounds 5
    python benchmarks/precision.py --part prefill --rounds 5 --int8
    python benchmarks/precision.py --part train --preset smollm2-135m --steps 30
    python benchmarks/precision.py --part train --preset small-llama --steps 60 --plot docs/images/bf16_small.png

GEMM (``--part gemm``): GFLOP/s of one 2048^3 product in fp32 and bf16, the ceiling.

Prints a table and one JSON line per part.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))

import lmforge  # noqa: E402
from lmforge.infer import SamplingParams  # noqa: E402
from lmforge.io.progress import Progress  # noqa: E402
from lmforge.model import precision  # noqa: E402

ROOT = os.path.join(os.path.dirname(__file__), "..")


def held_out_text(max_chars: int) -> str:
    """The handbook pages, in name order, up to `max_chars` (code blocks included: real text)."""
    parts, size = [], 0
    for path in sorted(glob.glob(os.path.join(ROOT, "docs", "handbook", "*.md"))):
        with open(path, encoding="utf-8") as f:
            text = f.read()
        parts.append(text)
        size += len(text)
        if size >= max_chars:
            break
    return "\n\n".join(parts)[:max_chars]


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def machine() -> dict:
    return {"machine": f"{platform.machine()} {os.cpu_count()} cpu, torch {torch.__version__}, "
                       f"{torch.get_num_threads()} threads",
            "bf16_units": list(precision.cpu_bf16_units()), "date": time.strftime("%Y-%m-%d"),
            "load_avg": round(os.getloadavg()[0], 1)}


def prefill_part(args) -> dict:
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from lmforge.eval.perplexity import perplexity
    from lmforge.infer.bf16_prefill import (bf16_copy_bytes, generation_products, prepare_bf16_copies, use_bf16_prefill,
                                            uses_bf16_prefill)

    hf_logging.set_verbosity_error()
    fp32 = lmforge.load(dtype="float32", device="cpu")
    auto = lmforge.load(dtype="auto", device="cpu")
    if args.force_bf16 and not uses_bf16_prefill(auto.model):
        use_bf16_prefill(auto.model)
    prepare_bf16_copies(auto.model)
    int8 = None
    if args.int8:
        import itertools

        from bench_common import wiki_texts
        from lmforge.infer.int8_prefill import calibrate_for_generation, cpu_int8_units, int8_copy_bytes

        int8 = lmforge.load(dtype="auto", device="cpu")
        prepare_bf16_copies(int8.model)  # the down projections' and the head's path, as in auto
        texts = list(itertools.islice(wiki_texts("train"), 400))
        started = time.perf_counter()
        # as lmforge.load(prefill="int8") calibrates (half plain text, half chat prompts), on
        # Wikipedia text instead of the handbook that the perplexity below is measured on
        report = calibrate_for_generation(int8.model, int8.tokenizer, texts, tokens=args.int8_calib_tokens,
                                          use_cache=False)
        calib_seconds = time.perf_counter() - started
    path = str(fp32.spec.path)
    hf = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                              dtype=torch.float32).eval()
    hf_bf16 = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                   dtype=torch.float32).to(torch.bfloat16).eval()
    g = torch.Generator().manual_seed(0)
    vocab = fp32.config.vocab_size
    long = torch.randint(100, vocab, (1, args.prefill_tokens), generator=g)
    short = torch.randint(100, vocab, (1, 16), generator=g)

    def hf_first(model):
        with torch.inference_mode():
            model.generate(long, attention_mask=torch.ones_like(long), max_new_tokens=1, min_new_tokens=1,
                           do_sample=False, pad_token_id=fp32.tokenizer.eos_id)

    def ours(lm, ids, new):
        params = SamplingParams(max_tokens=new, temperature=0, ignore_eos=True)
        return lm.generator.generate([row.tolist() for row in ids], params)

    first_same = ours(fp32, long, 1)[0].token_ids == ours(auto, long, 1)[0].token_ids
    cont_fp32, cont_auto = ours(fp32, long, 32)[0].token_ids, ours(auto, long, 32)[0].token_ids
    agree = next((i for i, (a, b) in enumerate(zip(cont_fp32, cont_auto)) if a != b), len(cont_fp32))
    sides = {
        "lmforge_fp32": lambda: ours(fp32, long, 1),
        "lmforge_auto": lambda: ours(auto, long, 1),
        "hf_fp32": lambda: hf_first(hf),
        "hf_bf16": lambda: hf_first(hf_bf16),
    }
    lms = {"fp32": fp32, "auto": auto}
    if int8 is not None:
        sides["lmforge_int8"] = lambda: ours(int8, long, 1)
        lms["int8"] = int8
    rates: dict[str, list[float]] = {k: [] for k in sides}
    decode: dict[str, list[float]] = {f"lmforge_{k}": [] for k in lms}
    progress = Progress("prefill benchmark", args.rounds, unit="rounds", log_every=0.0)
    for r in range(args.rounds):
        order = list(sides) if r % 2 == 0 else list(sides)[::-1]
        for name in order:
            rates[name].append(args.prefill_tokens / timed(sides[name]))
        for name, lm in [(f"lmforge_{k}", v) for k, v in lms.items()][:: 1 if r % 2 == 0 else -1]:
            decode[name].append(args.new_tokens / timed(lambda: ours(lm, short, args.new_tokens)))
        progress.update(r + 1, info=", ".join(f"{k} {v[-1]:.0f}" for k, v in rates.items()))
    progress.close()
    med = {k: statistics.median(v) for k, v in rates.items()}
    text = held_out_text(args.ppl_chars)
    # Scoring runs float32 products unless asked otherwise; the bf16 prefill's own effect on
    # the likelihood is measured with generation's switch on.
    with generation_products():
        ppl = {name: perplexity(lm, text, window=args.ppl_window) for name, lm in lms.items()}
    out = {
        "benchmark": "precision-prefill", "model": fp32.name, **machine(), "rounds": args.rounds,
        "prefill_tokens": args.prefill_tokens, "bf16_prefill": uses_bf16_prefill(auto.model),
        **{f"{k}_prefill_tok_s": round(v, 1) for k, v in med.items()},
        "auto_vs_hf_fp32": round(med["lmforge_auto"] / med["hf_fp32"], 2),
        "auto_vs_lmforge_fp32": round(med["lmforge_auto"] / med["lmforge_fp32"], 2),
        "auto_vs_hf_bf16": round(med["lmforge_auto"] / med["hf_bf16"], 2),
        "lmforge_fp32_vs_hf_fp32": round(med["lmforge_fp32"] / med["hf_fp32"], 2),
        **{f"{k}_decode_b1_tok_s": round(statistics.median(v), 1) for k, v in decode.items()},
        "bf16_copies_mb": round(bf16_copy_bytes(auto.model) / 1e6, 1),
        "fp32_weights_mb": round(fp32.model.num_parameters() * 4 / 1e6, 1),
        "first_token_equal": first_same, "greedy_prefix_equal": f"{agree}/{len(cont_fp32)}",
        "ppl_tokens": ppl["fp32"].tokens if hasattr(ppl["fp32"], "tokens") else None,
        "ppl_fp32": round(ppl["fp32"].ppl, 4), "ppl_auto": round(ppl["auto"].ppl, 4),
        "ppl_rel_delta": round(ppl["auto"].ppl / ppl["fp32"].ppl - 1, 5),
        "bpb_fp32": round(ppl["fp32"].bpb, 5), "bpb_auto": round(ppl["auto"].bpb, 5),
    }
    if int8 is not None:
        out.update(chat_agreement(fp32, {"auto": auto, "int8": int8}))
        alphas = [r["alpha"] for r in report.values()]
        out.update({
            "int8_units": list(cpu_int8_units()),
            "int8_vs_hf_fp32": round(med["lmforge_int8"] / med["hf_fp32"], 2),
            "int8_vs_lmforge_fp32": round(med["lmforge_int8"] / med["lmforge_fp32"], 2),
            "int8_vs_auto": round(med["lmforge_int8"] / med["lmforge_auto"], 2),
            "int8_copies_mb": round(int8_copy_bytes(int8.model) / 1e6, 1),
            "int8_calib_tokens": args.int8_calib_tokens, "int8_calib_seconds": round(calib_seconds, 1),
            "int8_alpha_mean": round(sum(alphas) / len(alphas), 3),
            "ppl_int8": round(ppl["int8"].ppl, 4),
            "ppl_int8_rel_delta": round(ppl["int8"].ppl / ppl["fp32"].ppl - 1, 5),
            "bpb_int8": round(ppl["int8"].bpb, 5),
        })
    print(f"{'prefill ' + str(args.prefill_tokens) + ' tokens':28}{'tok/s':>10}{'vs hf fp32':>12}")
    for k, v in med.items():
        print(f"{k:28}{v:10.1f}{v / med['hf_fp32']:12.2f}")
    print(f"decode b=1 tok/s: fp32 {out['lmforge_fp32_decode_b1_tok_s']}, auto {out['lmforge_auto_decode_b1_tok_s']}; "
          f"bf16 copies {out['bf16_copies_mb']} MB beside {out['fp32_weights_mb']} MB of fp32 weights")
    print(f"perplexity on held-out text: fp32 {out['ppl_fp32']}, auto {out['ppl_auto']} "
          f"(relative {out['ppl_rel_delta']:+.2e}); greedy continuation equal for {out['greedy_prefix_equal']} tokens")
    if int8 is not None:
        print(f"int8: perplexity {out['ppl_int8']} (relative {out['ppl_int8_rel_delta']:+.2e}), int8 copies "
              f"{out['int8_copies_mb']} MB, calibration {out['int8_calib_seconds']} s")
        for name in ("auto", "int8"):
            print(f"chat replies ({len(CHAT_PROMPTS)} prompts, 24 greedy tokens) equal to fp32's: {name} "
                  f"{out[f'chat_{name}_same_replies']}; first-token KL median "
                  f"{out[f'chat_{name}_first_token_kl_median']}, max {out[f'chat_{name}_first_token_kl_max']}")
    print(json.dumps(out))
    return out


CHAT_PROMPTS = (
    "What is the capital of France?", "Explain what a KV cache is.", "Write a haiku about the sea.",
    "How do I sort a list in Python?", "Who wrote Hamlet?", "Give me three tips for a job interview.",
    "What is 12 times 7?", "Translate 'good morning' into Spanish.", "What causes rain?",
    "Summarize the plot of Cinderella in one sentence.",
)


def chat_agreement(fp32, variants: dict, max_tokens: int = 24) -> dict:
    """For each variant: on CHAT_PROMPTS, how many greedy replies equal fp32's, and the KL
    divergence of the first reply token's distribution from fp32's (generation's products)."""
    from lmforge.infer.bf16_prefill import generation_products

    out = {}
    want = [fp32.chat(q, max_tokens=max_tokens, temperature=0) for q in CHAT_PROMPTS]
    for name, lm in variants.items():
        kls = []
        for q in CHAT_PROMPTS:
            ids = torch.tensor([fp32.chat_prompt(q)])
            with torch.inference_mode():
                ref = torch.log_softmax(fp32.model(ids)[0, -1], -1)
                with generation_products():
                    got = torch.log_softmax(lm.model(ids)[0, -1], -1)
            kls.append(float((ref.exp() * (ref - got)).sum()))
        same = sum(lm.chat(q, max_tokens=max_tokens, temperature=0) == w for q, w in zip(CHAT_PROMPTS, want))
        out[f"chat_{name}_same_replies"] = f"{same}/{len(CHAT_PROMPTS)}"
        out[f"chat_{name}_first_token_kl_max"] = round(max(kls), 4)
        out[f"chat_{name}_first_token_kl_median"] = round(statistics.median(kls), 4)
    return out


def train_rows(vocab: int, batch: int, seq_len: int, count: int) -> list[torch.Tensor]:
    """`count` batches of token rows cut from the held-out text (the default tokenizer), ids < vocab."""
    from lmforge.model.loading import resolve_tokenizer

    ids = resolve_tokenizer(None).encode(held_out_text(4_000_000))
    ids = torch.tensor(ids, dtype=torch.long) % vocab
    per = batch * seq_len
    n = min(count, len(ids) // per)
    return [ids[i * per:(i + 1) * per].view(batch, seq_len) for i in range(n)]


def train_part(args) -> dict:
    from train import PRESETS

    from lmforge.io.allocator import keep_freed_memory

    keep_freed_memory(large_blocks=True)  # what lmforge's trainer does on a CPU

    from lmforge.model.config import ModelConfig
    from lmforge.model.onednn import bf16_products
    from lmforge.model.transformer import Transformer
    from lmforge.train.loss import causal_lm_loss

    config = ModelConfig(**PRESETS[args.preset], max_position_embeddings=max(2048, args.seq_len))
    torch.manual_seed(0)
    models = {"fp32": Transformer(config).train()}
    models["bf16"] = Transformer(config).train()
    models["bf16"].load_state_dict(models["fp32"].state_dict())
    opts = {k: torch.optim.AdamW(m.parameters(), lr=args.lr, fused=True) for k, m in models.items()}
    batches = train_rows(config.vocab_size, args.batch_size, args.seq_len, args.steps)
    losses: dict[str, list[float]] = {k: [] for k in models}
    seconds: dict[str, list[float]] = {k: [] for k in models}
    progress = Progress("train precision", len(batches), unit="steps", log_every=0.0)
    for step, ids in enumerate(batches):
        for name in (("fp32", "bf16") if step % 2 == 0 else ("bf16", "fp32")):
            model, opt = models[name], opts[name]
            start = time.perf_counter()
            with bf16_products(name == "bf16"):
                loss = causal_lm_loss(model, ids)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            seconds[name].append(time.perf_counter() - start)
            losses[name].append(float(loss.detach()))
        progress.update(step + 1, info=f"loss fp32 {losses['fp32'][-1]:.3f} bf16 {losses['bf16'][-1]:.3f}")
    progress.close()
    tokens = args.batch_size * args.seq_len
    # After two warm-up steps: tokens over total time per side (what a run achieves), and the
    # median over steps of the two sides' time ratio (each pair ran back to back, under
    # nearly the same load: the steadier figure on a shared machine).
    rate = {k: tokens * len(v[2:] or v) / sum(v[2:] or v) for k, v in seconds.items()}
    ratios = [a / b for a, b in zip(seconds["fp32"][2:], seconds["bf16"][2:])] or [rate["bf16"] / rate["fp32"]]
    gaps = [abs(b - a) / a for a, b in zip(losses["fp32"], losses["bf16"])]
    out = {
        "benchmark": "precision-train", "preset": args.preset, "params": config.num_parameters(), **machine(),
        "batch_size": args.batch_size, "seq_len": args.seq_len, "steps": len(batches), "lr": args.lr,
        "fp32_tok_s": round(rate["fp32"], 1), "bf16_tok_s": round(rate["bf16"], 1),
        "speedup": round(rate["bf16"] / rate["fp32"], 2), "speedup_per_step_median": round(statistics.median(ratios), 2),
        "loss_fp32": [round(x, 4) for x in losses["fp32"]], "loss_bf16": [round(x, 4) for x in losses["bf16"]],
        "max_rel_loss_gap": round(max(gaps), 5), "final_rel_loss_gap": round(gaps[-1], 5),
    }
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        from lmforge.io.atomic import atomic_path

        fig, ax = plt.subplots(figsize=(6, 3.5))
        for name in models:
            ax.plot(range(1, len(losses[name]) + 1), losses[name], label=f"{name} ({rate[name]:.0f} tok/s)")
        ax.set_xlabel("step")
        ax.set_ylabel("training loss")
        ax.set_title(f"{args.preset}: fp32 vs bf16 products (max gap {100 * max(gaps):.2f}%)")
        ax.legend()
        fig.tight_layout()
        with atomic_path(args.plot) as tmp:
            fig.savefig(tmp, format="png", dpi=100)
        out["plot"] = args.plot
    print(f"{config.num_parameters() / 1e6:.1f}M parameters ({args.preset}), batch {args.batch_size} x {args.seq_len}, "
          f"{len(batches)} steps: fp32 {rate['fp32']:.0f} tok/s, bf16 products {rate['bf16']:.0f} tok/s "
          f"({out['speedup']:.2f}x; per-step median {out['speedup_per_step_median']:.2f}x); loss gap at most {100 * max(gaps):.2f}% (final {100 * gaps[-1]:.2f}%)")
    print(json.dumps(out))
    return out


def gemm_part(args) -> dict:
    """GFLOP/s of one n^3 matrix product in float32 and in bf16 (oneDNN; AMX where present), alternating."""
    n = args.gemm_size
    a, b = torch.randn(n, n), torch.randn(n, n)
    pairs = {"fp32": (a, b), "bf16": (a.bfloat16(), b.bfloat16())}
    times: dict[str, list[float]] = {k: [] for k in pairs}
    for _ in range(args.rounds * 3):
        for name, (x, y) in pairs.items():
            torch.mm(x, y)
            times[name].append(timed(lambda: torch.mm(x, y)))
    gflops = {k: 2 * n**3 / min(v) / 1e9 for k, v in times.items()}
    out = {"benchmark": "precision-gemm", "n": n, **machine(), **{f"{k}_gflop_s": round(v) for k, v in gflops.items()},
           "bf16_vs_fp32": round(gflops["bf16"] / gflops["fp32"], 2)}
    print(f"{n}^3 product: fp32 {gflops['fp32']:.0f} GFLOP/s, bf16 {gflops['bf16']:.0f} GFLOP/s "
          f"({out['bf16_vs_fp32']:.1f}x; best of {args.rounds * 3})")
    print(json.dumps(out))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--part", choices=("gemm", "prefill", "train", "all"), default="all")
    ap.add_argument("--gemm-size", type=int, default=2048)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--prefill-tokens", type=int, default=512)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--ppl-chars", type=int, default=20000)
    ap.add_argument("--ppl-window", type=int, default=512)
    ap.add_argument("--force-bf16", action="store_true", help="bf16 prefill even where no bf16 units are detected")
    ap.add_argument("--int8", action="store_true", help="also time lmforge with int8 prefill products (W8A8)")
    ap.add_argument("--int8-calib-tokens", type=int, default=2048, help="calibration tokens for --int8")
    ap.add_argument("--preset", default="smollm2-135m")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--plot", default=None, help="PNG of the two loss curves")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.part in ("gemm", "all"):
        gemm_part(args)
    if args.part in ("prefill", "all"):
        prefill_part(args)
    if args.part in ("train", "all"):
        train_part(args)


if __name__ == "__main__":
    main()
