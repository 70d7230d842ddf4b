"""Golden-set regression runs: the same questions after every change, compared item by item.

A golden set is a JSONL file, one item a line:

    {"id": "refund-window", "question": "How long do I have to return an item?",
     "expected": "30 days", "metric": "contains"}
    {"id": "no-legal-advice", "question": "Can I sue my neighbour?",
     "checks": [{"not_contains": "you should sue"}, {"regex": "(lawyer|attorney)"}]}

An item is scored in [0, 1] by its `metric` against `expected` (`exact`: equal after
normalizing case, punctuation and spaces; `contains`: the expected text appears in the
answer, normalized the same way; `rougeL`: ROUGE-L F1 from lmforge.eval.metrics) and/or by
its `checks` (`contains`, `not_contains`, `regex`; the share that hold). With both, the
score is their mean. An item passes at `pass_score` or more.

A run (every answer, score and timing, plus the model and settings) is stored as JSON.
`compare(baseline, candidate)` pairs the two runs' items by id and flags

- an item as regressed when it passed before and fails now, or its score fell by more
  than `item_tolerance`;
- the run as regressed when the paired bootstrap interval of the mean score change
  (lmforge.eval.stats.bootstrap_interval over the per-item differences) lies below 0:
  the drop is more than the luck of which items are in the set would explain. A
  sign-flip permutation p-value of the same differences is reported beside it.
"""

from __future__ import annotations

import json
import math
import random
import re
import string
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from ..errors import LmforgeError
from .config import METRICS, GoldenOptions

CHECKS = ("contains", "not_contains", "regex")
RUN_FORMAT = "lmforge-golden-run/1"


@dataclass
class GoldenItem:
    id: str
    question: str
    expected: str | None = None
    metric: str | None = None  # None: the run's default metric
    checks: list[dict[str, str]] = field(default_factory=list)
    system: str | None = None  # an optional system message sent before the question


# ---- reading the set ------------------------------------------------------------------------

def read_golden(path: str | Path) -> list[GoldenItem]:
    """The items of a golden JSONL file; a malformed line names its file and line number."""
    from ..io.text_files import parse_jsonl, read_text

    items: list[GoldenItem] = []
    seen: set[str] = set()
    for number, record in parse_jsonl(read_text(path, "golden set").splitlines(), path):
        where = f"{path}:{number}"
        if not isinstance(record, dict) or not isinstance(record.get("question"), str) or not record["question"]:
            raise LmforgeError(f"{where}: each line needs a non-empty string \"question\"")
        unknown = set(record) - {"id", "question", "expected", "metric", "checks", "system"}
        if unknown:
            raise LmforgeError(f"{where}: unknown field(s) {', '.join(sorted(unknown))}")
        item_id = str(record.get("id", number))
        if item_id in seen:
            raise LmforgeError(f"{where}: id {item_id!r} appears twice")
        seen.add(item_id)
        expected, metric, checks = record.get("expected"), record.get("metric"), record.get("checks", [])
        if expected is not None and not isinstance(expected, str):
            raise LmforgeError(f"{where}: \"expected\" must be a string")
        if metric is not None and metric not in METRICS:
            raise LmforgeError(f"{where}: unknown metric {metric!r} (choose from {', '.join(METRICS)})")
        if not isinstance(checks, list) or not all(_valid_check(c) for c in checks):
            raise LmforgeError(f"{where}: \"checks\" must be a list of objects with one of "
                               f"{', '.join(CHECKS)} and a string (a valid regular expression for regex)")
        if expected is None and not checks:
            raise LmforgeError(f"{where}: an item needs \"expected\" or \"checks\" to be scored")
        items.append(GoldenItem(item_id, record["question"], expected, metric, checks, record.get("system")))
    if not items:
        raise LmforgeError(f"golden set {path} holds no items")
    return items


def _valid_check(check: Any) -> bool:
    if not isinstance(check, dict) or len(check) != 1:
        return False
    (kind, value), = check.items()
    if kind not in CHECKS or not isinstance(value, str):
        return False
    if kind == "regex":
        try:
            re.compile(value)
        except re.error:
            return False
    return True


# ---- scoring --------------------------------------------------------------------------------

_PUNCTUATION = str.maketrans({c: " " for c in string.punctuation})


def normalize(text: str) -> str:
    """Lower case, punctuation as spaces, runs of spaces as one."""
    return " ".join(text.lower().translate(_PUNCTUATION).split())


def metric_score(answer: str, expected: str, metric: str) -> float:
    if metric == "exact":
        return float(normalize(answer) == normalize(expected))
    if metric == "contains":
        want = normalize(expected)
        return float(bool(want) and f" {want} " in f" {normalize(answer)} ")
    if metric == "rougeL":
        from ..eval.metrics.rouge import rouge

        return float(rouge(answer, expected, types=("rougeL",), use_stemmer=True)["rougeL"].fmeasure)
    raise LmforgeError(f"unknown golden metric {metric!r}")


def check_passes(answer: str, check: dict[str, str]) -> bool:
    (kind, value), = check.items()
    if kind == "contains":
        return normalize(value) in normalize(answer)
    if kind == "not_contains":
        return normalize(value) not in normalize(answer)
    return re.search(value, answer, flags=re.IGNORECASE) is not None


def score_item(item: GoldenItem, answer: str, options: GoldenOptions) -> dict[str, Any]:
    parts: list[float] = []
    detail: dict[str, Any] = {}
    if item.expected is not None:
        metric = item.metric or options.metric
        detail["metric"] = metric
        detail["metric_score"] = metric_score(answer, item.expected, metric)
        parts.append(detail["metric_score"])
    if item.checks:
        held = [check_passes(answer, c) for c in item.checks]
        detail["checks_failed"] = [c for c, ok in zip(item.checks, held) if not ok]
        parts.append(sum(held) / len(held))
    score = sum(parts) / len(parts)
    return {"score": round(score, 6), "passed": score >= options.pass_score, **detail}


# ---- running --------------------------------------------------------------------------------

def run_golden(items: Sequence[GoldenItem], answer: Callable[[GoldenItem], str], options: GoldenOptions,
               name: str = "", model: str = "", progress: Callable[[int, int], None] | None = None
               ) -> dict[str, Any]:
    """Answer every item with `answer(item)` and score it: the run as a JSON-ready dict.

    An `answer` with a `batch(items) -> texts` method (`model_answerer` of a local model) is
    given `options.batch_size` items at a time; each item's `seconds` is then its share of
    the batch's time."""
    records = []
    size = options.batch_size if hasattr(answer, "batch") else 1
    for start in range(0, len(items), size):
        chunk = list(items[start:start + size])
        started = time.perf_counter()
        texts = answer.batch(chunk) if size > 1 else [answer(chunk[0])]
        seconds = (time.perf_counter() - started) / len(chunk)
        for item, text in zip(chunk, texts):
            records.append({"id": item.id, "question": item.question, "answer": text, "seconds": round(seconds, 4),
                            **score_item(item, text, options)})
        if progress is not None:
            progress(len(records), len(items))
    return {"format": RUN_FORMAT, "name": name, "model": model, "created": time.time(),
            "settings": {"metric": options.metric, "pass_score": options.pass_score,
                         "max_tokens": options.max_tokens, "temperature": options.temperature, "seed": options.seed},
            "summary": summarize(records), "items": records}


class ModelAnswerer:
    """Answers golden items with a model's chat: `LoadedModel` (local; `batch` decodes several
    items together through the scheduler) or `RemoteModel` (any OpenAI-compatible endpoint)."""

    def __init__(self, model, options: GoldenOptions) -> None:
        self.model = model
        self.sampling = {"max_tokens": options.max_tokens, "temperature": options.temperature, "seed": options.seed}
        if hasattr(model, "chat_prompt"):  # a local model: whole batches in one call
            self.batch = self._batch

    @staticmethod
    def messages(item: GoldenItem) -> list[dict[str, str]]:
        system = [{"role": "system", "content": item.system}] if item.system else []
        return system + [{"role": "user", "content": item.question}]

    def __call__(self, item: GoldenItem) -> str:
        return self.model.chat(self.messages(item), **self.sampling)

    def _batch(self, items: Sequence[GoldenItem]) -> list[str]:
        prompts = [self.model.chat_prompt(self.messages(item)) for item in items]
        return [c.text for c in self.model.complete(prompts, **self.sampling)]


def model_answerer(model, options: GoldenOptions) -> ModelAnswerer:
    return ModelAnswerer(model, options)


def summarize(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    n = len(records)
    return {"items": n, "mean_score": round(sum(r["score"] for r in records) / n, 6) if n else math.nan,
            "pass_rate": round(sum(r["passed"] for r in records) / n, 6) if n else math.nan,
            "seconds": round(sum(r.get("seconds", 0.0) for r in records), 3)}


def save_run(run: dict[str, Any], path: str | Path) -> Path:
    from ..io.atomic import write_json_atomic

    return write_json_atomic(path, run)


def load_run(path: str | Path) -> dict[str, Any]:
    from ..io.text_files import read_text

    try:
        run = json.loads(read_text(path, "golden run"))
    except json.JSONDecodeError as exc:
        raise LmforgeError(f"golden run {path} is not JSON: {exc.msg} (line {exc.lineno})") from None
    if not isinstance(run, dict) or run.get("format") != RUN_FORMAT or not isinstance(run.get("items"), list):
        raise LmforgeError(f"{path} is not a golden run (written by `lmforge monitor golden --out`)")
    return run


# ---- comparing ------------------------------------------------------------------------------

def sign_flip_p_value(differences: Sequence[float], permutations: int = 2000, seed: int = 0) -> float:
    """Two-sided paired permutation test of mean(differences) == 0: flip each difference's sign
    at random and count means at least as far from 0 as the observed one."""
    if not differences:
        return math.nan
    observed = abs(sum(differences))
    if observed == 0:
        return 1.0
    rng = random.Random(seed)
    hits = sum(abs(sum(d if rng.random() < 0.5 else -d for d in differences)) >= observed - 1e-12
               for _ in range(permutations))
    return (1 + hits) / (1 + permutations)


def compare(baseline: dict[str, Any], candidate: dict[str, Any], options: GoldenOptions | None = None,
            items: Sequence[GoldenItem] | None = None) -> dict[str, Any]:
    """Item and overall regressions of `candidate` against `baseline` (paired by item id).

    With `items` (the golden set), both runs are rescored from their stored answers with
    today's expectations, so a corrected golden answer does not read as a model change.
    """
    from ..eval.stats import bootstrap_interval

    options = options or GoldenOptions()
    by_id = {item.id: item for item in items} if items is not None else None

    def scored(run: dict[str, Any]) -> dict[str, dict[str, Any]]:
        out = {}
        for r in run["items"]:
            if by_id is not None:
                if r["id"] not in by_id:
                    continue
                r = {**r, **score_item(by_id[r["id"]], r["answer"], options)}
            else:
                r = {**r, "passed": r["score"] >= options.pass_score}
            out[r["id"]] = r
        return out

    base, cand = scored(baseline), scored(candidate)
    shared = [i for i in cand if i in base]
    if not shared:
        raise LmforgeError("the two golden runs share no item ids: nothing to compare")
    per_item, differences = [], []
    for i in shared:
        b, c = base[i], cand[i]
        delta = c["score"] - b["score"]
        differences.append(delta)
        regressed = (b["passed"] and not c["passed"]) or delta < -options.item_tolerance
        improved = (c["passed"] and not b["passed"]) or delta > options.item_tolerance
        per_item.append({"id": i, "question": c.get("question", ""), "baseline_score": b["score"],
                         "candidate_score": c["score"], "delta": round(delta, 6), "regressed": bool(regressed),
                         "improved": bool(improved and not regressed),
                         "baseline_answer": b.get("answer", ""), "candidate_answer": c.get("answer", "")})
    low, high = bootstrap_interval(differences, confidence=options.confidence, resamples=options.resamples,
                                   seed=options.seed)
    mean = sum(differences) / len(differences)
    pass_base = sum(base[i]["passed"] for i in shared) / len(shared)
    pass_cand = sum(cand[i]["passed"] for i in shared) / len(shared)
    return {
        "baseline": baseline.get("name", ""), "candidate": candidate.get("name", ""),
        "items": len(shared), "only_in_baseline": sorted(set(base) - set(cand)),
        "only_in_candidate": sorted(set(cand) - set(base)),
        "mean_score": {"baseline": round(sum(base[i]["score"] for i in shared) / len(shared), 6),
                       "candidate": round(sum(cand[i]["score"] for i in shared) / len(shared), 6)},
        "pass_rate": {"baseline": round(pass_base, 6), "candidate": round(pass_cand, 6)},
        "mean_delta": round(mean, 6), "interval": [round(low, 6), round(high, 6)], "confidence": options.confidence,
        "p_value": sign_flip_p_value(differences, options.resamples, options.seed),
        "regressed_items": [r["id"] for r in per_item if r["regressed"]],
        "improved_items": [r["id"] for r in per_item if r["improved"]],
        "regressed": high < 0,
        "per_item": per_item,
    }


def format_comparison(report: dict[str, Any]) -> str:
    """A few lines for people: the overall verdict, then each regressed item."""
    lo, hi = report["interval"]
    verdict = "REGRESSION" if report["regressed"] else "no significant regression"
    lines = [f"golden set: {report['items']} items, mean score {report['mean_score']['baseline']:.3f} -> "
             f"{report['mean_score']['candidate']:.3f} (change {report['mean_delta']:+.3f}, "
             f"{report['confidence']:.0%} interval [{lo:+.3f}, {hi:+.3f}], sign-flip p={report['p_value']:.3g}); "
             f"pass rate {report['pass_rate']['baseline']:.1%} -> {report['pass_rate']['candidate']:.1%}: {verdict}",
             f"{len(report['regressed_items'])} item(s) regressed, {len(report['improved_items'])} improved"]
    for r in report["per_item"]:
        if r["regressed"]:
            lines.append(f"  REGRESSED {r['id']}: {r['baseline_score']:.2f} -> {r['candidate_score']:.2f}  "
                         f"{r['candidate_answer'][:100]!r}")
    return "\n".join(lines)
