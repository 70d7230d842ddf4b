"""LLM-as-judge (E4): pointwise rubric scores, pairwise preferences, golden-set regression runs.

A judge is any object with `chat(messages, **sampling) -> str`: a local `LoadedModel`
from `lmforge.load()`, the remote OpenAI-compatible backend, or a scripted stand-in in
tests. Judges run greedy (temperature 0) so the same inputs give the same verdicts.

Known biases and what this module does about them:
- position: judges favour the answer shown first (or second). `PairwiseJudge` asks
  twice with the answers swapped and only declares a winner when both orders agree;
  otherwise the pair is a tie, and the share of consistent pairs is reported.
- verbosity: longer answers get higher marks for the same content. The prompts tell
  the judge not to reward length; `summarize_pairs` reports how often the longer answer
  won so that the effect can be watched.
- self-preference: a model rates text in its own style higher. Use a judge from a
  different family than the models being compared when one is available.
Verdicts that cannot be parsed are kept as None (pointwise) or a tie (pairwise) and
counted, never guessed.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Protocol, Sequence

from .bench.extract import normalize_text


class ChatBackend(Protocol):
    def chat(self, messages: Sequence[dict[str, Any]] | str, **sampling: Any) -> str: ...


JUDGE_SAMPLING = {"temperature": 0.0, "max_tokens": 256}

DEFAULT_RUBRIC = """\
5 - fully correct, complete and directly useful; nothing important missing
4 - correct, with a small omission or a minor unclear part
3 - partly correct or only partly answers the question
2 - mostly wrong, or misses the point of the question
1 - wrong, irrelevant, or unsafe"""

POINTWISE_SYSTEM = ("You are an impartial expert evaluator. You judge the quality of an answer to a question. "
                    "Length is not quality: a short correct answer beats a long padded one.")

POINTWISE_PROMPT = """\
Rate the answer to the question below on a scale of 1 to 5 using this rubric:
{rubric}

[Question]
{question}
{reference}
[Answer]
{answer}

Give one or two sentences of justification, then end with a line of the form "Score: N" where N is 1, 2, 3, 4 or 5."""

PAIRWISE_SYSTEM = ("You are an impartial expert evaluator. You compare two answers to the same question. "
                   "The order in which the answers are shown and their length must not influence you.")

PAIRWISE_PROMPT = """\
Which answer to the question is better: more correct, more helpful, more relevant?

[Question]
{question}

[Answer A]
{answer_a}

[Answer B]
{answer_b}

Explain briefly, then end with exactly one verdict: [[A]] if answer A is better, [[B]] if answer B is better, [[tie]] if they are equally good."""


# -- parsing ----------------------------------------------------------------------------------------

_SCORE_PATTERNS = [
    re.compile(r"score\s*(?:is|of)?\s*[:=]?\s*\[{0,2}\**\s*(\d(?:\.\d+)?)\s*\**\]{0,2}(?:\s*(?:/|out of)\s*5)?", re.I),
    re.compile(r"\[\[\s*(\d(?:\.\d+)?)\s*\]\]"),
    re.compile(r"rating\s*(?:is|of)?\s*[:=]?\s*\**\s*(\d(?:\.\d+)?)", re.I),
    re.compile(r"\b(\d(?:\.\d+)?)\s*(?:/|out of)\s*5\b", re.I),
]


def parse_score(text: str, low: int = 1, high: int = 5) -> int | None:
    """The judge's score: "Score: 4", "[[4]]", "Rating: 4", "4/5", "4 out of 5", or a bare "4".

    The last match of the most specific pattern wins (a justification may quote the
    rubric first). Values outside [low, high] are rejected, not clamped; decimals round
    half up.
    """
    for pattern in _SCORE_PATTERNS:
        found = [float(v) for v in pattern.findall(text)]
        found = [v for v in found if low <= v <= high]
        if found:
            return int(math.floor(found[-1] + 0.5))
    bare = text.strip().strip("*.[]() \n")
    if bare.isdigit() and low <= int(bare) <= high:
        return int(bare)
    return None


_VERDICT = re.compile(r"\[\[\s*(A|B|C|tie)\s*\]\]", re.I)
_BETTER = re.compile(r"(?:answer|response|assistant)\s*\(?([AB])\)?\s+is\s+(?:clearly\s+|slightly\s+|much\s+)?better", re.I)
_WINNER = re.compile(r"(?:winner|verdict|better answer)\s*(?:is)?\s*[:=]?\s*\**\s*\(?(A|B|tie)\b", re.I)
_TIE = re.compile(r"\b(?:it'?s a tie|equally good|both (?:answers )?are equally)", re.I)


def parse_preference(text: str) -> str | None:
    """"A", "B" or "tie" from a pairwise verdict ("[[A]]", "[[C]]" = tie, "Answer B is better", ...); None if unclear."""
    for pattern in (_VERDICT, _WINNER, _BETTER):
        found = pattern.findall(text)
        if found:
            value = found[-1].upper()
            return "tie" if value in ("C", "TIE") else value
    if _TIE.search(text):
        return "tie"
    bare = text.strip().strip("*.[]() \n").upper()
    if bare in ("A", "B"):
        return bare
    if bare == "TIE":
        return "tie"
    return None


# -- judges ----------------------------------------------------------------------------------------------

@dataclass
class PointwiseVerdict:
    score: int | None
    raw: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class PointwiseJudge:
    """Scores one answer at a time against a rubric."""

    def __init__(self, backend: ChatBackend, rubric: str = DEFAULT_RUBRIC, sampling: dict[str, Any] | None = None,
                 retries: int = 0) -> None:
        self.backend, self.rubric = backend, rubric
        self.sampling = {**JUDGE_SAMPLING, **(sampling or {})}
        self.retries = retries  # extra attempts (with a reminder of the format) when no score can be parsed

    def messages(self, question: str, answer: str, reference: str | None = None) -> list[dict[str, str]]:
        ref = f"\n[Reference answer]\n{reference}\n" if reference else ""
        user = POINTWISE_PROMPT.format(rubric=self.rubric, question=question, reference=ref, answer=answer)
        return [{"role": "system", "content": POINTWISE_SYSTEM}, {"role": "user", "content": user}]

    def score(self, question: str, answer: str, reference: str | None = None) -> PointwiseVerdict:
        messages = self.messages(question, answer, reference)
        raw = self.backend.chat(messages, **self.sampling)
        score = parse_score(raw)
        for _ in range(self.retries):
            if score is not None:
                break
            messages = messages + [{"role": "assistant", "content": raw},
                                   {"role": "user", "content": 'Reply with only "Score: N" (N from 1 to 5).'}]
            raw = self.backend.chat(messages, **self.sampling)
            score = parse_score(raw)
        return PointwiseVerdict(score, raw)


@dataclass
class PairwiseVerdict:
    winner: str  # "A", "B" or "tie" (after reconciling both orders)
    first: str | None  # verdict with A shown first
    second: str | None  # verdict with B shown first, mapped back to the original labels
    consistent: bool  # both orders gave the same verdict
    raw_first: str
    raw_second: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


_SWAP = {"A": "B", "B": "A", "tie": "tie", None: None}


class PairwiseJudge:
    """Compares two answers, asking twice with the order swapped (position-bias control)."""

    def __init__(self, backend: ChatBackend, sampling: dict[str, Any] | None = None, swap: bool = True) -> None:
        self.backend = backend
        self.sampling = {**JUDGE_SAMPLING, **(sampling or {})}
        self.swap = swap

    def messages(self, question: str, answer_a: str, answer_b: str) -> list[dict[str, str]]:
        user = PAIRWISE_PROMPT.format(question=question, answer_a=answer_a, answer_b=answer_b)
        return [{"role": "system", "content": PAIRWISE_SYSTEM}, {"role": "user", "content": user}]

    def _ask(self, question: str, a: str, b: str) -> tuple[str | None, str]:
        raw = self.backend.chat(self.messages(question, a, b), **self.sampling)
        return parse_preference(raw), raw

    def compare(self, question: str, answer_a: str, answer_b: str) -> PairwiseVerdict:
        first, raw_first = self._ask(question, answer_a, answer_b)
        if not self.swap:
            return PairwiseVerdict(first or "tie", first, None, first is not None, raw_first, "")
        swapped, raw_second = self._ask(question, answer_b, answer_a)
        second = _SWAP[swapped]
        consistent = first is not None and first == second
        winner = first if consistent and first in ("A", "B") else "tie"
        return PairwiseVerdict(winner, first, second, consistent, raw_first, raw_second)


def summarize_scores(scores: Sequence[int | None]) -> dict[str, Any]:
    valid = [s for s in scores if s is not None]
    out: dict[str, Any] = {"items": len(scores), "scored": len(valid), "unparsed": len(scores) - len(valid),
                           "mean": sum(valid) / len(valid) if valid else float("nan")}
    for value in range(1, 6):
        out[f"score_{value}"] = valid.count(value)
    return out


def summarize_pairs(winners: Sequence[str], consistent: Sequence[bool],
                    lengths: Sequence[tuple[int, int]] | None = None) -> dict[str, Any]:
    """Win counts, A's win rate (ties count half), position consistency, and how often the longer answer won."""
    n = len(winners)
    a, b = winners.count("A"), winners.count("B")
    out: dict[str, Any] = {"pairs": n, "a_wins": a, "b_wins": b, "ties": n - a - b,
                           "a_win_rate": (a + 0.5 * (n - a - b)) / n if n else float("nan"),
                           "consistency": sum(consistent) / n if n else float("nan")}
    if lengths is not None:
        decided = [(w, la, lb) for w, (la, lb) in zip(winners, lengths) if w in ("A", "B") and la != lb]
        longer = sum((w == "A") == (la > lb) for w, la, lb in decided)
        out["longer_won"] = longer / len(decided) if decided else float("nan")
    return out


# -- golden-set regression ------------------------------------------------------------------------------

@dataclass
class GoldenItem:
    prompt: str
    reference: str | None = None
    id: str = ""


@dataclass
class RegressionItem:
    id: str
    prompt: str
    reference: str | None
    baseline: str
    candidate: str
    verdict: str  # "baseline", "candidate" or "tie"
    consistent: bool
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)  # metric -> {"baseline", "candidate"}
    regressed: bool = False
    reasons: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class RegressionReport:
    names: tuple[str, str]
    items: list[RegressionItem]
    wins: int
    losses: int
    ties: int
    metrics: dict[str, dict[str, float]]
    regressed: bool
    reasons: list[str]
    margin: float

    @property
    def candidate_win_rate(self) -> float:
        n = len(self.items)
        return (self.wins + 0.5 * self.ties) / n if n else float("nan")

    def to_dict(self, items: bool = True) -> dict[str, Any]:
        data = {"baseline": self.names[0], "candidate": self.names[1], "items_total": len(self.items),
                "wins": self.wins, "losses": self.losses, "ties": self.ties,
                "candidate_win_rate": self.candidate_win_rate, "metrics": self.metrics,
                "regressed": self.regressed, "reasons": self.reasons, "margin": self.margin,
                "flagged": [i.id for i in self.items if i.regressed]}
        if items:
            data["items"] = [i.to_dict() for i in self.items]
        return data

    def summary(self) -> str:
        verdict = "REGRESSION: " + "; ".join(self.reasons) if self.regressed else "no regression"
        return (f"{self.names[1]} vs {self.names[0]} on {len(self.items)} prompts: {self.wins} wins, "
                f"{self.losses} losses, {self.ties} ties (win rate {self.candidate_win_rate:.2f}); "
                f"{sum(i.regressed for i in self.items)} items flagged; {verdict}")

    def markdown(self) -> str:
        from .report import markdown_table

        lines = [f"# Golden-set regression: {self.names[1]} vs {self.names[0]}", "", self.summary(), ""]
        if self.metrics:
            rows = [[name, v["baseline"], v["candidate"], v["candidate"] - v["baseline"]] for name, v in self.metrics.items()]
            lines += [markdown_table(["metric", "baseline", "candidate", "change"], rows)]
        flagged = [i for i in self.items if i.regressed]
        if flagged:
            lines += ["## Flagged items", "", markdown_table(["id", "why"], [[i.id, "; ".join(i.reasons)] for i in flagged])]
        return "\n".join(lines)


def exact_metrics(answer: str, reference: str) -> dict[str, float]:
    """exact_match: equal after normalization; contains: the normalized reference appears in the answer."""
    a, r = normalize_text(answer), normalize_text(reference)
    return {"exact_match": float(a == r), "contains": float(bool(r) and r in a)}


def answer_all(model, prompts: Sequence[str], max_tokens: int = 256, batch_size: int = 8) -> list[str]:
    """Greedy chat answers; a local model answers `batch_size` prompts per engine call."""
    generator, chat_prompt = getattr(model, "generator", None), getattr(model, "chat_prompt", None)
    if generator is None or chat_prompt is None:
        return [model.chat(p, temperature=0.0, max_tokens=max_tokens) for p in prompts]
    from ..infer import SamplingParams

    out: list[str] = []
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
    for at in range(0, len(prompts), batch_size):
        chunk = [chat_prompt(p) for p in prompts[at : at + batch_size]]
        out += [c.text for c in generator.generate(chunk, params)]
    return out


def regression_run(
    golden: Sequence[GoldenItem],
    baseline,
    candidate,
    judge: PairwiseJudge | ChatBackend,
    max_tokens: int = 256,
    margin: float = 0.1,
    progress: Callable[[int, int], None] | None = None,
    names: tuple[str, str] = ("baseline", "candidate"),
) -> RegressionReport:
    """Answer every golden prompt with both models, judge each pair in both orders, flag regressions.

    An item regresses when the judge prefers the baseline in both orders, or when an exact
    metric (against the item's reference) drops from 1 to 0. The run regresses when
    (losses - wins) / items exceeds `margin`, or a metric's mean drops by more than `margin`.
    """
    judge = judge if isinstance(judge, PairwiseJudge) else PairwiseJudge(judge)
    prompts = [g.prompt for g in golden]
    base_answers = answer_all(baseline, prompts, max_tokens)
    cand_answers = answer_all(candidate, prompts, max_tokens)
    items: list[RegressionItem] = []
    for k, (g, a, b) in enumerate(zip(golden, base_answers, cand_answers)):
        verdict = judge.compare(g.prompt, a, b)
        who = {"A": "baseline", "B": "candidate"}.get(verdict.winner, "tie")
        item = RegressionItem(g.id or str(k), g.prompt, g.reference, a, b, who, verdict.consistent)
        if who == "baseline":
            item.regressed = True
            item.reasons.append("judge prefers the baseline in both orders")
        if g.reference is not None:
            ma, mb = exact_metrics(a, g.reference), exact_metrics(b, g.reference)
            item.metrics = {m: {"baseline": ma[m], "candidate": mb[m]} for m in ma}
            for m in ma:
                if ma[m] == 1.0 and mb[m] == 0.0:
                    item.regressed = True
                    item.reasons.append(f"{m} lost")
        items.append(item)
        if progress is not None:
            progress(k + 1, len(golden))
    wins = sum(i.verdict == "candidate" for i in items)
    losses = sum(i.verdict == "baseline" for i in items)
    metrics: dict[str, dict[str, float]] = {}
    with_ref = [i for i in items if i.metrics]
    for m in (with_ref[0].metrics if with_ref else {}):
        metrics[m] = {side: sum(i.metrics[m][side] for i in with_ref) / len(with_ref) for side in ("baseline", "candidate")}
    reasons = []
    n = len(items)
    if n and (losses - wins) / n > margin:
        reasons.append(f"judge: {losses} losses vs {wins} wins over {n} prompts")
    for m, v in metrics.items():
        if v["baseline"] - v["candidate"] > margin:
            reasons.append(f"{m} fell from {v['baseline']:.2f} to {v['candidate']:.2f}")
    return RegressionReport(names, items, wins, losses, n - wins - losses, metrics, bool(reasons), reasons, margin)
