"""`lmforge rag eval`: retrieval quality, refusals and answer groundedness on labelled questions.

For every retrieval mode (none, dense, BM25, hybrid) each question's hits become a ranked
list of distinct pages, scored against its gold pages (recall@k, MRR, nDCG@k; see
`metrics.py`). The refusal decision (see `retriever.py`) is scored on out-of-scope
questions (refusal rate) and in-scope ones (false refusals).

**Calibration** (`--calibrate`) picks the two confidence thresholds from the questions
themselves: the pair that refuses the most out-of-scope questions while refusing at most
5% of in-scope ones. Fitted and scored on the same questions such a figure flatters, so
the report gives the rates of a two-fold split too: thresholds fitted on one half, scored
on the other, and the other way round.

**Groundedness** (`--answers N`): N questions are answered (by the chosen answer mode)
with retrieval and, as the baseline, without it (the model alone); each answer's sentences
are checked against the chunks hybrid retrieval finds for the question (`groundedness.py`).
The automatic support decision is itself checked against the hand-labelled pairs.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path
from typing import Any, Sequence

from ..errors import LmforgeError
from ..io.atomic import write_text_atomic
from .config import AnswerOptions, EvalOptions, RetrieverOptions
from .groundedness import SupportChecker, calibrate as calibrate_support, groundedness
from .metrics import Question, evaluate_retrieval, load_groundedness_labels, load_questions, ranked_pages
from .retriever import Retriever, query_lang

MAX_FALSE_REFUSALS = 0.05


def fit_thresholds(signals: Sequence[dict[str, float]], in_scope: Sequence[bool],
                   max_false: float = MAX_FALSE_REFUSALS) -> tuple[float, float]:
    """(min_cosine, min_strength) refusing the most out-of-scope questions with at most `max_false` false refusals.

    A question is answered when its cosine or its strength reaches its threshold. Candidate
    thresholds are the observed values (just above each), so the search is exact.
    """
    if not any(in_scope):
        raise LmforgeError("calibration needs in-scope questions")
    cos = [s["cosine"] for s in signals]
    strength = [s["strength"] for s in signals]
    candidates_c = sorted(set(cos)) + [max(cos) + 1e-6]
    candidates_s = sorted(set(strength)) + [max(strength) + 1e-6]
    n_in = sum(in_scope)
    n_out = len(in_scope) - n_in
    best = (-1.0, 0.0, 0.0, 0.0)  # (refused out-of-scope share, -false share, tc, ts)
    for tc in candidates_c:
        for ts in candidates_s:
            false = refused_out = 0
            for c, s, inside in zip(cos, strength, in_scope):
                refuse = c < tc and s < ts
                if inside:
                    false += refuse
                else:
                    refused_out += refuse
            if false / n_in > max_false:
                continue
            key = (refused_out / n_out if n_out else 0.0, -false / n_in, tc, ts)
            if key[:2] > best[:2]:
                best = key
    return float(best[2]), float(best[3])


def fit_by_language(questions: Sequence[Question], signals: Sequence[dict[str, float]],
                    indices: Sequence[int] | None = None) -> dict[str, tuple[float, float]]:
    """`fit_thresholds` for each language group of the questions (the groups `Retriever` judges by)."""
    indices = range(len(questions)) if indices is None else indices
    groups: dict[str, list[int]] = {}
    for i in indices:
        groups.setdefault(query_lang(questions[i].question), []).append(i)
    return {lang: fit_thresholds([signals[i] for i in members], [questions[i].in_scope for i in members])
            for lang, members in groups.items()}


def _refused(question: Question, signal: dict[str, float], thresholds: dict[str, tuple[float, float]]) -> bool:
    min_cosine, min_strength = thresholds[query_lang(question.question)]
    return signal["cosine"] < min_cosine and signal["strength"] < min_strength


def _two_fold(questions: Sequence[Question], signals: Sequence[dict[str, float]], seed: int) -> list[bool | None]:
    """Each question's refusal decided by thresholds fitted on the other half (split within each language).

    None where a half holds no in-scope question of that language to fit on (tiny sets).
    """
    order = list(range(len(questions)))
    random.Random(seed).shuffle(order)
    halves = [order[::2], order[1::2]]
    refused: list[bool | None] = [None] * len(questions)
    for fit, score in (halves, halves[::-1]):
        try:
            thresholds = fit_by_language(questions, signals, fit)
        except LmforgeError:
            continue
        for i in score:
            if query_lang(questions[i].question) in thresholds:
                refused[i] = _refused(questions[i], signals[i], thresholds)
    return refused


def _pick(questions: Sequence[Question], n: int, seed: int) -> list[Question]:
    """`n` questions spread over languages and kinds (out-of-scope included), reproducibly."""
    groups: dict[tuple[str, str], list[Question]] = {}
    for q in questions:
        groups.setdefault((q.lang, q.kind), []).append(q)
    rng = random.Random(seed)
    for members in groups.values():
        rng.shuffle(members)
    picked: list[Question] = []
    keys = sorted(groups)
    while len(picked) < min(n, len(questions)):
        for key in keys:
            if groups[key] and len(picked) < n:
                picked.append(groups[key].pop())
    return picked


def run_eval(options: EvalOptions, embedder, model=None, index: str | None = None,
             progress=None) -> dict[str, Any]:
    """The report of `lmforge rag eval` (a dict with `summary`, `text` and everything measured)."""
    from .store import open_store

    questions = load_questions(options.questions)
    if index is None:
        from .handbook import handbook_index

        index = str(handbook_index(embedder))
    started = time.perf_counter()
    report: dict[str, Any] = {"index": index, "questions": len(questions), "modes": {}}
    with open_store(index) as store:
        retriever = Retriever(store, embedder, RetrieverOptions())
        depth = max(options.k)
        rankings: dict[str, list[list[str]]] = {m: [] for m in options.modes}
        signals = []
        rows = []
        for n, q in enumerate(questions, 1):
            lists = retriever.search_lists(q.question, max(depth, retriever.options.depth))
            for mode in options.modes:
                hits = [] if mode == "none" else retriever.combine(lists, mode, depth, query_lang(q.question))
                rankings[mode].append(ranked_pages(hits))
            signals.append(lists.signals)
            rows.append({"id": q.id, "lang": q.lang, "gold": list(q.gold), "signals": lists.signals,
                         "pages": {m: rankings[m][-1][:5] for m in options.modes if m != "none"}})
            if progress is not None:
                progress(n, len(questions))
        if options.calibrate:
            fitted = fit_by_language(questions, signals)
            retriever.thresholds.update(fitted)
            store.set_meta(model_id=embedder.model_id, dim=embedder.dim,
                           **{f"min_{name}_{lang}": value for lang, pair in fitted.items()
                              for name, value in zip(("cosine", "strength"), pair)})
        refused = [_refused(q, s, retriever.thresholds) for q, s in zip(questions, signals)]
        for row, flag in zip(rows, refused):
            row["refused"] = flag
        report["per_question"] = rows
        for mode in options.modes:
            result = evaluate_retrieval(questions, rankings[mode], options.k,
                                        refused=None if mode == "none" else refused)
            report["modes"][mode] = result
        report["thresholds"] = {lang: {"min_cosine": c, "min_strength": s}
                                for lang, (c, s) in retriever.thresholds.items()}
        report["thresholds"]["calibrated"] = bool(options.calibrate or "min_cosine_en" in store.meta)
        held_out = _two_fold(questions, signals, options.seed)
        report["refusal_two_fold_overall"] = {
            "refusal_rate": _rate([r for r, q in zip(held_out, questions) if not q.in_scope and r is not None]),
            "false_refusal_rate": _rate([r for r, q in zip(held_out, questions) if q.in_scope and r is not None])}
        if options.answers:
            report["answers"] = _answers(options, retriever, model, questions)
    report["seconds"] = round(time.perf_counter() - started, 2)
    report["summary"] = _summary(report)
    report["text"] = _text(report)
    if options.out:
        _write(report, Path(options.out))
    return report


def _rate(flags: list[bool]) -> float | None:
    return sum(flags) / len(flags) if flags else None


def _answers(options: EvalOptions, retriever: Retriever, model, questions: Sequence[Question]) -> dict[str, Any]:
    from .answer import Answerer, grounded_messages

    checker = SupportChecker(retriever.embedder)
    labels = load_groundedness_labels()
    pairs = [(label.sentence, label.passage, label.supported) for label in labels]
    # The support decision, checked on the hand labels: fitted on one half, scored on the other.
    rng = random.Random(options.seed)
    order = list(range(len(pairs)))
    rng.shuffle(order)
    fit, held = [pairs[i] for i in order[::2]], [pairs[i] for i in order[1::2]]
    fitted, fit_accuracy = calibrate_support(checker, fit)
    held_checker = SupportChecker(retriever.embedder, fitted)
    held_accuracy = sum(held_checker.check(s, [p]).supported == label for s, p, label in held) / len(held)
    default_accuracy = sum(checker.check(s, [p]).supported == label for s, p, label in pairs) / len(pairs)

    answerer = Answerer(retriever, model, AnswerOptions(mode=options.answer_mode))
    rows = []
    for q in _pick(questions, options.answers, options.seed):
        evidence = retriever.retrieve(q.question, k=4, mode="hybrid")
        passages = [h.chunk.text for h in evidence.hits]
        answer = answerer.answer(q.question)
        rag_score, _ = groundedness(checker, "" if answer.refused else answer.text,
                                    [c.chunk.text for c in answer.cited()] or passages)
        row = {"id": q.id, "lang": q.lang, "in_scope": q.in_scope, "refused": answer.refused, "mode": answer.mode,
               "answer": answer.text, "groundedness": rag_score, "dropped": len(answer.dropped)}
        if model is not None:
            alone = model.chat(grounded_messages(q.question, [])[:1] + [{"role": "user", "content": q.question}],
                               temperature=0.0, max_tokens=AnswerOptions().max_tokens)
            row["baseline_answer"] = alone
            row["baseline_groundedness"], _ = groundedness(checker, alone, passages)
        rows.append(row)
    answered = [r for r in rows if r["in_scope"] and not r["refused"]]
    out = {"support_check": {"pairs": len(pairs), "accuracy_default_thresholds": default_accuracy,
                             "fitted_thresholds": vars(fitted), "fit_accuracy": fit_accuracy,
                             "held_out_accuracy": held_accuracy},
           "answered": len(answered), "rows": rows,
           "groundedness_rag": _mean([r["groundedness"] for r in answered])}
    if model is not None:
        out["groundedness_no_retrieval"] = _mean([r["baseline_groundedness"] for r in rows if r["in_scope"]])
    return out


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _summary(report: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"index": report["index"], "questions": report["questions"], "seconds": report["seconds"]}
    for mode, result in report["modes"].items():
        for lang, values in result["by_lang"].items():
            for metric in ("recall@3", "mrr", "ndcg@10", "refusal_rate", "false_refusal_rate"):
                if values.get(metric) is not None:
                    out[f"{mode}/{lang}/{metric}"] = round(values[metric], 4)
    out["thresholds"] = report["thresholds"]
    out["refusal_two_fold"] = report["refusal_two_fold_overall"]
    if "answers" in report:
        a = report["answers"]
        out["groundedness_rag"] = a["groundedness_rag"]
        out["groundedness_no_retrieval"] = a.get("groundedness_no_retrieval")
        out["support_check_held_out_accuracy"] = a["support_check"]["held_out_accuracy"]
    return out


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _text(report: dict[str, Any]) -> str:
    lines = [f"{report['questions']} questions, index {report['index']} ({report['seconds']} s)", ""]
    header = "| mode | lang | recall@1 | recall@3 | recall@5 | MRR | nDCG@10 | refusal (out of scope) | false refusal |"
    lines += [header, "|" + "---|" * 9]
    for mode, result in report["modes"].items():
        for lang, v in result["by_lang"].items():
            lines.append(f"| {mode} | {lang} | {_fmt(v.get('recall@1'))} | {_fmt(v.get('recall@3'))} | "
                         f"{_fmt(v.get('recall@5'))} | {_fmt(v.get('mrr'))} | {_fmt(v.get('ndcg@10'))} | "
                         f"{_fmt(v.get('refusal_rate'))} | {_fmt(v.get('false_refusal_rate'))} |")
    t = report["thresholds"]
    two = report["refusal_two_fold_overall"]
    pairs = "; ".join(f"{lang}: cosine {v['min_cosine']:.3f}, BM25 strength {v['min_strength']:.3f}"
                      for lang, v in t.items() if lang != "calibrated")
    lines += ["", f"refusal thresholds ({'calibrated' if t['calibrated'] else 'defaults'}): {pairs}",
              f"two-fold held-out refusal decisions: refusal {_fmt(two['refusal_rate'])}, "
              f"false refusal {_fmt(two['false_refusal_rate'])}"]
    if "answers" in report:
        a = report["answers"]
        s = a["support_check"]
        lines += [f"groundedness of {a['answered']} answered in-scope questions: with retrieval "
                  f"{_fmt(a['groundedness_rag'])}, without {_fmt(a.get('groundedness_no_retrieval'))}",
                  f"support check vs {s['pairs']} hand labels: accuracy {s['accuracy_default_thresholds']:.3f} "
                  f"(default thresholds), {s['held_out_accuracy']:.3f} held out (thresholds fitted on the other half)"]
    return "\n".join(lines)


def _write(report: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    data = {k: v for k, v in report.items() if k != "text"}
    write_text_atomic(out / "report.json", json.dumps(data, ensure_ascii=False, indent=1) + "\n")
    write_text_atomic(out / "report.md", report["text"] + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    modes = list(report["modes"])
    langs = sorted({lang for r in report["modes"].values() for lang in r["by_lang"]})
    metrics = ("recall@3", "mrr", "ndcg@10")
    fig, axes = plt.subplots(1, len(langs), figsize=(5 * len(langs), 3.6), squeeze=False)
    for ax, lang in zip(axes[0], langs):
        width = 0.8 / len(metrics)
        for j, metric in enumerate(metrics):
            values = [report["modes"][m]["by_lang"].get(lang, {}).get(metric) or 0.0 for m in modes]
            ax.bar([i + j * width for i in range(len(modes))], values, width, label=metric)
        ax.set_xticks([i + width for i in range(len(modes))], modes)
        ax.set_ylim(0, 1)
        ax.set_title(f"retrieval, {lang}")
        ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    tmp = out / "retrieval.png.tmp"
    fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    tmp.replace(out / "retrieval.png")
