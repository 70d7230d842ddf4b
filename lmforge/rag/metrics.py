"""Retrieval metrics, and the labelled sets they are measured on.

A retriever returns hits (chunks with scores). For evaluation the hits become a **ranked
list of distinct pages**: the page of each hit in order, keeping only the first
occurrence of each page, so that five chunks of one page count as one answer at the rank
of the best of them. Pages are compared by file name (`docs/handbook/kv-cache.md#the-math`
is `kv-cache.md`), which is how the question set names its gold pages.

For one question with gold pages G and ranked distinct pages p_1, p_2, ... (rank i is
1-based):

    recall@k       = 1 if some p_i with i <= k is in G, else 0
    gold_recall@k  = |{p_1 .. p_k} & G| / |G|                   (the share of the gold found)
    RR             = 1 / (smallest i with p_i in G), 0 if no p_i is in G
    DCG@k          = sum over i <= k with p_i in G of 1 / log2(i + 1)
    IDCG@k         = sum over i = 1 .. min(|G|, k) of 1 / log2(i + 1)
    nDCG@k         = DCG@k / IDCG@k                             (binary relevance)

Averaged over the in-scope questions (those with gold pages), recall@k is the share of
questions with at least one gold page in the top k, and the mean of RR is MRR. nDCG's
ideal list holds every gold page at the top, so a question with three gold pages only
reaches 1 when all three lead the list.

Out-of-scope questions (no gold page) measure refusals instead: the **refusal rate** is
the share of out-of-scope questions the system declined to answer (higher is better) and
the **false-refusal rate** the share of in-scope questions it declined (lower is better).

Every figure is also reported per language, and as a **macro average** over languages
(the mean of the per-language means), so that the language with more questions does
not decide the headline number alone.

The question set (`load_questions`) and the groundedness labels
(`load_groundedness_labels`) ship as package data in `lmforge/rag/data/`; both loaders
also read a user's own file of the same shape and report a bad line as one error naming
the file and line.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from importlib import resources
from pathlib import Path, PurePosixPath
from typing import Any, Iterable, Mapping, Sequence

from ..errors import LmforgeError
from ..io.text_files import parse_jsonl, read_text
from .types import Chunk, Hit

LANGS = ("en", "zh-Hant")
KINDS = ("concept", "howto", "keyword", "out_of_scope")
DEFAULT_KS = (1, 3, 5, 10)
QUESTIONS_FILE = "handbook_questions.jsonl"
GROUNDEDNESS_FILE = "groundedness_labels.jsonl"


# ---------------------------------------------------------------------------------------
# Ranked pages


def page_name(source: str) -> str:
    """The page a source names: its file name, without a URL fragment or query."""
    path = str(source).split("#", 1)[0].split("?", 1)[0].replace("\\", "/").rstrip("/")
    return PurePosixPath(path).name if path else ""


def ranked_pages(hits: Iterable[Hit | Chunk | str]) -> list[str]:
    """Distinct pages in rank order: the first occurrence of each source's page is kept.

    Items may be `Hit`s, `Chunk`s or source strings (a page name is its own source).
    """
    seen: set[str] = set()
    pages = []
    for item in hits:
        if isinstance(item, Hit):
            source = item.chunk.source
        elif isinstance(item, Chunk):
            source = item.source
        else:
            source = str(item)
        page = page_name(source)
        if page and page not in seen:
            seen.add(page)
            pages.append(page)
    return pages


def _check_k(k: int) -> int:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise LmforgeError(f"k must be a positive integer, got {k!r}")
    return k


def _gold_set(gold: Iterable[str]) -> set[str]:
    pages = {page_name(page) for page in gold}
    pages.discard("")
    if not pages:
        raise LmforgeError("no gold pages: retrieval metrics are defined only for in-scope questions")
    return pages


def recall_at_k(ranked: Iterable[Hit | Chunk | str], gold: Iterable[str], k: int) -> float:
    """1.0 if at least one gold page is among the top k distinct pages, else 0.0."""
    top, gold = ranked_pages(ranked)[:_check_k(k)], _gold_set(gold)
    return 1.0 if any(page in gold for page in top) else 0.0


def gold_recall_at_k(ranked: Iterable[Hit | Chunk | str], gold: Iterable[str], k: int) -> float:
    """The share of the gold pages found among the top k distinct pages."""
    top, gold = ranked_pages(ranked)[:_check_k(k)], _gold_set(gold)
    return sum(page in gold for page in top) / len(gold)


def reciprocal_rank(ranked: Iterable[Hit | Chunk | str], gold: Iterable[str], k: int | None = None) -> float:
    """1 / rank of the first gold page (within the top k, if given); 0.0 when there is none."""
    pages, gold = ranked_pages(ranked), _gold_set(gold)
    if k is not None:
        pages = pages[:_check_k(k)]
    for rank, page in enumerate(pages, 1):
        if page in gold:
            return 1.0 / rank
    return 0.0


def _discount(rank: int) -> float:
    return 1.0 / math.log2(rank + 1)


def ndcg_at_k(ranked: Iterable[Hit | Chunk | str], gold: Iterable[str], k: int) -> float:
    """nDCG@k with binary relevance over distinct pages; the ideal ranks every gold page first."""
    top, gold = ranked_pages(ranked)[:_check_k(k)], _gold_set(gold)
    dcg = sum(_discount(rank) for rank, page in enumerate(top, 1) if page in gold)
    ideal = sum(_discount(rank) for rank in range(1, min(len(gold), k) + 1))
    return dcg / ideal


def question_scores(ranked: Iterable[Hit | Chunk | str], gold: Iterable[str],
                    ks: Sequence[int] = DEFAULT_KS) -> dict[str, float]:
    """Every metric of one in-scope question: recall@k, gold_recall@k and ndcg@k for each k, and rr."""
    pages = ranked_pages(ranked)
    scores = {}
    for k in ks:
        scores[f"recall@{k}"] = recall_at_k(pages, gold, k)
        scores[f"gold_recall@{k}"] = gold_recall_at_k(pages, gold, k)
        scores[f"ndcg@{k}"] = ndcg_at_k(pages, gold, k)
    scores["rr"] = reciprocal_rank(pages, gold)
    return scores


# ---------------------------------------------------------------------------------------
# Aggregates


def mean(values: Iterable[float]) -> float | None:
    """The arithmetic mean; None for no values (a rate over nothing is undefined, not 0)."""
    values = list(values)
    return sum(values) / len(values) if values else None


def refusal_rate(refused: Iterable[bool]) -> float | None:
    """The share of True among `refused` (None when empty).

    Over out-of-scope questions this is the refusal rate; over in-scope questions it is the
    false-refusal rate.
    """
    return mean(1.0 if flag else 0.0 for flag in refused)


def macro_average(values: Sequence[float], groups: Sequence[str]) -> tuple[dict[str, float], float | None]:
    """(mean per group, mean of the group means); `values[i]` belongs to `groups[i]`."""
    if len(values) != len(groups):
        raise LmforgeError(f"{len(values)} values but {len(groups)} group labels")
    by_group: dict[str, list[float]] = {}
    for value, group in zip(values, groups):
        by_group.setdefault(group, []).append(value)
    means = {group: sum(v) / len(v) for group, v in sorted(by_group.items())}
    return means, mean(means.values())


def evaluate_retrieval(questions: Sequence[Question], rankings: Sequence[Iterable[Hit | Chunk | str]],
                       ks: Sequence[int] = DEFAULT_KS,
                       refused: Sequence[bool] | None = None) -> dict[str, Any]:
    """A report over a question set: rankings[i] (hits or pages) answers questions[i].

    Retrieval metrics average over in-scope questions; `refused[i]` (optional) says whether
    the system declined questions[i], giving the refusal rate on out-of-scope questions and
    the false-refusal rate on in-scope ones. The report holds `overall` (each metric averaged
    over the questions it applies to, whatever their language), `by_lang` (the same per
    language) and `macro` (the mean of the per-language figures), each a dict of metric ->
    value, where `mrr` is the mean reciprocal rank; a metric with no question to average
    over is None.
    """
    if len(rankings) != len(questions):
        raise LmforgeError(f"{len(questions)} questions but {len(rankings)} rankings")
    if refused is not None and len(refused) != len(questions):
        raise LmforgeError(f"{len(questions)} questions but {len(refused)} refusal flags")
    ks = [_check_k(k) for k in ks]
    names = [f"{metric}@{k}" for k in ks for metric in ("recall", "gold_recall", "ndcg")] + ["mrr"]
    if refused is not None:
        names += ["refusal_rate", "false_refusal_rate"]

    per_question: list[tuple[str, dict[str, float]]] = []  # (lang, {metric: value}) per question
    for i, (question, ranked) in enumerate(zip(questions, rankings)):
        scores: dict[str, float] = {}
        if question.gold:
            scores = question_scores(ranked, question.gold, ks)
            scores["mrr"] = scores.pop("rr")
        if refused is not None:
            scores["false_refusal_rate" if question.gold else "refusal_rate"] = 1.0 if refused[i] else 0.0
        per_question.append((question.lang, scores))

    def summary(rows: list[dict[str, float]]) -> dict[str, float | None]:
        return {name: mean(row[name] for row in rows if name in row) for name in names}

    langs = sorted({lang for lang, _ in per_question})
    by_lang = {lang: summary([scores for q_lang, scores in per_question if q_lang == lang]) for lang in langs}
    macro = {name: mean(v for v in (by_lang[lang][name] for lang in langs) if v is not None) for name in names}
    in_scope = sum(1 for q in questions if q.gold)
    return {"questions": len(questions), "in_scope": in_scope, "out_of_scope": len(questions) - in_scope,
            "ks": list(ks), "overall": summary([scores for _, scores in per_question]),
            "by_lang": by_lang, "macro": macro}


# ---------------------------------------------------------------------------------------
# The labelled sets


@dataclass(frozen=True)
class Question:
    """A labelled question: `gold` lists every page that answers it, the best first; empty when out of scope."""

    id: str
    question: str
    gold: tuple[str, ...] = ()
    lang: str = "en"
    kind: str = "concept"
    notes: str = ""

    @property
    def in_scope(self) -> bool:
        return bool(self.gold)


@dataclass(frozen=True)
class SupportLabel:
    """A hand-labelled pair: does `passage` (copied from handbook page `page`) support `sentence`?"""

    id: str
    page: str
    passage: str
    sentence: str
    supported: bool = False
    lang: str = "en"


def _string(record: Mapping[str, Any], field: str, where: str, allow_empty: bool = False) -> str:
    value = record[field]
    if not isinstance(value, str):
        raise LmforgeError(f"{where}: {field} must be a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise LmforgeError(f"{where}: {field} is empty")
    return value


def _page(value: Any, where: str, field: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise LmforgeError(f"{where}: {field} entries must be non-empty page file names")
    if "/" in value or "\\" in value:
        raise LmforgeError(f"{where}: {field} page {value!r} must be a file name, not a path")
    return value


def _records(lines: Iterable[str], source: str | Path, fields: tuple[str, ...],
             required: tuple[str, ...]) -> Iterable[tuple[str, dict[str, Any]]]:
    """("source:line", record) for each record, with the field names checked and ids unique."""
    first_line: dict[str, int] = {}
    for number, record in parse_jsonl(lines, source):
        where = f"{source}:{number}"
        if not isinstance(record, dict):
            raise LmforgeError(f"{where}: expected a JSON object, got {type(record).__name__}")
        unknown = sorted(set(record) - set(fields))
        if unknown:
            raise LmforgeError(f"{where}: unknown field{'s' if len(unknown) > 1 else ''} "
                               f"{', '.join(map(repr, unknown))} (expected {', '.join(fields)})")
        missing = [field for field in required if field not in record]
        if missing:
            raise LmforgeError(f"{where}: missing field{'s' if len(missing) > 1 else ''} {', '.join(missing)}")
        ident = _string(record, "id", where)
        if ident in first_line:
            raise LmforgeError(f"{where}: duplicate id {ident!r} (first on line {first_line[ident]})")
        first_line[ident] = number
        if "lang" in record and record["lang"] not in LANGS:
            raise LmforgeError(f"{where}: lang must be one of {', '.join(LANGS)}, got {record['lang']!r}")
        yield where, record
    if not first_line:
        raise LmforgeError(f"{source}: no records")


def parse_questions(lines: Iterable[str], source: str | Path) -> list[Question]:
    """Questions from JSONL lines, validated; a bad line is one error naming `source:line`."""
    questions = []
    for where, record in _records(lines, source, ("id", "lang", "question", "gold", "kind", "notes"),
                                  ("id", "lang", "question", "gold", "kind")):
        text = _string(record, "question", where)
        gold = record["gold"]
        if not isinstance(gold, list):
            raise LmforgeError(f"{where}: gold must be a list of page file names")
        gold = tuple(_page(page, where, "gold") for page in gold)
        if len(set(gold)) != len(gold):
            raise LmforgeError(f"{where}: gold lists a page twice")
        kind = record["kind"]
        if kind not in KINDS:
            raise LmforgeError(f"{where}: kind must be one of {', '.join(KINDS)}, got {kind!r}")
        if kind == "out_of_scope" and gold:
            raise LmforgeError(f"{where}: an out_of_scope question must have an empty gold list")
        if kind != "out_of_scope" and not gold:
            raise LmforgeError(f"{where}: gold is empty: list the pages that answer it, or use kind out_of_scope")
        notes = _string(record, "notes", where, allow_empty=True) if "notes" in record else ""
        questions.append(Question(id=record["id"], question=text, gold=gold, lang=record["lang"],
                                  kind=kind, notes=notes))
    return questions


def parse_groundedness_labels(lines: Iterable[str], source: str | Path) -> list[SupportLabel]:
    """Support labels from JSONL lines, validated; a bad line is one error naming `source:line`."""
    fields = ("id", "page", "passage", "sentence", "supported", "lang")
    labels = []
    for where, record in _records(lines, source, fields, fields):
        if not isinstance(record["supported"], bool):
            raise LmforgeError(f"{where}: supported must be true or false, got {record['supported']!r}")
        labels.append(SupportLabel(id=record["id"], page=_page(record["page"], where, "page"),
                                   passage=_string(record, "passage", where),
                                   sentence=_string(record, "sentence", where),
                                   supported=record["supported"], lang=record["lang"]))
    return labels


def _lines(path: str | Path | None, packaged: str, what: str) -> tuple[list[str], str]:
    if path is None:
        text = (resources.files(__package__) / "data" / packaged).read_text(encoding="utf-8")
        return text.splitlines(), f"lmforge/rag/data/{packaged}"
    return read_text(path, what).splitlines(), str(path)


def load_questions(path: str | Path | None = None) -> list[Question]:
    """The labelled handbook questions shipped with lmforge, or a file of the same shape."""
    return parse_questions(*_lines(path, QUESTIONS_FILE, "question"))


def load_groundedness_labels(path: str | Path | None = None) -> list[SupportLabel]:
    """The hand-labelled (passage, sentence, supported) pairs shipped with lmforge, or a file like it."""
    return parse_groundedness_labels(*_lines(path, GROUNDEDNESS_FILE, "groundedness label"))


def missing_gold_pages(questions: Iterable[Question], handbook_dir: str | Path) -> dict[str, list[str]]:
    """Gold pages with no file in `handbook_dir`: page -> ids of the questions that name it."""
    directory = Path(handbook_dir)
    if not directory.is_dir():
        raise LmforgeError(f"handbook directory {directory} does not exist")
    missing: dict[str, list[str]] = {}
    for question in questions:
        for page in question.gold:
            if not (directory / page).is_file():
                missing.setdefault(page, []).append(question.id)
    return dict(sorted(missing.items()))


def check_gold_pages(questions: Iterable[Question], handbook_dir: str | Path) -> None:
    """Raise one error naming every gold page that has no file in `handbook_dir`."""
    missing = missing_gold_pages(questions, handbook_dir)
    if missing:
        listed = "; ".join(f"{page} (named by {', '.join(ids[:3])}{', ...' if len(ids) > 3 else ''})"
                           for page, ids in missing.items())
        raise LmforgeError(f"{len(missing)} gold page{'s' if len(missing) > 1 else ''} missing from "
                           f"{handbook_dir}: {listed}")
