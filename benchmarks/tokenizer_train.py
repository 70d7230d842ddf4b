"""BPE training time: lmforge's pure-Python trainer against Hugging Face ``tokenizers`` (Rust).

Both train a byte-level BPE tokenizer (GPT-2 pre-tokenization, all 256 byte symbols,
``<|endoftext|>`` special token) with the same vocabulary size on the same texts, end to
end (pre-tokenization, word counting, merges), in the same process, alternating in rounds.
The learned vocabularies and merge lists must be identical, or the script fails.

Corpus (offline): the gensim test corpora, i.e. the English Wikipedia excerpt (markup
stripped by lmforge) and the news articles; about 3.2 MB of text.

Run:  python benchmarks/tokenizer_train.py [--vocab-size 8000] [--rounds 3] [--hf-threads 1]
The last line printed is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--vocab-size", type=int, default=8000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--hf-threads", default="1", help="RAYON_NUM_THREADS for tokenizers ('default' = its own)")
    args = parser.parse_args()
    if args.hf_threads != "default":  # must be set before tokenizers starts its thread pool
        os.environ["RAYON_NUM_THREADS"] = args.hf_threads
        os.environ["TOKENIZERS_PARALLELISM"] = "false" if args.hf_threads == "1" else "true"
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

    import tokenizers

    from lmforge.data.corpora import load_source
    from lmforge.tokenizer.train import train_tokenizer

    texts = [d.text for d in load_source("wiki")] + [d.text for d in load_source("news")]
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    print(f"corpus: {len(texts)} documents, {n_bytes / 1e6:.2f} MB; vocab size {args.vocab_size}", file=sys.stderr)

    def run_lmforge() -> dict:
        tok = train_tokenizer(texts, "bpe", args.vocab_size)
        return tok.model.to_dict()

    def run_reference() -> dict:
        hf = tokenizers.Tokenizer(tokenizers.models.BPE())
        hf.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
        trainer = tokenizers.trainers.BpeTrainer(
            vocab_size=args.vocab_size, special_tokens=["<|endoftext|>"], show_progress=False,
            initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
        hf.train_from_iterator(texts, trainer)
        return json.loads(hf.to_str())["model"]

    times: dict[str, list[float]] = {"lmforge": [], "tokenizers": []}
    results = {}
    for r in range(args.rounds):
        for name, fn in (("lmforge", run_lmforge), ("tokenizers", run_reference)):
            started = time.perf_counter()
            results[name] = fn()
            times[name].append(time.perf_counter() - started)
        print(f"round {r + 1}: lmforge {times['lmforge'][-1]:.2f}s, tokenizers {times['tokenizers'][-1]:.2f}s",
              file=sys.stderr)

    ours, ref = results["lmforge"], results["tokenizers"]
    ref_merges = [m if isinstance(m, list) else m.split(" ") for m in ref["merges"]]
    identical = ours["vocab"] == ref["vocab"] and [list(m) for m in ours["merges"]] == ref_merges
    if not identical:
        print("FAIL: the learned vocabularies or merges differ", file=sys.stderr)
        return 1
    lm, hf = statistics.median(times["lmforge"]), statistics.median(times["tokenizers"])
    print(f"lmforge {lm:.2f}s, tokenizers {hf:.2f}s (median of {args.rounds}); lmforge takes {lm / hf:.2f}x "
          f"as long; {len(ours['merges'])} merges, identical vocabularies and merges")
    print(json.dumps({
        "benchmark": "bpe_training", "vocab_size": args.vocab_size, "corpus_bytes": n_bytes,
        "documents": len(texts), "merges": len(ours["merges"]), "identical": identical,
        "lmforge_seconds": round(lm, 3), "tokenizers_seconds": round(hf, 3), "ratio": round(lm / hf, 3),
        "rounds": args.rounds, "tokenizers_threads": args.hf_threads, "tokenizers_version": tokenizers.__version__,
        "python": platform.python_version(), "machine": platform.machine(), "cpus": os.cpu_count(),
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
