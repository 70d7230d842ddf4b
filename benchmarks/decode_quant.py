"""Batch-1 decode with weights kept quantized: float32 vs int8 vs int4, same run, same machine.

The default model (SmolLM2-135M-Instruct, a Q4_1 GGUF) is loaded three ways:
`lmforge.load()` (every tensor dequantized to float32, lmforge's CPU decoding layout),
`weights="q8"` (int8 per-row block linears and head) and `weights="q4"` (the file's Q4_1
blocks kept as int4 groups of 32, an int8 head). Each round times every variant once
(greedy, end-of-sequence ignored, through the scheduler like every lmforge decode) and
the medians are reported, so a burst of load on a shared machine hits all of them.

Also measured:
- the share of a quantized decode step spent in the products (torch.profiler over a few
  steps: the weight-only kernels' self time against the unprofiled step's wall time); the
  rest is per-op overhead (norms, rotary, attention, casts, Python) and the aten op count;
- held-out perplexity of the three variants (the Wikipedia excerpt's held-out side, as
  benchmarks/prune.py splits it; --eval-tokens tokens, windows of 512);
- with --vs-llama-cpp and llama-cpp-python importable: llama.cpp decoding the same GGUF
  with the same thread count (scripts/bench-llama-cpp.sh installs it).

    python benchmarks/decode_quant.py                      # 3 rounds, 64 new tokens
    python benchmarks/decode_quant.py --rounds 5 --vs-llama-cpp
    python benchmarks/decode_quant.py --skip-perplexity --rounds 1   # quick look
    python benchmarks/decode_quant.py --variants float32,q4,q4-torch --step-ppl-tokens 512   # own vs PyTorch kernels
    python benchmarks/decode_quant.py --threads 1 --head-study       # steadier on a crowded machine
    for v in float32 q8 q4; do python benchmarks/decode_quant.py --variants $v --skip-perplexity; done

Prints a table and one JSON line (with `lscpu`'s model name and `uptime`).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_common import cpu_model, heldout_texts  # noqa: E402

import lmforge  # noqa: E402
from lmforge.infer import SamplingParams, quant_kernels  # noqa: E402
from lmforge.io.progress import Progress  # noqa: E402

VARIANTS = ("float32", "q8", "q4", "q8-torch", "q4-torch")
DEFAULT_VARIANTS = ("float32", "q8", "q4")
PRODUCT_OPS = ("aten::_weight_int4pack_mm_for_cpu", "aten::_weight_int8pack_mm", "aten::mm", "aten::addmm",
               "aten::linear", "aten::matmul")


def uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return "unknown"


def load(variant: str):
    if variant == "float32":
        return lmforge.load(dtype="float32", device="cpu")
    return lmforge.load(weights=variant.removesuffix("-torch"))


def as_variant(variant: str, fn, *args, **kwargs):
    """fn(...) with the single-row products on lmforge's C kernels, or, for the "-torch"
    variants (same weights), on PyTorch's weight-only kernels."""
    quant_kernels.ENABLED = not variant.endswith("-torch")
    try:
        return fn(*args, **kwargs)
    finally:
        quant_kernels.ENABLED = True


def stepwise_nll(lm, ids: list[int]) -> float:
    """Mean negative log-likelihood of ids[1:] scored one token at a time through the KV cache:
    every product is a single-row one, the path a batch-1 decode takes."""
    from lmforge.model.kv_cache import KVCache

    model = lm.model
    cache = KVCache.for_model(model.config, 1, len(ids) + 1, torch.float32, "cpu")
    total = 0.0
    with torch.inference_mode():
        for i in range(len(ids) - 1):
            logits = model(torch.tensor([[ids[i]]]), cache=cache, start=i, last_only=True)
            total -= float(torch.log_softmax(logits[0, -1].float(), -1)[ids[i + 1]])
    return total / (len(ids) - 1)


def decode_rate(lm, prompt: list[int], new: int) -> float:
    """Decode tokens/s after the first token (the scheduler's own timing, prefill excluded)."""
    done = lm.generator.generate([prompt], SamplingParams(max_tokens=new, temperature=0, ignore_eos=True))[0]
    return (done.completion_tokens - 1) / done.decode_seconds


def step_profile(lm, prompt: list[int], steps: int = 16) -> dict[str, float]:
    """Wall time of a batch-1 decode step and the share of it the products' kernels take."""
    from torch.profiler import ProfilerActivity, profile

    from lmforge.infer.layout import torch_threads_for, uses_numpy_blas
    from lmforge.model.kv_cache import KVCache

    model = lm.model
    cache = KVCache.for_model(model.config, 1, len(prompt) + 2 * steps + 2, torch.float32, "cpu")
    threads = torch_threads_for(1) if uses_numpy_blas(model) else None
    with torch.inference_mode():
        model(torch.tensor([prompt]), cache=cache, start=0, last_only=True)
        tok = torch.tensor([[prompt[-1]]])

        def step(i: int) -> None:
            if threads is None:
                model(tok, cache=cache, start=len(prompt) + i, last_only=True)
            else:
                with torch_threads_for(1):
                    model(tok, cache=cache, start=len(prompt) + i, last_only=True)

        times = []
        for i in range(steps):
            start = time.perf_counter()
            step(i)
            times.append(time.perf_counter() - start)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for i in range(steps, 2 * steps):
                step(i)
    events = prof.key_averages()
    products_ms = sum(e.self_cpu_time_total for e in events if e.key in PRODUCT_OPS) / steps / 1e3
    ops = sum(e.count for e in events if e.key.startswith("aten::")) / steps
    step_ms = statistics.median(times) * 1e3
    return {"step_ms": step_ms, "products_ms": products_ms, "product_share": min(1.0, products_ms / step_ms),
            "aten_ops_per_step": ops}


def llama_cpp_rate(path: str, prompt: list[int], new: int, threads: int) -> tuple[float, float] | None:
    """llama.cpp's decode tokens/s with its Python sampling call in the loop, and counting
    only its forward passes (`eval`), which leaves out the sampling lmforge's rate includes:
    the second is the stricter comparison."""
    try:
        from llama_cpp import Llama
    except ImportError:
        return None
    llm = Llama(model_path=path, n_threads=threads, n_ctx=512, verbose=False)
    llm.reset()
    llm.eval(prompt)
    start = time.perf_counter()
    in_eval = 0.0
    for _ in range(new):
        token = llm.sample(top_k=1, temp=0)
        t = time.perf_counter()
        llm.eval([token])
        in_eval += time.perf_counter() - t
    return new / (time.perf_counter() - start), new / in_eval


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--eval-tokens", type=int, default=4096, help="held-out tokens for perplexity")
    ap.add_argument("--skip-perplexity", action="store_true")
    ap.add_argument("--step-ppl-tokens", type=int, default=0,
                    help="also score this many held-out tokens one at a time (the single-row path of decode)")
    ap.add_argument("--vs-llama-cpp", action="store_true", help="also time llama-cpp-python on the same GGUF")
    ap.add_argument("--head-study", action="store_true",
                    help="also the perplexity of q4 with an int4 and a float32 vocabulary head (default int8)")
    ap.add_argument("--variants", default=",".join(DEFAULT_VARIANTS),
                    help="comma-separated subset of float32,q8,q4,q8-torch,q4-torch (the same weights with PyTorch's kernels for single rows); one per process keeps each variant's thread "
                         "pools to itself (NumPy's OpenBLAS threads of the float32 layout slow PyTorch's "
                         "two OpenMP threads on a 2-core machine)")
    ap.add_argument("--threads", type=int, default=0,
                    help="PyTorch threads (default: its own choice); 1 is steadier on a crowded machine")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    variants = tuple(v for v in args.variants.split(",") if v)
    if not variants or any(v not in VARIANTS for v in variants):
        raise SystemExit(f"--variants takes a comma-separated subset of {','.join(VARIANTS)}")
    load_start = {}
    models = {}
    for variant in variants:
        start = time.perf_counter()
        models[variant] = load(variant)
        load_start[variant] = time.perf_counter() - start
    lm = models[variants[0]]
    prompt = lm.chat_prompt("Write a short story about a lighthouse keeper.")

    # Correctness first: greedy tokens of each variant against float32's.
    reference = lm.generator.generate([prompt], SamplingParams(max_tokens=32, temperature=0, ignore_eos=True))[0]
    agree = {}
    for variant in [v for v in variants if v != variants[0]]:
        got = as_variant(variant, models[variant].generator.generate, [prompt],
                         SamplingParams(max_tokens=32, temperature=0, ignore_eos=True))[0]
        agree[variant] = next((i for i, (a, b) in enumerate(zip(got.token_ids, reference.token_ids)) if a != b), 32)

    rates: dict[str, list[float]] = {v: [] for v in variants}
    llama = []
    progress = Progress("quantized decode benchmark", args.rounds, unit="rounds", log_every=0.0)
    for r in range(args.rounds):
        order = variants if r % 2 == 0 else tuple(reversed(variants))
        for variant in order:
            rates[variant].append(as_variant(variant, decode_rate, models[variant], prompt, args.new_tokens))
        if args.vs_llama_cpp:
            rate = llama_cpp_rate(str(lm.spec.path), prompt, args.new_tokens, torch.get_num_threads())
            if rate is not None:
                llama.append(rate)
        progress.update(r + 1, info=", ".join(f"{v}={rates[v][-1]:.1f}" for v in variants))
    progress.close()
    med = {v: statistics.median(rates[v]) for v in variants}
    profiles = {v: as_variant(v, step_profile, models[v], prompt) for v in variants if v != "float32"}

    ppl = {}
    if not args.skip_perplexity:
        from lmforge.eval.perplexity import perplexity

        texts, counted = heldout_texts(lm.tokenizer, args.eval_tokens)
        for variant in variants:
            ppl[variant] = as_variant(variant, perplexity, models[variant], texts, window=512, stride=512).ppl
        if args.head_study:
            from lmforge.infer.quant_gguf import load_gguf_quantized

            for label, head_bits in (("q4_head4", 4), ("q4_head_float32", None)):
                model = load_gguf_quantized(lm.spec.path, 4, head_bits)
                ppl[label] = perplexity(model, texts, tokenizer=lm.tokenizer, window=512, stride=512).ppl
                del model

    step_ppl = {}
    if args.step_ppl_tokens:
        ids = lm.tokenizer.encode("\n\n".join(heldout_texts(lm.tokenizer, args.step_ppl_tokens)[0]))
        ids = ids[: args.step_ppl_tokens]
        for variant in variants:
            step_ppl[variant] = math.exp(as_variant(variant, stepwise_nll, models[variant], ids))

    sizes, native_sizes = {}, {}
    from lmforge.infer.quant_linear import quantized_nbytes

    for variant in variants:
        sizes[variant] = round(quantized_nbytes(models[variant].model)["total"] / 1e6, 1)
        native_sizes[variant] = round(sum(getattr(m, "native_nbytes", 0) for m in models[variant].model.modules()) / 1e6, 1)

    out = {
        "benchmark": "decode_quant",
        "model": lm.name,
        "cpu": cpu_model(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "uptime": uptime(),
        "rounds": args.rounds,
        "new_tokens": args.new_tokens,
        **{f"{v}_decode_tok_s": round(med[v], 1) for v in variants},
        **{f"{v}_vs_float32": round(med[v] / med["float32"], 2) for v in variants if "float32" in med and v != "float32"},
        **{f"{v}_greedy_tokens_equal_{variants[0]}": f"{agree[v]}/32" for v in agree},
        **{f"{v}_step_ms": round(p["step_ms"], 2) for v, p in profiles.items()},
        **{f"{v}_products_ms": round(p["products_ms"], 2) for v, p in profiles.items()},
        **{f"{v}_product_share": round(p["product_share"], 3) for v, p in profiles.items()},
        **{f"{v}_aten_ops_per_step": round(p["aten_ops_per_step"]) for v, p in profiles.items()},
        **{f"{v}_load_s": round(t, 1) for v, t in load_start.items()},
        **{f"{v}_mb": s for v, s in sizes.items()},
        **{f"{v}_single_row_kernel_copy_mb": s for v, s in native_sizes.items() if s},
        **({"single_row_kernels": quant_kernels.available()} if any("q" in v for v in variants) else {}),
        **{f"{v}_stepwise_ppl": round(p, 3) for v, p in step_ppl.items()},
        **({"stepwise_ppl_tokens": len(ids)} if step_ppl else {}),
    }
    if ppl:
        out.update({f"{v}_ppl": round(p, 3) for v, p in ppl.items()})
        if "float32" in ppl:
            out.update({f"{v}_ppl_vs_float32": round(ppl[v] / ppl["float32"] - 1, 4) for v in ppl if v != "float32"})
        out["eval_tokens"] = counted
    if llama:
        out["llama_cpp_decode_tok_s"] = round(statistics.median(r[0] for r in llama), 1)
        out["llama_cpp_eval_only_tok_s"] = round(statistics.median(r[1] for r in llama), 1)
        out["llama_cpp_per_round"] = [round(r[0], 1) for r in llama]
        if "q4" in med:
            out["q4_per_round"] = [round(r, 1) for r in rates["q4"]]
            out["q4_vs_llama_cpp"] = round(med["q4"] / out["llama_cpp_decode_tok_s"], 2)
            out["q4_vs_llama_cpp_eval_only"] = round(med["q4"] / out["llama_cpp_eval_only_tok_s"], 2)
    print(f"{'':10}{'decode tok/s':>14}{'vs fp32':>9}{'MB':>8}{'ppl':>9}")
    for v in variants:
        ratio = med[v] / med["float32"] if "float32" in med else float("nan")
        print(f"{v:10}{med[v]:14.1f}{ratio:9.2f}{sizes[v]:8.1f}{ppl.get(v, float('nan')):9.3f}")
    for v in ppl:
        if v not in variants:
            print(f"{v:10}{'':31}{ppl[v]:9.3f}")
    for v, p in profiles.items():
        print(f"{v} step {p['step_ms']:.2f} ms, products {p['products_ms']:.2f} ms ({p['product_share']:.0%}), "
              f"{p['aten_ops_per_step']:.0f} aten ops a step")
    if llama:
        print(f"llama.cpp {out['llama_cpp_decode_tok_s']} tok/s ({out['llama_cpp_eval_only_tok_s']} counting its forward "
              f"passes only); q4 / llama.cpp {out.get('q4_vs_llama_cpp')} ({out.get('q4_vs_llama_cpp_eval_only')})")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
