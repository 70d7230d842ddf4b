"""`lmforge rag eval`: retrieval quality, refusals and answer groundedness on labelled questions.

For every retrieval mode (none, dense, BM25, hybrid) each question's hits become a ranked
list of distinct pages, scored against its gold pages (recall@k, MRR, nDCG@k; see
`metrics.py`). The refusal decision (see `retriever.py`) is scored on out-of-scope
questions (refusal rate) and in-scope ones (false refusals).

**Calibration** (`--calibrate`) picks the confidence thresholds from the questions
themselves, per question language: the thresholds that refuse the most out-of-scope
questions while refusing at most 5% of in-scope ones, for the set of signals
(`RULE_CHOICES`) that does so best on questions it was not fitted on (`fit_language`). Fitted and scored on the same questions such a figure flatters, so
the report gives the rates of a two-fold split too: thresholds fitted on one half, scored
on the other, and the other way round.

**Groundedness** (`--answers N`): N questions are answered (by the chosen answer mode)
with retrieval and, as the baseline, without it (the model alone); each answer's sentences
are checked against the chunks hybrid retrieval finds for the question (`groundedness.py`).
The automatic support decision is itself checked against the hand-labelled pairs.
"""

from __future__ import annotations

import json
import math
import random
import time
from pathlib import Path
from typing import Any, Sequence

from ..errors import LmforgeError
from ..io.atomic import write_text_atomic
from .config import RERANK_MODE, AnswerOptions, EvalOptions, RetrieverOptions
from .groundedness import (CrossEncoderSupportChecker, SupportChecker, answer_sentences,
                           calibrate as calibrate_support, groundedness)
from .metrics import Question, evaluate_retrieval, load_groundedness_labels, load_questions, ranked_pages
from .gloss import dictionary_path
from .retriever import ANSWERABLE_RULE_KEYS, LANGS, Retriever, query_lang

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


def fit_refusal(signals: Sequence[dict[str, float]], in_scope: Sequence[bool],
                max_false: float = MAX_FALSE_REFUSALS,
                keys: Sequence[str] = ("cosine", "strength", "overlap")) -> tuple[float, float, float, int, float, float]:
    """(min_cosine, min_strength, min_overlap, unknown_veto, min_coverage, min_answerable) refusing
    the most out-of-scope questions with at most `max_false` false refusals, for `Retriever.judge`'s
    rule: refused when the question holds at least `unknown_veto` unknown Latin names (0: never), or
    when the signals named by `keys` (one to three of cosine, strength, overlap, coverage,
    answerable) are all below their thresholds. The signals left out get an infinite threshold:
    they never answer.

    Exhaustive: each veto (none, then from the largest count observed down to 1), and for each the
    three thresholds by `fit_rule` on the questions it leaves, with the false refusals it left to
    spend. Ties keep the milder veto and the lowest thresholds.
    """
    if not any(in_scope):
        raise LmforgeError("calibration needs in-scope questions")
    n_in = sum(in_scope)
    unknown = [int(s.get("unknown", 0.0)) for s in signals]
    best: tuple | None = None
    for veto in [0] + sorted({u for u in unknown if u > 0}, reverse=True):
        vetoed = [veto > 0 and u >= veto for u in unknown]
        vetoed_in = sum(v and inside for v, inside in zip(vetoed, in_scope))
        budget = max_false * n_in - vetoed_in
        rest = [i for i, v in enumerate(vetoed) if not v]
        rest_in = sum(in_scope[i] for i in rest)
        if budget < 0:
            continue
        if rest_in:
            thresholds = fit_rule([[signals[i].get(k, 0.0) for k in keys] for i in rest],
                                  [in_scope[i] for i in rest], max_false=budget / rest_in)
        else:
            thresholds = (0.0,) * len(keys)
        chosen = dict(zip(keys, thresholds))
        fit = (*(chosen.get(k, math.inf) for k in ("cosine", "strength", "overlap")), veto,
               chosen.get("coverage", math.inf), chosen.get("answerable", math.inf))
        refused = [_refuse_by(signals[i], fit) for i in range(len(signals))]
        key = (sum(r and not inside for r, inside in zip(refused, in_scope)),
               -sum(r and inside for r, inside in zip(refused, in_scope)))
        if best is None or key > best[0]:
            best = (key, fit)
    assert best is not None
    c, s, o, v, g, a = best[1]
    return float(c), float(s), float(o), int(v), float(g), float(a)


TERM_RULE = ("cosine", "strength", "overlap")
# The signal sets a calibration chooses from (`fit_language`), the earlier rule first. Each set
# is three signals: with all four, the exhaustive search is slow, and each signal that may
# answer is one more way for an out-of-scope question through; a threshold fitted just above
# the out-of-scope questions of one sample is often below those of the next.
RULE_CHOICES: tuple[tuple[str, ...], ...] = (TERM_RULE, ("strength", "overlap", "coverage"),
                                             ("cosine", "overlap", "coverage"), ("cosine", "strength", "coverage"),
                                             # with the cross-encoder's answerable judgement (answerable.py),
                                             # considered only where the signals hold it
                                             ("answerable",), ("cosine", "strength", "answerable"),
                                             ("answerable", "overlap", "coverage"), ("cosine", "overlap", "answerable"),
                                             ("strength", "overlap", "answerable"))


SELECTION_SPLITS = 5  # random two-fold splits `fit_language` scores each signal set on


def fit_language(signals: Sequence[dict[str, float]], in_scope: Sequence[bool], seed: int = 0,
                 max_false: float = MAX_FALSE_REFUSALS) -> tuple[float, float, float, int, float, float]:
    """`fit_refusal` with the signal set of `RULE_CHOICES` that does best two-fold on these questions.

    Every set is fitted on one half and scored on the other, both ways, over `SELECTION_SPLITS`
    random splits (one split of a few dozen out-of-scope questions decides by one or two of
    them); the set that keeps the false refusals of those decisions within `max_false` and
    refuses the most out-of-scope questions wins (ties: fewer false refusals, then the earlier
    set), and is fitted on all the questions. Choosing by in-sample rates would take the set
    that fits this sample tightest, the one that generalizes worst. With too few questions to
    split, the earlier rule.
    """
    splits = [_halves(len(signals), seed + r) for r in range(SELECTION_SPLITS)]
    if not all(any(in_scope[i] for i in half) for halves in splits for half in halves):
        return fit_refusal(signals, in_scope, max_false)
    n_in = sum(in_scope) * len(splits)
    best: tuple | None = None
    for keys in RULE_CHOICES:
        if any(k not in signals[0] for k in keys):
            continue
        false = refused_out = 0
        for halves in splits:
            for part, score in (halves, halves[::-1]):
                fit = fit_refusal([signals[i] for i in part], [in_scope[i] for i in part], max_false, keys)
                for i in score:
                    refused = _refuse_by(signals[i], fit)
                    false += refused and in_scope[i]
                    refused_out += refused and not in_scope[i]
        key = (false <= max_false * n_in, refused_out, -false)
        if best is None or key > best[0]:
            best = (key, keys)
    assert best is not None
    return fit_refusal(signals, in_scope, max_false, best[1])


def _refuse_by(signal: dict[str, float], fit: Sequence[float]) -> bool:
    """`Retriever.judge`'s refusal for thresholds (min_cosine, min_strength, min_overlap, unknown_veto,
    min_coverage, min_answerable); without the fifth (sixth), the coverage (answerable judgement)
    never answers."""
    cos, strength, overlap, veto = fit[:4]
    coverage = fit[4] if len(fit) > 4 else math.inf
    answerable = fit[5] if len(fit) > 5 else math.inf
    if veto > 0 and signal.get("unknown", 0.0) >= veto:
        return True
    return (signal["cosine"] < cos and signal["strength"] < strength and signal.get("overlap", 0.0) < overlap
            and signal.get("coverage", 0.0) < coverage and signal.get("answerable", -math.inf) < answerable)


def fit_by_language(questions: Sequence[Question], signals: Sequence[dict[str, float]],
                    indices: Sequence[int] | None = None,
                    seed: int = 0) -> dict[str, tuple[float, float, float, int, float, float]]:
    """`fit_language` for each language group of the questions (the groups `Retriever` judges by)."""
    indices = range(len(questions)) if indices is None else indices
    groups: dict[str, list[int]] = {}
    for i in indices:
        groups.setdefault(query_lang(questions[i].question), []).append(i)
    return {lang: fit_language([signals[i] for i in members], [questions[i].in_scope for i in members], seed)
            for lang, members in groups.items()}


def _refused(question: Question, signal: dict[str, float], retriever: Retriever) -> bool:
    """The retriever's decision on a question's signals (without the cross-encoder's)."""
    plain = {k: v for k, v in signal.items() if k != "rerank"}
    return not retriever.judge(plain, query_lang(question.question))[1]


def _halves(n: int, seed: int) -> list[list[int]]:
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return [order[::2], order[1::2]]


def _two_fold(questions: Sequence[Question], signals: Sequence[dict[str, float]], seed: int) -> list[bool | None]:
    """Each question's refusal decided by thresholds fitted on the other half (split within each language).

    None where a half holds no in-scope question of that language to fit on (tiny sets).
    """
    halves = _halves(len(questions), seed)
    refused: list[bool | None] = [None] * len(questions)
    for fit, score in (halves, halves[::-1]):
        thresholds = {}
        for lang in LANGS:
            part = [i for i in fit if query_lang(questions[i].question) == lang]
            if any(questions[i].in_scope for i in part):
                thresholds.update(fit_by_language(questions, signals, part))
        for i in score:
            lang = query_lang(questions[i].question)
            if lang in thresholds:
                refused[i] = _refuse_by(signals[i], thresholds[lang])
    return refused


def refusal_by_language(questions: Sequence[Question], signals: Sequence[dict[str, float]],
                        seed: int) -> dict[str, Any]:
    """Refusal and false-refusal rates per language of the rule the retriever uses (cosine, strength
    and term overlap, with the unknown-name veto) beside the earlier two-signal rule (cosine,
    strength): thresholds fitted on all the questions (in sample) and two-fold (`_two_fold`'s split)."""
    halves = _halves(len(questions), seed)
    rules = {"chosen set+veto": lambda rows: fit_language([signals[i] for i in rows],
                                                          [questions[i].in_scope for i in rows], seed),
             "cosine+strength+overlap+veto": lambda rows: fit_refusal([signals[i] for i in rows],
                                                                      [questions[i].in_scope for i in rows]),
             "cosine+strength": lambda rows: (*fit_rule([[signals[i]["cosine"], signals[i]["strength"]] for i in rows],
                                                        [questions[i].in_scope for i in rows]), math.inf, 0)}
    if any("coverage" not in s for s in signals):
        del rules["chosen set+veto"]
    out: dict[str, Any] = {}
    for lang in LANGS:
        members = [i for i, q in enumerate(questions) if query_lang(q.question) == lang]
        if not any(questions[i].in_scope for i in members):
            continue
        out[lang] = {"out_of_scope": sum(not questions[i].in_scope for i in members),
                     "in_scope": sum(questions[i].in_scope for i in members)}
        for name, fit in rules.items():
            fitted = fit(members)
            decisions = {"in_sample": {i: _refuse_by(signals[i], fitted) for i in members}, "two_fold": {}}
            for part, score in (halves, halves[::-1]):
                part = [i for i in part if i in decisions["in_sample"]]
                if any(questions[i].in_scope for i in part):
                    t = fit(part)
                    decisions["two_fold"].update({i: _refuse_by(signals[i], t) for i in score
                                                  if i in decisions["in_sample"]})
            out[lang][name] = {"thresholds": _threshold_dict(fitted)}
            for label, refused in decisions.items():
                out[lang][name][label] = {
                    "refusal_rate": _rate([r for i, r in refused.items() if not questions[i].in_scope]),
                    "false_refusal_rate": _rate([r for i, r in refused.items() if questions[i].in_scope])}
    return out


def _threshold_dict(fit: Sequence[float]) -> dict[str, Any]:
    """Thresholds as the report and the index metadata hold them (an unused threshold as None)."""
    c, s, o, v = fit[:4]
    g = fit[4] if len(fit) > 4 else math.inf

    def used(x: float) -> float | None:  # 1e9: how the index stores an unused one
        return None if math.isinf(x) or x >= 1e9 else float(x)
    return {"min_cosine": used(c), "min_strength": used(s), "min_overlap": used(o), "unknown_veto": int(v),
            "min_coverage": used(g)}


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
    """The report of `lmforge rag eval` (a dict with `summary`, `text` and everything measured).

    ``progress(done, total, stage="questions")`` is called as questions are retrieved and,
    with ``--answers``, as answers are made (stage ``"answers"``)."""
    from .store import open_store

    questions = load_questions(options.questions)
    if index is None:
        from .handbook import handbook_index

        index = str(handbook_index(embedder))
    started = time.perf_counter()
    report: dict[str, Any] = {"index": index, "questions": len(questions), "modes": {}}
    reranker = None
    if RERANK_MODE in options.modes:
        from .rerank import load_reranker, resolve_reranker

        reranker = load_reranker(options.rerank)
        report["reranker"] = str(resolve_reranker(options.rerank))
    answerable = None
    if options.answerable:
        from .answerable import DEFAULT_TOP, answerable_score, load_answerable, resolve_answerable

        answerable = load_answerable(options.answerable)
        if answerable is None:
            raise LmforgeError("--answerable auto: no trained model in the cache; train one with "
                               "`lmforge rag train-answerable`")
        report["answerable"] = str(resolve_answerable(options.answerable))
    with open_store(index) as store:
        retriever_options = RetrieverOptions()
        if options.calibrate:
            # New thresholds replace the stored ones: Chinese questions are glossed exactly when
            # the dictionary is installed, whatever the index was calibrated on before.
            retriever_options.gloss_zh = dictionary_path() is not None
        retriever = Retriever(store, embedder, retriever_options)
        if options.calibrate:
            retriever.glossing = retriever.can_gloss()
        depth = max(options.k)
        rankings: dict[str, list[list[str]]] = {m: [] for m in options.modes}
        signals = []
        rows = []
        seconds: dict[str, list[float]] = {"retrieval": [], "rerank": [], "answerable": []}
        for n, q in enumerate(questions, 1):
            t0 = time.perf_counter()
            lists = retriever.search_lists(q.question, max(depth, retriever.options.depth,
                                                           options.rerank_depth if reranker else 0))
            seconds["retrieval"].append(time.perf_counter() - t0)
            signal = dict(lists.signals)
            lang = query_lang(q.question)
            if answerable is not None:
                t0 = time.perf_counter()
                top = retriever.combine(lists, "hybrid", DEFAULT_TOP, lang)
                signal["answerable"] = answerable_score(answerable, q.question, [h.chunk for h in top])
                seconds["answerable"].append(time.perf_counter() - t0)
            for mode in options.modes:
                if mode == "none":
                    hits = []
                elif mode == RERANK_MODE:
                    t0 = time.perf_counter()
                    hits = reranked(retriever, reranker, lists, q.question, max(depth, options.rerank_depth),
                                    options.rerank_depth, lang)
                    seconds["rerank"].append(time.perf_counter() - t0)
                    signal["rerank"] = hits[0].score if hits else -100.0
                else:
                    hits = retriever.combine(lists, mode, depth, lang)
                rankings[mode].append(ranked_pages(hits))
            signals.append(signal)
            rows.append({"id": q.id, "lang": q.lang, "gold": list(q.gold), "signals": signal,
                         "pages": {m: rankings[m][-1][:5] for m in options.modes if m != "none"}})
            if progress is not None:
                progress(n, len(questions))
        if options.calibrate:
            plain = [{k: v for k, v in s.items() if k != "answerable"} for s in signals]
            fitted = fit_by_language(questions, plain)
            meta: dict[str, float] = {}
            for lang, fit in fitted.items():
                retriever.thresholds[lang] = fit[:2]
                retriever.term_thresholds[lang] = fit[2:4]
                retriever.coverage_thresholds[lang] = fit[4]
                # JSON has no infinity: an unused threshold is stored as a value no question reaches
                values = {key: 1e9 if value is None else value for key, value in _threshold_dict(fit).items()}
                meta.update({f"{key}_{lang}": value for key, value in values.items()})
            if answerable is not None:
                # The rule with the answerable judgement, stored beside the plain one (which
                # retrieval without the model keeps using).
                for lang, fit in fit_by_language(questions, signals).items():
                    if math.isinf(fit[5]):
                        continue  # the calibration chose a set without it: no rule to store
                    retriever.answerable_rules[lang] = tuple(min(float(v), 1e9) for v in fit)
                    meta.update({f"answerable_{key}_{lang}": min(float(value), 1e9)
                                 for key, value in zip(ANSWERABLE_RULE_KEYS, fit)})
            if "zh" in fitted or "min_cosine_zh" not in store.meta:
                meta["gloss_zh"] = 1.0 if retriever.glossing else 0.0  # what the Chinese thresholds were fitted on
            store.set_meta(model_id=embedder.model_id, dim=embedder.dim, **meta)
        if answerable is not None:
            report["answerable_rule"] = {lang: dict(zip(ANSWERABLE_RULE_KEYS, rule))
                                         for lang, rule in retriever.answerable_rules.items()}
            report["answerable_ms_per_question"] = _latency(seconds["answerable"])
        refused = [_refused(q, s, retriever) for q, s in zip(questions, signals)]
        for row, flag in zip(rows, refused):
            row["refused"] = flag
        report["per_question"] = rows
        for mode in options.modes:
            result = evaluate_retrieval(questions, rankings[mode], options.k,
                                        refused=None if mode == "none" else refused)
            report["modes"][mode] = result
        report["thresholds"] = {lang: _threshold_dict((*retriever.thresholds[lang], *retriever.term_thresholds[lang],
                                                       retriever.coverage_thresholds[lang]))
                                for lang in retriever.thresholds}
        report["thresholds"]["calibrated"] = bool(options.calibrate or "min_cosine_en" in store.meta)
        held_out = _two_fold(questions, signals, options.seed)
        report["refusal_two_fold_overall"] = {
            "refusal_rate": _rate([r for r, q in zip(held_out, questions) if not q.in_scope and r is not None]),
            "false_refusal_rate": _rate([r for r, q in zip(held_out, questions) if q.in_scope and r is not None])}
        report["refusal_by_language"] = refusal_by_language(questions, signals, options.seed)
        if reranker is not None and options.calibrate:
            # The three signals calibrated together, stored apart from the two-signal thresholds
            # (which retrieval without a cross-encoder keeps using).
            joint = {}
            for lang in sorted({query_lang(q.question) for q in questions}):
                members = [i for i, q in enumerate(questions) if query_lang(q.question) == lang]
                if not any(questions[i].in_scope for i in members):
                    continue
                joint[lang] = fit_rule([[signals[i][k] for k in ("cosine", "strength", "rerank")] for i in members],
                                       [questions[i].in_scope for i in members])
            retriever.rerank_thresholds.update(joint)
            store.set_meta(model_id=embedder.model_id, dim=embedder.dim,
                           **{f"{key}_{lang}": value for lang, values in joint.items()
                              for key, value in zip(("rerank_min_cosine", "rerank_min_strength", "min_rerank"),
                                                    values)})
        if reranker is not None:
            report["rerank"] = {
                "depth": options.rerank_depth,
                "seconds_per_question": {"hybrid_retrieval": _latency(seconds["retrieval"]),
                                         "rerank": _latency(seconds["rerank"])},
                "refusal_rules": refusal_rules(questions, signals, options.seed)}
            report["support_check"] = support_check(retriever.embedder, reranker)
        if options.answers:
            report["answers"] = _answers(options, retriever, model, questions, reranker, progress)
    report["seconds"] = round(time.perf_counter() - started, 2)
    report["summary"] = _summary(report)
    report["text"] = _text(report)
    if options.out:
        _write(report, Path(options.out))
    return report


def _rate(flags: list[bool]) -> float | None:
    return sum(flags) / len(flags) if flags else None


def reranked(retriever: Retriever, model, lists, query: str, k: int, depth: int, lang: str = "en") -> list:
    """Hybrid hits for `query` with the top `depth` reordered by the cross-encoder (then the rest), the top `k`."""
    from .rerank import rerank

    fused = retriever.combine(lists, "hybrid", max(k, depth), lang)
    return (rerank(fused[:depth], query, model) + fused[depth:])[:k]


def _latency(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    ordered = sorted(values)
    return {"mean": round(sum(values) / len(values), 4), "p50": round(ordered[len(ordered) // 2], 4),
            "p95": round(ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))], 4)}


REFUSAL_RULES = {"cosine+strength": ("cosine", "strength"), "rerank": ("rerank",),
                 "cosine+strength+rerank": ("cosine", "strength", "rerank")}


def fit_rule(values: Sequence[Sequence[float]], in_scope: Sequence[bool],
             max_false: float = MAX_FALSE_REFUSALS) -> tuple[float, ...]:
    """One threshold per signal (columns of `values`) for the rule "refuse when every signal is
    below its threshold": the most out-of-scope questions refused with at most `max_false` of
    the in-scope ones. Exhaustive over the observed values; the last signal's threshold is found
    by sorting for each combination of the others. Ties keep the lowest thresholds."""
    import itertools

    import numpy as np

    x = np.asarray(values, dtype=np.float64)
    inside = np.asarray(in_scope, dtype=bool)
    if not inside.any():
        raise LmforgeError("calibration needs in-scope questions")
    n_in = int(inside.sum())
    grids = [np.append(np.unique(x[:, j]), x[:, j].max() + 1e-6) for j in range(x.shape[1])]
    last = x[:, -1]
    best: tuple = (-1, 0, ())
    for combo in itertools.product(*grids[:-1]):
        below = np.all(x[:, :-1] < np.asarray(combo), axis=1) if combo else np.ones(len(x), dtype=bool)
        false = np.searchsorted(np.sort(last[below & inside]), grids[-1], side="left")
        refused = np.searchsorted(np.sort(last[below & ~inside]), grids[-1], side="left")
        allowed = np.flatnonzero(false <= max_false * n_in)
        if not len(allowed):
            continue
        top = allowed[np.lexsort((false[allowed], -refused[allowed]))[0]]
        key = (int(refused[top]), -int(false[top]))
        if key > best[:2]:
            best = (*key, tuple(float(c) for c in combo) + (float(grids[-1][top]),))
    return best[2]


def _refuse(values: Sequence[float], thresholds: Sequence[float]) -> bool:
    return all(v < t for v, t in zip(values, thresholds))


def refusal_rules(questions: Sequence[Question], signals: Sequence[dict[str, float]], seed: int) -> dict[str, Any]:
    """Refusal and false-refusal rates of each rule in `REFUSAL_RULES`, per language: with
    thresholds fitted on all the questions (in sample) and fitted on one half, scored on the
    other (two-fold, the same split as `_two_fold`)."""
    order = list(range(len(questions)))
    random.Random(seed).shuffle(order)
    halves = [order[::2], order[1::2]]
    langs = sorted({query_lang(q.question) for q in questions})
    out: dict[str, Any] = {}
    for name, keys in REFUSAL_RULES.items():
        if any(k not in signals[0] for k in keys):
            continue
        values = [[s[k] for k in keys] for s in signals]
        result: dict[str, Any] = {}
        for lang in langs:
            members = [i for i in range(len(questions)) if query_lang(questions[i].question) == lang]
            if not any(questions[i].in_scope for i in members):
                continue  # nothing to calibrate against (tiny question sets)
            fitted = fit_rule([values[i] for i in members], [questions[i].in_scope for i in members])
            in_sample = {i: _refuse(values[i], fitted) for i in members}
            held: dict[int, bool] = {}
            for fit, score in (halves, halves[::-1]):
                part = [i for i in fit if i in in_sample]
                if not any(questions[i].in_scope for i in part):
                    continue
                t = fit_rule([values[i] for i in part], [questions[i].in_scope for i in part])
                held.update({i: _refuse(values[i], t) for i in score if i in in_sample})
            result[lang] = {"thresholds": dict(zip(keys, fitted))}
            for label, refused in (("in_sample", in_sample), ("two_fold", held)):
                result[lang][label] = {
                    "refusal_rate": _rate([r for i, r in refused.items() if not questions[i].in_scope]),
                    "false_refusal_rate": _rate([r for i, r in refused.items() if questions[i].in_scope])}
        out[name] = result
    return out


def support_check(embedder, reranker) -> dict[str, Any]:
    """Accuracy of the support decisions on the hand-labelled pairs, by language: the embedding
    checker (default thresholds) and the cross-encoder (with and without the number check).
    The cross-encoder never trains on these pairs."""
    labels = load_groundedness_labels()
    checkers = {"embedding": SupportChecker(embedder),
                "cross_encoder": CrossEncoderSupportChecker(reranker),
                "cross_encoder_no_number_check": CrossEncoderSupportChecker(reranker, check_numbers=False)}
    out: dict[str, Any] = {"pairs": len(labels)}
    for name, checker in checkers.items():
        by_lang: dict[str, list[bool]] = {}
        for label in labels:
            ok = checker.check(label.sentence, [label.passage]).supported == label.supported
            by_lang.setdefault(label.lang, []).append(ok)
        out[name] = {lang: round(sum(v) / len(v), 4) for lang, v in sorted(by_lang.items())}
        out[name]["all"] = round(sum(sum(v) for v in by_lang.values()) / len(labels), 4)
    return out


def _answers(options: EvalOptions, retriever: Retriever, model, questions: Sequence[Question],
             reranker=None, progress=None) -> dict[str, Any]:
    from .answer import Answerer, grounded_messages

    checker = SupportChecker(retriever.embedder)
    # The answers' groundedness is judged by the checker that does better on the hand labels
    # (`support_check`): the cross-encoder trained here only when it beats the embedding checker.
    judge = checker
    if reranker is not None:
        scores = support_check(retriever.embedder, reranker)
        if scores["cross_encoder"]["all"] > scores["embedding"]["all"]:
            judge = CrossEncoderSupportChecker(reranker)
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
    picked = _pick(questions, options.answers, options.seed)
    for q in picked:
        if progress is not None:
            progress(len(rows), len(picked), "answers")
        evidence = retriever.retrieve(q.question, k=4, mode="hybrid")
        passages = [h.chunk.text for h in evidence.hits]
        answer = answerer.answer(q.question)
        rag_score, _ = groundedness(judge, "" if answer.refused else answer.text,
                                    [c.chunk.text for c in answer.cited()] or passages)
        row = {"id": q.id, "lang": q.lang, "in_scope": q.in_scope, "refused": answer.refused, "mode": answer.mode,
               "answer": answer.text, "groundedness": rag_score, "dropped": len(answer.dropped)}
        if model is not None:
            alone = model.chat(grounded_messages(q.question, [])[:1] + [{"role": "user", "content": q.question}],
                               temperature=0.0, max_tokens=AnswerOptions().max_tokens)
            row["baseline_answer"] = alone
            row["baseline_groundedness"], _ = groundedness(judge, alone, passages)
        rows.append(row)
    if progress is not None:
        progress(len(rows), len(picked), "answers")
    answered = [r for r in rows if r["in_scope"] and not r["refused"]]
    out = {"groundedness_judge": "cross-encoder" if judge is not checker else "embedding","support_check": {"pairs": len(pairs), "accuracy_default_thresholds": default_accuracy,
                             "fitted_thresholds": vars(fitted), "fit_accuracy": fit_accuracy,
                             "held_out_accuracy": held_accuracy},
           "answered": len(answered), "rows": rows,
           "groundedness_rag": _mean([r["groundedness"] for r in answered])}
    if model is not None:
        out["groundedness_no_retrieval"] = _mean([r["baseline_groundedness"] for r in rows if r["in_scope"]])
    return out


def _mean(values: list[float | None]) -> float | None:
    """The mean of the values that exist (an answer with nothing to check has no groundedness)."""
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def _summary(report: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"index": report["index"], "questions": report["questions"], "seconds": report["seconds"]}
    for mode, result in report["modes"].items():
        for lang, values in result["by_lang"].items():
            for metric in ("recall@1", "recall@3", "mrr", "ndcg@10", "refusal_rate", "false_refusal_rate"):
                if values.get(metric) is not None:
                    out[f"{mode}/{lang}/{metric}"] = round(values[metric], 4)
    if "rerank" in report:
        out["rerank_seconds_per_question"] = (report["rerank"]["seconds_per_question"]["rerank"] or {}).get("mean")
        for rule, by_lang in report["rerank"]["refusal_rules"].items():
            for lang, values in by_lang.items():
                for metric in ("refusal_rate", "false_refusal_rate"):
                    out[f"refusal/{rule}/{lang}/two_fold/{metric}"] = values["two_fold"][metric]
    if "support_check" in report:
        for name in ("embedding", "cross_encoder"):
            for lang, value in report["support_check"][name].items():
                out[f"support_check/{name}/{lang}"] = value
    out["thresholds"] = report["thresholds"]
    out["refusal_two_fold"] = report["refusal_two_fold_overall"]
    for lang, rules in report.get("refusal_by_language", {}).items():
        for rule, values in rules.items():
            if isinstance(values, dict):
                for fold in ("in_sample", "two_fold"):
                    for metric in ("refusal_rate", "false_refusal_rate"):
                        out[f"refusal_by_language/{lang}/{rule}/{fold}/{metric}"] = values[fold][metric]
    if "answers" in report:
        a = report["answers"]
        out["groundedness_rag"] = a["groundedness_rag"]
        out["groundedness_no_retrieval"] = a.get("groundedness_no_retrieval")
        out["support_check_held_out_accuracy"] = a["support_check"]["held_out_accuracy"]
        for lang, g in answer_breakdown(a).items():
            for key in ("groundedness_rag", "groundedness_no_retrieval", "fallback", "refused_in_scope"):
                out[f"answers/{lang}/{key}"] = g[key]
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
    pairs = "; ".join(f"{lang}: cosine {_fmt(v.get('min_cosine'))}, BM25 strength {_fmt(v.get('min_strength'))}, "
                      f"overlap {_fmt(v.get('min_overlap'))}, coverage {_fmt(v.get('min_coverage'))}, "
                      f"veto {v.get('unknown_veto') or '-'}"
                      for lang, v in t.items() if lang != "calibrated")
    lines += ["", f"refusal thresholds ({'calibrated' if t['calibrated'] else 'defaults'}): {pairs}",
              f"two-fold held-out refusal decisions: refusal {_fmt(two['refusal_rate'])}, "
              f"false refusal {_fmt(two['false_refusal_rate'])}"]
    if "rerank" in report:
        r = report["rerank"]
        lat = r["seconds_per_question"]
        lines += ["", f"cross-encoder {report.get('reranker')} over the fused top {r['depth']}: "
                      f"{_fmt_s(lat['rerank'])} per question (hybrid retrieval itself {_fmt_s(lat['hybrid_retrieval'])})",
                  "", "| refusal rule | lang | refusal, in sample | false refusal, in sample | refusal, two-fold | "
                      "false refusal, two-fold |", "|" + "---|" * 6]
        for rule, by_lang in r["refusal_rules"].items():
            for lang, v in by_lang.items():
                lines.append(f"| {rule} | {lang} | {_fmt(v['in_sample']['refusal_rate'])} | "
                             f"{_fmt(v['in_sample']['false_refusal_rate'])} | {_fmt(v['two_fold']['refusal_rate'])} | "
                             f"{_fmt(v['two_fold']['false_refusal_rate'])} |")
    if "support_check" in report:
        sc = report["support_check"]
        langs = [k for k in sc["embedding"] if k != "all"]
        lines += ["", f"support check on {sc['pairs']} hand-labelled pairs (accuracy): "
                  + "; ".join(f"{name.replace('_', ' ')}: " + ", ".join(f"{lang} {sc[name][lang]:.3f}"
                                                                       for lang in langs + ["all"])
                              for name in ("embedding", "cross_encoder", "cross_encoder_no_number_check"))]
    if "answers" in report:
        a = report["answers"]
        s = a["support_check"]
        lines += ["", f"groundedness of {a['answered']} answered in-scope questions: with retrieval "
                      f"{_fmt(a['groundedness_rag'])}, without {_fmt(a.get('groundedness_no_retrieval'))} "
                      f"(judge: {a.get('groundedness_judge', 'embedding')} support check)",
                  f"support check vs {s['pairs']} hand labels: accuracy {s['accuracy_default_thresholds']:.3f} "
                  f"(default thresholds), {s['held_out_accuracy']:.3f} held out (thresholds fitted on the other half)",
                  "", "| answers, lang | asked | in scope | refused (in scope / out of scope) | generated | "
                      "extractive (after dropped sentences) | model's sentences kept / written | "
                      "groundedness, with retrieval | groundedness, no retrieval |", "|" + "---|" * 9]
        for lang, g in answer_breakdown(a).items():
            lines.append(f"| {lang} | {g['asked']} | {g['in_scope']} | {g['refused_in_scope']} / "
                         f"{g['refused_out_of_scope']} | {g['generated']} | {g['extractive']} "
                         f"({g['fallback']}) | {g['sentences_kept']} / {g['sentences_written']} | "
                         f"{_fmt(g['groundedness_rag'])} | {_fmt(g['groundedness_no_retrieval'])} |")
    return "\n".join(lines)


def answer_breakdown(answers: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The `--answers` rows counted by language, then over all: how each answer was made, the refusals,
    and the mean groundedness with retrieval (in-scope answers not refused) and without it (in-scope
    questions). A *fallback* is an extractive answer whose generated sentences were all dropped."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for row in answers["rows"]:
        groups.setdefault(row["lang"], []).append(row)
    if len(groups) > 1:
        groups["all"] = list(answers["rows"])
    out = {}
    for lang, rows in groups.items():
        inside = [r for r in rows if r["in_scope"]]
        answered = [r for r in inside if not r["refused"]]
        baseline = [r["baseline_groundedness"] for r in inside if "baseline_groundedness" in r]
        out[lang] = {"asked": len(rows), "in_scope": len(inside),
                     "refused_in_scope": sum(r["refused"] for r in inside),
                     "refused_out_of_scope": sum(r["refused"] for r in rows if not r["in_scope"]),
                     "generated": sum(r["mode"] == "generated" for r in rows),
                     "extractive": sum(r["mode"] == "extractive" for r in rows),
                     "fallback": sum(r["mode"] == "extractive" and r.get("dropped", 0) > 0 for r in rows),
                     "groundedness_rag": _mean([r["groundedness"] for r in answered]),
                     "groundedness_no_retrieval": _mean(baseline)}
        # The model's own sentences with the sources in its prompt, before the check removed any:
        # kept (in generated answers) and dropped (in those and in fallbacks).
        kept = sum(len(answer_sentences(r["answer"])) for r in rows if r["mode"] == "generated")
        written = kept + sum(r.get("dropped", 0) for r in rows)
        out[lang].update(sentences_written=written, sentences_kept=kept,
                         sentences_kept_share=kept / written if written else None)
    return out


def _fmt_s(latency: dict[str, float] | None) -> str:
    return "-" if not latency else f"{latency['mean'] * 1000:.0f} ms mean, {latency['p95'] * 1000:.0f} ms p95"


def _write(report: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    data = {k: v for k, v in report.items() if k != "text"}
    write_text_atomic(out / "report.json", json.dumps(data, ensure_ascii=False, indent=1) + "\n")
    write_text_atomic(out / "report.md", report["text"] + "\n")
    from lmforge.io.plots import pyplot

    plt = pyplot()
    if plt is None:
        return
    modes = list(report["modes"])
    langs = sorted({lang for r in report["modes"].values() for lang in r["by_lang"]})
    metrics = ("recall@1", "recall@3", "mrr", "ndcg@10")
    grounded = answer_breakdown(report["answers"]) if "answers" in report else {}
    panels = len(langs) + bool(grounded)
    fig, axes = plt.subplots(1, panels, figsize=(max(5.0, 0.9 * len(modes) + 1.4) * panels, 3.6), squeeze=False)
    if grounded:
        _plot_groundedness(axes[0][-1], grounded, report["answers"])
    for ax, lang in zip(axes[0], langs):
        width = 0.8 / len(metrics)
        for j, metric in enumerate(metrics):
            values = [report["modes"][m]["by_lang"].get(lang, {}).get(metric) or 0.0 for m in modes]
            ax.bar([i + j * width for i in range(len(modes))], values, width, label=metric)
        ax.set_xticks([i + width * (len(metrics) - 1) / 2 for i in range(len(modes))], modes, fontsize=8)
        ax.set_ylim(0, 1)
        ax.set_title(f"retrieval, {lang}")
        ax.legend(loc="upper left", fontsize=7)
    fig.tight_layout()
    tmp = out / "retrieval.png.tmp"
    fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    tmp.replace(out / "retrieval.png")


def _plot_groundedness(ax, grounded: dict[str, dict[str, Any]], answers: dict[str, Any]) -> None:
    """Bars of answer groundedness with retrieval and without it, by language."""
    names = list(grounded)
    width = 0.27
    for j, (key, label) in enumerate((("groundedness_rag", "with retrieval: answers as given"),
                                      ("sentences_kept_share", "with retrieval: model's sentences before the check"),
                                      ("groundedness_no_retrieval", "no retrieval: the model alone"))):
        values = [grounded[name][key] for name in names]
        bars = ax.bar([i + j * width for i in range(len(names))], [v or 0.0 for v in values], width, label=label)
        for bar, value in zip(bars, values):
            ax.annotate("-" if value is None else f"{value:.2f}", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                        ha="center", va="bottom", fontsize=7)
    ax.set_xticks([i + width for i in range(len(names))],
                  [f"{name}\n({grounded[name]['in_scope']} in scope)" for name in names], fontsize=8)
    ax.set_ylim(0, 1.25)
    ax.set_title(f"answers: share of sentences supported\n(judge: {answers.get('groundedness_judge', 'embedding')})",
                 fontsize=9)
    ax.legend(loc="upper right", fontsize=7)
