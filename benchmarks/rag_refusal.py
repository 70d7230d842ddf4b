"""Out-of-scope refusal rules on the labelled handbook questions, fitted on the main set only.

`lmforge rag eval --calibrate` fits the retriever's own rule; this script compares it with
candidate signals and rules cheaply. It runs in two stages:

  1. *collect* (the slow part, cached): every question of the main and the held-out set is
     retrieved once against one index (`--index`, a frozen copy of the handbook index), and
     its signals are written to `--cache` (JSON): the retriever's own (cosine, strength,
     overlap, unknown, coverage) and the candidates below, plus its hybrid page ranking.
  2. *rules*: each rule is fitted per question language on the main set and scored in
     sample and two-fold on the main set (the split of `lmforge rag eval`, seed 0), and, with
     `--heldout`, on the held-out set. The held-out set is never fitted on.

Candidate signals (computed here, beside the retriever's):

  * ``focus2``: of the question's two rarest content terms (by IDF; a term no chunk holds is
    the rarest), the largest IDF share one chunk holds *together*; ``focus2k`` and
    ``focus3k``: the same over the two or three rarest terms that some chunk holds;
  * ``cov_top``: the IDF share of the question's content terms the top hybrid chunk holds
    (the retriever's ``coverage`` is the same share for the chunk that holds the most);
  * ``title_cos``: the best dense cosine between the question and a page's title (with its
    Chinese title, when it has one); ``head_cos``: the same against every chunk's heading path.

Rules: "base" is the earlier rule (cosine, strength, overlap, unknown-name veto); "chosen
set" is what `lmforge rag eval --calibrate` fits now (`evaluate.fit_language`: of four
three-signal sets, the one that does best over repeated two-fold splits of the fitting set);
the fixed sets with coverage; with `--gates`, the base rule plus a gate on one signal
(refused also below the gate's threshold, fitted jointly); "logistic" is an L2-regularised
logistic model (C = 1) over the standardized signals, its cut at 5% false refusals on the
fitted set.

With ``--answerable DIR`` (a model of `lmforge rag train-answerable`), each question also gets
the ``answerable`` signal (`answerable.answerable_score`: the best "this passage answers this
question" logit over its top hybrid chunks), cached beside the others, and the rules with it
are fitted: the judgement alone, the signal set chosen two-fold when the answerable sets may be
chosen (``chosen set, with answerable``; the plain ``chosen set`` never sees the signal), the
base rule gated by it, and the logistic model with it.

Run:  python benchmarks/rag_refusal.py --index /tmp/frozen.sqlite --cache /tmp/refusal-signals.json [--heldout]
The last line printed is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lmforge.rag.evaluate import MAX_FALSE_REFUSALS, _halves, _refuse_by, fit_language, fit_refusal  # noqa: E402
from lmforge.rag.metrics import Question, evaluate_retrieval, load_questions  # noqa: E402
from lmforge.rag.retriever import LANGS, query_lang  # noqa: E402

DATA = REPO / "lmforge" / "rag" / "data"
SETS = {"main": DATA / "handbook_questions.jsonl", "heldout": DATA / "handbook_questions_heldout.jsonl"}


def collect(index_path: str) -> dict:
    """Signals and hybrid page rankings of every question of both sets against one index."""
    from lmforge.rag.bm25 import question_terms
    from lmforge.rag.config import RetrieverOptions
    from lmforge.rag.embedder import load_embedder
    from lmforge.rag.metrics import ranked_pages
    from lmforge.rag.retriever import Retriever
    from lmforge.rag.store import open_store

    embedder = load_embedder()
    out: dict = {"index": index_path, "questions": {}}
    with open_store(index_path) as store:
        retriever = Retriever(store, embedder, RetrieverOptions())
        index = retriever.bm25
        n = len(index)
        unseen = math.log1p((n + 0.5) / 0.5)
        position = {c.id: i for i, c in enumerate(index.chunks)}
        # Title and heading-path vectors, once for the index.
        titles: dict[str, str] = {}
        for c in index.chunks:
            zh = c.metadata.get("zh_title")
            titles.setdefault(c.source, c.title + (f" ({zh})" if zh else ""))
        pages = sorted(titles)
        title_vectors = embedder.encode([titles[p] for p in pages], normalize=True)
        heads = [" > ".join([c.title, *[h for h in c.headings[1:] if h]]) for c in index.chunks]
        distinct = sorted(set(heads))
        head_vectors = embedder.encode(distinct, normalize=True)
        started = time.perf_counter()
        for name, path in SETS.items():
            for q in load_questions(path):
                lists = retriever.search_lists(q.question, max(10, retriever.options.depth))
                lang = query_lang(q.question)
                hits = retriever.combine(lists, "hybrid", 10, lang)
                terms = question_terms(q.question, index.analyzer).content
                idf = {}
                holders = np.zeros(n)
                for t in terms:
                    posting = index._posting(t)
                    idf[t] = posting[2] if posting is not None else unseen
                    if posting is not None:
                        holders[posting[0]] += posting[2]
                mass = sum(idf.values())
                top = position.get(hits[0].chunk.id) if hits else None
                signal = dict(lists.signals)
                ranked = sorted(terms, key=lambda t: -idf[t])
                known = [t for t in ranked if idf[t] < unseen]
                for label, chosen in (("focus2", ranked[:2]), ("focus2k", known[:2]), ("focus3k", known[:3])):
                    together = np.zeros(n)
                    for t in chosen:
                        posting = index._posting(t)
                        if posting is not None:
                            together[posting[0]] += posting[2]
                    total = sum(idf[t] for t in chosen)
                    signal[label] = float(together.max() / total) if total else 1.0
                signal["cov_top"] = float(holders[top] / mass) if mass and top is not None else 0.0
                signal["title_cos"] = float((title_vectors @ lists.query_vector).max())
                signal["head_cos"] = float((head_vectors @ lists.query_vector).max())
                out["questions"][f"{name}/{q.id}"] = {"set": name, "lang": lang, "in_scope": q.in_scope,
                                                      "signals": signal, "pages": ranked_pages(hits)}
        out["seconds_per_question"] = (time.perf_counter() - started) / len(out["questions"])
    return out


# --- rules ------------------------------------------------------------------------------------------------

def fit_gated(signals, in_scope, gate: str):
    """The base rule plus a gate: refused also when `gate` is below its threshold (fitted jointly,
    the gate's threshold exhaustive over the observed values, the rest by `fit_refusal` on what
    the gate leaves, with the false refusals it left to spend)."""
    n_in = sum(in_scope)
    best = None
    for g in [-math.inf] + sorted({s[gate] for s in signals}):
        gated = [s[gate] < g for s in signals]
        gated_in = sum(x and i for x, i in zip(gated, in_scope))
        budget = MAX_FALSE_REFUSALS * n_in - gated_in
        if budget < 0:
            break
        rest = [k for k, x in enumerate(gated) if not x]
        rest_in = sum(in_scope[k] for k in rest)
        fit = fit_refusal([signals[k] for k in rest], [in_scope[k] for k in rest],
                          max_false=budget / rest_in) if rest_in else (0.0, 0.0, 0.0, 0)
        refused = [_refuse_by(s, fit) or s[gate] < g for s in signals]
        key = (sum(r and not i for r, i in zip(refused, in_scope)), -sum(r and i for r, i in zip(refused, in_scope)))
        if best is None or key > best[0]:
            best = (key, (fit, g))
    fit, g = best[1]
    return lambda s: _refuse_by(s, fit) or s[gate] < g, {"base": list(fit), gate: g}


def fit_chosen(signals, in_scope):
    """The rule `lmforge rag eval --calibrate` fits without the answerable judgement: the signal set
    chosen two-fold (`fit_language`) from the sets of the word statistics alone."""
    plain = [{k: v for k, v in s.items() if k != "answerable"} for s in signals]
    fit = fit_language(plain, in_scope)
    return lambda s: _refuse_by({k: v for k, v in s.items() if k != "answerable"}, fit), {"fit": list(fit)}


def fit_chosen_answerable(signals, in_scope):
    """The signal set chosen two-fold when the sets with the answerable judgement may be chosen."""
    fit = fit_language(signals, in_scope)
    return lambda s: _refuse_by(s, fit), {"fit": list(fit)}


def fit_answerable_alone(signals, in_scope):
    """Refused when the answerable judgement is below one threshold (no other signal, no veto)."""
    from lmforge.rag.evaluate import fit_rule

    (t,) = fit_rule([[s["answerable"]] for s in signals], in_scope)
    return lambda s: s["answerable"] < t, {"min_answerable": t}


def add_answerable(data: dict, index_path: str, model_dir: str) -> dict:
    """`data` with each question's ``answerable`` signal (and its cost in ms, one call per question)."""
    import torch

    from lmforge.rag.answerable import DEFAULT_TOP, answerable_score, load_answerable
    from lmforge.rag.config import RetrieverOptions
    from lmforge.rag.embedder import load_embedder
    from lmforge.rag.retriever import Retriever
    from lmforge.rag.store import open_store

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    model = load_answerable(model_dir)
    embedder = load_embedder()
    costs = []
    with open_store(index_path) as store:
        retriever = Retriever(store, embedder, RetrieverOptions())
        for name, path in SETS.items():
            for q in load_questions(path):
                row = data["questions"].get(f"{name}/{q.id}")
                if row is None:
                    continue
                lists = retriever.search_lists(q.question, max(10, retriever.options.depth))
                hits = retriever.combine(lists, "hybrid", DEFAULT_TOP, query_lang(q.question))
                got = ranked_pages_of(hits)
                if got != row["pages"][:len(got)]:
                    raise SystemExit(f"{name}/{q.id}: the hybrid ranking differs from the cached one")
                started = time.perf_counter()
                row["signals"]["answerable"] = answerable_score(model, q.question, [h.chunk for h in hits])
                costs.append(time.perf_counter() - started)
    data["answerable"] = {"model": model_dir, "top": DEFAULT_TOP, "ms_per_question_mean": 1000 * float(np.mean(costs)),
                          "ms_per_question_median": 1000 * float(np.median(costs)),
                          "threads": torch.get_num_threads()}
    return data


def ranked_pages_of(hits) -> list:
    from lmforge.rag.metrics import ranked_pages

    return ranked_pages(hits)


RULE_SETS = (("strength", "overlap", "coverage"), ("cosine", "overlap", "coverage"),
             ("cosine", "strength", "coverage"))


def fit_set(signals, in_scope, keys):
    fit = fit_refusal(signals, in_scope, keys=keys)
    return lambda s: _refuse_by(s, fit), {"fit": list(fit)}


def fit_base(signals, in_scope):
    fit = fit_refusal(signals, in_scope)
    return lambda s: _refuse_by(s, fit), {"base": list(fit)}


LOGISTIC_FEATURES = ("cosine", "strength", "overlap", "unknown", "coverage", "title_cos")


def fit_logistic(signals, in_scope, features=LOGISTIC_FEATURES, c: float = 1.0):
    """L2 logistic regression (in scope = 1) on standardized features; refuse below the cut that
    refuses the most out-of-scope questions with at most 5% false refusals on the fitted set."""
    x = np.asarray([[s[f] for f in features] for s in signals], dtype=np.float64)
    y = np.asarray(in_scope, dtype=np.float64)
    mean, std = x.mean(0), x.std(0) + 1e-9
    z = (x - mean) / std
    w = np.zeros(z.shape[1])
    b = 0.0
    for _ in range(500):  # Newton steps on the penalised log-likelihood (intercept not penalised)
        p = 1.0 / (1.0 + np.exp(-(z @ w + b)))
        g_w = z.T @ (p - y) + w / c
        g_b = float((p - y).sum())
        h = p * (1 - p)
        hess = np.zeros((len(w) + 1, len(w) + 1))
        hess[:-1, :-1] = z.T @ (z * h[:, None]) + np.eye(len(w)) / c
        hess[:-1, -1] = hess[-1, :-1] = z.T @ h
        hess[-1, -1] = h.sum() + 1e-9
        step = np.linalg.solve(hess, np.append(g_w, g_b))
        w -= step[:-1]
        b -= step[-1]
        if np.abs(step).max() < 1e-10:
            break
    score = z @ w + b
    inside = score[y == 1]
    allowed = int(math.floor(MAX_FALSE_REFUSALS * len(inside)))
    cut = np.sort(inside)[allowed] if allowed < len(inside) else np.inf  # refuse below: `allowed` in scope refused

    def refuse(s):
        v = (np.asarray([s[f] for f in features]) - mean) / std
        return float(v @ w + b) < cut
    return refuse, {"weights": dict(zip(features, w.round(3).tolist())), "bias": round(b, 3), "cut": float(cut)}


def rates(refused, in_scope):
    out_ = [r for r, i in zip(refused, in_scope) if not i]
    in_ = [r for r, i in zip(refused, in_scope) if i]
    return {"refusal": round(sum(out_) / len(out_), 3) if out_ else None,
            "false": round(sum(in_) / len(in_), 3) if in_ else None,
            "counts": f"{sum(out_)}/{len(out_)} refused, {sum(in_)}/{len(in_)} false"}


def evaluate_rules(data: dict, rules: dict, seed: int = 0) -> dict:
    rows = list(data["questions"].values())
    main = [r for r in rows if r["set"] == "main"]
    held = [r for r in rows if r["set"] == "heldout"]
    halves = _halves(len(main), seed)
    result: dict = {}
    for name, fit in rules.items():
        result[name] = {}
        for lang in LANGS:
            members = [i for i, r in enumerate(main) if r["lang"] == lang]
            sig = [main[i]["signals"] for i in members]
            inside = [main[i]["in_scope"] for i in members]
            refuse, params = fit(sig, inside)
            in_sample = rates([refuse(s) for s in sig], inside)
            two = {}
            for part, score in (halves, halves[::-1]):
                part = [i for i in part if main[i]["lang"] == lang]
                r2, _ = fit([main[i]["signals"] for i in part], [main[i]["in_scope"] for i in part])
                two.update({i: r2(main[i]["signals"]) for i in score if main[i]["lang"] == lang})
            two_fold = rates([two[i] for i in members], inside)
            h = [r for r in held if r["lang"] == lang]
            held_out = rates([refuse(r["signals"]) for r in h], [r["in_scope"] for r in h])
            result[name][lang] = {"in_sample": in_sample, "two_fold": two_fold, "held_out": held_out,
                                  "params": params}
    return result


def default_rule_rates(data: dict) -> dict:
    """Rates of the retriever's uncalibrated defaults (what `lmforge ask` judges by), per set and language."""
    from lmforge.rag.retriever import Retriever

    class _Store:
        meta: dict = {}

        def check_model(self, model_id):
            pass

    class _Embedder:
        model_id = "none"

    retriever = Retriever(_Store(), _Embedder())
    out = {}
    for name in SETS:
        for lang in LANGS:
            rows = [r for r in data["questions"].values() if r["set"] == name and r["lang"] == lang]
            if not rows:
                continue
            out[f"{name}/{lang}"] = rates([not retriever.judge(r["signals"], lang)[1] for r in rows],
                                          [r["in_scope"] for r in rows])
    return out


def recall(data: dict) -> dict:
    out = {}
    for name, path in SETS.items():
        questions = [q for q in load_questions(path)]
        if f"{name}/{questions[0].id}" not in data["questions"]:
            continue
        rankings = [data["questions"][f"{name}/{q.id}"]["pages"] for q in questions]
        result = evaluate_retrieval([Question(q.id, q.question, q.gold, q.lang, q.kind) for q in questions],
                                    rankings, (1, 3, 5))
        out[name] = {lang: {k: round(v[k], 4) for k in ("recall@1", "recall@3", "recall@5") if v.get(k) is not None}
                     for lang, v in result["by_lang"].items()}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--index", required=True, help="the index every question is retrieved from")
    parser.add_argument("--cache", default="runs/refusal-signals.json", help="the per-question signals (JSON)")
    parser.add_argument("--heldout", action="store_true", help="also score the held-out set (once the design is fixed)")
    parser.add_argument("--gates", action="store_true", help="also the gated rules (slow: a few minutes)")
    parser.add_argument("--recollect", action="store_true", help="retrieve again even when the cache exists")
    parser.add_argument("--answerable", metavar="DIR", help="add the answerable judgement of this model "
                                                            "(`lmforge rag train-answerable`) to the cached signals")
    args = parser.parse_args()
    cache = Path(args.cache)
    if args.recollect or not cache.exists():
        data = collect(args.index)
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps(data, ensure_ascii=False) + "\n", encoding="utf-8")
    else:
        data = json.loads(cache.read_text(encoding="utf-8"))
    if args.answerable and data.get("answerable", {}).get("model") != args.answerable:
        data = add_answerable(data, args.index, args.answerable)
        cache.write_text(json.dumps(data, ensure_ascii=False) + "\n", encoding="utf-8")
    rules = {"base": fit_base, "chosen set": fit_chosen}
    if all("answerable" in r["signals"] for r in data["questions"].values()):
        rules["answerable alone"] = fit_answerable_alone
        rules["chosen set, with answerable"] = fit_chosen_answerable
        rules["base+answerable gate"] = lambda s, i: fit_gated(s, i, "answerable")
        rules["logistic, base signals+answerable"] = lambda s, i: fit_logistic(
            s, i, ("cosine", "strength", "overlap", "unknown", "answerable"))
    for keys in RULE_SETS:
        rules["+".join(keys)] = lambda s, i, k=keys: fit_set(s, i, k)
    for gate in ("focus2", "focus2k", "focus3k", "coverage", "cov_top", "title_cos", "head_cos"):
        if args.gates and all(gate in r["signals"] for r in data["questions"].values()):
            rules[f"base+{gate} gate"] = lambda s, i, g=gate: fit_gated(s, i, g)
    present = [f for f in LOGISTIC_FEATURES if all(f in r["signals"] for r in data["questions"].values())]
    rules["logistic"] = lambda s, i: fit_logistic(s, i, present)
    rules["logistic, base signals"] = lambda s, i: fit_logistic(s, i, ("cosine", "strength", "overlap", "unknown"))
    if not args.heldout:
        data = {**data, "questions": {k: v for k, v in data["questions"].items() if v["set"] == "main"}}
    result = evaluate_rules(data, rules)
    for name, by_lang in result.items():
        for lang, v in by_lang.items():
            print(f"{name:24s} {lang}  in sample {v['in_sample']['refusal']} / {v['in_sample']['false']}   "
                  f"two-fold {v['two_fold']['refusal']} / {v['two_fold']['false']}   "
                  f"held-out {v['held_out']['refusal']} / {v['held_out']['false']}   {v['params']}")
    summary = {"rules": result, "defaults": default_rule_rates(data), "recall": recall(data),
               "seconds_per_question": data.get("seconds_per_question"), "answerable": data.get("answerable"),
               "index": data["index"],
               "cpu": platform.processor() or platform.machine(), "threads": os.environ.get("OMP_NUM_THREADS")}
    print(json.dumps(summary, ensure_ascii=False))


if __name__ == "__main__":
    main()
