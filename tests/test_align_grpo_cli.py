"""``lmforge align ppo`` and ``lmforge align grpo``: tiny end-to-end runs on a random model (files,
report, plot, saved policy or adapter, reward-model scoring), the shipped recipes resolve,
and bad input ends in one clear message."""

from __future__ import annotations

import json
import math

import pytest
import torch

from lmforge.align.config import GRPOConfig, PPOConfig, config_from_dict
from lmforge.align.rl_tasks import draw_prompts, is_correct
from lmforge.cli import main
from lmforge.errors import LmforgeError
from lmforge.model.config import ModelConfig
from lmforge.model.transformer import Transformer


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A random one-block model with the default model's tokenizer, saved in the HF layout."""
    from lmforge.model.checkpoint import save_hf_model
    from lmforge.model.loading import resolve_tokenizer

    tokenizer = resolve_tokenizer(None)
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=tokenizer.vocab_size, n_embd=32, n_head=4, n_layer=1,
                                    intermediate_size=64, tie_word_embeddings=True))
    path = tmp_path_factory.mktemp("tiny-policy") / "model"
    save_hf_model(model, path, tokenizer)
    return path, model, tokenizer


def _args(verb: str, model, out, *extra: str) -> list[str]:
    return ["align", verb, "--model", str(model), "--out", str(out), "--max-steps", "2", "--prompts-per-step", "2",
            "--group-size", "2", "--max-new-tokens", "4", "--eval-prompts", "2", "--eval-interval", "1",
            "--threads", "1", "--quiet", "--json", *extra]


def test_checker_and_prompts():
    q = "What is 3 + 5?"
    assert is_correct("3 + 5 = 8", "8", question=q) and is_correct("8", "8", question=q)
    assert is_correct("The sum is 1,024.", "1024", question="What is 1000 + 24?")
    assert not is_correct("8 or 9", "8", question=q) and not is_correct("9, no, 8", "8", question=q)  # no hedging
    assert not is_correct("3 + 5 =", "8", question=q) and not is_correct("eight", "8") and not is_correct("", "8")
    assert is_correct("5 + 0 = 5", "5", question="What is 5 + 0?")  # every number echoes the question
    assert not is_correct("5 + 0 = 0", "5", question="What is 5 + 0?")
    assert is_correct("RIVER,MAPLE", "RIVER,MAPLE", "format") and not is_correct("river,maple", "RIVER,MAPLE", "format")
    assert is_correct("river, maple.", "river,maple", "format")
    prompts = draw_prompts("addition", 50, 0, max_operand=9)
    assert prompts == draw_prompts("addition", 50, 0, max_operand=9)  # seeded
    for p in prompts:
        a, b = (int(x) for x in p.text.removeprefix("What is ").rstrip("?").split(" + "))
        assert 0 <= a <= 9 and 0 <= b <= 9 and p.answer == str(a + b)
    assert draw_prompts("format", 3, 0)[0].task == "format"
    with pytest.raises(LmforgeError, match="unknown RL task"):
        draw_prompts("poetry", 1, 0)


def test_grpo_end_to_end(tiny_dir, tmp_path, capsys):
    model_dir, _, _ = tiny_dir
    assert main(_args("grpo", model_dir, tmp_path / "grpo")) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["objective"] == "grpo" and report["steps"] == 2 and len(report["evaluations"]) == 3
    assert (tmp_path / "grpo" / "model" / "model.safetensors").is_file()
    assert (tmp_path / "grpo" / "plots" / "rl.png").stat().st_size > 1000
    assert "# GRPO run" in (tmp_path / "grpo" / "report.md").read_text()
    records = [json.loads(line) for line in (tmp_path / "grpo" / "logs" / "train.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in train] == [1, 2]
    for key in ("reward", "kl", "entropy", "clip_fraction", "correct"):
        assert all(isinstance(r[key], float) for r in train), key


def test_ppo_end_to_end(tiny_dir, tmp_path, capsys):
    model_dir, _, _ = tiny_dir
    assert main(_args("ppo", model_dir, tmp_path / "ppo", "--ppo-epochs", "2", "--minibatch-size", "2",
                      "--target-kl", "0.1", "--kl-horizon", "10", "--no-plots")) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["objective"] == "ppo" and report["steps"] == 2
    assert report["value_loss"]["first"] >= 0 and report["final_beta"] > 0
    records = [json.loads(line) for line in (tmp_path / "ppo" / "logs" / "train.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    assert all(k in train[0] for k in ("value_loss", "entropy", "clip_fraction", "kl", "beta"))
    # the adaptive controller moved beta: KL 0 on step 1 is below the target, so beta shrank
    assert train[1]["beta"] < train[0]["beta"]
    assert (tmp_path / "ppo" / "value_head.safetensors").is_file()
    assert (tmp_path / "ppo" / "model" / "config.json").is_file()
    assert not (tmp_path / "ppo" / "plots").exists()


def test_grpo_update_with_lora_takes_the_base_as_reference():
    """No reference model given: the KL is measured against the model with its adapters off."""
    from lmforge.align.grpo import GroupSample, grpo_update
    from lmforge.tune.peft import PeftOptions, apply_peft

    torch.manual_seed(0)
    model = apply_peft(Transformer(ModelConfig(vocab_size=16, n_embd=32, n_head=4, n_layer=1, intermediate_size=64,
                                               max_position_embeddings=32)),
                       PeftOptions(method="lora", r=2, target_modules=["q_proj", "v_proj"], seed=0))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-2)
    ids = torch.tensor([[1, 5, 3, 3], [1, 5, 4, 2], [1, 6, 3, 2], [1, 6, 7, 7]])
    mask = torch.tensor([[0, 0, 1, 1]] * 4)
    sample = GroupSample(ids, mask, ["", "", "", ""], torch.tensor([1.0, 0.0, 1.0, 0.0]))
    first = grpo_update(model, None, optimizer, sample, 2, beta=0.1)
    second = grpo_update(model, None, optimizer, sample, 2, beta=0.1)
    assert first["kl"] == 0.0  # LoRA's B starts at zero: the adapted model is the base
    assert second["kl"] > 0 and "entropy" in second
    # dr_grpo: the loss is normalised by the token budget given, not by the padded width. With
    # pi_old = pi the ratio is 1 and the loss is -sum_i A_i n_i / (responses x budget).
    longer = GroupSample(ids, torch.tensor([[0, 1, 1, 1], [0, 0, 1, 1]] * 2), sample.texts, sample.rewards)
    a = grpo_update(model, None, optimizer, longer, 2, beta=0.0, aggregation="dr_grpo", max_tokens=3)["loss"]
    b = grpo_update(model, None, optimizer, longer, 2, beta=0.0, aggregation="dr_grpo", max_tokens=6)["loss"]
    adv = 0.5 / (math.sqrt(0.5) + 1e-4)  # rewards (1, 0) in a group: centred +-0.5, Bessel std sqrt(0.5)
    assert math.isclose(a, -(adv * 3 - adv * 2) * 2 / (4 * 3), rel_tol=1e-5) and math.isclose(a / b, 2, rel_tol=1e-5)


@pytest.mark.slow
def test_lora_run_saves_an_adapter_and_reward_model_scores(tiny_dir, tmp_path, capsys):
    from lmforge.align.reward import from_language_model, save_reward_model

    model_dir, model, tokenizer = tiny_dir
    reward_dir = save_reward_model(from_language_model(Transformer(model.config), 0, seed=1), tmp_path / "rm",
                                   tokenizer)
    args = _args("ppo", model_dir, tmp_path / "run", "--peft", "lora", "--lora-r", "2", "--reward", "model",
                 "--reward-model", str(reward_dir), "--lr", "1e-3")
    assert main(args) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["adapter"] and (tmp_path / "run" / "model" / "adapter_config.json").is_file()
    assert report["trainable_parameters"] < 100_000
    records = [json.loads(line) for line in (tmp_path / "run" / "logs" / "train.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    # a random reward model gives real-valued scores (not the checker's 0/1)
    assert any(r["reward"] not in (0.0, 1.0) for r in train)


def test_recipes_resolve(capsys):
    for verb, recipe in (("grpo", "grpo-arithmetic"), ("ppo", "ppo-arithmetic"), ("ppo", "ppo-reward-model")):
        assert main(["align", verb, recipe, "--print-config", "--max-steps", "3"]) == 0
        config = json.loads(capsys.readouterr().out)
        assert config["max_steps"] == 3 and config["task"] == "addition"
    assert main(["align", "grpo", "grpo-arithmetic", "--print-config", "--peft", "lora", "--lora-r", "4"]) == 0
    assert json.loads(capsys.readouterr().out)["peft"]["r"] == 4


@pytest.mark.parametrize("verb, extra, message", [
    ("grpo", ["--group-size", "1"], "at least 2 responses"),
    ("grpo", ["--epsilon", "0"], "epsilon"),
    ("ppo", ["--epsilon", "-0.1"], "epsilon"),
    ("ppo", ["--reward", "model"], "needs --reward-model"),
    ("ppo", ["--task", "poetry"], "unknown RL task"),
    ("grpo", ["--peft", "prompt"], "LoRA/QLoRA"),
])
def test_bad_input_is_one_clear_message(tiny_dir, tmp_path, capsys, verb, extra, message):
    model_dir, _, _ = tiny_dir
    assert main(_args(verb, model_dir, tmp_path / "run", *extra)) == 1
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_missing_reward_model_directory(tiny_dir, tmp_path, capsys):
    model_dir, _, _ = tiny_dir
    assert main(_args("ppo", model_dir, tmp_path / "run", "--reward", "model", "--reward-model",
                      str(tmp_path / "absent"))) == 1
    assert "no such reward model directory" in capsys.readouterr().err


def test_recipe_keys_are_checked():
    with pytest.raises(LmforgeError, match="unknown recipe key"):
        config_from_dict(GRPOConfig, {"group_size": 4, "ppo_epochs": 2})
    with pytest.raises(LmforgeError, match="recipe 'peft'"):
        config_from_dict(PPOConfig, {"peft": {"rank": 4}})
    assert config_from_dict(PPOConfig, {"peft": {"method": "lora", "r": 4}}).peft.r == 4
