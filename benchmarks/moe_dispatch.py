"""MoE block forward time: lmforge's grouped dispatch vs transformers' MixtralSparseMoeBlock.

Both blocks hold the same weights (a tiny random Mixtral layer: 8 experts, top-2) and get
the same input; outputs must agree to 1e-5 before timing. Rounds alternate which side runs
first; the table shows medians over rounds for a prefill-sized input (many tokens) and a
decode-sized one (a few tokens), and the JSON line the ratios (transformers / lmforge,
above 1 = lmforge faster).

    python benchmarks/moe_dispatch.py
    python benchmarks/moe_dispatch.py --hidden 256 --width 512 --experts 8 --rounds 9
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--tokens", type=int, nargs=2, default=[1024, 4], metavar=("PREFILL", "DECODE"))
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    import transformers as T
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    from lmforge.model import ModelConfig
    from lmforge.model.moe import MoE

    hf_config = T.MixtralConfig(hidden_size=args.hidden, intermediate_size=args.width, num_local_experts=args.experts,
                                num_experts_per_tok=args.top_k)
    torch.manual_seed(0)
    theirs = MixtralSparseMoeBlock(hf_config).eval()
    with torch.no_grad():
        for p in theirs.parameters():
            p.normal_(std=0.05)
    ours = MoE(ModelConfig(n_embd=args.hidden, n_head=4, intermediate_size=args.width, num_experts=args.experts,
                           experts_per_token=args.top_k)).eval()
    with torch.no_grad():
        ours.router.weight.copy_(theirs.gate.weight)
        ours.w_in.copy_(theirs.experts.gate_up_proj)
        ours.w_out.copy_(theirs.experts.down_proj)

    rows = []
    for label, n in zip(("prefill", "decode"), args.tokens):
        x = torch.randn(1, n, args.hidden)
        with torch.inference_mode():
            diff = (ours(x) - theirs(x)).abs().max().item()
        assert diff <= 1e-5, f"outputs differ by {diff}"
        times = {"lmforge": [], "transformers": []}
        for r in range(args.rounds):
            order = [("lmforge", ours), ("transformers", theirs)]
            for name, block in (order if r % 2 == 0 else order[::-1]):
                with torch.inference_mode():
                    block(x)
                    start = time.perf_counter()
                    for _ in range(args.repeats):
                        block(x)
                times[name].append((time.perf_counter() - start) / args.repeats)
        med = {k: statistics.median(v) for k, v in times.items()}
        rows.append({"input": label, "tokens": n, "lmforge_ms": med["lmforge"] * 1e3,
                     "transformers_ms": med["transformers"] * 1e3, "ratio": med["transformers"] / med["lmforge"]})
    print(f"{'input':<8} {'tokens':>6} {'lmforge ms':>11} {'transformers ms':>16} {'ratio':>6}")
    for r in rows:
        print(f"{r['input']:<8} {r['tokens']:>6} {r['lmforge_ms']:>11.3f} {r['transformers_ms']:>16.3f} {r['ratio']:>6.2f}")
    print(json.dumps({"benchmark": "moe_dispatch", "experts": args.experts, "top_k": args.top_k,
                      "hidden": args.hidden, "width": args.width, "threads": args.threads,
                      "ratios": {r["input"]: round(r["ratio"], 3) for r in rows}, "load_average": os.getloadavg()}))


if __name__ == "__main__":
    main()
