"""BM25 (hand-derived scores, rank-bm25 parity, the English/Chinese analyzer), filters,
reciprocal rank fusion and maximal marginal relevance."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from lmforge.errors import LmforgeError
from lmforge.rag.bm25 import Analyzer, BM25Index, s_stem
from lmforge.rag.chunking import Chunker
from lmforge.rag.documents import iter_documents
from lmforge.rag.fusion import (make_filter, matches, maximal_marginal_relevance, mmr_hits,
                                reciprocal_rank_fusion)
from lmforge.rag.types import Chunk, Hit

ROOT = Path(__file__).resolve().parents[1]


def chunk(text: str, source: str = "s.md", **metadata) -> Chunk:
    return Chunk(source=source, text=text, headings=(), metadata=metadata)


@pytest.fixture(scope="module")
def handbook_chunks():
    docs = iter_documents(ROOT / "docs" / "handbook", suffixes=[".md"])
    return Chunker().chunk_all(docs)


# ---------------------------------------------------------------------------------------- analyzer

def test_analyzer_english():
    analyze = Analyzer()
    assert analyze("The tokenizers' outputs: BM25 and ＢＭ２５, don't stop!") == [
        "tokenizer", "output", "bm25", "bm25", "dont", "stop"]
    assert analyze("lmforge's queries use max_tokens e.g. 3.14") == [
        "lmforge", "query", "use", "max", "token", "e", "g", "3", "14"]
    assert Analyzer(stopwords=frozenset(), stem=None)("The Cats") == ["the", "cats"]
    assert [s_stem(w) for w in ("queries", "series", "boxes", "shoes", "cats", "bus", "class", "its", "is")] == [
        "query", "sery", "boxe", "shoe", "cat", "bus", "class", "its", "is"]


def test_analyzer_chinese_traditional_simplified_and_mixed():
    analyze = Analyzer()
    assert analyze("退款政策，請問「退貨」？") == [
        "退", "款", "政", "策", "退款", "款政", "政策", "退", "貨", "退貨"]  # 請問 is no term
    assert analyze("退货") == ["退", "货", "退货"]  # Simplified, indexed as written
    assert analyze("用BM25搜尋文件。") == ["用", "bm25", "搜", "尋", "文", "件", "搜尋", "尋文", "文件"]
    assert analyze("，。「」！？、；：（）") == []  # full-width punctuation is never a token
    assert analyze("句") == ["句"]
    assert Analyzer(cjk_unigrams=False)("句向量") == ["句向", "向量"]
    assert Analyzer(cjk_unigrams=False)("量") == ["量"]  # a lone character still counts
    # Function characters are no terms, nor a bigram of two of them; a content word holding one stays.
    assert analyze("什麼是效能？") == ["效", "效能"]
    assert analyze("如何對齊我們的模型") == ["齊", "模", "型", "對齊", "模型"]
    assert Analyzer(cjk_particles=frozenset(), cjk_function_chars=frozenset())("什麼") == ["什", "麼", "什麼"]


# ---------------------------------------------------------------------------------------- scores

CORPUS = ["apple banana apple", "banana cherry", "cherry cherry cherry date"]


def test_scores_match_hand_derived_values():
    # N = 3 chunks of 3, 2 and 4 tokens: avgdl = 3. df: apple 1, banana 2, cherry 2, date 1.
    index = BM25Index.from_tokens([chunk(t) for t in CORPUS], [t.split() for t in CORPUS], k1=1.2, b=0.75)
    idf_apple = math.log(1 + (3 - 1 + 0.5) / (1 + 0.5))  # = ln(8/3)
    idf_banana = math.log(1 + (3 - 2 + 0.5) / (2 + 0.5))  # = ln(1.6)
    assert index.idf["apple"] == pytest.approx(math.log(8 / 3))
    assert index.idf["banana"] == pytest.approx(math.log(1.6))
    # Chunk 0: |d| = avgdl, so the length norm is k1; apple tf 2, banana tf 1.
    d0 = idf_apple * 2 * 2.2 / (2 + 1.2) + idf_banana * 1 * 2.2 / (1 + 1.2)
    # Chunk 1: |d| = 2, norm = 1.2 * (0.25 + 0.75 * 2 / 3) = 0.9.
    d1 = idf_banana * 2.2 / (1 + 0.9)
    np.testing.assert_allclose(index.scores(["apple", "banana"]), [d0, d1, 0.0], rtol=1e-12)
    assert d0 == pytest.approx(1.8186, abs=1e-4) and d1 == pytest.approx(0.5442, abs=1e-4)
    # b = 0: no length normalization; k1 = 0: term frequency saturates at once.
    flat = BM25Index.from_tokens([chunk(t) for t in CORPUS], [t.split() for t in CORPUS], k1=1.2, b=0.0)
    cherry = math.log(1.6) * 3 * 2.2 / (3 + 1.2)
    assert flat.scores(["cherry"])[2] == pytest.approx(cherry)
    binary = BM25Index.from_tokens([chunk(t) for t in CORPUS], [t.split() for t in CORPUS], k1=0.0)
    assert binary.scores(["cherry"])[2] == pytest.approx(math.log(1.6))


def test_okapi_idf_floor():
    index = BM25Index.from_tokens([chunk(t) for t in CORPUS], [t.split() for t in CORPUS], idf_variant="okapi")
    # ln((N - n + 0.5) / (n + 0.5)): apple, date = ln(5/3); banana, cherry = ln(3/5) < 0 -> 0.25 * mean = 0.
    assert index.idf["apple"] == pytest.approx(math.log(5 / 3))
    assert index.idf["banana"] == pytest.approx(0.0, abs=1e-12)


def test_scores_match_rank_bm25(handbook_chunks):
    rank_bm25 = pytest.importorskip("rank_bm25")
    analyze = Analyzer()
    tokens = [analyze(c.search_text()) for c in handbook_chunks]
    ours = BM25Index.from_tokens(handbook_chunks, tokens, k1=1.5, b=0.75, idf_variant="okapi", epsilon=0.25)
    reference = rank_bm25.BM25Okapi(tokens, k1=1.5, b=0.75, epsilon=0.25)
    for query in ("how does the kv cache save memory", "byte pair encoding merges", "退款 政策 分詞器",
                  "the the the", "warmup cosine schedule learning rate", "no such term zzzqqq"):
        q = analyze(query)
        np.testing.assert_allclose(ours.scores(q), reference.get_scores(q), rtol=1e-9, atol=1e-12)


def test_build_and_search_on_the_handbook(handbook_chunks):
    index = BM25Index.build(handbook_chunks)
    assert len(index) == len(handbook_chunks) and index.build_seconds > 0
    hits = index.search("grouped-query attention shares key and value heads", k=5)
    assert len(hits) == 5 and hits[0].chunk.source == "grouped-query-attention.md"
    assert [h.ranks for h in hits] == [{"bm25": i} for i in range(1, 6)]
    assert all(a.score >= b.score for a, b in zip(hits, hits[1:]))
    # Chinese questions find English pages through their Traditional Chinese front matter.
    zh = index.search("分詞器訓練", k=3)
    assert zh and zh[0].chunk.source == "tokenizer-training.md"
    only = index.search("attention", k=50, filters={"source": ["kv-cache.md", "attention.md"]})
    assert only and {h.chunk.source for h in only} <= {"kv-cache.md", "attention.md"}
    assert index.search("zzzqqq xyzzyplugh", k=5) == []


def test_search_ties_and_edge_cases():
    chunks = [chunk("same words here", source=f"{i}.md") for i in range(4)]
    index = BM25Index.build(chunks)
    assert [h.chunk.source for h in index.search("words", k=3)] == ["0.md", "1.md", "2.md"]
    assert index.search("words", k=0) == [] and BM25Index.build([]).search("words") == []
    with pytest.raises(LmforgeError, match="IDF variant"):
        BM25Index(idf_variant="bm25+")
    with pytest.raises(LmforgeError, match="k1 >= 0"):
        BM25Index(b=1.5)


# ---------------------------------------------------------------------------------------- filters

def test_filter_semantics():
    c = Chunk(source="a.md", text="t", metadata={"kind": "markdown", "page": 2, "terms": ["bm25", "rrf"],
                                                  "draft": False, "lang": None})
    assert matches(c, None) and matches(c, {})
    assert matches(c, {"source": "a.md"}) and not matches(c, {"source": "b.md"})
    assert matches(c, {"source": ["b.md", "a.md"]}) and not matches(c, {"source": []})
    assert not matches(c, {"id": c.id})  # a metadata key, as in the stores' SQL: chunks have none
    assert matches(c, {"terms": "rrf"}) and matches(c, {"terms": ["x", "bm25"]}) and not matches(c, {"terms": "x"})
    assert matches(c, {"page": 2}) and matches(c, {"page": 2.0}) and not matches(c, {"page": "2"})
    assert matches(c, {"draft": False}) and not matches(c, {"draft": 0}) and not matches(c, {"page": True})
    assert matches(c, {"lang": None}) and not matches(c, {"missing": "x"})
    assert matches(c, {"source": "a.md", "kind": "markdown"}) and not matches(c, {"source": "a.md", "kind": "pdf"})
    with pytest.raises(LmforgeError, match="values are strings, numbers"):
        make_filter({"source": {"$ne": "a.md"}})
    with pytest.raises(LmforgeError, match="mapping"):
        make_filter(["source"])


# ---------------------------------------------------------------------------------------- fusion

def hits(name: str, *chunks: Chunk) -> list[Hit]:
    return [Hit(chunk=c, score=10.0 - i, ranks={name: i}) for i, c in enumerate(chunks, 1)]


def test_reciprocal_rank_fusion_scores_ranks_and_ties():
    a, b, c, d = (chunk(x) for x in "abcd")
    fused = reciprocal_rank_fusion({"dense": hits("dense", a, b, c), "bm25": hits("bm25", c, a, d)})
    assert [h.chunk.text for h in fused] == ["a", "c", "b", "d"]
    assert [h.score for h in fused] == pytest.approx([1 / 61 + 1 / 62, 1 / 63 + 1 / 61, 1 / 62, 1 / 63])
    assert fused[0].ranks == {"dense": 1, "bm25": 2} and fused[3].ranks == {"bm25": 3}
    # Equal sums: the better single rank wins, then the earlier list; the same on every run.
    tie = reciprocal_rank_fusion({"x": hits("x", a, b), "y": hits("y", b, a)})
    assert [h.chunk.text for h in tie] == ["a", "b"] and tie[0].score == tie[1].score
    swapped = reciprocal_rank_fusion({"y": hits("y", b, a), "x": hits("x", a, b)})
    assert [h.chunk.text for h in swapped] == ["b", "a"]
    # Weights, k, limit, unnamed lists and a repeat inside one list.
    weighted = reciprocal_rank_fusion([hits("p", a, b), hits("q", b, a, a)], k=0, weights=[1.0, 3.0], limit=1)
    assert [h.chunk.text for h in weighted] == ["b"] and weighted[0].score == pytest.approx(1 / 2 + 3 / 1)
    assert weighted[0].ranks == {"q": 1, "p": 2, "0": 2, "1": 1}
    with pytest.raises(LmforgeError, match="unknown result lists"):
        reciprocal_rank_fusion({"dense": []}, weights={"sparse": 2.0})


def test_mmr_trades_relevance_for_diversity():
    query = [1.0, 0.0]
    candidates = [[1.0, 0.0], [0.995, 0.0998], [0.6, 0.8]]  # a, a near-copy of a, something else
    assert maximal_marginal_relevance(query, candidates, k=3, lambda_=1.0) == [0, 1, 2]
    # lambda 0.5 after picking a: near-copy 0.5*0.995 - 0.5*0.995 = 0 vs other 0.5*0.6 - 0.5*0.6 = 0;
    # lambda 0.3: near-copy 0.3*0.995 - 0.7*0.995 < other 0.3*0.6 - 0.7*0.6.
    assert maximal_marginal_relevance(query, candidates, k=2, lambda_=0.3) == [0, 2]
    assert maximal_marginal_relevance(query, candidates, k=2, lambda_=0.9) == [0, 1]
    assert maximal_marginal_relevance(query, [], k=3) == []
    assert maximal_marginal_relevance(query, candidates, k=10, lambda_=0.5)[:1] == [0]
    assert maximal_marginal_relevance(query, candidates, k=1, relevance=[0.0, 0.0, 1.0]) == [2]
    with pytest.raises(LmforgeError, match="dimensions"):
        maximal_marginal_relevance([1.0, 0.0, 0.0], candidates, k=1)
    with pytest.raises(LmforgeError, match="lambda"):
        maximal_marginal_relevance(query, candidates, k=1, lambda_=1.5)
    found = [Hit(chunk(t), s, {"dense": i}) for i, (t, s) in enumerate([("a", 0.9), ("a2", 0.8), ("b", 0.1)], 1)]
    picked = mmr_hits(found, candidates, query, k=2, lambda_=0.3)
    assert [h.chunk.text for h in picked] == ["a", "b"] and picked[1].ranks == {"dense": 3, "mmr": 2}
