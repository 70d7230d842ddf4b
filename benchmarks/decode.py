"""Prefill and decode speed: lmforge vs transformers on the same GGUF, same machine, same run.

Both load the default model's GGUF file dequantized to fp32 (lmforge with its own loader,
transformers with `from_pretrained(..., gguf_file=...)`). Measurements alternate between
the two in rounds and report medians, so a burst of load on a shared machine hits both.

    python benchmarks/decode.py                 # 3 rounds
    python benchmarks/decode.py --rounds 5 --bf16

Measures: prefill tokens/s (a 512-token prompt, time to the first generated token),
batch-1 decode tokens/s (128 new tokens, greedy, end-of-sequence ignored; the whole call, as
for transformers) and aggregate decode tokens/s at batch 8 (64 new tokens per row). It also
reports the memory bandwidth lmforge's decode steps stream (fp32 weight bytes x the steps'
tokens/s, from the first token to the last as the engine times them) beside the one-GEMV
ceilings of `Ceilings`, measured in every round.
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


class Ceilings:
    """What one matrix-vector product over a 512 MiB fp32 matrix streams here, measured once per
    round between the decode measurements (the same bursts of load hit both).

    `numpy_4k`: NumPy's BLAS on ordinary (4 KiB-page) memory, the figure earlier reports used.
    `numpy_huge` / `lmforge_huge`: NumPy's and lmforge's own product on the same matrix in 2 MiB
    pages (lmforge/io/hugepages.py), where lmforge puts a decoding model's weights; with fewer
    address translations a product streams faster.
    `numpy_model` / `lmforge_model`: the same two products over the very memory the model's
    weights occupy (all its Linear weights, which lmforge keeps in one region in the order a
    step reads them, viewed as one [rows, d] matrix): the bytes and the pages a decode step
    streams. On this 2-vCPU virtual machine two buffers of equal size need not stream equally
    fast (the same compiled step measured 37-51 GB/s from one fresh allocation to the next), so
    these are the ceilings the step's share is taken against; the others are reported beside.
    `sum`: a plain streaming read of a 512 MiB PyTorch buffer.
    """

    def __init__(self, model: torch.nn.Module | None = None) -> None:
        import numpy as np

        from lmforge.infer import decode_kernels
        from lmforge.io import hugepages

        self.kernels = decode_kernels
        self.buf = torch.ones(128 * 2**20)
        self.m4k = np.ones((2**16, 2**11), dtype=np.float32)  # x @ M: M streamed row by row
        self.vec = np.ones((1, 2**16), dtype=np.float32)
        self.huge = torch.ones(2**16, 2**11)
        # lmforge's layout (W [n, k] row-major), in the model's shape: short rows, x in L1
        self.rows = torch.ones(2**18, 2**9)
        self.region = hugepages.move_to_huge_pages([self.huge, self.rows])
        self.huge_mib = (hugepages.huge_bytes(self.huge) >> 20) if self.region is not None else 0
        self.x = torch.ones(1, 2**9)
        self.span = None if model is None else weight_span(model)
        self.results: dict[str, list[float]] = {}

    def measure(self, repeats: int = 3) -> None:
        gb = self.m4k.nbytes / 1e9
        probes = {"sum": (lambda: self.buf.sum(), gb)}
        span = self.span
        if self.kernels.available():
            threads = torch.get_num_threads()
            probes["lmforge_huge"] = (lambda: self.kernels.f32_gemv(self.rows, self.x, None, threads), gb)
            if span is not None:
                probes["lmforge_model"] = (lambda: self.kernels.f32_gemv(span[0], span[1], None, threads),
                                           span[0].numel() * 4 / 1e9)
        # NumPy's last, then a pause: OpenBLAS's worker threads spin for up to ~0.1 s after a
        # call, and whatever runs then on two cores runs at about half speed.
        probes["numpy_4k"] = (lambda: self.vec @ self.m4k, gb)
        probes["numpy_huge"] = (lambda: self.vec @ self.huge.numpy(), gb)
        if span is not None:
            rows, x = span[0].numpy(), span[1].numpy()
            probes["numpy_model"] = (lambda: x @ rows.T, rows.nbytes / 1e9)
        for name, (fn, size) in probes.items():
            fn()
            best = min(timed(fn) for _ in range(repeats))
            self.results.setdefault(name, []).append(size / best)
        time.sleep(0.5)

    def step_ceiling(self, latest: bool = False) -> tuple[str, float]:
        """The ceiling a decode step is held to: the best product over the model's own weight
        memory (the best of all where that could not be viewed); the latest round's or the median."""
        own = [k for k in self.results if k.endswith("_model")]
        keys = own or [k for k in self.results if k != "sum"]
        values = {k: (v[-1] if latest else statistics.median(v)) for k, v in self.results.items() if k in keys}
        best = max(values, key=values.get)
        return best, values[best]

    def medians(self) -> dict[str, float]:
        return {k: statistics.median(v) for k, v in self.results.items()}


def weight_span(model: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor] | None:
    """All the model's Linear weights as one [rows, d] float32 matrix over their own memory (and a
    row x to multiply it by), where they lie back to back in one region; else None."""
    import ctypes

    weights = {id(m.weight): m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)}
    ws = sorted(weights.values(), key=lambda t: t.data_ptr())
    if not ws or any(w.dtype != torch.float32 or not w.is_contiguous() for w in ws):
        return None
    start, end = ws[0].data_ptr(), ws[-1].data_ptr() + ws[-1].numel() * 4
    if end - start > sum(w.numel() * 4 + 64 for w in ws):
        return None  # not one region (huge pages off or unavailable)
    d = ws[0].shape[1]
    floats = (end - start) // 4 // d * d
    raw = (ctypes.c_float * floats).from_address(start)
    return torch.frombuffer(raw, dtype=torch.float32).view(-1, d), torch.ones(1, d)


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

    ceilings = Ceilings(lm.model)
    progress = Progress("decode benchmark", args.rounds, unit="rounds", log_every=0.0)
    weight_bytes = lm.model.num_parameters() * 4
    for r in range(args.rounds):
        record("hf_prefill", long.shape[1] / timed(lambda: hf_generate(long, 1)))
        record("lmforge_prefill", long.shape[1] / timed(lambda: ours_generate(lm, long, 1)))
        record("hf_decode_b1", n / timed(lambda: hf_generate(short, n)))
        ceilings.measure()  # just before lmforge's batch-1 decode: the share is taken per round
        started = time.perf_counter()
        done = ours_generate(lm, short, n)[0]
        record("lmforge_decode_b1", n / (time.perf_counter() - started))
        record("lmforge_decode_b1_steps", (n - 1) / done.decode_seconds)
        record("share", weight_bytes * results["lmforge_decode_b1_steps"][-1] / 1e9 / ceilings.step_ceiling(True)[1])
        record("hf_decode_b8", args.batch * nb / timed(lambda: hf_generate(batch, nb)))
        record("lmforge_decode_b8", args.batch * nb / timed(lambda: ours_generate(lm, batch, nb)))
        if lm_bf16 is not None:
            record("lmforge_bf16_decode_b1", n / timed(lambda: ours_generate(lm_bf16, short, n)))
        progress.update(r + 1, info=", ".join(f"{k}={v[-1]:.1f}" for k, v in results.items()))
    progress.close()

    med = {k: statistics.median(v) for k, v in results.items()}
    bandwidth = ceilings.medians()
    gemv = {k: v for k, v in bandwidth.items() if k != "sum"}
    best = max(gemv, key=gemv.get)
    held_to, ceiling = ceilings.step_ceiling()
    traffic = weight_bytes * med["lmforge_decode_b1_steps"] / 1e9
    from lmforge.io import hugepages

    out = {
        "benchmark": "decode",
        "model": lm.name,
        "machine": f"{platform.machine()} {os.cpu_count()} cpu, torch {torch.__version__}, {torch.get_num_threads()} threads",
        "date": time.strftime("%Y-%m-%d"),
        "rounds": args.rounds,
        "greedy_tokens_equal": f"{same}/32",
        **{f"{k}_tok_s": round(v, 2) for k, v in med.items() if k != "share"},
        "prefill_ratio": round(med["lmforge_prefill"] / med["hf_prefill"], 2),
        "decode_b1_ratio": round(med["lmforge_decode_b1"] / med["hf_decode_b1"], 2),
        "decode_b8_ratio": round(med["lmforge_decode_b8"] / med["hf_decode_b8"], 2),
        "fp32_weight_mb": round(weight_bytes / 1e6, 1),
        "decode_b1_weight_traffic_gb_s": round(traffic, 1),
        "read_bandwidth_gb_s": round(bandwidth["sum"], 1),
        **{f"gemv_{k}_gb_s": round(v, 1) for k, v in gemv.items()},
        "step_ceiling": held_to,
        "step_ceiling_gb_s": round(ceiling, 1),
        "decode_b1_share_of_step_ceiling": round(traffic / ceiling, 3),
        "decode_b1_share_per_round": [round(v, 3) for v in results["share"]],
        "decode_b1_share_median_of_rounds": round(med["share"], 3),
        "large_gemv_best": best,
        "decode_b1_share_of_best_gemv_anywhere": round(traffic / gemv[best], 3),
        "decode_b1_share_of_numpy_4k_gemv": round(traffic / gemv["numpy_4k"], 3),
        "huge_pages": hugepages.mode(),
        "model_weights_in_huge_pages_mib": hugepages.huge_bytes(lm.model.layers[0].mlp.fc.weight) >> 20,
        "ceiling_matrix_in_huge_pages_mib": ceilings.huge_mib,
    }
    print(f"{'':22}{'lmforge':>10}{'transformers':>14}{'ratio':>8}")
    for key, label in (("prefill", "prefill tok/s"), ("decode_b1", "decode b=1 tok/s"), ("decode_b8", f"decode b={args.batch} tok/s")):
        print(f"{label:22}{med['lmforge_' + key]:10.1f}{med['hf_' + key]:14.1f}{out[key + '_ratio']:8.2f}")
    if lm_bf16 is not None:
        print(f"{'decode b=1 bf16':22}{med['lmforge_bf16_decode_b1']:10.1f}")
    print(f"greedy tokens equal: {same}/32; batch-1 decode steps ({med['lmforge_decode_b1_steps']:.1f} tok/s, first to "
          f"last token) stream {out['decode_b1_weight_traffic_gb_s']} GB/s of weights = "
          f"{100 * out['decode_b1_share_of_step_ceiling']:.0f}% of one GEMV over the model's own weight memory "
          f"({ceiling:.1f} GB/s, {held_to}); per round, against that round's: median {100 * med['share']:.0f}%; "
          f"{100 * out['decode_b1_share_of_best_gemv_anywhere']:.0f}% of the best GEMV on any buffer ({best}); GEMV "
          "ceilings: " + ", ".join(f"{k} {v:.1f}" for k, v in gemv.items())
          + f" GB/s; streaming sum {bandwidth['sum']:.1f} GB/s")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
