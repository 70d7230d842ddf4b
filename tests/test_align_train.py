"""Training runs on preference pairs: a tiny DPO run and a tiny reward-model run learn their
pairs; the CLI writes data, reads recipes and flags, and refuses bad input with one message."""

from __future__ import annotations

import json

import pytest
import torch

from lmforge.align.config import DPOConfig, PreferenceLossConfig, RewardConfig, config_from_dict
from lmforge.align.preference_data import PreferenceDataConfig, generate_pairs
from lmforge.cli import main
from lmforge.errors import LmforgeError
from lmforge.model.config import ModelConfig
from lmforge.model.transformer import Transformer


@pytest.fixture(scope="module")
def tokenizer():
    from lmforge.model.loading import resolve_tokenizer

    return resolve_tokenizer(None)


@pytest.fixture(scope="module")
def pairs():
    splits = generate_pairs(PreferenceDataConfig(seed=0, arithmetic=40, format=0, json=0, harmful=0, benign=0, bias=0))
    return splits["train"][:12]


def _tiny(tokenizer, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(ModelConfig(vocab_size=tokenizer.vocab_size, n_embd=32, n_head=4, n_layer=1,
                                   intermediate_size=64, tie_word_embeddings=True))


def _tiny_config(cls, tmp_path, **kw):
    base = dict(out=str(tmp_path / "run"), max_steps=12, batch_size=4, lr=3e-3, warmup_steps=1, eval_interval=12,
                max_length=48, save=False, plots=False, threads=1)
    return cls(**(base | kw))


@pytest.mark.slow
def test_tiny_dpo_run_learns_its_pairs(tmp_path, tokenizer, pairs):
    config = _tiny_config(DPOConfig, tmp_path, loss=PreferenceLossConfig(beta=0.5))
    from lmforge.align.train import train_dpo

    report = train_dpo(config, _tiny(tokenizer), tokenizer, {"train": pairs, "validation": pairs}, progress=False)
    start, end = report["heldout_start"], report["heldout_end"]
    assert start["reward_accuracy"] == 0.0 and start["reward_margin"] == 0.0  # policy == reference at step 0
    assert end["loss"] < start["loss"] - 0.1
    assert end["logp_accuracy"] > start["logp_accuracy"]
    assert end["reward_accuracy"] >= 0.75 and end["reward_margin"] > 0
    log = [json.loads(line) for line in (tmp_path / "run" / "logs" / "train.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if r["kind"] == "train"] == list(range(1, 13))
    assert (tmp_path / "run" / "report.md").read_text().startswith("# DPO run")


@pytest.mark.slow
def test_tiny_reward_run_and_its_saved_model(tmp_path, tokenizer, pairs):
    from lmforge.align.reward import encode_for_reward, load_reward_model, score_rows
    from lmforge.align.train import train_reward

    config = _tiny_config(RewardConfig, tmp_path, save=True, max_length=96)
    report = train_reward(config, _tiny(tokenizer), tokenizer, {"train": pairs, "validation": pairs}, progress=False)
    assert report["heldout_end"]["reward_accuracy"] > report["heldout_start"]["reward_accuracy"]
    assert report["heldout_end"]["loss"] < report["heldout_start"]["loss"]
    model = load_reward_model(report["model"])
    rows = [encode_for_reward(tokenizer, p["prompt"], side, 96) for p in pairs for side in (p["chosen"], p["rejected"])]
    rewards = score_rows(model, rows, tokenizer.pad_id)
    accuracy = float((rewards[0::2] > rewards[1::2]).float().mean())
    assert accuracy == pytest.approx(report["heldout_end"]["reward_accuracy"])


def test_recipe_keys_are_checked():
    with pytest.raises(LmforgeError, match="unknown recipe key"):
        config_from_dict(DPOConfig, {"max_stepz": 3})
    with pytest.raises(LmforgeError, match="loss"):
        config_from_dict(DPOConfig, {"loss": {"betta": 1}})
    with pytest.raises(LmforgeError, match="unknown pair kind"):
        config_from_dict(DPOConfig, {"kinds": ["poetry"]})
    config = config_from_dict(DPOConfig, {"loss": {"loss_type": "ipo", "beta": 0.5}, "kinds": "arithmetic,json"})
    assert config.loss.loss_type == "ipo" and config.kinds == ["arithmetic", "json"]
    with pytest.raises(LmforgeError, match="max_steps"):
        DPOConfig(max_steps=0).validate()


def test_cli_data_and_errors(tmp_path, capsys):
    assert main(["align", "data", str(tmp_path / "pairs"), "--arithmetic", "20", "--format", "0", "--json", "0",
                 "--harmful", "5", "--benign", "0", "--bias", "0"]) == 0
    lines = (tmp_path / "pairs" / "train.jsonl").read_text().splitlines()
    assert lines and {json.loads(x)["kind"] for x in lines} <= {"arithmetic", "harmful"}
    assert "train:" in capsys.readouterr().out
    # Flags override a recipe; the recipe's loss section survives unless a loss flag is given.
    recipe = tmp_path / "r.yaml"
    recipe.write_text("max_steps: 7\nloss: {beta: 0.3, loss_type: ipo}\n")
    assert main(["align", "dpo", str(recipe), "--print-config", "--max-steps", "9", "--label-smoothing", "0.1"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["max_steps"] == 9 and shown["loss"] == {**shown["loss"], "beta": 0.3, "loss_type": "ipo",
                                                         "label_smoothing": 0.1}
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "train.jsonl").write_text('{"prompt": "p", "chosen": "x", "rejected": "x"}\n')
    assert main(["align", "dpo", "--data", str(bad), "--model", str(tmp_path / "absent")]) == 1
    assert main(["align", "dpo", "--kinds", "poetry"]) == 1
    err = capsys.readouterr().err
    assert "unknown pair kind" in err and "Traceback" not in err


@pytest.mark.slow
def test_cli_dpo_end_to_end(tmp_path, tokenizer, capsys):
    from lmforge.model.checkpoint import save_hf_model

    save_hf_model(_tiny(tokenizer), tmp_path / "tiny", tokenizer)
    data = tmp_path / "pairs"
    assert main(["align", "data", str(data), "--arithmetic", "40", "--format", "0", "--json", "0", "--harmful", "0",
                 "--benign", "0", "--bias", "0"]) == 0
    capsys.readouterr()
    (data / "train.jsonl").write_text("".join((data / "train.jsonl").read_text().splitlines(True)[:8]))
    assert main(["align", "dpo", "--model", str(tmp_path / "tiny"), "--data", str(data), "--out", str(tmp_path / "run"),
                 "--max-steps", "4", "--eval-interval", "2", "--eval-pairs", "8", "--max-length", "48", "--lr", "1e-3",
                 "--quiet", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["steps"] == 4 and len(report["evaluations"]) == 3
    assert (tmp_path / "run" / "model" / "model.safetensors").is_file()
    assert (tmp_path / "run" / "plots" / "training.png").is_file()
    # The run left its checkpoint: a second run into the same directory is refused, --resume is not.
    args = ["align", "dpo", "--model", str(tmp_path / "tiny"), "--data", str(data), "--out", str(tmp_path / "run"),
            "--max-steps", "4", "--eval-pairs", "8", "--max-length", "48", "--quiet", "--json", "--no-save"]
    assert main(args) == 1
    assert "already holds checkpoints" in capsys.readouterr().err
    assert main(args + ["--resume"]) == 0
    assert json.loads(capsys.readouterr().out)["steps"] == 4


def test_initial_evaluation_reuses_the_reference_pass(tokenizer, pairs):
    from lmforge.align.batching import encode_pair
    from lmforge.align.train import DPOObjective

    model = _tiny(tokenizer).eval()
    encoded = {"validation": [encode_pair(tokenizer, p, 48) for p in pairs]}
    objective = DPOObjective(PreferenceLossConfig(), tokenizer.pad_id)
    objective.prepare(model, encoded, 5)
    reused = objective.evaluate(model, encoded["validation"], pairs, "validation", 5, initial=True)
    computed = objective.evaluate(model, encoded["validation"], pairs, "validation", 5)
    assert reused.keys() == computed.keys()
    for key, value in computed.items():
        assert reused[key] == pytest.approx(value, abs=1e-5), key



def _train_log(out) -> list[dict]:
    return [json.loads(line) for line in (out / "logs" / "train.jsonl").read_text().splitlines()]


def _loop_run(config, tokenizer, pairs, **train):
    """A DPO run on the training loop with some of the loop's own settings changed."""
    from lmforge.align.train import DPOObjective, PreferenceTask, loop_config
    from lmforge.train.loop import Trainer, shutdown

    sections = loop_config(config)
    for key, value in train.items():
        setattr(sections.train, key, value)
    task = PreferenceTask(config, DPOObjective(config.loss, tokenizer.pad_id), _tiny(tokenizer), tokenizer,
                          {"train": pairs, "validation": pairs[:4]}, progress=False)
    trainer = Trainer(sections, resume=config.resume, progress=False, log=lambda _m: None, task=task)
    try:
        return trainer.run()
    finally:
        shutdown(trainer.runtime)


@pytest.mark.slow
def test_dpo_on_the_loop_first_step_accumulation_and_resume(tmp_path, tokenizer, pairs):
    """At step 1 the policy is its reference: every margin is 0 and the sigmoid loss is log 2. Two
    micro-batches of 2 pairs equal one batch of 4, and a run stopped after step 3 and resumed
    continues with exactly the losses of an uninterrupted run."""
    import math

    config = _tiny_config(DPOConfig, tmp_path, max_steps=6, eval_interval=100, loss=PreferenceLossConfig(beta=0.5))
    report = _loop_run(config, tokenizer, pairs)
    whole = [r for r in _train_log(tmp_path / "run") if r["kind"] == "train"]
    assert whole[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert whole[0]["reward_margin"] == 0.0 and whole[0]["reward_accuracy"] == 0.0
    assert whole[-1]["loss"] < whole[0]["loss"]
    assert report["objective"] == "dpo" and report["steps"] == 6 and report["heldout_start"]["step"] == 0

    accumulated = _tiny_config(DPOConfig, tmp_path, out=str(tmp_path / "acc"), max_steps=6, eval_interval=100,
                               loss=PreferenceLossConfig(beta=0.5))
    _loop_run(accumulated, tokenizer, pairs, batch_size=2, grad_accum=2)
    acc = [r for r in _train_log(tmp_path / "acc") if r["kind"] == "train"]
    for a, b in zip(acc, whole, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-6)
        assert a["reward_margin"] == pytest.approx(b["reward_margin"], rel=1e-3, abs=2e-5)  # padding widths differ

    resumed = _tiny_config(DPOConfig, tmp_path, out=str(tmp_path / "resumed"), max_steps=6, eval_interval=100,
                           loss=PreferenceLossConfig(beta=0.5))
    _loop_run(resumed, tokenizer, pairs, stop_at_step=3)
    resumed.resume = True
    _loop_run(resumed, tokenizer, pairs)
    again = [r for r in _train_log(tmp_path / "resumed") if r["kind"] == "train"]
    assert [r["step"] for r in again] == list(range(1, 7))
    for a, b in zip(again, whole, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6, abs=1e-7)


def test_reward_resume_is_refused_with_one_message(tmp_path, tokenizer, pairs):
    from lmforge.align.train import train_reward

    config = _tiny_config(RewardConfig, tmp_path, resume=True)
    with pytest.raises(LmforgeError, match="--resume is not supported for reward"):
        train_reward(config, _tiny(tokenizer), tokenizer, {"train": pairs}, progress=False)
