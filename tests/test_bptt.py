"""Truncated-BPTT training of the recurrent LMs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from lmforge.errors import LmforgeError
from lmforge.model.rnn import RecurrentLM, RNNConfig
from lmforge.train.bptt import BPTTConfig, rows_nll, stream_batches, train_bptt


def test_stream_batches_are_contiguous_pieces():
    batches = stream_batches(np.arange(103), 4)
    assert batches.shape == (4, 25)
    assert batches[1].tolist() == list(range(25, 50))
    with pytest.raises(LmforgeError, match="too few"):
        stream_batches(np.arange(5), 4)


def test_training_learns_a_pattern_and_writes_its_files(tmp_path):
    torch.manual_seed(0)
    pattern = np.tile(np.array([0, 3, 1, 4, 1, 5, 2, 6]), 400)  # after 1 comes 4 or 5: needs the token before
    model = RecurrentLM(RNNConfig(cell="lstm", vocab_size=8, embed_dim=16, hidden_size=16, num_layers=1, dropout=0.0))
    val = torch.from_numpy(pattern[:8 * 6].reshape(3, 16).astype(np.int64))
    before, count = rows_nll(model, val)
    report = train_bptt(model, pattern, val, BPTTConfig(out=str(tmp_path), batch_size=4, bptt=16, max_steps=80,
                                                        lr=1e-2, eval_interval=20, threads=1, progress=False))
    after, _ = rows_nll(model, val)
    assert count == 3 * 15
    assert before / count > 1.5
    assert after / count < 0.35  # a bigram model cannot go below 2/15 * ln 2 ~ 0.09 + the first-token guesses
    assert [c["step"] for c in report["validation"]] == [0, 20, 40, 60, 80]
    assert report["validation"][-1]["val_loss"] == pytest.approx(after / count, rel=1e-5)
    assert 80 * 4 * 15 <= report["tokens"] <= 80 * 4 * 16  # an epoch's last chunk may be shorter
    log = [json.loads(line) for line in (tmp_path / "logs" / "train.jsonl").read_text().splitlines()]
    assert sum(r["kind"] == "train" for r in log) == 80
    assert json.loads((tmp_path / "report.json").read_text())["steps"] == 80
    reloaded = RecurrentLM.load(tmp_path / "model")
    assert rows_nll(reloaded, val)[0] == pytest.approx(after, rel=1e-5)
    # Greedy continuation reproduces the pattern, including the choice after 1.
    assert model.generate([0, 3, 1], max_tokens=6, temperature=0) == [4, 1, 5, 2, 6, 0]


def test_config_errors(tmp_path):
    model = RecurrentLM(RNNConfig(vocab_size=8, embed_dim=4, hidden_size=4, num_layers=1))
    with pytest.raises(LmforgeError, match="bptt must be positive"):
        train_bptt(model, np.arange(8).repeat(10), None, BPTTConfig(out=str(tmp_path), bptt=0))
    with pytest.raises(LmforgeError, match="unknown schedule"):
        train_bptt(model, np.arange(8).repeat(10), None, BPTTConfig(out=str(tmp_path), schedule="step"))
