"""Retrieval metrics on hand-derived rankings, and the labelled sets shipped in lmforge/rag/data."""

from __future__ import annotations

import json
import math
import re
import tomllib
from fnmatch import fnmatch
from pathlib import Path

import pytest

from lmforge.errors import LmforgeError
from lmforge.rag.metrics import (
    Question, check_gold_pages, evaluate_retrieval, gold_recall_at_k, load_groundedness_labels, load_questions,
    macro_average, missing_gold_pages, ndcg_at_k, page_name, parse_questions, question_scores, ranked_pages,
    recall_at_k, reciprocal_rank, refusal_rate,
)
from lmforge.rag.types import Chunk, Hit

REPO = Path(__file__).resolve().parents[1]
HANDBOOK = REPO / "docs" / "handbook"

# The handbook pages the question set covers: those written before retrieval, and the
# pages written with it (their names and subjects were fixed before their text existed).
WRITTEN_PAGES = {
    "api-vs-self-hosting.md", "attention.md", "benchmarks.md", "bpe-encoding.md", "chat-templates.md",
    "checkpoints-and-formats.md", "data-cleaning.md", "decoding.md", "deduplication.md", "distributed-training.md",
    "embeddings.md", "feed-forward.md", "flash-attention.md", "grouped-query-attention.md", "human-evaluation.md",
    "kv-cache.md", "llm-as-judge.md", "lr-schedules.md", "memory-math.md", "mixed-precision-and-recomputation.md",
    "monitoring-metrics.md", "normalization.md", "optimizers.md", "perplexity.md", "positional-encodings.md",
    "pretraining-objective.md", "prompting.md", "scaling-laws.md", "serving-and-batching.md", "streaming.md",
    "structured-output.md", "text-metrics.md", "tokenizer-training.md", "training-checkpoints.md",
    "training-telemetry.md", "web-chat.md",
}
NEW_PAGES = {
    "sentence-embeddings.md", "vector-databases.md", "chunking.md", "hybrid-search-and-reranking.md", "rag.md",
    "groundedness.md", "what-is-an-llm.md", "emergent-abilities.md", "in-context-learning-vs-fine-tuning.md",
    "open-vs-closed-models.md", "choosing-a-model.md", "cost-estimation.md", "copyright-and-data-provenance.md",
    "responsible-ai.md", "research-frontiers.md",
}


def log2_discount(rank: int) -> float:
    return 1 / math.log2(rank + 1)


# --------------------------------------------------------------------------------------
# Ranked pages


def test_ranked_pages_keep_the_first_occurrence_of_each_page_in_rank_order():
    def hit(source, score):
        return Hit(Chunk(source=source, text=f"text of {source} {score}"), score)

    hits = [hit("kv-cache.md", 0.9), hit("kv-cache.md", 0.8), hit("docs/handbook/attention.md", 0.7),
            hit("handbook/kv-cache.md#the-math", 0.6), hit("rag.md", 0.5)]
    assert ranked_pages(hits) == ["kv-cache.md", "attention.md", "rag.md"]
    # rag.md is the fifth hit but the third distinct page: its reciprocal rank is 1/3, not 1/5.
    assert reciprocal_rank(hits, ["rag.md"]) == pytest.approx(1 / 3)
    assert ranked_pages([Chunk(source="a/b.md", text="x"), "b.md", "c.md?x=1", ""]) == ["b.md", "c.md"]
    assert page_name("https://host/docs/rag.md#refusal") == "rag.md"
    assert page_name("docs\\handbook\\rag.md") == "rag.md"


# --------------------------------------------------------------------------------------
# The metrics, by hand

# Three questions: gold found at rank 1, gold found at rank 2, no gold in the list.
RANKINGS = [["a.md", "x.md", "y.md"], ["x.md", "b.md", "y.md"], ["x.md", "y.md", "z.md", "c.md"]]
GOLDS = [["a.md"], ["b.md"], ["c.md"]]


def test_recall_at_k_is_the_share_of_questions_with_a_gold_page_in_the_top_k():
    assert [recall_at_k(r, g, 3) for r, g in zip(RANKINGS, GOLDS)] == [1.0, 1.0, 0.0]  # recall@3 = 2/3
    assert [recall_at_k(r, g, 1) for r, g in zip(RANKINGS, GOLDS)] == [1.0, 0.0, 0.0]  # recall@1 = 1/3
    assert recall_at_k(RANKINGS[2], GOLDS[2], 4) == 1.0  # c.md is the fourth page
    questions = [Question(id=f"q{i}", question="?", gold=tuple(g)) for i, g in enumerate(GOLDS)]
    report = evaluate_retrieval(questions, RANKINGS, ks=(1, 3))
    assert report["overall"]["recall@3"] == pytest.approx(2 / 3)
    assert report["overall"]["recall@1"] == pytest.approx(1 / 3)


def test_mrr_is_the_mean_reciprocal_rank_of_the_first_gold_page():
    assert [reciprocal_rank(r, g) for r, g in zip(RANKINGS, GOLDS)] == [1.0, 0.5, 0.25]
    # Cut at k = 3 the third question has no gold page: MRR = (1 + 1/2 + 0) / 3.
    assert [reciprocal_rank(r, g, k=3) for r, g in zip(RANKINGS, GOLDS)] == [1.0, 0.5, 0.0]
    questions = [Question(id=f"q{i}", question="?", gold=tuple(g)) for i, g in enumerate(GOLDS)]
    truncated = [r[:3] for r in RANKINGS]
    assert evaluate_retrieval(questions, truncated, ks=(3,))["overall"]["mrr"] == pytest.approx((1 + 1 / 2 + 0) / 3)
    # The first gold page counts, whichever of the gold pages it is.
    assert reciprocal_rank(["x.md", "b.md", "a.md"], ["a.md", "b.md"]) == 0.5


def test_gold_recall_counts_the_share_of_the_gold_pages_found():
    assert gold_recall_at_k(["a.md", "x.md", "b.md"], ["a.md", "b.md", "c.md"], 3) == pytest.approx(2 / 3)
    assert gold_recall_at_k(["a.md", "x.md", "b.md"], ["a.md", "b.md", "c.md"], 2) == pytest.approx(1 / 3)
    assert recall_at_k(["a.md", "x.md", "b.md"], ["a.md", "b.md", "c.md"], 2) == 1.0


def test_ndcg_with_binary_relevance_and_an_ideal_from_the_number_of_gold_pages():
    # Two gold pages at ranks 1 and 3: (1 + 1/log2(4)) / (1 + 1/log2(3)).
    value = ndcg_at_k(["a.md", "x.md", "b.md", "y.md"], ["a.md", "b.md"], 5)
    assert value == pytest.approx((1 + 1 / math.log2(4)) / (1 + 1 / math.log2(3)))
    assert value == pytest.approx(0.9197, abs=1e-4)
    # Three gold pages and k = 2: the ideal has two terms, one gold page found at rank 1.
    assert ndcg_at_k(["a.md", "x.md"], ["a.md", "b.md", "c.md"], 2) == pytest.approx(1 / (1 + log2_discount(2)))
    # A gold page below the cut does not count; every gold page first is 1.
    assert ndcg_at_k(["x.md", "y.md", "a.md"], ["a.md"], 2) == 0.0
    assert ndcg_at_k(["b.md", "a.md", "x.md"], ["a.md", "b.md"], 3) == pytest.approx(1.0)
    # One gold page at rank 2 of the list: 1/log2(3).
    assert ndcg_at_k(["x.md", "a.md"], ["a.md"], 10) == pytest.approx(1 / math.log2(3))


def test_duplicate_pages_in_the_hits_do_not_move_later_pages_down():
    hits = ["x.md", "x.md", "x.md", "a.md"]
    assert recall_at_k(hits, ["a.md"], 2) == 1.0
    assert ndcg_at_k(hits, ["a.md"], 2) == pytest.approx(1 / math.log2(3))
    assert question_scores(hits, ["a.md"], ks=(1, 2)) == {
        "recall@1": 0.0, "gold_recall@1": 0.0, "ndcg@1": 0.0,
        "recall@2": 1.0, "gold_recall@2": 1.0, "ndcg@2": pytest.approx(1 / math.log2(3)), "rr": 0.5}


def test_edge_cases_empty_rankings_short_lists_and_bad_arguments():
    assert recall_at_k([], ["a.md"], 5) == 0.0
    assert reciprocal_rank([], ["a.md"]) == 0.0
    assert ndcg_at_k([], ["a.md"], 5) == 0.0
    assert recall_at_k(["a.md"], ["a.md"], 100) == 1.0  # k past the end of the list
    with pytest.raises(LmforgeError, match="no gold pages"):
        recall_at_k(["a.md"], [], 3)
    for bad in (0, -1, 2.5, True):
        with pytest.raises(LmforgeError, match="k must be a positive integer"):
            ndcg_at_k(["a.md"], ["a.md"], bad)
    with pytest.raises(LmforgeError, match="2 questions but 1 rankings"):
        evaluate_retrieval([Question("a", "?", ("a.md",)), Question("b", "?", ("b.md",))], [["a.md"]])


def test_ndcg_matches_scikit_learn_on_random_rankings():
    sklearn_metrics = pytest.importorskip("sklearn.metrics")
    import random

    rng = random.Random(7)
    pages = [f"p{i}.md" for i in range(30)]
    for _ in range(200):
        ranked = rng.sample(pages, 12)
        gold = rng.sample(pages, rng.randint(1, 5))
        k = rng.randint(1, 12)
        # scikit-learn sees every page ranked plus the gold pages the retriever missed, below them.
        items = ranked + [page for page in gold if page not in ranked]
        scores = [len(items) - i for i in range(len(ranked))] + [0] * (len(items) - len(ranked))
        relevance = [1 if page in gold else 0 for page in items]
        expected = sklearn_metrics.ndcg_score([relevance], [scores], k=k, ignore_ties=True)
        assert ndcg_at_k(ranked, gold, k) == pytest.approx(expected, abs=1e-12)


def test_refusal_rates_and_macro_average_per_language():
    assert refusal_rate([True, False]) == 0.5
    assert refusal_rate([]) is None
    means, macro = macro_average([1.0, 1.0, 0.0, 0.0, 1.0], ["en", "en", "en", "en", "zh-Hant"])
    assert means == {"en": 0.5, "zh-Hant": 1.0} and macro == 0.75  # the micro mean would be 0.6

    questions = [
        Question("en-1", "?", ("a.md",), lang="en"), Question("en-2", "?", ("b.md",), lang="en"),
        Question("en-3", "?", (), lang="en", kind="out_of_scope"),
        Question("zh-1", "?", ("a.md",), lang="zh-Hant"),
        Question("zh-2", "?", (), lang="zh-Hant", kind="out_of_scope"),
        Question("zh-3", "?", (), lang="zh-Hant", kind="out_of_scope"),
    ]
    rankings = [["a.md"], ["x.md", "b.md"], ["a.md"], ["x.md"], [], ["a.md"]]
    refused = [False, True, True, False, True, False]
    report = evaluate_retrieval(questions, rankings, ks=(1, 2), refused=refused)
    assert (report["questions"], report["in_scope"], report["out_of_scope"]) == (6, 3, 3)
    en, zh = report["by_lang"]["en"], report["by_lang"]["zh-Hant"]
    assert en["recall@1"] == 0.5 and en["recall@2"] == 1.0 and en["mrr"] == 0.75
    assert zh["recall@2"] == 0.0 and zh["mrr"] == 0.0
    assert report["overall"]["mrr"] == pytest.approx((1 + 0.5 + 0) / 3)
    assert report["macro"]["mrr"] == pytest.approx((0.75 + 0) / 2)
    assert en["refusal_rate"] == 1.0 and en["false_refusal_rate"] == 0.5
    assert zh["refusal_rate"] == 0.5 and zh["false_refusal_rate"] == 0.0
    assert report["overall"]["refusal_rate"] == pytest.approx(2 / 3)
    assert report["overall"]["false_refusal_rate"] == pytest.approx(1 / 3)
    assert report["macro"]["refusal_rate"] == pytest.approx(0.75)
    # Out-of-scope questions take no part in the retrieval figures.
    assert evaluate_retrieval(questions[2:3], [["a.md"]])["overall"]["mrr"] is None
    json.dumps(report)  # the report is plain data


# --------------------------------------------------------------------------------------
# Loading and validating question files


def write_lines(path: Path, records: list) -> Path:
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r, ensure_ascii=False) for r in records) + "\n",
                    encoding="utf-8")
    return path


GOOD = {"id": "en-001", "lang": "en", "question": "Why cache keys?", "gold": ["kv-cache.md"], "kind": "concept"}


@pytest.mark.parametrize("bad, message", [
    ({**GOOD, "id": "en-002", "answer": "x"}, r"q\.jsonl:2: unknown field 'answer'"),
    ({**GOOD, "id": "en-002", "question": "  "}, r"q\.jsonl:2: question is empty"),
    (GOOD, r"q\.jsonl:2: duplicate id 'en-001' \(first on line 1\)"),
    ({**GOOD, "id": "en-002", "lang": "zh-CN"}, r"q\.jsonl:2: lang must be one of en, zh-Hant, got 'zh-CN'"),
    ({**GOOD, "id": "en-002", "kind": "trivia"}, r"q\.jsonl:2: kind must be one of"),
    ({**GOOD, "id": "en-002", "gold": []}, r"q\.jsonl:2: gold is empty"),
    ({**GOOD, "id": "en-002", "kind": "out_of_scope"}, r"q\.jsonl:2: an out_of_scope question must have an empty gold"),
    ({**GOOD, "id": "en-002", "gold": ["docs/handbook/kv-cache.md"]}, r"q\.jsonl:2: gold page .* must be a file name"),
    ({**GOOD, "id": "en-002", "gold": ["a.md", "a.md"]}, r"q\.jsonl:2: gold lists a page twice"),
    ({"id": "en-002", "lang": "en", "question": "?", "kind": "concept"}, r"q\.jsonl:2: missing field gold"),
    ("{not json", r"q\.jsonl:2: not valid JSON"),
    ('["a list"]', r"q\.jsonl:2: expected a JSON object"),
])
def test_a_bad_question_line_is_one_error_naming_the_file_and_line(tmp_path, bad, message):
    path = write_lines(tmp_path / "q.jsonl", [GOOD, bad])
    with pytest.raises(LmforgeError, match=message):
        load_questions(path)


def test_questions_load_from_a_user_file_and_gold_pages_are_checked(tmp_path):
    records = [GOOD, {"id": "en-002", "lang": "en", "question": "Weather?", "gold": [], "kind": "out_of_scope",
                      "notes": "everyday"},
               {"id": "zh-001", "lang": "zh-Hant", "question": "RAG 是什麼？", "gold": ["rag.md", "kv-cache.md"],
                "kind": "concept"}]
    questions = load_questions(write_lines(tmp_path / "q.jsonl", records))
    assert [q.id for q in questions] == ["en-001", "en-002", "zh-001"]
    assert questions[1].notes == "everyday" and not questions[1].in_scope and questions[2].gold[0] == "rag.md"
    handbook = tmp_path / "handbook"
    handbook.mkdir()
    (handbook / "kv-cache.md").write_text("# KV\n", encoding="utf-8")
    assert missing_gold_pages(questions, handbook) == {"rag.md": ["zh-001"]}
    with pytest.raises(LmforgeError, match=r"1 gold page missing from .*handbook: rag\.md \(named by zh-001\)"):
        check_gold_pages(questions, handbook)
    (handbook / "rag.md").write_text("# RAG\n", encoding="utf-8")
    check_gold_pages(questions, handbook)
    with pytest.raises(LmforgeError, match="does not exist"):
        check_gold_pages(questions, tmp_path / "nowhere")
    with pytest.raises(LmforgeError, match="no records"):
        parse_questions(["", "  "], "empty.jsonl")
    with pytest.raises(LmforgeError, match="question file .* does not exist"):
        load_questions(tmp_path / "missing.jsonl")


# --------------------------------------------------------------------------------------
# The packaged question set

SIMPLIFIED_ONLY = set("们这为资训练数据记忆与个说时么对会优阶层输问题词语级长开关发动应该术网页经过请让还边运进选单带实现")
MAINLAND_TERMS = ("內存", "數據", "信息", "默認", "軟件", "視頻", "網絡", "服務器", "硬件", "緩存")


def test_the_packaged_question_set_is_valid_and_balanced():
    questions = load_questions()
    in_scope = [q for q in questions if q.in_scope]
    by_lang = {lang: [q for q in in_scope if q.lang == lang] for lang in ("en", "zh-Hant")}
    out_of_scope = {lang: [q for q in questions if not q.in_scope and q.lang == lang] for lang in ("en", "zh-Hant")}
    assert len(in_scope) >= 200
    assert 100 <= len(by_lang["en"]) <= 130 and 85 <= len(by_lang["zh-Hant"]) <= 110
    assert len(out_of_scope["en"]) >= 20 and len(out_of_scope["zh-Hant"]) >= 20
    assert {q.kind for q in questions} == {"concept", "howto", "keyword", "out_of_scope"}
    assert all(q.id.startswith("en-" if q.lang == "en" else "zh-") for q in questions)
    texts = [q.question.strip().lower() for q in questions]
    assert len(set(texts)) == len(texts), "a question appears twice"
    # Some questions name several pages, among them answers that live outside the obvious page.
    assert sum(len(q.gold) > 1 for q in in_scope) >= 60
    for q in by_lang["zh-Hant"] + out_of_scope["zh-Hant"]:
        assert re.search(r"[\u4e00-\u9fff]", q.question), q.id
        assert not SIMPLIFIED_ONLY & set(q.question), (q.id, q.question)
        assert not [term for term in MAINLAND_TERMS if term in q.question], (q.id, q.question)


def test_every_handbook_page_is_covered_in_both_languages():
    questions = load_questions()
    for lang in ("en", "zh-Hant"):
        covered = {page for q in questions if q.lang == lang for page in q.gold}
        assert covered == WRITTEN_PAGES | NEW_PAGES, (lang, (WRITTEN_PAGES | NEW_PAGES) ^ covered)


def test_questions_mostly_avoid_the_headings_of_their_pages():
    questions = [q for q in load_questions() if q.in_scope and (HANDBOOK / q.gold[0]).is_file()]
    copied = []
    for q in questions:
        text = (HANDBOOK / q.gold[0]).read_text(encoding="utf-8")
        headings = [h.strip().lower() for h in re.findall(r"^#{1,3} (.+)$", text, flags=re.M)]
        if any(len(h.split()) >= 2 and h in q.question.lower() for h in headings):
            copied.append(q.id)
    assert len(copied) <= 0.05 * len(questions), copied


def test_gold_pages_exist_in_the_handbook_or_are_pages_being_written():
    questions = load_questions()
    missing = missing_gold_pages(questions, HANDBOOK)
    assert set(missing) <= NEW_PAGES, f"gold pages that are neither in docs/handbook nor new: {set(missing) - NEW_PAGES}"
    assert all((HANDBOOK / page).is_file() for page in WRITTEN_PAGES), "a handbook page was renamed or removed"
    if missing:
        pytest.skip(f"gold pages checked except {len(missing)} not written yet: {', '.join(missing)}")
    check_gold_pages(questions, HANDBOOK)


# --------------------------------------------------------------------------------------
# The packaged groundedness labels


def test_groundedness_labels_are_balanced_and_their_passages_are_copied_from_the_handbook():
    labels = load_groundedness_labels()
    assert len(labels) >= 60
    supported = [label for label in labels if label.supported]
    assert abs(2 * len(supported) - len(labels)) <= 2
    for lang in ("en", "zh-Hant"):
        in_lang = [label for label in labels if label.lang == lang]
        assert {label.supported for label in in_lang} == {True, False}, lang
    assert len({label.page for label in labels}) >= 20

    def squeeze(text):
        return re.sub(r"\s+", " ", text).strip()

    pages = {}
    for label in labels:
        if label.page not in pages:
            pages[label.page] = squeeze((HANDBOOK / label.page).read_text(encoding="utf-8"))
        assert squeeze(label.passage) in pages[label.page], (label.id, label.passage[:60])
        assert label.sentence.strip() and label.sentence not in label.passage, label.id
        if label.lang == "zh-Hant":
            assert re.search(r"[\u4e00-\u9fff]", label.sentence), label.id


def test_a_bad_groundedness_line_names_the_file_and_line(tmp_path):
    good = {"id": "g-1", "page": "rag.md", "passage": "p", "sentence": "s", "supported": True, "lang": "en"}
    path = write_lines(tmp_path / "g.jsonl", [good, {**good, "id": "g-2", "supported": 1}])
    with pytest.raises(LmforgeError, match=r"g\.jsonl:2: supported must be true or false, got 1"):
        load_groundedness_labels(path)
    path = write_lines(tmp_path / "g.jsonl", [good, {k: v for k, v in good.items() if k != "lang"} | {"id": "g-2"}])
    with pytest.raises(LmforgeError, match=r"g\.jsonl:2: missing field lang"):
        load_groundedness_labels(path)
    assert load_groundedness_labels(write_lines(tmp_path / "ok.jsonl", [good]))[0].supported is True


def test_the_wheel_ships_the_labelled_sets():
    config = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
    package_data = config["tool"]["setuptools"]["package-data"]
    shipped = [f"lmforge/{pattern}" for pattern in package_data.get("lmforge", [])]
    shipped += [f"lmforge/rag/{pattern}" for pattern in package_data.get("lmforge.rag", [])]
    for name in ("handbook_questions.jsonl", "groundedness_labels.jsonl"):
        assert any(fnmatch(f"lmforge/rag/data/{name}", pattern) for pattern in shipped), name
