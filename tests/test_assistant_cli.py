"""`lmforge assistant`: data, configuration errors, and a missing router said clearly."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from lmforge.assistant.config import load_assistant_config
from lmforge.errors import LmforgeError

LMFORGE = [sys.executable, "-m", "lmforge"]


def _run(args, timeout=120):
    return subprocess.run(LMFORGE + args, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_data_writes_the_intent_splits(tmp_path):
    done = _run(["assistant", "data", "--out", str(tmp_path / "intents")])
    assert done.returncode == 0, done.stderr
    assert "train 1050, validation 280, test 420" in done.stdout
    info = json.loads((tmp_path / "intents" / "dataset.json").read_text())
    assert info["counts"]["test"]["abuse"] == 60


def test_ask_without_a_trained_router_says_how_to_train_one(tmp_path, capsys):
    from lmforge.cli import main

    # The command's entry point in this process (the real process start is checked by `data`):
    # an LmforgeError that escaped it would fail the test with its traceback.
    code = main(["assistant", "ask", "hello", "--router.path", str(tmp_path / "none"),
                 "--store.url", str(tmp_path / "s.db")])
    err = capsys.readouterr().err
    assert code == 1 and "lmforge assistant train-router" in err
    assert err.startswith("lmforge: error:") and err.count("\n") == 1 and not (tmp_path / "s.db").exists()


def test_configuration_is_checked(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("router:\n  max_error: 2\n")
    with pytest.raises(LmforgeError, match="router.max_error"):
        load_assistant_config(bad)
    bad.write_text("models:\n  strong_url: http://example.invalid/v1\n")
    with pytest.raises(LmforgeError, match="strong_url and models.strong_model"):
        load_assistant_config(bad)
    bad.write_text("nonsense:\n  x: 1\n")
    with pytest.raises(LmforgeError, match="unknown section"):
        load_assistant_config(bad)
    good = tmp_path / "good.yaml"
    good.write_text("prompts:\n  split: {support@1: 1, support@2: 3}\ntools:\n  allow: [get_order_status]\n")
    config = load_assistant_config(good, {"handoff.after_unclear": 3})
    assert config.prompts.split == {"support@1": 1.0, "support@2": 3.0} and config.handoff.after_unclear == 3


def test_flywheel_and_variants_read_the_store(tmp_path):
    from lmforge.assistant.conversations import ConversationStore
    from lmforge.assistant.db import open_database

    db = open_database(tmp_path / "s.db")
    store = ConversationStore(db)
    for variant, rating in (("support@1", -1), ("support@2", 1)):
        conv = store.start(variant=variant)
        store.add(conv, "user", "Do gift cards expire?")
        answer = store.add(conv, "assistant", "Yes.")
        store.rate(conv, answer, rating, correction="No, they never expire." if rating < 0 else None)
    db.close()
    done = _run(["assistant", "flywheel", "--store.url", str(tmp_path / "s.db"), "--out", str(tmp_path / "fw")])
    assert done.returncode == 0, done.stderr
    sft = [json.loads(x) for x in (tmp_path / "fw" / "sft.jsonl").read_text().splitlines()]
    pairs = [json.loads(x) for x in (tmp_path / "fw" / "preferences.jsonl").read_text().splitlines()]
    assert len(sft) == 2 and pairs[0]["chosen"] == "No, they never expire." and pairs[0]["rejected"] == "Yes."
    shown = _run(["assistant", "variants", "--store.url", str(tmp_path / "s.db"), "--json"])
    results = json.loads(shown.stdout)
    assert results["support@1"]["up_rate"] == 0.0 and results["support@2"]["up_rate"] == 1.0
