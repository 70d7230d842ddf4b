"""Prefill and decode speed: lmforge vs transformers on the same GGUF, same machine, same run.

Both load the default model's GGUF file dequantized to fp32 (lmforge with its own loader,
transformers with `from_pretrained(..., gguf_file=...)`). Measurements alternate between
the two in rounds and report medians, so a burst of load on a shared machine hits both.

    python benchmarks/decode.py                 # 3 rounds
    python benchmarks/decode.py --rounds 5 --bf16

Measures: prefill tokens/s (a 512-token prompt, time to the first generated token),
batch-1 decode tokens/s (128 new tokens, greedy, end-of-sequence ignored) and aggregate
decode tokens/s at batch 8 (64 new tokens per row). It also reports the memory bandwidth
a decode step needs (fp32 weight bytes x tokens/s) beside a streaming-read probe.
Prints a table and one JSON line.
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

import lmforge  # noqa: E402
from lmforge.infer import SamplingParams  # noqa: E402
from lmforge.io.progress import Progress  # noqa: E402


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def read_bandwidth_gbs() -> dict[str, float]:
    """Two ceilings for a memory-bound decode step, measured here and now.

    `sum`: streaming read of a 512 MiB buffer (median of 5). `gemv`: one matrix-vector
    product over a 512 MiB fp32 matrix through the kernel lmforge uses (median of 5).
    """
    import numpy as np

    buf = torch.ones(128 * 2**20)
    matrix = np.ones((2**16, 2**11), dtype=np.float32)  # 512 MiB
    vec = np.ones((1, 2**16), dtype=np.float32)
    buf.sum(), vec @ matrix
    read = statistics.median(timed(buf.sum) for _ in range(5))
    gemv = statistics.median(timed(lambda: vec @ matrix) for _ in range(5))
    return {"sum": buf.numel() * 4 / read / 1e9, "gemv": matrix.nbytes / gemv / 1e9}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--batch-new-tokens", type=int, default=64)
    ap.add_argument("--prefill-tokens", type=int, default=512)
    ap.add_argument("--bf16", action="store_true", help="also time lmforge with bfloat16 weights (reported beside fp32)")
    args = ap.parse_args()

    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    lm = lmforge.load(dtype="float32", device="cpu")
    path = str(lm.spec.path)
    hf = AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32
    ).eval()
    lm_bf16 = lmforge.load(dtype="bfloat16", device="cpu") if args.bf16 else None

    g = torch.Generator().manual_seed(0)
    vocab = lm.config.vocab_size
    short = torch.randint(100, vocab, (1, 16), generator=g)
    long = torch.randint(100, vocab, (1, args.prefill_tokens), generator=g)
    batch = torch.randint(100, vocab, (args.batch, 16), generator=g)
    n, nb = args.new_tokens, args.batch_new_tokens

    def hf_generate(ids, new):
        with torch.inference_mode():
            return hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                               do_sample=False, pad_token_id=lm.tokenizer.eos_id)

    def ours_generate(model, ids, new):
        params = SamplingParams(max_tokens=new, temperature=0, ignore_eos=True)
        return model.generator.generate([row.tolist() for row in ids], params)

    # Correctness first: the same greedy tokens from both.
    ours_ids = ours_generate(lm, short, 32)[0].token_ids
    hf_ids = hf_generate(short, 32)[0, short.shape[1]:].tolist()
    same = sum(a == b for a, b in zip(ours_ids, hf_ids))

    results: dict[str, list[float]] = {}

    def record(key: str, value: float) -> None:
        results.setdefault(key, []).append(value)

    progress = Progress("decode benchmark", args.rounds, unit="rounds", log_every=0.0)
    for r in range(args.rounds):
        record("hf_prefill", long.shape[1] / timed(lambda: hf_generate(long, 1)))
        record("lmforge_prefill", long.shape[1] / timed(lambda: ours_generate(lm, long, 1)))
        record("hf_decode_b1", n / timed(lambda: hf_generate(short, n)))
        record("lmforge_decode_b1", n / timed(lambda: ours_generate(lm, short, n)))
        record("hf_decode_b8", args.batch * nb / timed(lambda: hf_generate(batch, nb)))
        record("lmforge_decode_b8", args.batch * nb / timed(lambda: ours_generate(lm, batch, nb)))
        if lm_bf16 is not None:
            record("lmforge_bf16_decode_b1", n / timed(lambda: ours_generate(lm_bf16, short, n)))
        progress.update(r + 1, info=", ".join(f"{k}={v[-1]:.1f}" for k, v in results.items()))
    progress.close()

    med = {k: statistics.median(v) for k, v in results.items()}
    weight_bytes = lm.model.num_parameters() * 4
    bandwidth = read_bandwidth_gbs()
    out = {
        "benchmark": "decode",
        "model": lm.name,
        "machine": f"{platform.machine()} {os.cpu_count()} cpu, torch {torch.__version__}, {torch.get_num_threads()} threads",
        "date": time.strftime("%Y-%m-%d"),
        "rounds": args.rounds,
        "greedy_tokens_equal": f"{same}/32",
        **{f"{k}_tok_s": round(v, 2) for k, v in med.items()},
        "prefill_ratio": round(med["lmforge_prefill"] / med["hf_prefill"], 2),
        "decode_b1_ratio": round(med["lmforge_decode_b1"] / med["hf_decode_b1"], 2),
        "decode_b8_ratio": round(med["lmforge_decode_b8"] / med["hf_decode_b8"], 2),
        "fp32_weight_mb": round(weight_bytes / 1e6, 1),
        "decode_b1_weight_traffic_gb_s": round(weight_bytes * med["lmforge_decode_b1"] / 1e9, 1),
        "read_bandwidth_gb_s": round(bandwidth["sum"], 1),
        "large_gemv_bandwidth_gb_s": round(bandwidth["gemv"], 1),
    }
    print(f"{'':22}{'lmforge':>10}{'transformers':>14}{'ratio':>8}")
    for key, label in (("prefill", "prefill tok/s"), ("decode_b1", "decode b=1 tok/s"), ("decode_b8", f"decode b={args.batch} tok/s")):
        print(f"{label:22}{med['lmforge_' + key]:10.1f}{med['hf_' + key]:14.1f}{out[key + '_ratio']:8.2f}")
    if lm_bf16 is not None:
        print(f"{'decode b=1 bf16':22}{med['lmforge_bf16_decode_b1']:10.1f}")
    print(f"greedy tokens equal: {same}/32; batch-1 decode streams {out['decode_b1_weight_traffic_gb_s']} GB/s of "
          f"weights; ceilings measured now: {out['read_bandwidth_gb_s']} GB/s (sum), "
          f"{out['large_gemv_bandwidth_gb_s']} GB/s (one large GEMV)")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
