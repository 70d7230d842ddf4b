"""BM25 over the handbook: build and query time against rank-bm25, and the analyzer's choices measured.

Corpus: the handbook (docs/handbook/*.md) loaded and chunked with lmforge's defaults;
each chunk is indexed by its `search_text()` (titles, key terms, heading path, text).

Speed (same process, same tokens; tokenizing is timed once, apart, as both need it):
  * index build: lmforge `BM25Index.from_tokens` vs rank-bm25 `BM25Okapi(tokens)`;
  * query: lmforge `search(q, k=10)` vs rank-bm25 `get_scores(q)` + a top-10 sort;
  * scores: lmforge's "okapi" variant must equal rank-bm25's to 1e-9, or the script fails.

Quality: the questions below (written for this benchmark in English, Traditional Chinese
and a few in Simplified Chinese, each with the handbook page that answers it) are run
against variants of the analyzer and scoring. A question counts as found at rank r when
the r-th chunk returned is from its page. Figures: hit@1, recall@5, MRR@10.

Run:  python benchmarks/rag_bm25.py [--repeat 5]   (needs rank-bm25; nltk for the Porter row)
The last line printed is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

QUESTIONS = [
    ("why does generation keep the keys and values of earlier tokens", "kv-cache.md"),
    ("how are near-duplicate documents found with minhash signatures", "deduplication.md"),
    ("difference between layernorm and rmsnorm", "normalization.md"),
    ("rotary position embeddings rotate query and key vectors", "positional-encodings.md"),
    ("how much memory do the Adam optimizer states take per parameter", "memory-math.md"),
    ("warm up the learning rate then decay it along a cosine", "lr-schedules.md"),
    ("decoupled weight decay compared with an L2 penalty", "optimizers.md"),
    ("nucleus sampling with top-p and temperature", "decoding.md"),
    ("force the model to produce JSON that matches a schema", "structured-output.md"),
    ("continuous batching of many requests in one server", "serving-and-batching.md"),
    ("server-sent events that stream tokens to the client", "streaming.md"),
    ("how perplexity relates to cross-entropy and bits per byte", "perplexity.md"),
    ("BLEU, chrF and ROUGE scores of generated text", "text-metrics.md"),
    ("pass@k for generated code run in a sandbox", "benchmarks.md"),
    ("a strong model grades answers; position and verbosity bias", "llm-as-judge.md"),
    ("Elo ratings from pairwise human preferences and annotator agreement", "human-evaluation.md"),
    ("few-shot examples and chain-of-thought prompting", "prompting.md"),
    ("compute-optimal number of training tokens per parameter", "scaling-laws.md"),
    ("training WordPiece and Unigram vocabularies", "tokenizer-training.md"),
    ("how byte-level BPE applies merges to encode a string", "bpe-encoding.md"),
    ("template with special tokens for system, user and assistant turns", "chat-templates.md"),
    ("safetensors and GGUF files, dequantizing quantized blocks", "checkpoints-and-formats.md"),
    ("removing personal information and filtering low-quality web text", "data-cleaning.md"),
    ("sharding parameters, gradients and optimizer states across GPUs", "distributed-training.md"),
    ("tied input and output embeddings and word analogies", "embeddings.md"),
    ("gated SwiGLU feed-forward layer", "feed-forward.md"),
    ("tiled attention with an online softmax that never stores the score matrix", "flash-attention.md"),
    ("fewer key and value heads shared by groups of query heads", "grouped-query-attention.md"),
    ("causal mask in multi-head scaled dot-product attention", "attention.md"),
    ("bf16 autocast, fp16 loss scaling and activation checkpointing", "mixed-precision-and-recomputation.md"),
    ("Prometheus metrics: time to first token and p95 latency", "monitoring-metrics.md"),
    ("resume a training run exactly after a crash", "training-checkpoints.md"),
    ("loss spikes and model FLOPs utilization in the training log", "training-telemetry.md"),
    ("thumbs-up ratings in the browser chat turned into preference data", "web-chat.md"),
    ("should we call a hosted API or run our own model", "api-vs-self-hosting.md"),
    ("next-token prediction loss and masked language modelling", "pretraining-objective.md"),
    ("split documents into passages that fit the embedding model's window", "chunking.md"),
    ("combine keyword search and vector search results into one list", "hybrid-search-and-reranking.md"),
    ("accumulate gradients over micro-batches to simulate a larger batch", "mixed-precision-and-recomputation.md"),
    ("greedy decoding at temperature zero and a repetition penalty", "decoding.md"),
    ("什麼是鍵值快取", "kv-cache.md"),
    ("如何去除重複的資料", "deduplication.md"),
    ("學習率預熱與餘弦衰減", "lr-schedules.md"),
    ("困惑度怎麼計算", "perplexity.md"),
    ("分詞器如何訓練", "tokenizer-training.md"),
    ("旋轉位置編碼是什麼", "positional-encodings.md"),
    ("連續批次處理如何提高吞吐量", "serving-and-batching.md"),
    ("用大型語言模型當評審", "llm-as-judge.md"),
    ("文件切塊與重疊", "chunking.md"),
    ("關鍵字檢索與倒數排名融合", "hybrid-search-and-reranking.md"),
    ("混合精度訓練", "mixed-precision-and-recomputation.md"),
    ("結構化輸出與 JSON 模式", "structured-output.md"),
    ("什么是键值缓存", "kv-cache.md"),  # Simplified Chinese from here on
    ("学习率预热", "lr-schedules.md"),
    ("困惑度怎么计算", "perplexity.md"),
    ("分词器训练", "tokenizer-training.md"),
]
SIMPLIFIED = 4  # the last four questions


def load_chunks():
    from lmforge.rag.chunking import Chunker
    from lmforge.rag.documents import iter_documents

    start = time.perf_counter()
    docs = list(iter_documents(ROOT / "docs" / "handbook", suffixes=[".md"]))
    loaded = time.perf_counter()
    chunks = Chunker().chunk_all(docs)
    return docs, chunks, loaded - start, time.perf_counter() - loaded


def evaluate(index, questions) -> dict[str, float]:
    hit1 = recall5 = rr = 0.0
    for question, page in questions:
        hits = index.search(question, k=10)
        sources = [h.chunk.source for h in hits]
        if sources[:1] == [page]:
            hit1 += 1
        if page in sources[:5]:
            recall5 += 1
        if page in sources:
            rr += 1 / (sources.index(page) + 1)
    n = len(questions)
    return {"hit@1": round(hit1 / n, 3), "recall@5": round(recall5 / n, 3), "mrr@10": round(rr / n, 3)}


def best_time(fn, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()

    import numpy as np
    import rank_bm25

    from lmforge.rag.bm25 import Analyzer, BM25Index

    docs, chunks, load_s, chunk_s = load_chunks()
    pages = {c.source for c in chunks}
    questions = [(q, p) for q, p in QUESTIONS if p in pages]
    if len(questions) < len(QUESTIONS):
        print(f"note: {len(QUESTIONS) - len(questions)} questions name pages that do not exist yet; left out")
    analyzer = Analyzer()
    texts = [c.search_text() for c in chunks]
    tokens = [analyzer(t) for t in texts]
    tokenize_s = best_time(lambda: [analyzer(t) for t in texts], args.repeat)
    n_tokens = sum(map(len, tokens))

    # -- speed and parity
    ours_build = best_time(lambda: BM25Index.from_tokens(chunks, tokens, k1=1.5, idf_variant="okapi"), args.repeat)
    ref_build = best_time(lambda: rank_bm25.BM25Okapi(tokens, k1=1.5, b=0.75, epsilon=0.25), args.repeat)
    ours = BM25Index.from_tokens(chunks, tokens, k1=1.5, idf_variant="okapi")
    ref = rank_bm25.BM25Okapi(tokens, k1=1.5, b=0.75, epsilon=0.25)
    query_terms = [analyzer(q) for q, _ in questions]
    worst = max(float(np.max(np.abs(ours.scores(q) - ref.get_scores(q)))) for q in query_terms)
    if worst > 1e-9:
        raise SystemExit(f"FAIL: scores differ from rank-bm25 by {worst}")

    def ref_search():
        for q in query_terms:
            scores = ref.get_scores(q)
            top = np.argpartition(-scores, 10)[:10]
            top[np.argsort(-scores[top], kind="stable")]

    ours_query = best_time(lambda: [ours.search_terms(q, 10) for q in query_terms], args.repeat) / len(query_terms)
    ref_query = best_time(ref_search, args.repeat) / len(query_terms)
    full_build = best_time(lambda: BM25Index.build(chunks), args.repeat)

    # -- quality of the analyzer and scoring choices
    def variant(name: str, analyze, text_of=lambda c: c.search_text(), **options):
        index = BM25Index.from_tokens(chunks, [analyze(text_of(c)) for c in chunks], analyzer=analyze, **options)
        out = {"all": evaluate(index, questions)}
        english = [(q, p) for q, p in questions if q.isascii()]
        traditional = [(q, p) for q, p in questions[:len(questions) - SIMPLIFIED] if not q.isascii()]
        simplified = questions[len(questions) - SIMPLIFIED:]
        out["english"] = evaluate(index, english)
        out["traditional"] = evaluate(index, traditional)
        out["simplified"] = evaluate(index, simplified)
        return name, out

    variants = [
        variant("default: stopwords + S-stemmer, Lucene IDF, k1 1.2, b 0.75", analyzer),
        variant("no stopwords", Analyzer(stopwords=frozenset())),
        variant("no stemmer", Analyzer(stem=None)),
        variant("neither", Analyzer(stopwords=frozenset(), stem=None)),
        variant("Okapi IDF with floor (rank-bm25), k1 1.5", analyzer, idf_variant="okapi", k1=1.5),
        variant("CJK unigrams only", Analyzer(cjk_bigrams=False)),
        variant("CJK bigrams only", Analyzer(cjk_unigrams=False)),
        variant("text only: no titles, terms or headings", analyzer, text_of=lambda c: c.text),
    ]
    try:
        from nltk.stem.porter import PorterStemmer

        variants.insert(3, variant("Porter stemmer (nltk) + stopwords", Analyzer(stem=PorterStemmer().stem)))
    except ImportError:
        print("note: nltk not installed, no Porter row")

    print(f"corpus: {len(docs)} pages, {len(chunks)} chunks, {n_tokens} index terms; "
          f"load {load_s * 1e3:.0f} ms, chunk {chunk_s * 1e3:.0f} ms, analyze {tokenize_s * 1e3:.0f} ms")
    print(f"index build from tokens: lmforge {ours_build * 1e3:.1f} ms, rank-bm25 {ref_build * 1e3:.1f} ms "
          f"(rank-bm25 / lmforge {ref_build / ours_build:.2f}x); lmforge build with analysis {full_build * 1e3:.0f} ms")
    print(f"query (top 10): lmforge {ours_query * 1e3:.3f} ms, rank-bm25 {ref_query * 1e3:.3f} ms "
          f"(rank-bm25 / lmforge {ref_query / ours_query:.2f}x); scores equal to {worst:.1e}")
    print(f"{len(questions)} questions ({sum(q.isascii() for q, _ in questions)} English, "
          f"{len(questions) - sum(q.isascii() for q, _ in questions) - SIMPLIFIED} Traditional, {SIMPLIFIED} Simplified)")
    print(f"{'variant':62s} {'hit@1':>6s} {'R@5':>6s} {'MRR':>6s} | {'en R@5':>6s} {'zh-t R@5':>8s} {'zh-s R@5':>8s}")
    for name, figures in variants:
        a = figures["all"]
        print(f"{name:62s} {a['hit@1']:6.3f} {a['recall@5']:6.3f} {a['mrr@10']:6.3f} | "
              f"{figures['english']['recall@5']:6.3f} {figures['traditional']['recall@5']:8.3f} "
              f"{figures['simplified']['recall@5']:8.3f}")
    summary = {
        "benchmark": "rag_bm25",
        "pages": len(docs), "chunks": len(chunks), "index_terms": n_tokens, "questions": len(questions),
        "chunk_ms": round(chunk_s * 1e3, 1), "analyze_ms": round(tokenize_s * 1e3, 1),
        "build_ms_lmforge": round(ours_build * 1e3, 2), "build_ms_rank_bm25": round(ref_build * 1e3, 2),
        "ratio_build_rank_bm25_vs_lmforge": round(ref_build / ours_build, 2),
        "build_with_analysis_ms_lmforge": round(full_build * 1e3, 1),
        "query_ms_lmforge": round(ours_query * 1e3, 4), "query_ms_rank_bm25": round(ref_query * 1e3, 4),
        "ratio_query_rank_bm25_vs_lmforge": round(ref_query / ours_query, 2),
        "max_score_difference": worst,
        "variants": dict(variants),
        "cpus": os.cpu_count(),
        "rank_bm25_version": importlib.metadata.version("rank-bm25"),
    }
    print(json.dumps(summary, ensure_ascii=False))


if __name__ == "__main__":
    main()
