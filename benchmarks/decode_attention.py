"""Decode-step attention over a long key/value cache: lmforge's kernel against PyTorch's.

Every decode step attends from each running row's new token to that row's whole cache, in
every layer: at long contexts the step reads the cache as well as the weights. This times
that attention alone, for the default model's shapes (30 layers, 9 query heads sharing 3
key/value heads of 64), B rows of T cached tokens:

* `lmforge`: `cpu_ops.decode_attention_rows` (the kernel the compiled decode step runs: a
  group's query heads read each cached row once, long caches split into parts the threads
  share), over a cache allocated as lmforge allocates it (`kv_cache.zeros`: 2 MiB pages where
  the OS gives them);
* `lmforge_4k`: the same kernel over a cache in ordinary 4 KiB pages;
* `pytorch`: `scaled_dot_product_attention` with `enable_gqa` on the same cache (what the
  model's modules would run), after the same rotation and cache write done by PyTorch ops.

Rows are at the same position so PyTorch needs no mask. Variants alternate in rounds; medians.
Prints a table and one JSON line.

    python benchmarks/decode_attention.py
    python benchmarks/decode_attention.py --rows 1 16 --context 150 1000 2000 --rounds 9
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time

import torch
import torch.nn.functional as F

from bench_common import cpu_model
from lmforge.model import cpu_ops
from lmforge.model.kv_cache import zeros

LAYERS, HEADS, KV_HEADS, HEAD_DIM = 30, 9, 3, 64


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--context", type=int, nargs="+", default=[150, 1000, 2000])
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args()
    if not cpu_ops.available():
        raise SystemExit("lmforge's C kernels are not built here (no C compiler?)")

    width = (HEADS + 2 * KV_HEADS) * HEAD_DIM
    table: dict[str, dict[str, float]] = {}
    torch.manual_seed(0)
    with torch.inference_mode():
        for rows in args.rows:
            for context in args.context:
                shape = (LAYERS, rows, KV_HEADS, context + 8, HEAD_DIM)
                caches = {"lmforge": (zeros(shape, torch.float32, "cpu"), zeros(shape, torch.float32, "cpu")),
                          "lmforge_4k": (torch.zeros(shape), torch.zeros(shape))}
                for k, v in caches.values():  # the same values in both
                    k.copy_(torch.randn(shape, generator=torch.Generator().manual_seed(1)))
                    v.copy_(torch.randn(shape, generator=torch.Generator().manual_seed(2)))
                caches["pytorch"] = caches["lmforge_4k"]
                qkv = torch.randn(rows, 1, width)
                pos = context - 1

                def ours(name: str) -> torch.Tensor:
                    k, v = caches[name]
                    return torch.stack([cpu_ops.decode_attention_rows(qkv, None, k[layer], v[layer], pos, HEADS,
                                                                      KV_HEADS, HEAD_DIM) for layer in range(LAYERS)])

                def pytorch() -> torch.Tensor:
                    k, v = caches["pytorch"]
                    heads = qkv.view(rows, 1, HEADS + 2 * KV_HEADS, HEAD_DIM).transpose(1, 2)
                    q, nk, nv = heads.split((HEADS, KV_HEADS, KV_HEADS), dim=1)
                    out = []
                    for layer in range(LAYERS):
                        k[layer, :, :, pos:pos + 1] = nk
                        v[layer, :, :, pos:pos + 1] = nv
                        out.append(F.scaled_dot_product_attention(q, k[layer, :, :, :context], v[layer, :, :, :context],
                                                                  enable_gqa=True).reshape(rows, -1))
                    return torch.stack(out)

                runs = {"lmforge": lambda: ours("lmforge"), "lmforge_4k": lambda: ours("lmforge_4k"),
                        "pytorch": pytorch}
                want = pytorch()
                for name in ("lmforge", "lmforge_4k"):
                    torch.testing.assert_close(runs[name](), want, rtol=1e-4, atol=1e-5)
                times: dict[str, list[float]] = {name: [] for name in runs}
                for _ in range(args.rounds):
                    for name in random.sample(list(runs), len(runs)):
                        start = time.perf_counter()
                        runs[name]()
                        times[name].append(time.perf_counter() - start)
                table[f"{rows}x{context}"] = {name: statistics.median(t) * 1e3 for name, t in times.items()}

    print(f"{'rows x tokens':>14} {'lmforge ms':>11} {'4 KiB pages':>12} {'pytorch ms':>11} {'vs pytorch':>11}")
    for key, t in table.items():
        print(f"{key:>14} {t['lmforge']:>11.2f} {t['lmforge_4k']:>12.2f} {t['pytorch']:>11.2f} "
              f"{t['pytorch'] / t['lmforge']:>10.2f}x")
    print(json.dumps({"benchmark": "decode_attention", "cpu": cpu_model(), "threads": torch.get_num_threads(),
                      "layers": LAYERS, "heads": HEADS, "kv_heads": KV_HEADS, "head_dim": HEAD_DIM,
                      "rounds": args.rounds, "ms_30_layers": {k: {n: round(v, 2) for n, v in t.items()}
                                                              for k, t in table.items()}}))


if __name__ == "__main__":
    main()
