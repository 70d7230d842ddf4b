"""lmforge's ViT against transformers' ViTModel of the same shape: inference and training-step
throughput (images/s), alternating rounds, medians, and the ratio.

    python benchmarks/vit_speed.py --patch-size 7 --width 64 --depth 4 --batch 128 --rounds 7

Both models have the same architecture (tests/test_vlm.py holds their outputs equal on the
same weights), so the ratio measures only the implementations: lmforge's fused q/k/v
projection and oneDNN training projections against transformers' separate q, k and v.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F


def build(args):
    from transformers import ViTConfig as HFViTConfig, ViTModel

    from lmforge.vlm.encoders import ViTConfig, VisionTransformer

    ours = VisionTransformer(ViTConfig(patch_size=args.patch_size, width=args.width, depth=args.depth,
                                       heads=args.heads, mlp_ratio=2))
    hf = ViTModel(HFViTConfig(hidden_size=args.width, num_hidden_layers=args.depth, num_attention_heads=args.heads,
                              intermediate_size=2 * args.width, image_size=28, patch_size=args.patch_size,
                              num_channels=1, layer_norm_eps=1e-6, hidden_act="gelu"), add_pooling_layer=False)
    return ours, lambda x: hf(pixel_values=x).last_hidden_state[:, 0], hf


def seconds(fn, repeats: int) -> float:
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--patch-size", type=int, default=7)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    ours, hf_forward, hf = build(args)
    head_ours, head_hf = torch.nn.Linear(args.width, 10), torch.nn.Linear(args.width, 10)
    x, y = torch.rand(args.batch, 1, 28, 28), torch.randint(0, 10, (args.batch,))

    def infer(model, forward):
        model.eval()
        with torch.no_grad():
            forward(x)

    def train_step(model, forward, head):
        model.train()
        model.zero_grad(set_to_none=True)
        F.cross_entropy(head(forward(x)), y).backward()

    cases = {
        "inference": (lambda: infer(ours, ours), lambda: infer(hf, hf_forward)),
        "train step": (lambda: train_step(ours, ours, head_ours), lambda: train_step(hf, hf_forward, head_hf)),
    }
    results = {}
    for name, (mine, theirs) in cases.items():
        mine(), theirs()  # warm-up
        times = {"lmforge": [], "transformers": []}
        for _ in range(args.rounds):
            times["lmforge"].append(seconds(mine, args.repeats))
            times["transformers"].append(seconds(theirs, args.repeats))
        med = {k: statistics.median(v) for k, v in times.items()}
        results[name] = {"lmforge_images_per_s": round(args.batch / med["lmforge"], 1),
                         "transformers_images_per_s": round(args.batch / med["transformers"], 1),
                         "ratio": round(med["transformers"] / med["lmforge"], 3)}
        print(f"{name:10s}  lmforge {results[name]['lmforge_images_per_s']:8.1f} images/s  transformers "
              f"{results[name]['transformers_images_per_s']:8.1f} images/s  lmforge/transformers speed "
              f"{results[name]['ratio']:.2f}x")
    print(json.dumps({"benchmark": "vit_speed", **vars(args), **results}))


if __name__ == "__main__":
    main()
