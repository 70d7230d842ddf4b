"""`lmforge rag eval`'s report: the answers counted by language, the table and the plot."""

from __future__ import annotations

import json

import pytest

from lmforge.rag.evaluate import _summary, _text, _write, answer_breakdown


def _row(lang, in_scope, mode, groundedness, dropped=0, baseline=None, answer="", refused=False):
    row = {"id": f"{lang}-{mode}", "lang": lang, "in_scope": in_scope, "refused": refused or mode == "refused",
           "mode": mode, "answer": answer, "groundedness": groundedness, "dropped": dropped}
    if baseline is not None:
        row["baseline_groundedness"] = baseline
    return row


@pytest.fixture()
def report():
    rows = [
        # Generated: two checked sentences kept, one dropped.
        _row("en", True, "generated", 1.0, dropped=1, baseline=0.0,
             answer="The cache keeps the keys of earlier tokens [1]. Each step runs the newest token only [2]."),
        # Every generated sentence dropped: the sources' sentences answered instead.
        _row("en", True, "extractive", 1.0, dropped=3, baseline=0.5),
        _row("en", True, "refused", 1.0, baseline=0.25),  # a false refusal
        _row("en", False, "refused", 1.0, baseline=0.0),  # an out-of-scope question refused
        _row("zh-Hant", True, "extractive", 0.5, baseline=0.0),
    ]
    answers = {"groundedness_judge": "embedding", "answered": 3, "rows": rows, "groundedness_rag": 2.5 / 3,
               "groundedness_no_retrieval": 0.75 / 4,
               "support_check": {"pairs": 72, "accuracy_default_thresholds": 0.542, "held_out_accuracy": 0.5,
                                 "fit_accuracy": 0.6, "fitted_thresholds": {}}}
    metrics = {"recall@1": 0.5, "recall@3": 0.75, "recall@5": 1.0, "mrr": 0.6, "ndcg@10": 0.7,
               "refusal_rate": 1.0, "false_refusal_rate": 0.0}
    modes = {mode: {"by_lang": {lang: dict(metrics) for lang in ("en", "zh-Hant")}}
             for mode in ("none", "hybrid", "dense", "bm25", "hybrid+rerank")}
    return {"index": "kb.sqlite", "questions": 5, "seconds": 1.0, "modes": modes,
            "thresholds": {"en": {"min_cosine": 0.3, "min_strength": 0.25}, "calibrated": False},
            "refusal_two_fold_overall": {"refusal_rate": 1.0, "false_refusal_rate": 0.0}, "answers": answers}


def test_answers_are_counted_by_language_with_the_models_own_sentences(report):
    by_lang = answer_breakdown(report["answers"])
    assert list(by_lang) == ["en", "zh-Hant", "all"]
    en = by_lang["en"]
    assert (en["asked"], en["in_scope"], en["refused_in_scope"], en["refused_out_of_scope"]) == (4, 3, 1, 1)
    assert (en["generated"], en["extractive"], en["fallback"]) == (1, 1, 1)
    assert en["groundedness_rag"] == pytest.approx(1.0)  # the two in-scope answers not refused
    assert en["groundedness_no_retrieval"] == pytest.approx(0.75 / 3)  # the three in-scope questions
    assert (en["sentences_kept"], en["sentences_written"]) == (2, 6)
    assert en["sentences_kept_share"] == pytest.approx(2 / 6)
    zh = by_lang["zh-Hant"]
    assert zh["fallback"] == 0 and zh["sentences_written"] == 0 and zh["sentences_kept_share"] is None
    assert by_lang["all"]["groundedness_rag"] == pytest.approx(2.5 / 3)


def test_the_report_tabulates_answers_and_the_plot_has_a_groundedness_panel(report, tmp_path):
    report["text"] = _text(report)
    assert "| en | 4 | 3 | 1 / 1 | 1 | 1 (1) | 2 / 6 | 1.000 | 0.250 |" in report["text"]
    assert "| zh-Hant | 1 | 1 | 0 / 0 | 0 | 1 (0) | 0 / 0 | 0.500 | 0.000 |" in report["text"]
    summary = _summary(report)
    assert summary["answers/en/fallback"] == 1 and summary["answers/all/groundedness_rag"] == pytest.approx(2.5 / 3)
    _write(report, tmp_path)
    assert json.loads((tmp_path / "report.json").read_text())["answers"]["answered"] == 3
    assert "hybrid+rerank" in (tmp_path / "report.md").read_text()
    imread = pytest.importorskip("matplotlib.image").imread
    with_answers = imread(tmp_path / "retrieval.png").shape[:2]
    report.pop("answers")
    _write(report, tmp_path)
    without = imread(tmp_path / "retrieval.png").shape[:2]
    # Two panels of retrieval (one per language), and a third for the answers when there are any.
    assert with_answers[0] == without[0]
    assert with_answers[1] / without[1] == pytest.approx(1.5, abs=0.02)


def test_an_answer_with_nothing_to_check_has_no_groundedness(minilm_dir):
    from lmforge.rag.embedder import load_embedder
    from lmforge.rag.evaluate import _mean
    from lmforge.rag.groundedness import SupportChecker, groundedness

    checker = SupportChecker(load_embedder())
    passage = "The KV cache stores the keys and values of earlier tokens, so each step runs only the new token."
    assert groundedness(checker, "The [1] is a [2]. Yes.", [passage]) == (None, [])
    share, checks = groundedness(checker, "The cache keeps the keys and values of earlier tokens [1].", [passage])
    assert len(checks) == 1 and share == float(checks[0].supported)
    # Averages leave such answers out instead of counting them as fully supported.
    assert _mean([None, 0.5, 0.0]) == 0.25 and _mean([None]) is None
