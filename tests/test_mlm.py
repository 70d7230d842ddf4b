"""Masked-LM pretraining: BERT's masking rule, the encoder + head against transformers'
BertForMaskedLM, and training through the pretraining loop (learning, exact resume, layout)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lmforge.errors import LmforgeError
from lmforge.train.loss import IGNORE_INDEX
from lmforge.train.mlm import Masker, masked_lm_loss, word_start_table

SPECIAL = [0, 1, 2, 3, 4]  # [PAD] [UNK] [CLS] [SEP] [MASK]
MASK = 4

TINY_MLM = {"objective.name": "mlm", "model.family": "bert", "model.n_layer": 2, "model.n_embd": 32,
            "model.n_head": 4, "model.intermediate_size": 64, "train.batch_size": 8, "train.eval_batches": 2,
            "train.sample_tokens": 0, "train.peak_tflops": 1.0, "train.plots": False, "train.log_interval": 1,
            "schedule.warmup_steps": 2, "optim.lr": 3e-3, "train.threads": 1}


def _rows(n=400, length=64, vocab=500, seed=0):
    rng = np.random.default_rng(seed)
    rows = rng.integers(5, vocab, size=(n, length))
    rows[:, 0] = 2  # [CLS]
    rows[:, length // 2] = 3  # a [SEP] inside every row
    rows[:, -4:] = 0  # padding
    return rows


def test_masking_follows_berts_rule():
    rows = _rows()
    masker = Masker(MASK, 500, SPECIAL)
    rngs = [np.random.default_rng([0, i]) for i in range(len(rows))]
    inputs, labels = masker(rows, rngs)
    chosen = labels != IGNORE_INDEX
    ordinary = ~np.isin(rows, SPECIAL)
    assert not (chosen & ~ordinary).any()  # special tokens are never chosen
    assert (labels[chosen] == rows[chosen]).all()  # the targets are the original tokens
    assert (inputs[~chosen] == rows[~chosen]).all()  # nothing else changes
    per_row = ordinary.sum(1)
    assert (chosen.sum(1) == np.round(0.15 * per_row)).all()  # exactly 15% of each row's candidates
    n = chosen.sum()
    masked = (inputs == MASK) & chosen
    kept = (inputs == rows) & chosen
    randomized = chosen & ~masked & ~kept
    assert abs(masked.sum() / n - 0.8) < 0.03
    assert abs(randomized.sum() / n - 0.1) < 0.025  # (a random token equal to the original counts as kept)
    assert abs(kept.sum() / n - 0.1) < 0.025
    assert not np.isin(inputs[randomized], SPECIAL).any()  # random replacements are ordinary tokens
    again, _ = masker(rows, [np.random.default_rng([0, i]) for i in range(len(rows))])
    assert (again == inputs).all()  # a pure function of the seeds
    other, _ = masker(rows, [np.random.default_rng([1, i]) for i in range(len(rows))])
    assert (other != inputs).any()


def test_fractions_and_errors():
    rows = _rows(50)
    all_mask, labels = Masker(MASK, 500, SPECIAL, mask_fraction=1.0, random_fraction=0.0)(
        rows, [np.random.default_rng(i) for i in range(50)])
    assert (all_mask[labels != IGNORE_INDEX] == MASK).all()
    only_special = np.full((1, 8), 3)
    inputs, labels = Masker(MASK, 500, SPECIAL)(only_special, [np.random.default_rng(0)])
    assert (labels == IGNORE_INDEX).all() and (inputs == only_special).all()
    with pytest.raises(LmforgeError, match="fractions"):
        Masker(MASK, 500, SPECIAL, mask_fraction=0.8, random_fraction=0.3)


def test_whole_word_masking_takes_every_piece_of_a_word():
    from lmforge.train.data import bert_wordpiece

    text = "unbelievably misunderstood encyclopedias were reorganized yesterday " * 3
    tok = bert_wordpiece([text, "the cat sat on the mat and was happy"] * 20, 60)
    ids = tok.encode(text * 4, add_special_tokens=True)
    starts = word_start_table(tok)
    pieces = tok.ids_to_tokens(ids)
    assert any(p.startswith("##") for p in pieces)  # the words really are split
    row = np.array([ids])
    masker = Masker(tok.token_to_id("[MASK]"), tok.vocab_size, sorted(tok.special_ids), word_starts=starts)
    for seed in range(5):
        _, labels = masker(row, [np.random.default_rng(seed)])
        chosen = labels[0] != IGNORE_INDEX
        word = np.cumsum([starts[i] for i in ids])  # word number of every piece
        for w in set(word[chosen]):
            ordinary = [k for k in range(len(ids)) if word[k] == w and ids[k] not in tok.special_ids]
            assert chosen[ordinary].all()  # a chosen word is chosen whole
        n_words = len({w for k, w in enumerate(word) if ids[k] not in tok.special_ids})
        assert len(set(word[chosen])) == round(0.15 * n_words)


def _tiny_masked_lm(vocab=120):
    from lmforge.model.masked_lm import MaskedLM, bert_config

    torch.manual_seed(0)
    model = MaskedLM(bert_config(vocab, n_layer=2, n_embd=32, n_head=4, intermediate_size=64,
                                 max_position_embeddings=40))
    with torch.no_grad():  # a trained-looking head (fresh biases are zeros, LayerNorm the identity)
        for p in model.mlm_head.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return model.eval()


def test_masked_lm_matches_transformers_and_round_trips(tmp_path):
    from transformers import BertForMaskedLM

    from lmforge.model.loading import load_model
    from lmforge.model.masked_lm import load_masked_lm, save_masked_lm
    from lmforge.model.registry import resolve

    model = _tiny_masked_lm()
    ids = torch.randint(5, 120, (3, 17))
    mask = torch.ones_like(ids)
    mask[1, 12:] = 0
    out = save_masked_lm(model, tmp_path / "m")
    with torch.no_grad():
        ours = model(ids, mask)
        reference = BertForMaskedLM.from_pretrained(out).eval()(input_ids=ids, attention_mask=mask).logits
        torch.testing.assert_close(ours[mask.bool()], reference[mask.bool()], atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(load_masked_lm(out)(ids, mask), ours, atol=0, rtol=0)
        body = load_model(resolve(str(out)), need_lm_head=False)  # what the task heads fine-tune
        torch.testing.assert_close(body.encode(ids, mask), model.encode(ids, mask), atol=0, rtol=0)
    assert json.loads((out / "config.json").read_text())["architectures"] == ["BertForMaskedLM"]
    with pytest.raises(LmforgeError, match="already exists"):
        save_masked_lm(model, out)


def test_loss_is_cross_entropy_at_the_masked_positions_only():
    model = _tiny_masked_lm()
    ids = torch.randint(5, 120, (2, 12))
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[0, 3], labels[1, 7], labels[1, 9] = 11, 12, 13
    loss, right = masked_lm_loss(model, ids, labels)
    with torch.no_grad():
        logits = model(ids)
    expected = F.cross_entropy(logits.reshape(-1, 120), labels.reshape(-1), reduction="sum")
    torch.testing.assert_close(loss.detach(), expected, atol=1e-5, rtol=1e-5)
    chosen = labels != IGNORE_INDEX
    assert float(right) == float((logits[chosen].argmax(-1) == labels[chosen]).sum())

    from lmforge.train.mlm import accuracy_by_corruption

    ids[0, 3], ids[1, 7], ids[1, 9] = MASK, 12, 14  # targets 11, 12, 13: one [MASK], one kept, one random
    b = accuracy_by_corruption(model, ids, labels, MASK)
    assert b["targets"] == 3 and b["mask_share"] == b["kept_share"] == b["random_share"] == pytest.approx(1 / 3)
    assert b["accuracy"] == pytest.approx((b["mask_accuracy"] + b["kept_accuracy"] + b["random_accuracy"]) / 3)


def _run(data, out, resume=False, **options):
    from lmforge.train.loop import pretrain
    from lmforge.train.recipe import load_recipe

    config = load_recipe(None, {**TINY_MLM, "data.path": str(data), "train.out": str(out), **options})
    return pretrain(config, resume=resume, progress=False)


def _log(out):
    return [json.loads(line) for line in (out / "logs" / "train.jsonl").read_text().splitlines()]


def test_mlm_run_learns_resumes_exactly_and_saves_a_masked_lm(tiny_wordpiece_data, tmp_path):
    from transformers import BertForMaskedLM

    from lmforge.model.masked_lm import load_masked_lm

    steps = {"train.max_steps": 24, "train.eval_interval": 6, "train.save_interval": 6}
    report = _run(tiny_wordpiece_data, tmp_path / "straight", **steps)
    evals = report["validation"]
    assert report["title"] == "Masked-LM pretraining run" and report["model"]["family"] == "bert"
    # It learns: a uniform guess costs ln V; the tokens' frequencies come first in so few steps.
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] - 0.2
    assert evals[-1]["val_loss"] < np.log(report["model"]["vocab_size"]) - 0.4
    assert evals[-1]["masked_accuracy"] > 5 / report["model"]["vocab_size"]
    assert evals[-1]["masked_tokens"] == evals[0]["masked_tokens"] > 0  # the same held-out masks every time
    assert all(0 <= e["accuracy_at_mask"] <= 1 for e in evals)
    train = [r for r in _log(tmp_path / "straight") if r["kind"] == "train"]
    assert all(0 <= r["masked_accuracy"] <= 1 for r in train)

    # stopped at step 12 and resumed: the same losses as the uninterrupted run, to the last bit
    _run(tiny_wordpiece_data, tmp_path / "resumed", **steps, **{"train.stop_at_step": 12})
    assert (tmp_path / "resumed" / "checkpoints" / "step-0000012" / "mlm_head.safetensors").is_file()
    _run(tiny_wordpiece_data, tmp_path / "resumed", resume=True, **steps)
    straight = {r["step"]: r["loss"] for r in train}
    resumed = {r["step"]: r["loss"] for r in _log(tmp_path / "resumed") if r["kind"] == "train"}
    assert resumed == straight

    model_dir = tmp_path / "straight" / "model"
    ours = load_masked_lm(model_dir)
    ids = torch.randint(5, ours.config.vocab_size, (2, 20))
    with torch.no_grad():
        reference = BertForMaskedLM.from_pretrained(model_dir).eval()(input_ids=ids).logits
        torch.testing.assert_close(ours(ids), reference, atol=5e-5, rtol=1e-4)
    roles = json.loads((model_dir / "tokenizer_config.json").read_text())
    assert roles["mask_token"] == "[MASK]" and roles["cls_token"] == "[CLS]"


def test_mlm_recipe_mistakes_end_in_one_message(tiny_wordpiece_data, tmp_path):
    from lmforge.train.recipe import load_recipe

    with pytest.raises(LmforgeError, match="objective.name must be causal or mlm"):
        load_recipe(None, {"objective.name": "mlm2"})
    with pytest.raises(LmforgeError, match="mask_probability"):
        load_recipe(None, {"objective.mask_probability": 1.5})
    with pytest.raises(LmforgeError, match="model.family: bert"):
        _run(tiny_wordpiece_data, tmp_path / "llama", **{"model.family": "llama", "train.max_steps": 2})

    from lmforge.train.data import ensure_dataset
    from lmforge.train.recipe import DataSection

    bpe = tmp_path / "bpe"  # byte-level BPE: no [MASK] token
    ensure_dataset(DataSection(path=str(bpe), sources=["news"], tokenizer_vocab_size=300, seq_len=32, max_docs=20),
                   log=lambda _m: None)
    with pytest.raises(LmforgeError, match=r"needs a tokenizer with a \[MASK\] token"):
        _run(bpe, tmp_path / "bpe-run", **{"train.max_steps": 2})


@pytest.mark.slow
def test_two_processes_match_one(tiny_wordpiece_data, tmp_path):
    """torchrun, 2 processes x batch 4 under DDP = one process x batch 8: the masks are drawn by
    stream position, so both see the same corrupted rows; losses, masked accuracy and the held-out
    figures agree to float32 rounding."""
    import os
    import subprocess
    import sys

    steps = {"train.max_steps": 6, "train.eval_interval": 3, "train.save_interval": 3}
    single = _run(tiny_wordpiece_data, tmp_path / "one", **steps)
    options = {**TINY_MLM, **steps, "data.path": str(tiny_wordpiece_data), "train.out": str(tmp_path / "two"),
               "train.batch_size": 4, "train.distributed": "ddp"}
    flags = [arg for key, value in options.items() for arg in (f"--{key}", str(value))]
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             "-m", "lmforge", "pretrain", "--quiet", *flags], capture_output=True, text=True,
                            timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    one = [r for r in _log(tmp_path / "one") if r["kind"] == "train"]
    two = [r for r in _log(tmp_path / "two") if r["kind"] == "train"]
    assert [r["step"] for r in two] == list(range(1, 7))
    for a, b in zip(one, two):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5, abs=1e-5)
        assert b["masked_accuracy"] == pytest.approx(a["masked_accuracy"], abs=1e-6)
    evals = [r for r in _log(tmp_path / "two") if r["kind"] == "eval"]
    for a, b in zip(single["validation"], evals):
        assert b["val_loss"] == pytest.approx(a["val_loss"], rel=1e-5)
        assert b["masked_tokens"] == a["masked_tokens"]
