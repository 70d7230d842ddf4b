"""Human evaluation (E5): kappa, win rates, Elo, Bradley-Terry, loading and export, all by hand."""

from __future__ import annotations

import json
import math
from fractions import Fraction

import pytest

from lmforge.errors import LmforgeError
from lmforge.eval.human import (
    Comparison,
    Rating,
    agreement,
    bradley_terry,
    cohen_kappa,
    comparison_units,
    elo_ratings,
    elo_scale,
    fleiss_kappa,
    head_to_head,
    likert_summary,
    load_annotations,
    preference_pairs,
    rating_units,
    summarize,
    win_rates,
)
from lmforge.eval.stats import bootstrap_interval, wilson_interval

# Fleiss (1971) as tabulated in the literature: 10 subjects, 14 raters, 5 categories.
FLEISS_TABLE = [
    [0, 0, 0, 0, 14], [0, 2, 6, 4, 2], [0, 0, 3, 5, 6], [0, 3, 9, 2, 0], [2, 2, 8, 1, 1],
    [7, 7, 0, 0, 0], [3, 2, 6, 3, 0], [2, 5, 3, 2, 2], [6, 5, 2, 1, 0], [0, 2, 2, 3, 7],
]


def games(spec: str) -> list[Comparison]:
    """'A>B A=C ...' -> comparisons in that order (> a wins, < b wins, = tie)."""
    out = []
    for n, game in enumerate(spec.split()):
        for sign, winner in ((">", "a"), ("<", "b"), ("=", "tie")):
            if sign in game:
                a, b = game.split(sign)
                out.append(Comparison(f"q{n}", "r1", a, b, winner))
    return out


def test_fleiss_kappa_classic_table():
    # Column totals 20, 28, 39, 21, 32 of 140 labels: P_e = (20^2+28^2+39^2+21^2+32^2)/140^2 = 417/1960.
    # Row agreements sum to 3.78: mean P = 172/455. kappa = (172/455 - 417/1960) / (1 - 417/1960).
    expected = (Fraction(172, 455) - Fraction(417, 1960)) / (1 - Fraction(417, 1960))
    assert expected == Fraction(4211, 20059)
    assert fleiss_kappa(FLEISS_TABLE) == pytest.approx(float(expected), abs=1e-12)
    assert round(fleiss_kappa(FLEISS_TABLE), 3) == 0.210
    with pytest.raises(LmforgeError):
        fleiss_kappa([[1, 2], [2, 2]])  # units with different numbers of raters


def test_cohen_kappa_by_hand():
    # 50 units: both yes 20, A yes/B no 5, A no/B yes 10, both no 15.
    # p_o = 35/50 = 0.7; A says yes 25/50, B 30/50: p_e = 0.5*0.6 + 0.5*0.4 = 0.5; kappa = 0.2/0.5 = 0.4.
    a = ["yes"] * 25 + ["no"] * 25
    b = ["yes"] * 20 + ["no"] * 5 + ["yes"] * 10 + ["no"] * 15
    assert cohen_kappa(a, b) == pytest.approx(0.4, abs=1e-12)
    assert cohen_kappa(a, a) == pytest.approx(1.0)
    assert math.isnan(cohen_kappa(["x", "x"], ["x", "x"]))
    # Weighted, 3 ordinal labels on 4 units: pairs (1,1) (2,3) (3,3) (1,3).
    # Linear disagreement weights |i-j|/2: observed = (0.5 + 1) / 4 = 0.375.
    # Marginals A: 1:2/4 2:1/4 3:1/4; B: 1:1/4 3:3/4; expected = sum w_ij a_i b_j
    # = a1*(b3*1) + a2*(b1*.5 + b3*.5) + a3*(b1*1) = .5*.75 + .25*.5 + .25*.25 = 0.5625; kappa = 1 - .375/.5625 = 1/3.
    assert cohen_kappa([1, 2, 3, 1], [1, 3, 3, 3], weights="linear") == pytest.approx(1 / 3)


def test_three_player_bradley_terry_solved_by_hand():
    # Strengths 4 : 2 : 1 make these counts exactly expected: A-B 3 games (A wins 2/3 = 4/6),
    # A-C 5 games (4/5), B-C 3 games (2/3). W_i = sum_j n_ij p_i/(p_i+p_j) holds: A 6, B 3, C 2.
    comparisons = games("A>B A>B A<B A>C A>C A>C A>C A<C B>C B>C B<C")
    strengths = bradley_terry(comparisons)
    scale = strengths["C"]
    assert strengths["A"] / scale == pytest.approx(4.0, rel=1e-9)
    assert strengths["B"] / scale == pytest.approx(2.0, rel=1e-9)
    # Geometric mean 2 (of 4, 2, 1) sits at 1000; 400 * log10(2) = 120.41 points per factor 2.
    ratings = elo_scale(strengths)
    assert ratings["A"] == pytest.approx(1000 + 400 * math.log10(2), abs=1e-6)
    assert ratings["B"] == pytest.approx(1000, abs=1e-6)
    assert ratings["C"] == pytest.approx(1000 - 400 * math.log10(2), abs=1e-6)
    # Two ties count as one win for each side: A-B "1 win + 2 ties" is the same as "2 wins, 1 loss".
    with_ties = games("A>B A=B A=B A>C A>C A>C A>C A<C B>C B>C B<C")
    assert bradley_terry(with_ties)["A"] == pytest.approx(strengths["A"], rel=1e-9)


def test_bradley_terry_unbounded_without_prior():
    undefeated = games("A>B A>B B>C C>B")
    with pytest.raises(LmforgeError, match="prior"):
        bradley_terry(undefeated)
    s = bradley_terry(undefeated, prior=1.0)
    assert s["A"] > s["B"] and all(math.isfinite(v) for v in s.values())


def test_elo_by_hand():
    # K = 32, all start at 1000. Game 1, A beats B: expected 0.5 each, so A 1016, B 984.
    # Game 2, B ties C: 10^(16/400) = 1.0964782, E_B = 1/2.0964782 = 0.4769904;
    #   B += 32 * (0.5 - 0.4769904) = +0.7363068 -> 984.7363068, C -> 999.2636932.
    # Game 3, A loses to C: E_C = 1/(1 + 10^((1016 - 999.2636932)/400)) = 0.4759331;
    #   C += 32 * (1 - 0.4759331) = +16.7701398 -> 1016.0338330, A -> 999.2298602.
    r = elo_ratings(games("A>B B=C A<C"), k=32, initial=1000)
    assert r["B"] == pytest.approx(984.7363068, abs=1e-6)
    assert r["C"] == pytest.approx(1016.0338330, abs=1e-6)
    assert r["A"] == pytest.approx(999.2298602, abs=1e-6)
    assert sum(r.values()) == pytest.approx(3000)  # Elo only moves points between players
    assert elo_ratings(games("A<C A>B B=C"))["A"] != pytest.approx(r["A"])  # online: the order matters


def test_win_rates_with_wilson_and_bootstrap():
    comparisons = games("A>B A>B A=B A<B A>C")
    rows = {r["system"]: r for r in win_rates(comparisons)}
    a = rows["A"]
    assert (a["games"], a["wins"], a["ties"], a["losses"]) == (5, 3, 1, 1)
    assert a["win_rate"] == pytest.approx(3.5 / 5)
    # Wilson at z=1.96 for 3.5 of 5: centre (0.7 + 1.9208/5)/(1 + 3.8415/5), half-width z*sqrt(...)/(...)
    z = 1.959963984540054
    centre = (0.7 + z * z / 10) / (1 + z * z / 5)
    half = z * math.sqrt(0.7 * 0.3 / 5 + z * z / 100) / (1 + z * z / 5)
    assert (a["ci_low"], a["ci_high"]) == pytest.approx((centre - half, centre + half))
    assert rows["C"]["win_rate"] == 0.0 and rows["C"]["ci_low"] == 0.0
    boot = {r["system"]: r for r in win_rates(comparisons, method="bootstrap")}
    assert boot["A"]["ci_low"] <= 0.7 <= boot["A"]["ci_high"]
    assert head_to_head(comparisons)["A"]["B"] == pytest.approx(2.5 / 4)
    assert all(math.isnan(v) for v in wilson_interval(0, 0))  # no data, no interval
    assert bootstrap_interval([2.0, 2.0, 2.0]) == (2.0, 2.0)


def test_likert_summary_and_agreement():
    ratings = [Rating("q1", "ana", "m1", 4), Rating("q1", "bo", "m1", 4), Rating("q2", "ana", "m1", 2),
               Rating("q2", "bo", "m1", 3), Rating("q1", "ana", "m2", 5), Rating("q1", "bo", "m2", 5)]
    rows = {r["system"]: r for r in likert_summary(ratings)}
    assert rows["m1"]["mean"] == pytest.approx(13 / 4) and rows["m1"]["n"] == 4
    assert rows["m1"]["distribution"] == {"2": 1, "3": 1, "4": 2}
    # Units (q1,m1) 4/4, (q2,m1) 2/3, (q1,m2) 5/5: p_o = 2/3;
    # ana 4,2,5 and bo 4,3,5: p_e = (1/3)(1/3) [4] + 0 [2,3] + (1/3)(1/3) [5] = 2/9; kappa = (2/3-2/9)/(7/9) = 4/7.
    result = agreement(rating_units(ratings, "overall"))
    assert result["method"] == "cohen" and result["kappa"] == pytest.approx(4 / 7)
    three = {f"u{i}": {f"r{k}": lab for k, lab in enumerate(row)} for i, row in
             enumerate([["a", "a", "b"], ["b", "b", "b"], ["a", "b", "a"]])}
    result = agreement(three)
    # Table rows (a,b): (2,1) (0,3) (2,1): P_i = 1/3, 1, 1/3 -> 5/9; p = (4/9, 5/9): P_e = 41/81;
    # kappa = (5/9 - 41/81) / (40/81) = 4/40 = 0.1.
    assert result["method"] == "fleiss" and result["kappa"] == pytest.approx(0.1)


ANNOTATIONS = [
    {"item": "q1", "rater": "ana", "a": "m1", "b": "m2", "winner": "a", "prompt": "Say hi",
     "response_a": "Hi!", "response_b": "Go away."},
    {"item": "q1", "rater": "bo", "a": "m2", "b": "m1", "winner": "m1", "prompt": "Say hi",
     "response_a": "Go away.", "response_b": "Hi!"},
    {"item": "q2", "rater": "ana", "a": "m1", "b": "m2", "winner": "tie", "prompt": "2+2?",
     "response_a": "4", "response_b": "four"},
    {"item": "q3", "rater": "ana", "a": "m1", "b": "m2", "winner": "b", "prompt": "Capital of France?",
     "response_a": "Lyon", "response_b": "Paris"},
    {"item": "q1", "rater": "ana", "system": "m1", "rating": 5, "criterion": "helpfulness"},
    {"item": "q1", "rater": "bo", "system": "m1", "rating": 4, "criterion": "helpfulness"},
]


def test_load_summarize_and_export(tmp_path):
    path = tmp_path / "ann.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in ANNOTATIONS) + "\n\n", encoding="utf-8")
    ann = load_annotations(path)
    assert len(ann.comparisons) == 4 and len(ann.ratings) == 2
    assert ann.comparisons[1].winner == "b"  # "m1" named as the winner is side b
    pairs = preference_pairs(ann.comparisons)
    assert pairs == [
        {"prompt": "Say hi", "chosen": "Hi!", "rejected": "Go away.", "item": "q1", "chosen_system": "m1",
         "rejected_system": "m2", "votes": [2, 0], "judgements": 2},
        {"prompt": "Capital of France?", "chosen": "Paris", "rejected": "Lyon", "item": "q3",
         "chosen_system": "m2", "rejected_system": "m1", "votes": [1, 0], "judgements": 1},
    ]  # the tie on q2 teaches nothing and is left out
    summary = summarize(ann)
    assert summary["win_rates"][0]["system"] == "m1" and summary["win_rates"][0]["win_rate"] == pytest.approx(2.5 / 4)
    assert summary["pairwise_agreement"]["method"] == "cohen"
    assert comparison_units(ann.comparisons)[("q1", "m1", "m2")] == {"ana": "m1", "bo": "m1"}
    assert set(summary["bradley_terry"]["ratings"]) == {"m1", "m2"}


@pytest.mark.parametrize("line,message", [
    ("{not json", "not valid JSON"),
    ('{"rater": "x", "rating": 3, "system": "m"}', "missing 'item'"),
    ('{"item": "q", "rating": "good", "system": "m"}', "must be a number"),
    ('{"item": "q", "a": "m1", "b": "m2", "winner": "c"}', "'winner' must be"),
    ('{"item": "q", "a": "m1", "winner": "a"}', "needs 'a' and 'b'"),
    ('{"item": "q", "text": "?"}', "neither"),
])
def test_malformed_annotations_are_user_errors(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"item": "ok", "rater": "r", "system": "m", "rating": 1}\n' + line + "\n", encoding="utf-8")
    with pytest.raises(LmforgeError, match=message) as info:
        load_annotations(path)
    assert ":2:" in str(info.value)
    with pytest.raises(LmforgeError, match="does not exist"):
        load_annotations(tmp_path / "missing.jsonl")
    with pytest.raises(LmforgeError, match="needs 'prompt'"):
        preference_pairs(games("A>B"))
