"""Quality of the default model's GGUF exports: perplexity and top-1 agreement per tensor type.

Writes the default model as F16, Q8_0, Q4_0 (head in Q8_0) and Q4_0 --pure with lmforge's
GGUF writer, loads each file back with lmforge's GGUF loader and scores the same text: the
first 1,024 tokens of the offline Wikipedia excerpt, as two 512-token windows. Top-1
agreement compares each position's most likely next token with the float32 model's.

    python benchmarks/export_gguf_quality.py

Prints a table and one JSON line.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from lmforge.data.corpora import load_source  # noqa: E402
from lmforge.model.gguf_io import load_gguf_model  # noqa: E402
from lmforge.model.gguf_write import write_gguf  # noqa: E402
from lmforge.model.loading import load_model, load_tokenizer  # noqa: E402
from lmforge.model.registry import resolve  # noqa: E402

WINDOW = 512


def score(model, windows, reference=None):
    """(perplexity, top-1 agreement with `reference`'s argmaxes, this model's argmaxes)."""
    nll, count, agree, choices = 0.0, 0, 0, []
    with torch.no_grad():
        for i, x in enumerate(windows):
            logits = model(x)
            nll -= logits.log_softmax(-1)[0, :-1].gather(-1, x[0, 1:, None]).sum().item()
            count += x.shape[1] - 1
            choices.append(logits.argmax(-1))
            if reference is not None:
                agree += int((choices[-1] == reference[i]).sum())
    total = sum(x.shape[1] for x in windows)
    return math.exp(nll / count), (agree / total if reference is not None else 1.0), choices


def main() -> None:
    spec = resolve(None)
    model, tokenizer = load_model(spec), load_tokenizer(spec)
    ids: list[int] = []
    for doc in itertools.islice(load_source("wiki"), 200):
        ids += tokenizer.encode(doc.text)
        if len(ids) >= 2 * WINDOW:
            break
    windows = [torch.tensor([ids[:WINDOW]]), torch.tensor([ids[WINDOW:2 * WINDOW]])]
    ppl, _, reference = score(model, windows)
    rows = [{"type": "float32", "mib": None, "perplexity": round(ppl, 3), "top1_agreement": 1.0}]
    out = Path(tempfile.mkdtemp())
    for qtype, pure in (("f16", False), ("q8_0", False), ("q4_0", False), ("q4_0", True)):
        result = write_gguf(model, out / f"{qtype}{'-pure' if pure else ''}.gguf", qtype, pure=pure)
        ppl, agree, _ = score(load_gguf_model(result.path), windows, reference)
        rows.append({"type": qtype + (" pure" if pure else ""), "mib": round(result.nbytes / 2**20, 1),
                     "perplexity": round(ppl, 3), "top1_agreement": round(agree, 3)})
        result.path.unlink()
    print(f"{'type':<12}{'MiB':>8}{'perplexity':>12}{'top-1 agree':>13}")
    for r in rows:
        print(f"{r['type']:<12}{r['mib'] or '-':>8}{r['perplexity']:>12.2f}{r['top1_agreement']:>13.1%}")
    print(json.dumps({"benchmark": "export_gguf_quality", "model": spec.name, "tokens": 2 * WINDOW, "rows": rows}))


if __name__ == "__main__":
    main()
