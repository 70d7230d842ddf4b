"""Hyperparameter search: the space file, seeded draws, rungs, successive halving whose promoted
trials continue from their checkpoints, random search, and an interrupted search that continues."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from lmforge.errors import LmforgeError
from lmforge.train.hpsearch import SearchOptions, parse_space, rungs, run_search, sample, trial_config

TINY = {"model.n_layer": 1, "model.n_embd": 32, "model.n_head": 4, "model.n_kv_head": 2,
        "model.intermediate_size": 64, "train.batch_size": 4, "train.eval_batches": 1, "train.sample_tokens": 0,
        "train.peak_tflops": 1.0, "train.threads": 1, "schedule.warmup_steps": 1, "train.max_steps": 8}
SPACE = {"optim.lr": {"log_uniform": [1e-4, 3e-2]}, "schedule": {"warmup_steps": {"int_uniform": [0, 2]}},
         "model.n_embd": {"choice": [16, 32]}}


def _base(data, **extra):
    from lmforge.train.recipe import load_recipe

    return load_recipe(None, {**TINY, "data.path": str(data), **extra})


def test_space_is_checked_and_draws_are_seeded():
    space = parse_space(SPACE)
    assert set(space) == {"optim.lr", "schedule.warmup_steps", "model.n_embd"}
    draws = [sample(space, 0, i) for i in range(200)]
    assert draws[:5] == [sample(space, 0, i) for i in range(5)]  # trial i does not depend on how many are drawn
    assert draws[0] != sample(space, 1, 0)
    lrs = [d["optim.lr"] for d in draws]
    assert all(1e-4 <= x <= 3e-2 for x in lrs)
    logs = sorted(math.log(x) for x in lrs)  # log-uniform: the median sits at the geometric middle
    assert abs(logs[100] - (math.log(1e-4) + math.log(3e-2)) / 2) < 0.6
    assert {d["schedule.warmup_steps"] for d in draws} == {0, 1, 2}
    assert {d["model.n_embd"] for d in draws} == {16, 32}
    for bad, message in [({"optim.lrr": {"uniform": [0, 1]}}, "not a recipe field"),
                         ({"optim.lr": {"gaussian": [0, 1]}}, "must be a table with one of"),
                         ({"optim.lr": {"log_uniform": [0, 1]}}, "low > 0"),
                         ({"optim.lr": {"uniform": [2, 1]}}, "low <= high"),
                         ({"train.batch_size": {"int_uniform": [1, 2.5]}}, "two integers"),
                         ({"train.max_steps": {"choice": [10, 20]}}, "set by the search itself"),
                         ({}, "names no recipe fields")]:
        with pytest.raises(LmforgeError, match=message):
            parse_space(bad)


def test_rungs_and_trial_configs(tiny_wordpiece_data, tmp_path):
    assert rungs(20, 180, 3) == [20, 60, 180]
    assert rungs(20, 100, 3) == [20, 60, 100]
    assert rungs(10, 10, 2) == [10]
    base = _base(tiny_wordpiece_data)
    config = trial_config(base, {"model.n_embd": 16, "optim.lr": 0.01}, tmp_path / "t", 30, 5)
    assert (config.model.n_embd, config.model.intermediate_size) == (16, 32)  # the MLP keeps its ratio
    assert (config.train.max_steps, config.train.eval_interval, config.optim.lr) == (30, 5, 0.01)
    assert base.model.n_embd == 32  # the base is left alone
    with pytest.raises(LmforgeError, match="not divisible"):
        trial_config(base, {"model.n_embd": 18}, tmp_path / "t", 30, 5)
    with pytest.raises(LmforgeError, match="eta >= 2"):
        SearchOptions(eta=1).validate()


def _train_records(run):
    return [json.loads(line) for line in (run / "logs" / "train.jsonl").read_text().splitlines()
            if json.loads(line)["kind"] == "train"]


@pytest.mark.slow
def test_successive_halving_promotes_the_best_and_continues_them(tiny_wordpiece_data, tmp_path):
    from lmforge.train.loop import pretrain

    base = _base(tiny_wordpiece_data)
    options = SearchOptions(method="halving", trials=4, eta=2, min_steps=2, max_steps=8, seed=3,
                            out=str(tmp_path / "search"))
    messages: list[str] = []
    result = run_search(base, options, SPACE, log=messages.append, progress=False)
    assert result["rungs"] == [2, 4, 8]
    reached = sorted(t["steps"] for t in result["trials"])
    assert reached == [2, 2, 4, 8]  # 4 trials, then the best 2, then the best 1
    rung0 = {t["trial"]: t["losses"]["2"] for t in result["trials"]}
    promoted = [t["trial"] for t in result["trials"] if t["steps"] >= 4]
    assert sorted(promoted) == sorted(sorted(rung0, key=rung0.get)[:2])  # the best half by validation loss
    best = result["best"]
    assert best["steps"] == 8 and best["status"] == "best"
    at_4 = {t["trial"]: t["losses"]["4"] for t in result["trials"] if "4" in t["losses"]}
    assert best["trial"] == min(at_4, key=at_4.get) and best["loss"] == best["losses"]["8"]
    assert result["steps_trained"] == 2 + 2 + 4 + 8 < result["steps_if_all_finished"] == 32

    # The winner went 0 -> 2, stopped, resumed 2 -> 4, stopped, resumed 4 -> 8: each step once, and
    # the same weights as one uninterrupted run of its configuration (a restart would differ).
    run = tmp_path / "search" / "trials" / f"{best['trial']:03d}"
    records = _train_records(run)
    assert [r["step"] for r in records] == list(range(1, 9))
    straight = trial_config(base, best["params"], tmp_path / "straight", 8, 2)
    report = pretrain(straight, progress=False)
    assert [r["loss"] for r in _train_records(tmp_path / "straight")] == [r["loss"] for r in records]
    assert report["validation"][-1]["val_loss"] == best["loss"]

    out = tmp_path / "search"
    csv_lines = (out / "trials.csv").read_text().splitlines()
    assert csv_lines[0].startswith("trial,model.n_embd,optim.lr,schedule.warmup_steps,val_loss@2")
    assert len(csv_lines) == 5
    assert "| best |" in (out / "hpsearch.md").read_text()
    assert (out / "plots" / "hpsearch.png").read_bytes()[:4] == b"\x89PNG"

    again: list[str] = []
    assert run_search(base, options, SPACE, log=again.append, progress=False)["best"] == best
    assert sum("(done before)" in m for m in again) == 7 and not any("(trained)" in m for m in again)
    with pytest.raises(LmforgeError, match="other settings"):
        run_search(base, SearchOptions(**{**options.__dict__, "seed": 4}), SPACE, progress=False)


def test_interrupted_search_continues_to_the_same_result(tiny_wordpiece_data, tmp_path, monkeypatch):
    import lmforge.train.hpsearch as hpsearch

    base = _base(tiny_wordpiece_data)
    options = SearchOptions(method="random", trials=3, max_steps=4, seed=1, out=str(tmp_path / "cut"))
    real, calls = hpsearch._train_to, []

    def dies_on_the_second_trial(config, stop):
        calls.append(config.train.out)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(config, stop)

    monkeypatch.setattr(hpsearch, "_train_to", dies_on_the_second_trial)
    with pytest.raises(KeyboardInterrupt):
        run_search(base, options, SPACE, log=lambda _m: None, progress=False)
    monkeypatch.setattr(hpsearch, "_train_to", real)
    messages: list[str] = []
    result = run_search(base, options, SPACE, log=messages.append, progress=False)
    assert sum("(done before)" in m for m in messages) == 1 and sum("(trained)" in m for m in messages) == 2
    assert all(t["steps"] == 4 and t["status"] in ("best", "finished") for t in result["trials"])
    fresh = run_search(base, SearchOptions(**{**options.__dict__, "out": str(tmp_path / "whole")}), SPACE,
                       log=lambda _m: None, progress=False)
    assert [t["loss"] for t in fresh["trials"]] == [t["loss"] for t in result["trials"]]


def test_cli_reports_mistakes_in_one_line(tmp_path):
    space = tmp_path / "space.toml"
    space.write_text('"optim.lr" = { log_uniform = [1e-4 }\n')
    result = subprocess.run([sys.executable, "-m", "lmforge", "hpsearch", "--space", str(space)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "not valid TOML" in result.stderr and "Traceback" not in result.stderr
    result = subprocess.run([sys.executable, "-m", "lmforge", "hpsearch"], capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "--space" in result.stderr and "Traceback" not in result.stderr
