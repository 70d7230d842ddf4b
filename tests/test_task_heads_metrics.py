"""Classification metrics: accuracy, per-class and averaged F1 and the confusion matrix against
scikit-learn (a test reference only), BIO entity spans and entity F1 by hand (seqeval's rules)."""

from __future__ import annotations

import random

import pytest

from lmforge.errors import LmforgeError
from lmforge.eval.metrics.classification import (bio_entities, classification_report, confusion_matrix,
                                                 entity_scores, format_confusion, plot_confusion)


def test_report_matches_scikit_learn():
    metrics = pytest.importorskip("sklearn.metrics", reason="scikit-learn is not installed")
    rng = random.Random(0)
    labels = ["a", "b", "c", "d"]
    y_true = [rng.choice([0, 0, 0, 1, 2, 3]) for _ in range(200)]
    y_pred = [t if t < 3 and rng.random() < 0.6 else rng.randrange(3) for t in y_true]  # class 3 never predicted
    ours = classification_report(y_true, y_pred, labels)
    assert ours["confusion_matrix"] == metrics.confusion_matrix(y_true, y_pred, labels=range(4)).tolist()
    assert ours["accuracy"] == pytest.approx(metrics.accuracy_score(y_true, y_pred))
    for average in ("macro", "micro", "weighted"):
        ref = metrics.f1_score(y_true, y_pred, labels=range(4), average=average, zero_division=0)
        assert ours[f"{average}_f1"] == pytest.approx(ref), average
    p, r, f, s = metrics.precision_recall_fscore_support(y_true, y_pred, labels=range(4), zero_division=0)
    for i, name in enumerate(labels):
        c = ours["per_class"][name]
        assert (c["precision"], c["recall"], c["f1"], c["support"]) == pytest.approx((p[i], r[i], f[i], s[i]))
    assert ours["per_class"]["d"]["precision"] == 0.0 and ours["micro_f1"] == pytest.approx(ours["accuracy"])


def test_confusion_table_and_plot(tmp_path):
    matrix = confusion_matrix([0, 0, 1, 1, 1], [0, 1, 1, 1, 0], 2)
    assert matrix == [[1, 1], [1, 2]]
    table = format_confusion(matrix, ["neg", "pos"])
    assert "| neg | 1 | 1 |" in table and "| pos | 1 | 2 |" in table
    pytest.importorskip("matplotlib", reason="matplotlib is not installed")
    path = plot_confusion(matrix, ["neg", "pos"], tmp_path / "plots" / "c.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(LmforgeError, match="outside"):
        confusion_matrix([0, 2], [0, 1], 2)


def test_bio_spans_follow_conlleval_rules():
    assert bio_entities(["B-PER", "I-PER", "O", "B-LOC"]) == [("PER", 0, 1), ("LOC", 3, 3)]
    assert bio_entities(["I-PER", "I-PER"]) == [("PER", 0, 1)]  # I- after O starts an entity
    assert bio_entities(["B-PER", "I-LOC"]) == [("PER", 0, 0), ("LOC", 1, 1)]  # a type switch splits
    assert bio_entities(["B-PER", "B-PER"]) == [("PER", 0, 0), ("PER", 1, 1)]
    assert bio_entities(["O", "O"]) == []
    with pytest.raises(LmforgeError, match="not a BIO tag"):
        bio_entities(["X-PER"])


def test_entity_f1_counts_exact_spans_only():
    true = [["B-PER", "I-PER", "O", "B-LOC"], ["B-DATE", "I-DATE", "I-DATE", "O"]]
    pred = [["B-PER", "O", "O", "B-LOC"], ["B-DATE", "I-DATE", "I-DATE", "B-LOC"]]
    s = entity_scores(true, pred)
    # True: PER(0-1), LOC, DATE = 3; predicted: PER(0-0), LOC, DATE, LOC = 4; exact hits: LOC, DATE = 2.
    assert (s["entities"], s["predicted_entities"]) == (3, 4)
    assert s["entity_precision"] == pytest.approx(2 / 4) and s["entity_recall"] == pytest.approx(2 / 3)
    assert s["entity_f1"] == pytest.approx(2 * 0.5 * (2 / 3) / (0.5 + 2 / 3))
    assert s["per_type"]["PER"]["f1"] == 0.0 and s["per_type"]["DATE"]["f1"] == 1.0
    assert s["token_accuracy"] == pytest.approx(6 / 8)
    with pytest.raises(LmforgeError, match="true tags but"):
        entity_scores([["O"]], [["O", "O"]])
