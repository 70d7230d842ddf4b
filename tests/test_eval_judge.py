"""LLM-as-judge: verdict parsing, position swap, golden-set regressions; any `.chat` backend plugs in."""

from __future__ import annotations

import re

import pytest

from lmforge.eval.judge import (GoldenItem, PairwiseJudge, PointwiseJudge, exact_metrics, parse_preference,
                                parse_score, regression_run, summarize_pairs, summarize_scores)


@pytest.mark.parametrize("text,expected", [
    ("The answer is right.\nScore: 4", 4),
    ("Using the rubric (1 = wrong ... 5 = perfect), I give Score: **5**", 5),
    ("Rating: [[2]]", 2),
    ("I would rate this 3/5.", 3),
    ("3 out of 5", 3),
    ("Score: 4.5", 5),
    ("  2.  ", 2),
    ("Score: 9", None),
    ("Great answer!", None),
])
def test_parse_score(text, expected):
    assert parse_score(text) == expected


@pytest.mark.parametrize("text,expected", [
    ("A is concise and right. [[A]]", "A"),
    ("Verdict: [[B]]", "B"),
    ("[[C]]", "tie"),
    ("Both are fine. [[tie]]", "tie"),
    ("Answer B is better because it cites the law.", "B"),
    ("winner: A", "A"),
    ("They are equally good.", "tie"),
    ("B", "B"),
    ("I cannot decide.", None),
])
def test_parse_preference(text, expected):
    assert parse_preference(text) == expected


class ScriptedJudge:
    """A `.chat` backend that decides from the rendered prompt."""

    def __init__(self, decide):
        self.decide = decide
        self.calls = []

    def chat(self, messages, **sampling):
        self.calls.append((messages, sampling))
        user = messages[-1]["content"]
        a = re.search(r"\[Answer A\]\n(.*?)\n\n\[Answer B\]", user, re.S)
        b = re.search(r"\[Answer B\]\n(.*?)\n\nExplain", user, re.S)
        return self.decide(user, a.group(1) if a else None, b.group(1) if b else None)


def test_position_biased_judge_yields_ties():
    judge = ScriptedJudge(lambda user, a, b: "[[A]]")  # always the first shown
    verdict = PairwiseJudge(judge).compare("q", "short", "a much longer answer")
    assert verdict.first == "A" and verdict.second == "B"
    assert verdict.winner == "tie" and not verdict.consistent
    assert len(judge.calls) == 2 and all(s["temperature"] == 0 for _, s in judge.calls)


def test_consistent_judge_picks_the_same_answer_in_both_orders():
    judge = ScriptedJudge(lambda user, a, b: "[[A]]" if "Paris" in a else "[[B]]")
    verdict = PairwiseJudge(judge).compare("Capital of France?", "Lyon", "Paris")
    assert verdict.winner == "B" and verdict.consistent
    swapped_prompt = judge.calls[1][0][-1]["content"]
    assert swapped_prompt.index("Paris") < swapped_prompt.index("Lyon")


def test_tie_and_unparsed_verdicts():
    assert PairwiseJudge(ScriptedJudge(lambda *_: "[[tie]]")).compare("q", "x", "y").winner == "tie"
    unclear = PairwiseJudge(ScriptedJudge(lambda *_: "hmm")).compare("q", "x", "y")
    assert unclear.winner == "tie" and unclear.first is None and not unclear.consistent


def test_summaries():
    pairs = summarize_pairs(["A", "B", "tie", "A"], [True, True, False, True], [(10, 5), (3, 9), (4, 4), (2, 8)])
    assert pairs["a_wins"] == 2 and pairs["ties"] == 1
    assert pairs["a_win_rate"] == pytest.approx(2.5 / 4)
    assert pairs["consistency"] == 0.75
    assert pairs["longer_won"] == pytest.approx(2 / 3)
    scores = summarize_scores([5, 3, None, 4])
    assert scores["mean"] == 4 and scores["unparsed"] == 1 and scores["score_5"] == 1


def test_pointwise_judge_renders_the_rubric_and_retries_unparsed_replies():
    replies = iter(["It is good.", "Score: 4"])
    judge = ScriptedJudge(lambda *_: next(replies))
    pointwise = PointwiseJudge(judge, rubric="5 - perfect\n1 - useless", retries=1)
    verdict = pointwise.score("2+2?", "4", reference="4")
    assert verdict.score == 4 and len(judge.calls) == 2
    first_prompt = judge.calls[0][0][-1]["content"]
    assert "5 - perfect" in first_prompt and "[Reference answer]\n4" in first_prompt


class EchoModel:
    """A 'model' answering from a dictionary (stands in for a checkpoint)."""

    def __init__(self, answers):
        self.answers = answers

    def chat(self, prompt, **sampling):
        return self.answers[prompt]


def test_regression_run_flags_judge_losses_and_lost_exact_matches():
    golden = [GoldenItem("Capital of France?", "Paris", "fr"), GoldenItem("2+2?", "4", "math"),
              GoldenItem("Say hi", None, "hi")]
    baseline = EchoModel({"Capital of France?": "Paris", "2+2?": "4", "Say hi": "Hello!"})
    candidate = EchoModel({"Capital of France?": "Paris", "2+2?": "5", "Say hi": "Hello there!"})
    good = {"Paris", "4", "Hello there!"}

    def decide(user, a, b):
        if (a in good) == (b in good):
            return "[[tie]]"
        return "[[A]]" if a in good else "[[B]]"

    report = regression_run(golden, baseline, candidate, ScriptedJudge(decide), margin=0.1)
    by_id = {i.id: i for i in report.items}
    assert by_id["math"].regressed and by_id["math"].verdict == "baseline"
    assert "exact_match lost" in by_id["math"].reasons
    assert by_id["hi"].verdict == "candidate" and not by_id["hi"].regressed
    assert by_id["fr"].verdict == "tie" and not by_id["fr"].regressed
    assert (report.wins, report.losses, report.ties) == (1, 1, 1)
    assert report.metrics["exact_match"] == {"baseline": 1.0, "candidate": 0.5}
    assert report.regressed and any("exact_match fell" in r for r in report.reasons)
    assert report.to_dict(items=False)["flagged"] == ["math"]
    assert "Flagged items" in report.markdown()


def test_identical_models_do_not_regress():
    model = EchoModel({"q1": "a", "q2": "b"})
    report = regression_run([GoldenItem("q1", "a"), GoldenItem("q2")], model, model,
                            ScriptedJudge(lambda *_: "[[tie]]"))
    assert not report.regressed and report.ties == 2


def test_exact_metrics():
    assert exact_metrics("Paris.", "paris") == {"exact_match": 1.0, "contains": 1.0}
    assert exact_metrics("It is Paris, France", "Paris") == {"exact_match": 0.0, "contains": 1.0}


def test_the_default_model_plugs_in_as_judge(default_lm):
    verdict = PointwiseJudge(default_lm, sampling={"max_tokens": 8}).score("What is 2 + 2?", "4")
    assert isinstance(verdict.raw, str) and verdict.raw
    assert verdict.score is None or 1 <= verdict.score <= 5
