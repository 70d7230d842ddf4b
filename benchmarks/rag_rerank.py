"""Cross-encoder scoring: lmforge's CrossEncoder vs sentence-transformers' CrossEncoder, same run.

Both score the same (question, passage) pairs with the same trained model directory (the one
`lmforge rag train-reranker` saves: a Hugging Face BertForSequenceClassification with two
logits): the labelled handbook questions, each against the passages of its fused top
`--depth` hits, exactly what `lmforge ask --rerank` reads. lmforge packs each batch without
padding and runs the last layer on [CLS] only; sentence-transformers pads each batch and runs
the full model. Rounds alternate which one runs first; the figures are medians over rounds.
The logits must agree (largest difference under 1e-3) or the script fails.

    python benchmarks/rag_rerank.py                         # the default model in the cache
    python benchmarks/rag_rerank.py --model DIR --rounds 5 --threads 1
    python benchmarks/rag_rerank.py --quality    # also recall@1/3 and MRR: hybrid, model alone, fusion

Printed: pairs/s of each, the ratio, the largest logit difference, and one JSON line.
`--quality` ranks the fused top 20 of every in-scope question of the main and the held-out
question set three ways (hybrid as fused, the cross-encoder alone, their reciprocal rank
fusion as `--rerank` does) and scores the distinct pages.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import numpy as np  # noqa: E402
import torch  # noqa: E402


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except Exception:  # noqa: BLE001 - a label only
        return platform.processor() or "unknown"


def candidates(question_file: str | None, depth: int, model) -> list[dict]:
    """Each labelled question with its fused top `depth` hits: (question, gold, lang, pages, passages)."""
    from lmforge.rag.config import RetrieverOptions
    from lmforge.rag.embedder import load_embedder
    from lmforge.rag.handbook import handbook_index
    from lmforge.rag.metrics import load_questions, page_name
    from lmforge.rag.retriever import Retriever, query_lang
    from lmforge.rag.store import open_store

    embedder = load_embedder()
    rows = []
    with open_store(handbook_index(embedder)) as store:
        retriever = Retriever(store, embedder, RetrieverOptions())
        for q in load_questions(question_file):
            if not q.in_scope:
                continue
            lists = retriever.search_lists(q.question, max(depth, 30))
            hits = retriever.combine(lists, "hybrid", depth, query_lang(q.question))
            rows.append({"question": q.question, "gold": list(q.gold), "lang": q.lang,
                         "pages": [page_name(h.chunk.source) for h in hits],
                         "passages": [model.passage_text(h.chunk) for h in hits]})
    return rows


def ranking_quality(rows: list[dict], model) -> dict:
    """recall@1, recall@3 and MRR per language of three orders of the same candidates: hybrid as
    fused, the cross-encoder's logits alone, and their reciprocal rank fusion (what --rerank does)."""
    from lmforge.rag.metrics import recall_at_k, reciprocal_rank

    def pages(order, row):
        seen = []
        for i in order:
            if row["pages"][i] not in seen:
                seen.append(row["pages"][i])
        return seen

    scores: dict[str, dict[str, list]] = {}
    for row in rows:
        logits = model.score([(row["question"], p) for p in row["passages"]])
        n = len(logits)
        by_model = sorted(range(n), key=lambda i: (-logits[i], i))
        model_rank = {i: r for r, i in enumerate(by_model, 1)}
        fusion = sorted(range(n), key=lambda i: (-(1 / (61 + i) + 1 / (60 + model_rank[i])), i))
        for name, order in (("hybrid", list(range(n))), ("model alone", by_model), ("hybrid+rerank", fusion)):
            ranked = pages(order, row)
            cell = scores.setdefault(f"{name}|{row['lang']}", {"r1": [], "r3": [], "mrr": []})
            cell["r1"].append(recall_at_k(ranked, row["gold"], 1))
            cell["r3"].append(recall_at_k(ranked, row["gold"], 3))
            cell["mrr"].append(reciprocal_rank(ranked, row["gold"]))
    return {key: {m: round(float(np.mean(v)), 3) for m, v in cell.items()} | {"n": len(cell["r1"])}
            for key, cell in scores.items()}


def main() -> None:
    from sentence_transformers import CrossEncoder as Reference

    from lmforge.rag.rerank import CrossEncoder, default_reranker_dir

    if ARGS.threads:
        torch.set_num_threads(ARGS.threads)
    directory = str(ARGS.model or default_reranker_dir())
    ours = CrossEncoder.load(directory)
    quality = {}
    main_rows = candidates(None, ARGS.depth, ours)
    if ARGS.quality:
        from pathlib import Path

        import lmforge.rag as rag

        heldout = Path(rag.__file__).parent / "data" / "handbook_questions_heldout.jsonl"
        sets = {"main": main_rows}
        if heldout.is_file():
            sets["heldout"] = candidates(str(heldout), ARGS.depth, ours)
        for name, rows in sets.items():
            quality[name] = ranking_quality(rows, ours)
            print(f"ranking of the fused top {ARGS.depth}, {name} question set (in scope):")
            for key, v in sorted(quality[name].items()):
                print(f"  {key:28s} recall@1 {v['r1']:.3f}  recall@3 {v['r3']:.3f}  MRR {v['mrr']:.3f}  (n={v['n']})")
    pairs = [(row["question"], p) for row in main_rows[: ARGS.questions] for p in row["passages"]]
    reference = Reference(directory, device="cpu", max_length=ours.max_length)
    times: dict[str, list[float]] = {"lmforge": [], "sentence-transformers": []}
    outputs: dict[str, np.ndarray] = {}

    def run(name: str) -> None:
        started = time.perf_counter()
        if name == "lmforge":
            outputs[name] = ours.logits(pairs, batch_size=ARGS.batch_size)
        else:
            outputs[name] = np.asarray(reference.predict(pairs, batch_size=ARGS.batch_size,
                                                         activation_fn=torch.nn.Identity(),
                                                         show_progress_bar=False), dtype=np.float32)
        times[name].append(time.perf_counter() - started)

    for r in range(ARGS.rounds):
        for name in (("lmforge", "sentence-transformers") if r % 2 == 0 else ("sentence-transformers", "lmforge")):
            run(name)
    diff = float(np.abs(outputs["lmforge"] - outputs["sentence-transformers"]).max())
    if diff > 1e-3:
        raise SystemExit(f"logits differ by {diff:.2e}: the two implementations disagree")
    rate = {k: len(pairs) / statistics.median(v) for k, v in times.items()}
    ratio = rate["lmforge"] / rate["sentence-transformers"]
    tokens = sum(len(ours.encode_pair(a, b)[0]) for a, b in pairs)
    print(f"{len(pairs)} pairs ({tokens / len(pairs):.0f} tokens each on average), batch {ARGS.batch_size}, "
          f"{torch.get_num_threads()} threads, {cpu_name()}")
    for name, value in rate.items():
        print(f"  {name:22s} {value:8.1f} pairs/s  (median of {ARGS.rounds})")
    print(f"  lmforge / sentence-transformers: {ratio:.2f}x; largest logit difference {diff:.1e}")
    print(json.dumps({"benchmark": "rag_rerank", "pairs": len(pairs), "mean_tokens": round(tokens / len(pairs), 1),
                      "batch_size": ARGS.batch_size, "threads": torch.get_num_threads(),
                      "pairs_per_s": {k: round(v, 2) for k, v in rate.items()}, "ratio": round(ratio, 3),
                      "max_logit_diff": diff, "cpu": cpu_name(), "model": directory, "quality": quality}))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="cross-encoder directory (default: the trained one in the cache)")
    parser.add_argument("--depth", type=int, default=20, help="fused hits per question")
    parser.add_argument("--questions", type=int, default=40, help="labelled questions used (the first N)")
    parser.add_argument("--batch-size", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--quality", action="store_true",
                        help="also rank the candidates of the main and held-out question sets three ways")
    ARGS = parser.parse_args()
    main()
