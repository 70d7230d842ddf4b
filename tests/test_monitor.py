"""Monitoring without a server: the drift statistics on constructed distributions, the drift
monitor's alerts and cool-down, golden-set scoring and regression flags, recent activity."""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from lmforge.errors import LmforgeError
from lmforge.monitor.activity import Price, RecentActivity, parse_prices, percentile
from lmforge.monitor.config import DriftOptions, GoldenOptions
from lmforge.monitor.drift import DriftMonitor, assign, kmeans, mmd_test, psi
from lmforge.monitor.golden import (GoldenItem, compare, metric_score, read_golden, score_item, sign_flip_p_value,
                                    summarize)
from lmforge.monitor.questions import TOPICS, questions


# ---- MMD and PSI --------------------------------------------------------------------------------

def brute_force_mmd2(x, y, s):
    k = lambda a, b: math.exp(-float(((a - b) ** 2).sum()) / (2 * s * s))  # noqa: E731
    n, m = len(x), len(y)
    xx = sum(k(x[i], x[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(a, b) for a in x for b in y) / (n * m)
    return xx + yy - 2 * xy


def test_mmd_statistic_equals_the_formula_and_uses_the_median_distance():
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(7, 3)), rng.normal(0.5, 1.0, size=(9, 3))
    result = mmd_test(x, y, permutations=20)
    pooled = np.concatenate([x, y])
    distances = [np.linalg.norm(a - b) for i, a in enumerate(pooled) for b in pooled[i + 1:]]
    assert result.bandwidth == pytest.approx(float(np.median(distances)))
    assert result.mmd2 == pytest.approx(brute_force_mmd2(x, y, result.bandwidth), rel=1e-9)
    assert mmd_test(x, y, permutations=20, bandwidth=0.7).mmd2 == pytest.approx(brute_force_mmd2(x, y, 0.7), rel=1e-9)


def test_mmd_p_value_high_for_the_same_distribution_low_for_a_shift():
    rng = np.random.default_rng(0)
    same = [mmd_test(rng.normal(size=(60, 8)), rng.normal(size=(60, 8)), permutations=199, seed=i).p_value
            for i in range(5)]
    assert min(same) > 0.01 and np.mean(same) > 0.2
    shifted = mmd_test(rng.normal(size=(60, 8)), rng.normal(0.6, 1.0, size=(60, 8)), permutations=199)
    assert shifted.p_value == pytest.approx(1 / 200) and shifted.mmd2 > 0.05


def test_psi_values():
    assert psi([30, 30, 40], [30, 30, 40]) == 0.0
    assert psi([50, 50], [0.9, 0.1]) == pytest.approx(0.4 * math.log(1.8) + (-0.4) * math.log(0.2))
    assert psi([10, 0], [5, 5]) == pytest.approx(-0.5 * math.log(0.5) + (0.5 - 1e-4) * math.log(0.5 / 1e-4))
    with pytest.raises(LmforgeError, match="same bins"):
        psi([1, 2], [1, 2, 3])


def test_kmeans_finds_separated_groups():
    rng = np.random.default_rng(0)
    centres = np.array([[0, 0], [10, 0], [0, 10]])
    points = np.concatenate([c + rng.normal(0, 0.5, size=(40, 2)) for c in centres])
    found = kmeans(points, 3)
    assert sorted(np.round(found).astype(int).tolist()) == sorted(centres.tolist())
    labels = assign(points, found)
    assert all(len(set(labels[i * 40:(i + 1) * 40])) == 1 for i in range(3))


# ---- the monitor ---------------------------------------------------------------------------------

class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def shifted_vectors(rng, n, shift=0.0):
    return rng.normal(size=(n, 6)) + shift


def test_monitor_same_distribution_stays_quiet():
    rng = np.random.default_rng(3)
    monitor = DriftMonitor(DriftOptions(window=80, reference_size=80, check_every=40, clusters=4, permutations=199))
    assert monitor.feed_vectors(shifted_vectors(rng, 80)) is None  # all of it became the reference
    assert monitor.reference is not None and monitor.state.checks == 0
    for _ in range(4):
        monitor.feed_vectors(shifted_vectors(rng, 40))
    s = monitor.state
    assert s.checks == 3 and s.window == 80  # a check once the window filled, then every 40
    assert s.psi < 0.25 and s.mmd_p_value > 0.01 and s.drifting == {"mmd": False, "psi": False}
    assert s.alerts == {"mmd": 0, "psi": 0} and sum(s.window_shares) == pytest.approx(1.0, abs=1e-3)


def test_monitor_alerts_on_a_shift_once_per_cooldown(caplog):
    rng = np.random.default_rng(4)
    clock = FakeClock()
    registry = CollectorRegistry()
    monitor = DriftMonitor(DriftOptions(window=150, reference_size=150, check_every=50, clusters=4, permutations=199,
                                        cooldown_seconds=100), registry=registry, clock=clock)
    monitor.set_reference(shifted_vectors(rng, 150))
    with caplog.at_level("WARNING", logger="lmforge.monitor"):
        state = monitor.feed_vectors(shifted_vectors(rng, 150, shift=1.5))
    assert state.drifting == {"mmd": True, "psi": True} and state.alerted_now == ["mmd", "psi"]
    shifted_psi, first = state.psi, state
    assert [json.loads(r.message)["drift_alert"] for r in caplog.records] == ["mmd", "psi"]
    clock.now = 50  # within the cool-down: still drifting, no new alert
    state = monitor.feed_vectors(shifted_vectors(rng, 50, shift=1.5))
    assert state.drifting["mmd"] and state.alerted_now == [] and state.alerts == {"mmd": 1, "psi": 1}
    clock.now = 120
    state = monitor.feed_vectors(shifted_vectors(rng, 50, shift=1.5))
    assert state.alerted_now == ["mmd", "psi"] and state.alerts == {"mmd": 2, "psi": 2}
    assert first.alerts == {"mmd": 1, "psi": 1} and first.checks == 1  # an earlier state stays as it was
    value = registry.get_sample_value
    assert value("lmforge_drift_alerts_total", {"test": "mmd"}) == 2
    assert value("lmforge_drift_alert", {"test": "psi"}) == 1
    assert value("lmforge_drift_psi") == pytest.approx(state.psi)
    assert value("lmforge_drift_mmd_p_value") == pytest.approx(state.mmd_p_value)
    monitor.set_reference(shifted_vectors(rng, 150, shift=1.5))  # a new normal: the window starts over
    state = monitor.feed_vectors(shifted_vectors(rng, 150, shift=1.5))
    assert state.drifting == {"mmd": False, "psi": False} and state.psi < shifted_psi / 5


def test_monitor_feeds_texts_through_the_embedder():
    seen = []

    def embed(texts):
        seen.extend(texts)
        return np.array([[len(t), t.count("a")] for t in texts], dtype=float)

    monitor = DriftMonitor(DriftOptions(window=4, reference_size=4, check_every=4, clusters=2, permutations=20, mmd_alpha=0.1),
                           embed=embed)
    monitor.feed(["aa", "", "bbb", "a", "cc", "   "])  # blank questions are skipped
    assert seen == ["aa", "bbb", "a", "cc"] and monitor.reference.shape == (4, 2)


def test_drift_options_are_checked():
    with pytest.raises(LmforgeError, match="window"):
        DriftOptions(window=0)
    with pytest.raises(LmforgeError, match="clusters"):
        DriftOptions(reference_size=10, clusters=20)
    with pytest.raises(LmforgeError, match="mmd-alpha"):
        DriftOptions(mmd_alpha=1.5)
    with pytest.raises(LmforgeError, match="at least 100 permutations"):
        DriftOptions(permutations=99, mmd_alpha=0.01)


def test_generated_questions():
    a = questions(50, random.Random(7), shift_share=0.3)
    assert a == questions(50, random.Random(7), shift_share=0.3) and len(set(a)) > 40
    privacy_phrases = ("breach", "data", "phishing", "hackers", "leak", "GDPR", "security")
    shifted = [q for q in a if any(p in q for p in privacy_phrases) and "delete my account" not in q]
    assert 13 <= len(shifted) <= 17
    assert set(TOPICS) >= {"shipping", "returns", "billing", "account", "technical", "privacy"}


# ---- golden sets ---------------------------------------------------------------------------------

def test_golden_scores():
    o = GoldenOptions()
    assert metric_score("Paris!", "paris", "exact") == 1.0 and metric_score("It is Paris.", "Paris", "exact") == 0.0
    assert metric_score("The capital is Paris.", "paris", "contains") == 1.0
    assert metric_score("Parisian food", "paris", "contains") == 0.0  # whole words only
    assert metric_score("the cat sat on the mat", "the cat lay on the mat", "rougeL") == pytest.approx(5 / 6)
    item = GoldenItem("a", "q", expected="30 days", checks=[{"not_contains": "sorry"}, {"regex": r"\breturn"}])
    good = score_item(item, "You can return it within 30 days.", o)
    assert good["score"] == 1.0 and good["passed"] and good["checks_failed"] == []
    bad = score_item(item, "Sorry, 14 days.", o)
    assert bad["score"] == 0.0 and not bad["passed"] and len(bad["checks_failed"]) == 2
    half = score_item(GoldenItem("b", "q", checks=[{"contains": "refund"}, {"contains": "label"}]), "A refund.", o)
    assert half["score"] == 0.5 and half["passed"]  # pass_score 0.5


def test_golden_file_errors(tmp_path):
    path = tmp_path / "golden.jsonl"
    cases = {'{"question": ""}': "non-empty", '{"question": "q"}': "needs",
             '{"question": "q", "expected": "x", "metric": "bleu"}': "unknown metric",
             '{"question": "q", "checks": [{"regex": "("}]}': "checks",
             '{"question": "q", "expected": "x", "answer": "y"}': "unknown field",
             '{"id": 1, "question": "q", "expected": "x"}\n{"id": 1, "question": "r", "expected": "x"}': "twice",
             "not json": "golden.jsonl:1"}
    for text, message in cases.items():
        path.write_text(text + "\n")
        with pytest.raises(LmforgeError, match=message):
            read_golden(path)
    path.write_text('{"question": "q", "expected": "x"}\n\n{"id": "b", "question": "r", "checks": [{"contains": "y"}]}\n')
    items = read_golden(path)
    assert [i.id for i in items] == ["1", "b"]


def run_of(scores, name):
    records = [{"id": str(i), "question": f"q{i}", "answer": f"a{i}", "score": s, "passed": s >= 0.5, "seconds": 0.1}
               for i, s in enumerate(scores)]
    return {"format": "lmforge-golden-run/1", "name": name, "items": records, "summary": summarize(records)}


def test_golden_comparison_flags_items_and_overall_regressions():
    base = run_of([1.0] * 30, "before")
    same = compare(base, run_of([1.0] * 30, "after"))
    assert not same["regressed"] and same["regressed_items"] == [] and same["p_value"] == 1.0
    one = compare(base, run_of([1.0] * 29 + [0.0], "after"))
    assert one["regressed_items"] == ["29"] and not one["regressed"]  # one item may be luck
    assert one["interval"][1] == 0.0 and one["mean_delta"] == pytest.approx(-1 / 30, abs=1e-6)
    many = compare(base, run_of([0.0] * 8 + [0.9] * 2 + [1.0] * 20, "after"))
    assert many["regressed"] and many["interval"][1] < 0 and many["p_value"] < 0.01
    assert many["regressed_items"] == [str(i) for i in range(8)]  # 0.9 is within the item tolerance
    assert many["pass_rate"] == {"baseline": 1.0, "candidate": pytest.approx(22 / 30, abs=1e-6)}
    better = compare(run_of([0.0] * 10, "a"), run_of([1.0] * 10, "b"))
    assert not better["regressed"] and better["improved_items"] == [str(i) for i in range(10)]
    with pytest.raises(LmforgeError, match="share no item"):
        compare(run_of([1.0], "a"), {"items": [{"id": "x", "score": 1.0}]})


def test_golden_comparison_rescores_with_the_current_expectations():
    items = [GoldenItem("0", "q", expected="a0"), GoldenItem("1", "q", expected="fixed")]
    base, cand = run_of([1.0, 1.0], "a"), run_of([1.0, 1.0], "b")
    report = compare(base, cand, items=items)
    assert report["mean_score"] == {"baseline": 0.5, "candidate": 0.5}  # item 1's stored answers miss "fixed"
    assert report["regressed_items"] == []


def test_sign_flip_p_value():
    assert sign_flip_p_value([0.0, 0.0]) == 1.0
    assert sign_flip_p_value([-1.0] * 12, permutations=1999) == pytest.approx(1 / 1000, abs=2e-3)
    assert sign_flip_p_value([1.0, -1.0] * 6) == 1.0


# ---- activity and prices -------------------------------------------------------------------------

def test_recent_activity_buckets_and_percentiles():
    clock = FakeClock()
    clock.now = 1000.0
    activity = RecentActivity(seconds=180, bucket_seconds=60, clock=clock)
    for seconds in (0.1, 0.2, 0.3, 0.4):
        activity.record_request(200, seconds)
    activity.record_request(503, 1.0)
    activity.record_generation(ttft=0.05, prompt_tokens=10, completion_tokens=20, cost=0.002, refusal=True,
                               failed=False)
    clock.now = 1070.0
    activity.record_request(429, 0.01)
    activity.record_generation(ttft=0.15, prompt_tokens=5, completion_tokens=30, cost=0.001, refusal=False,
                               failed=False)
    snap = activity.snapshot()
    assert [b["time"] for b in snap["series"]] == [960.0, 1020.0]
    assert snap["series"][0]["latency_p50"] == pytest.approx(0.3) and snap["series"][0]["server_errors"] == 1
    assert snap["series"][1]["tokens_per_second"] == pytest.approx(0.5)
    t = snap["totals"]
    assert t["requests"] == 6 and t["error_rate"] == pytest.approx(1 / 6) and t["client_error_rate"] == pytest.approx(1 / 6)
    assert t["refusal_rate"] == 0.5 and t["cost"] == pytest.approx(0.003) and t["ttft_p50"] == pytest.approx(0.1)
    clock.now = 1200.0  # the first bucket is older than 180 s now
    assert [b["time"] for b in activity.snapshot()["series"]] == [1020.0, 1200.0]
    assert percentile([], 0.5) is None and percentile([3.0, 1.0, 2.0], 1.0) == 3.0


def test_prices():
    prices = parse_prices(["tiny=0.5,1.5", "*=0.1"])
    assert prices == {"tiny": Price(0.5, 1.5), "*": Price(0.1, 0.1)}
    assert prices["tiny"].cost(1000, 2000) == pytest.approx(3.5)
    for bad in ["tiny", "=1", "tiny=x", "tiny=1,2,3", "tiny=-1"]:
        with pytest.raises(LmforgeError, match="MODEL=PROMPT"):
            parse_prices([bad])
