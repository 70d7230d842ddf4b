"""Pre-Transformer baselines: n-gram counting and recurrent-layer speed, each against a reference
in the same run (alternating rounds, medians).

1. Counting the n-grams of orders 1..N of the baseline corpus's training tokens (the
   Wikipedia excerpt, 4,096-id BPE; built by ``lmforge baseline prepare`` if missing):
   lmforge's NumPy counting (sorted int64 keys, `NGramLM.fit`, which also builds the
   continuation counts and discounts) against the textbook dict of tuples
   (``collections.Counter`` over ``zip`` windows, raw counts only). The top-order counts
   must be identical, or the script fails.
2. Scoring the test rows with the fitted model, vectorised (`token_logprobs`) against one
   `logprob` call per token on the first rows (the same values to 1e-12).
3. One LSTM layer stack forward + backward (batch 32 x 64 steps, width 176, 2 layers, one
   thread): the written-out cell math (`run_recurrent_layers`) against torch's fused
   ``nn.LSTM`` on the same weights (outputs equal to 1e-5).

Run:  python benchmarks/baselines.py [--order 4] [--rounds 3]
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
from collections import Counter
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--order", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--root", default="runs/baselines")
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

    import numpy as np
    import torch

    from lmforge.eval.baselines import BaselineConfig, load_rows, prepare_corpus
    from lmforge.model.ngram import NGramLM
    from lmforge.model.rnn import run_recurrent_layers

    torch.set_num_threads(1)
    config = BaselineConfig(root=args.root, progress=False)
    prepare_corpus(config)
    tokens = load_rows(config, "train").reshape(-1)
    test = load_rows(config, "test")
    vocab = int(json.loads((config.data_dir / "index.json").read_text())["vocab_size"])
    as_list = tokens.tolist()

    def count_numpy():
        return NGramLM(args.order, vocab).fit([tokens])

    def count_dicts():
        return [Counter(zip(*(as_list[i:] for i in range(k)))) for k in range(1, args.order + 1)]

    times: dict[str, list[float]] = {"numpy": [], "dicts": []}
    for r in range(args.rounds):
        for name, fn in (("numpy", count_numpy), ("dicts", count_dicts)):
            started = time.perf_counter()
            out = fn()
            times[name].append(time.perf_counter() - started)
            if name == "numpy":
                model = out
            else:
                reference = out
        print(f"round {r + 1}: numpy {times['numpy'][-1]:.2f}s, dicts {times['dicts'][-1]:.2f}s", file=sys.stderr)
    top = reference[-1]
    table = model.orders[-1]
    context_tuples = [()]
    for k, t in enumerate(model.orders[:-1], start=1):
        words = t.keys % vocab
        contexts = t.keys // vocab
        context_tuples = [context_tuples[c] + (int(w),) for c, w in zip(contexts, words)]
    ours_top = {context_tuples[int(c)] + (int(w),): int(n)
                for c, w, n in zip(table.keys // vocab, table.keys % vocab, table.counts)}
    if ours_top != dict(top):
        print("FAIL: the top-order counts differ", file=sys.stderr)
        return 1

    # Scoring: vectorised against one query at a time on the first rows.
    rows = test[:4]
    started = time.perf_counter()
    slow = [model.logprob(list(row[:t]), int(row[t])) for row in rows for t in range(1, len(row))]
    one_at_a_time = (time.perf_counter() - started) / len(slow)
    fast = np.concatenate([model.token_logprobs(row) for row in rows])
    if not np.allclose(fast, slow, rtol=0, atol=1e-12):
        print("FAIL: vectorised and one-at-a-time scores differ", file=sys.stderr)
        return 1
    started = time.perf_counter()
    scored = sum(len(model.token_logprobs(row)) for row in test)
    vectorised = (time.perf_counter() - started) / scored

    # LSTM stack: written-out cells against the fused kernel.
    torch.manual_seed(0)
    lstm = torch.nn.LSTM(176, 176, 2, batch_first=True)
    x = torch.randn(32, 64, 176)
    if not torch.allclose(run_recurrent_layers(lstm, x)[0], lstm(x)[0], atol=1e-5):
        print("FAIL: written-out LSTM differs from nn.LSTM", file=sys.stderr)
        return 1
    rnn_times: dict[str, list[float]] = {"written_out": [], "fused": []}
    for _ in range(args.rounds):
        for name, fn in (("written_out", lambda: run_recurrent_layers(lstm, x)[0]), ("fused", lambda: lstm(x)[0])):
            started = time.perf_counter()
            fn().sum().backward()
            rnn_times[name].append(time.perf_counter() - started)
            lstm.zero_grad()

    numpy_s, dicts_s = statistics.median(times["numpy"]), statistics.median(times["dicts"])
    manual_s, fused_s = statistics.median(rnn_times["written_out"]), statistics.median(rnn_times["fused"])
    print(f"counting {len(tokens):,} tokens, orders 1-{args.order}: numpy {numpy_s:.2f}s (with smoothing), "
          f"dict of tuples {dicts_s:.2f}s (raw counts only): {dicts_s / numpy_s:.1f}x; "
          f"scoring {1 / vectorised:,.0f} tokens/s vectorised vs {1 / one_at_a_time:,.0f} one at a time; "
          f"LSTM fwd+bwd written-out {manual_s * 1000:.0f} ms vs fused {fused_s * 1000:.0f} ms "
          f"({manual_s / fused_s:.2f}x)")
    print(json.dumps({
        "benchmark": "baselines", "order": args.order, "train_tokens": len(tokens), "vocab_size": vocab,
        "ngrams": model.num_ngrams(), "counting_numpy_s": round(numpy_s, 3), "counting_dicts_s": round(dicts_s, 3),
        "counting_speedup": round(dicts_s / numpy_s, 2), "counts_identical": True,
        "score_tokens_per_s_vectorised": round(1 / vectorised), "score_tokens_per_s_one_at_a_time": round(1 / one_at_a_time),
        "lstm_fwd_bwd_written_out_ms": round(manual_s * 1000, 1), "lstm_fwd_bwd_fused_ms": round(fused_s * 1000, 1),
        "lstm_written_out_over_fused": round(manual_s / fused_s, 2), "rounds": args.rounds, "threads": 1,
        "python": platform.python_version(), "machine": platform.machine(), "cpus": os.cpu_count(),
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
