"""Which teacher blocks should a layer-dropped student start from?

For each choice of blocks, builds the student the way ``lmforge distill`` does
(`student_from_layers`: the teacher's embeddings, final norm, head and those blocks) and
measures, before any training, its cross-entropy on held-out packed rows and how often its
top token is the teacher's. Prints a table and one JSON line.

    python benchmarks/distill_init.py [--data runs/data/wiki-smollm2-128] [--rows 8]

The data directory is the one the distill-smollm2 recipe builds (``lmforge distill
distill-smollm2`` writes it on its first run).
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch
import torch.nn.functional as F

CHOICES = {
    "every 5th": [0, 5, 10, 15, 20, 25],
    "evenly spaced": [0, 6, 12, 17, 23, 29],
    "first six": [0, 1, 2, 3, 4, 5],
    "first and last three": [0, 1, 2, 27, 28, 29],
    "every 5th + last": [0, 5, 10, 15, 20, 29],
}


def main() -> None:
    from lmforge.data.pack import PackedDataset
    from lmforge.tune.distill import load_teacher, student_from_layers

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default="runs/data/wiki-smollm2-128")
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--teacher", default=None)
    args = parser.parse_args()
    teacher = load_teacher(args.teacher)
    val = PackedDataset(args.data, "validation")
    rows = torch.from_numpy(np.stack([val[i] for i in range(min(args.rows, len(val)))]).astype(np.int64))
    targets = rows[:, 1:].reshape(-1)
    results = {}
    with torch.no_grad():
        teacher_logits = teacher(rows)[:, :-1].reshape(-1, teacher.config.vocab_size)
        results["teacher (30 blocks)"] = {"ce": F.cross_entropy(teacher_logits, targets).item(), "agreement": 1.0}
        teacher_top = teacher_logits.argmax(-1)
        for name, layers in CHOICES.items():
            student = student_from_layers(teacher, layers).eval()
            logits = student(rows)[:, :-1].reshape(-1, teacher.config.vocab_size)
            results[f"{name} {layers}"] = {"ce": F.cross_entropy(logits, targets).item(),
                                           "agreement": (logits.argmax(-1) == teacher_top).float().mean().item()}
    print(f"{len(targets)} held-out tokens; uniform guess: {np.log(teacher.config.vocab_size):.2f} nats")
    print("| blocks kept | cross-entropy | top-1 agreement with teacher |\n|---|---:|---:|")
    for name, r in results.items():
        print(f"| {name} | {r['ce']:.2f} | {100 * r['agreement']:.1f}% |")
    print(json.dumps({"tokens": len(targets), "results": results}))


if __name__ == "__main__":
    main()
