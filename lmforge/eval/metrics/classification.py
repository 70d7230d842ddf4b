"""Classification metrics (F2, E2): accuracy, per-class precision/recall/F1, macro and micro
averages, a confusion matrix (table and PNG), and entity-level F1 for BIO tags.

Per class c, with TP/FP/FN counted from the confusion matrix (rows: true class, columns:
predicted class):

    precision_c = TP / (TP + FP)     recall_c = TP / (TP + FN)     F1_c = 2 P R / (P + R)

Macro F1 is the unweighted mean of F1_c over the classes (every class counts the same, so
a rare class that is always missed drags it down); micro F1 pools TP/FP/FN over classes,
which for single-label classification equals accuracy. A ratio with a zero denominator
is 0, as scikit-learn reports it with ``zero_division=0``.

Entity F1 (named-entity tagging) scores *spans*, not tokens: a predicted entity counts
only if its type, start and end all match a true one. Spans are read from BIO (IOB2) tags
with the conlleval / seqeval default rules: a chunk starts at B-X, or at I-X after O or
after a chunk of another type; it ends before O, before B-*, or before a tag of another
type. So "I-PER I-PER" is one PER entity and "B-PER I-LOC" two entities.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from ...errors import LmforgeError


def _ratio(a: float, b: float) -> float:
    return a / b if b else 0.0


def _f1(p: float, r: float) -> float:
    return _ratio(2 * p * r, p + r)


def confusion_matrix(y_true: Sequence[int], y_pred: Sequence[int], n_classes: int) -> list[list[int]]:
    """counts[true][predicted]."""
    if len(y_true) != len(y_pred):
        raise LmforgeError(f"{len(y_true)} true labels but {len(y_pred)} predictions")
    counts = [[0] * n_classes for _ in range(n_classes)]
    for t, p in zip(y_true, y_pred):
        if not (0 <= t < n_classes and 0 <= p < n_classes):
            raise LmforgeError(f"label {t if not 0 <= t < n_classes else p} is outside 0..{n_classes - 1}")
        counts[t][p] += 1
    return counts


def classification_report(y_true: Sequence[int], y_pred: Sequence[int], labels: Sequence[str]) -> dict[str, Any]:
    """Accuracy, macro/micro/weighted F1, per-class precision/recall/F1/support, and the matrix."""
    n = len(labels)
    matrix = confusion_matrix(y_true, y_pred, n)
    per_class, tp_all, fp_all, fn_all = {}, 0, 0, 0
    for c, name in enumerate(labels):
        tp = matrix[c][c]
        fp = sum(matrix[r][c] for r in range(n)) - tp
        fn = sum(matrix[c]) - tp
        p, r = _ratio(tp, tp + fp), _ratio(tp, tp + fn)
        per_class[name] = {"precision": p, "recall": r, "f1": _f1(p, r), "support": sum(matrix[c])}
        tp_all, fp_all, fn_all = tp_all + tp, fp_all + fp, fn_all + fn
    total = len(y_true)
    micro_p, micro_r = _ratio(tp_all, tp_all + fp_all), _ratio(tp_all, tp_all + fn_all)
    return {
        "examples": total,
        "accuracy": _ratio(sum(matrix[c][c] for c in range(n)), total),
        "macro_precision": sum(v["precision"] for v in per_class.values()) / n,
        "macro_recall": sum(v["recall"] for v in per_class.values()) / n,
        "macro_f1": sum(v["f1"] for v in per_class.values()) / n,
        "micro_f1": _f1(micro_p, micro_r),
        "weighted_f1": _ratio(sum(v["f1"] * v["support"] for v in per_class.values()), total),
        "per_class": per_class,
        "labels": list(labels),
        "confusion_matrix": matrix,
    }


# ---- BIO entities -------------------------------------------------------------------------------

def _split_tag(tag: str) -> tuple[str, str]:
    if tag == "O" or not tag:
        return "O", ""
    prefix, _, kind = tag.partition("-")
    if prefix not in ("B", "I") or not kind:
        raise LmforgeError(f"not a BIO tag: {tag!r} (expected O, B-TYPE or I-TYPE)")
    return prefix, kind


def bio_entities(tags: Sequence[str]) -> list[tuple[str, int, int]]:
    """(type, start, end inclusive) of each entity in one BIO-tagged sequence."""
    spans: list[tuple[str, int, int]] = []
    start, kind = None, ""
    for i, tag in enumerate(list(tags) + ["O"]):
        prefix, this = _split_tag(tag)
        ends = start is not None and (prefix in ("O", "B") or this != kind)
        if ends:
            spans.append((kind, start, i - 1))
            start = None
        if prefix == "B" or (prefix == "I" and start is None):
            start, kind = i, this
    return spans


def entity_scores(true_tags: Sequence[Sequence[str]], pred_tags: Sequence[Sequence[str]]) -> dict[str, Any]:
    """Entity-level precision, recall and F1 (micro over all entities, as seqeval's default),
    per type, and the token accuracy over the tags given."""
    if len(true_tags) != len(pred_tags):
        raise LmforgeError(f"{len(true_tags)} true sequences but {len(pred_tags)} predicted")
    found, gold, hit = {}, {}, {}
    tokens = right = 0
    for number, (t, p) in enumerate(zip(true_tags, pred_tags)):
        if len(t) != len(p):
            raise LmforgeError(f"sequence {number}: {len(t)} true tags but {len(p)} predicted")
        tokens += len(t)
        right += sum(a == b for a, b in zip(t, p))
        ts = {(k, number, s, e) for k, s, e in bio_entities(t)}
        ps = {(k, number, s, e) for k, s, e in bio_entities(p)}
        for k, *_ in ts:
            gold[k] = gold.get(k, 0) + 1
        for k, *_ in ps:
            found[k] = found.get(k, 0) + 1
        for k, *_ in ts & ps:
            hit[k] = hit.get(k, 0) + 1
    per_type = {}
    for k in sorted(set(gold) | set(found)):
        p, r = _ratio(hit.get(k, 0), found.get(k, 0)), _ratio(hit.get(k, 0), gold.get(k, 0))
        per_type[k] = {"precision": p, "recall": r, "f1": _f1(p, r), "support": gold.get(k, 0)}
    p, r = _ratio(sum(hit.values()), sum(found.values())), _ratio(sum(hit.values()), sum(gold.values()))
    return {"entity_precision": p, "entity_recall": r, "entity_f1": _f1(p, r),
            "entity_macro_f1": _ratio(sum(v["f1"] for v in per_type.values()), len(per_type)),
            "token_accuracy": _ratio(right, tokens), "entities": sum(gold.values()),
            "predicted_entities": sum(found.values()), "per_type": per_type}


# ---- presentation -------------------------------------------------------------------------------

def format_confusion(matrix: Sequence[Sequence[int]], labels: Sequence[str]) -> str:
    """The matrix as a Markdown table (rows: true class, columns: predicted class)."""
    head = "| true \\ predicted | " + " | ".join(labels) + " |"
    rule = "|---|" + "---:|" * len(labels)
    rows = [f"| {name} | " + " | ".join(str(v) for v in row) + " |" for name, row in zip(labels, matrix)]
    return "\n".join([head, rule, *rows])


def format_report(report: dict[str, Any]) -> str:
    """Per-class precision/recall/F1/support and the averages, as a Markdown table."""
    lines = ["| class | precision | recall | F1 | support |", "|---|---:|---:|---:|---:|"]
    for name, v in report["per_class"].items():
        lines.append(f"| {name} | {v['precision']:.3f} | {v['recall']:.3f} | {v['f1']:.3f} | {v['support']} |")
    lines.append(f"| macro average | {report['macro_precision']:.3f} | {report['macro_recall']:.3f} | "
                 f"{report['macro_f1']:.3f} | {report['examples']} |")
    lines.append(f"\naccuracy {report['accuracy']:.3f}, micro F1 {report['micro_f1']:.3f}, "
                 f"macro F1 {report['macro_f1']:.3f} on {report['examples']} examples")
    return "\n".join(lines)


def plot_confusion(matrix: Sequence[Sequence[int]], labels: Sequence[str], path: str | Path,
                   title: str = "confusion matrix") -> Path | None:
    """A PNG heat map with the counts written in (None when matplotlib is missing)."""
    from lmforge.io.plots import pyplot

    plt = pyplot()
    if plt is None:
        return None
    from ...io.atomic import atomic_path

    n = len(labels)
    size = max(3.5, 0.6 * n + 2)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    image = ax.imshow(matrix, cmap="Blues")
    fig.colorbar(image, ax=ax, fraction=0.046)
    ax.set(xticks=range(n), yticks=range(n), xlabel="predicted", ylabel="true", title=title)
    ax.set_xticklabels(labels, rotation=45, ha="right")
    ax.set_yticklabels(labels)
    top = max((max(row) for row in matrix), default=0)
    for i, row in enumerate(matrix):
        for j, v in enumerate(row):
            ax.text(j, i, str(v), ha="center", va="center", color="white" if v > top / 2 else "black")
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
    return out
