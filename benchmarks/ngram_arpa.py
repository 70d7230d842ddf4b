"""lmforge's Kneser-Ney n-gram model written as ARPA and read by KenLM: the same log-probabilities?

Fits `NGramLM` on the offline Wikipedia excerpt's training side (token ids of the default
model's tokenizer), writes it with `lmforge.model.arpa.write_arpa` (the tokenizer's token
strings as words), loads the file in KenLM's Python module and scores held-out documents
with both: the largest per-token difference (natural log) and each side's scoring speed.
KenLM is not a dependency of lmforge or of its tests: `pip install kenlm` (builds from
source, about a minute) before running this.

    python benchmarks/ngram_arpa.py --order 4 --train-tokens 300000 --eval-tokens 20000
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_common import cpu_model, heldout_texts, wiki_texts  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--order", type=int, default=4)
    parser.add_argument("--train-tokens", type=int, default=300_000)
    parser.add_argument("--eval-tokens", type=int, default=20_000)
    args = parser.parse_args()

    import kenlm
    import numpy as np

    from lmforge.model.arpa import arpa_words, write_arpa
    from lmforge.model.loading import load_tokenizer
    from lmforge.model.ngram import NGramLM
    from lmforge.model.registry import resolve

    tokenizer = load_tokenizer(resolve(None))
    V = tokenizer.vocab_size
    train, total = [], 0
    for text in itertools.islice(wiki_texts("train"), 10_000):
        ids = tokenizer.encode(text)
        train.append(ids)
        total += len(ids)
        if total >= args.train_tokens:
            break
    texts, eval_tokens = heldout_texts(tokenizer, args.eval_tokens)
    heldout = [tokenizer.encode(t) for t in texts]

    start = time.perf_counter()
    model = NGramLM(args.order, V).fit(train)
    fit_s = time.perf_counter() - start
    tokens = [tokenizer.id_to_token(i) or "" for i in range(V)]
    words = arpa_words(tokens, V)
    path = Path(tempfile.mkdtemp(prefix="lmforge-arpa-")) / "model.arpa"
    start = time.perf_counter()
    write_arpa(model, path, tokens)
    write_s = time.perf_counter() - start
    start = time.perf_counter()
    reference = kenlm.Model(str(path))
    load_s = time.perf_counter() - start

    start = time.perf_counter()
    ours = [model.token_logprobs(ids, first=0) for ids in heldout]
    ours_s = time.perf_counter() - start
    sentences = [" ".join(words[i] for i in ids) for ids in heldout]
    start = time.perf_counter()
    theirs = [np.array([s[0] for s in reference.full_scores(text, bos=False, eos=False)]) * math.log(10)
              for text in sentences]
    theirs_s = time.perf_counter() - start
    diff = max(float(np.abs(a - b).max()) for a, b in zip(ours, theirs))
    scored = sum(len(a) for a in ours)
    nll = -sum(float(a.sum()) for a in ours) / scored
    print(json.dumps({
        "benchmark": "ngram_arpa", "cpu": cpu_model(), "order": args.order, "vocab_size": V,
        "train_tokens": total, "eval_tokens": eval_tokens, "ngrams": model.num_ngrams(),
        "arpa_mib": round(os.path.getsize(path) / 2**20, 1), "fit_s": round(fit_s, 2), "write_s": round(write_s, 2),
        "kenlm_load_s": round(load_s, 2), "max_abs_logprob_diff": diff,
        "perplexity_lmforge": round(math.exp(nll), 3),
        "perplexity_kenlm": round(math.exp(-sum(float(b.sum()) for b in theirs) / scored), 3),
        "score_tokens_per_s": {"lmforge": round(scored / ours_s), "kenlm": round(scored / theirs_s)},
        "load": round(os.getloadavg()[0], 1)}))
    path.unlink()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
