"""lmforge distill: the distillation loss against direct computation (forward/reverse KL, top-k,
the T^2 gradient scaling), students initialised from the teacher's layers, the task on the one
training loop (exact resume, assistant-only positions on chat data), the command end to end on a
tiny random teacher, and the errors a user can cause."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lmforge.errors import LmforgeError
from lmforge.tune.distill import (TopK, chosen_layers, distillation_loss, load_distill_recipe, simulated_acceptance,
                                  student_from_layers, token_logits)

LMFORGE = [sys.executable, "-m", "lmforge"]
WORDS = ("river city stone light music winter garden history market island bridge forest "
         "school letter mountain harbour painter engine village festival").split()
TEMPLATES = ("The {} of the {} was built near a {}.", "It is one of the oldest {}s in the {} and the {}.",
             "In the winter, people from the {} walked to the {} with their {}.",
             "There was a {} at the end of the {}, and it was known for its {}.")


# -- the loss ----------------------------------------------------------------------------------------

def _logits(n=9, v=13, seed=0):
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(n, v, generator=g) * 2
    teacher = torch.randn(n, v, generator=g) * 2
    targets = torch.randint(0, v, (n,), generator=g)
    targets[[1, 4]] = -100  # masked positions take no part
    return student, teacher, targets


@pytest.mark.parametrize("temperature,alpha", [(1.0, 1.0), (2.0, 0.5), (4.0, 0.25), (0.5, 0.9)])
def test_forward_kl_loss_equals_direct_computation(temperature, alpha):
    s, t, y = _logits()
    loss, sums = distillation_loss(s, t, y, temperature, alpha, "forward")
    keep = y != -100
    p = F.softmax(t[keep] / temperature, -1)
    log_q = F.log_softmax(s[keep] / temperature, -1)
    kl = F.kl_div(log_q, p, reduction="sum")  # sum p (log p - log q), torch's own
    ce = F.cross_entropy(s[keep], y[keep], reduction="sum")
    assert loss.item() == pytest.approx((alpha * temperature ** 2 * kl + (1 - alpha) * ce).item(), rel=1e-5)
    assert sums["kl"].item() == pytest.approx(kl.item(), rel=1e-5)
    assert sums["ce"].item() == pytest.approx(ce.item(), rel=1e-5)
    assert sums["agreement"].item() == (s[keep].argmax(-1) == t[keep].argmax(-1)).sum().item()


def test_reverse_kl_and_hard_labels_only():
    s, t, y = _logits(seed=1)
    keep = y != -100
    loss, sums = distillation_loss(s, t, y, 3.0, 1.0, "reverse")
    q = F.softmax(s[keep] / 3.0, -1)
    log_p = F.log_softmax(t[keep] / 3.0, -1)
    reverse = F.kl_div(log_p, q, reduction="sum")  # sum q (log q - log p)
    assert loss.item() == pytest.approx(9.0 * reverse.item(), rel=1e-5)
    forward, _ = distillation_loss(s, t, y, 3.0, 1.0, "forward")
    assert abs(forward.item() - loss.item()) > 1e-3  # the two directions differ
    # alpha 0: the cross-entropy on the labels, and no teacher needed.
    ce, sums = distillation_loss(s, None, y, 3.0, 0.0)
    assert ce.item() == pytest.approx(F.cross_entropy(s, y, ignore_index=-100, reduction="sum").item(), rel=1e-6)
    assert set(sums) == {"ce"}


def test_top_k_teacher_is_the_renormalised_top_tokens():
    s, t, y = _logits(seed=2)
    keep = y != -100
    full = t.topk(t.shape[-1], -1)
    whole, _ = distillation_loss(s, t, y, 2.0, 1.0)
    assert distillation_loss(s, TopK(full.values, full.indices), y, 2.0, 1.0)[0].item() == \
        pytest.approx(whole.item(), rel=1e-5)  # k = V is the full forward KL
    top = t.topk(3, -1)
    loss, _ = distillation_loss(s, TopK(top.values, top.indices), y, 2.0, 1.0)
    expected = 0.0
    for i in keep.nonzero().flatten().tolist():
        p = F.softmax(top.values[i] / 2.0, -1)
        log_q = F.log_softmax(s[i] / 2.0, -1)[top.indices[i]]
        expected += float((p * (p.log() - log_q)).sum())
    assert loss.item() == pytest.approx(4.0 * expected, rel=1e-5)
    with pytest.raises(ValueError, match="forward KL"):
        distillation_loss(s, TopK(top.values, top.indices), y, 2.0, 1.0, "reverse")


def test_soft_term_gradient_is_t_times_probability_gap_and_t_squared_keeps_its_scale():
    s, t, y = _logits(n=6, v=50, seed=3)
    y[:] = 0
    norms = {}
    for temperature in (1.0, 4.0, 16.0, 64.0):
        x = s.clone().requires_grad_(True)
        loss, _ = distillation_loss(x, t, y, temperature, 1.0)
        loss.backward()
        # d/ds [T^2 KL(p_t || p_s)] = T (p_s - p_t), per position
        expected = temperature * (F.softmax(s / temperature, -1) - F.softmax(t / temperature, -1))
        assert torch.allclose(x.grad, expected, atol=1e-5)
        norms[temperature] = x.grad.norm().item()
    # At high temperature the gradient tends to ((s - mean s) - (t - mean t)) / V: the same size
    # whatever T is, which is why the soft term is scaled by T^2 (without it, 1/T^2 smaller).
    limit = ((s - s.mean(-1, keepdim=True)) - (t - t.mean(-1, keepdim=True))).norm().item() / 50
    assert norms[64.0] == pytest.approx(limit, rel=0.02)
    assert norms[16.0] == pytest.approx(norms[64.0], rel=0.1)


def test_simulated_acceptance_counts_greedy_speculation_rounds():
    # Draft of 2: [T T] accepted (+1 target token) -> [F] rejected (+1) -> [T F]: 1 accepted (+1).
    matches = [True, True, False, False, True, False, True]
    sim = simulated_acceptance(matches, 2)
    # rounds: pos 0 (2 acc, pos->3), pos 3 (0 acc, ->4), pos 4 (1 acc, ->6), pos 6 (1 of 1, ->8)
    assert sim["tokens_per_target_pass"] == pytest.approx(7 / 4)
    assert sim["acceptance"] == pytest.approx(4 / 7)
    assert simulated_acceptance([True] * 8, 4)["tokens_per_target_pass"] == pytest.approx(8 / 2)


# -- students ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tokenizer():
    from lmforge.model.loading import resolve_tokenizer

    return resolve_tokenizer(None)


def _tiny_teacher(tokenizer, n_layer=4, seed=0):
    """A random Llama with ``tokenizer``'s ids (None: 256 ids, for tests that need no tokenizer)."""
    from lmforge.model.config import ModelConfig
    from lmforge.model.transformer import Transformer

    torch.manual_seed(seed)
    config = ModelConfig(family="llama", vocab_size=tokenizer.vocab_size if tokenizer else 256, n_layer=n_layer, n_embd=32, n_head=4,
                         n_kv_head=2, intermediate_size=64, max_position_embeddings=256, tie_word_embeddings=True,
                         bos_token_id=tokenizer.bos_id if tokenizer else 1,
                         eos_token_id=tokenizer.eos_id if tokenizer else 2)
    model = Transformer(config)
    with torch.no_grad():  # larger than the default init, so that layers differ visibly
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory, tokenizer) -> Path:
    """A 4-layer random Llama with the default model's tokenizer and chat template."""
    from lmforge.model.checkpoint import save_hf_model

    return save_hf_model(_tiny_teacher(tokenizer), tmp_path_factory.mktemp("distill") / "teacher", tokenizer)


@pytest.fixture(scope="module")
def text_source(tmp_path_factory) -> Path:
    """A few dozen plain-text documents (JSON lines) to build packed rows from."""
    rng = random.Random(0)
    path = tmp_path_factory.mktemp("distill-text") / "docs.jsonl"
    docs = []
    for i in range(48):
        sentences = [rng.choice(TEMPLATES).format(*(rng.choice(WORDS) for _ in range(3)))
                     for _ in range(rng.randint(5, 9))]
        docs.append(json.dumps({"text": f"Document {i}. " + " ".join(sentences)}))
    path.write_text("\n".join(docs) + "\n")
    return path


def test_student_from_layers_copies_the_chosen_teacher_blocks():
    teacher = _tiny_teacher(None, n_layer=6)
    student = student_from_layers(teacher, [0, 2, 5])
    assert student.config.n_layer == 3 and student.config.n_embd == teacher.config.n_embd
    t, s = teacher.state_dict(), student.state_dict()
    for j, i in enumerate([0, 2, 5]):
        for name, tensor in s.items():
            if name.startswith(f"layers.{j}."):
                assert torch.equal(tensor, t[name.replace(f"layers.{j}.", f"layers.{i}.", 1)]), name
    for name in ("embed.weight", "norm.weight", "lm_head.weight"):
        assert torch.equal(s[name], t[name])
    assert student.lm_head.weight is student.embed.weight  # still tied
    assert s["embed.weight"].data_ptr() != t["embed.weight"].data_ptr()  # copies: training the student leaves the teacher
    # Keeping every layer gives the teacher back, logit for logit.
    ids = torch.tensor([[1, 50, 30, 200, 7]])
    with torch.no_grad():
        assert torch.equal(student_from_layers(teacher, list(range(6)))(ids), teacher(ids))


def test_chosen_layers_every_kth_evenly_spaced_or_given():
    from lmforge.tune.distill import StudentSection

    assert chosen_layers(StudentSection(keep_every=5), 30) == [0, 5, 10, 15, 20, 25]
    assert chosen_layers(StudentSection(keep_every=None, n_layer=6), 30) == [0, 6, 12, 17, 23, 29]
    assert chosen_layers(StudentSection(layers=[3, 1]), 4) == [3, 1]
    with pytest.raises(LmforgeError, match="layers 0..3, not 4"):
        chosen_layers(StudentSection(layers=[0, 4]), 4)
    with pytest.raises(LmforgeError, match="twice"):
        chosen_layers(StudentSection(layers=[1, 1]), 4)


def test_random_student_takes_the_given_widths():
    from lmforge.tune.distill import StudentSection, random_student

    teacher = _tiny_teacher(None)
    student = random_student(teacher.config, StudentSection(init="random", n_layer=2, n_embd=16, n_head=2,
                                                            intermediate_size=24))
    c = student.config
    assert (c.n_layer, c.n_embd, c.n_head, c.head_dim, c.intermediate_size, c.vocab_size) == \
        (2, 16, 2, 8, 24, 256)
    assert c.n_head % c.n_kv_head == 0
    with pytest.raises(LmforgeError, match="not divisible"):
        random_student(teacher.config, StudentSection(init="random", n_embd=30, n_head=4))


# -- the task on the loop ---------------------------------------------------------------------------

def _config(teacher_dir: Path, source: Path, out: Path, **extra):
    options = {"teacher.model": str(teacher_dir), "student.keep_every": 2, "data.path": str(out.parent / "rows"),
               "data.sources": [str(source)], "data.seq_len": 32, "data.val_fraction": 0.1,
               "train.out": str(out), "train.max_steps": 6, "train.batch_size": 2, "train.eval_interval": 3,
               "train.save_interval": 3, "train.eval_batches": 2, "schedule.warmup_steps": 1, "optim.lr": 3e-3,
               "train.plots": False, "eval.heldout_tokens": 96, "eval.decode_tokens": 4, "eval.decode_rounds": 1,
               "eval.prompts": ["The river", "A city"], **extra}
    return load_distill_recipe(None, options)


def _losses(out: Path, key="loss", kind="train") -> dict[int, float]:
    records = [json.loads(x) for x in (out / "logs" / "train.jsonl").read_text().splitlines()]
    return {r["step"]: r[key] for r in records if r["kind"] == kind}


QUIET = {"progress": False, "log": lambda _m: None}


@pytest.mark.slow
def test_distillation_resumes_exactly_and_lowers_the_divergence(teacher_dir, text_source, tmp_path):
    from lmforge.tune.distill import train_student

    train_student(_config(teacher_dir, text_source, tmp_path / "ref"), **QUIET)
    reference, kl = _losses(tmp_path / "ref"), _losses(tmp_path / "ref", "kl")
    assert sorted(reference) == list(range(1, 7)) and kl[6] < kl[1]
    train_student(_config(teacher_dir, text_source, tmp_path / "cut", **{"train.stop_at_step": 3}), **QUIET)
    assert sorted(_losses(tmp_path / "cut")) == [1, 2, 3]
    train_student(_config(teacher_dir, text_source, tmp_path / "cut"), resume=True, **QUIET)
    assert _losses(tmp_path / "cut") == reference  # bit for bit
    evals = _losses(tmp_path / "ref", "val_top1_agreement", "eval")
    assert _losses(tmp_path / "cut", "val_top1_agreement", "eval") == evals and 0 <= evals[6] <= 1
    # The step's loss is the token mean of alpha T^2 KL + (1 - alpha) CE, as logged.
    record = [json.loads(x) for x in (tmp_path / "ref" / "logs" / "train.jsonl").read_text().splitlines()][0]
    assert record["loss"] == pytest.approx(0.5 * 4.0 * record["kl"] + 0.5 * record["ce"], rel=1e-5)


@pytest.mark.slow
def test_teacher_cache_and_top_k_give_the_same_run(teacher_dir, text_source, tmp_path):
    from lmforge.tune.distill import train_student

    base = {"train.max_steps": 3, "train.eval_interval": 3, "train.save_interval": 3}
    train_student(_config(teacher_dir, text_source, tmp_path / "plain", **base), **QUIET)
    report = train_student(_config(teacher_dir, text_source, tmp_path / "cached",
                                   **{**base, "distill.cache_teacher": True}), **QUIET)
    assert _losses(tmp_path / "cached") == _losses(tmp_path / "plain")
    assert report["distill"]["cache_hits"] == 0  # each batch seen once here: nothing to reuse
    train_student(_config(teacher_dir, text_source, tmp_path / "top",
                          **{**base, "distill.top_k": 8}), **QUIET)
    top = _losses(tmp_path / "top")
    assert top[1] != _losses(tmp_path / "plain")[1] and all(v > 0 for v in top.values())


@pytest.mark.slow
def test_chat_data_distils_on_assistant_tokens_only(teacher_dir, tmp_path, tokenizer):
    from lmforge.train.loop import Trainer
    from lmforge.tune.datasets import write_dataset
    from lmforge.tune.distill import DistillTask

    data = tmp_path / "arith"
    write_dataset("arithmetic", data, seed=0, sizes={"train": 40, "validation": 6, "test": 6})
    config = load_distill_recipe(None, {
        "teacher.model": str(teacher_dir), "student.keep_every": 2, "data.kind": "chat",
        "data.train": str(data / "train.jsonl"), "data.validation": str(data / "validation.jsonl"),
        "data.seq_len": 128, "train.out": str(tmp_path / "run"), "train.max_steps": 2, "train.eval_interval": 2,
        "train.save_interval": 2, "schedule.warmup_steps": 1, "train.plots": False, "eval.loss_examples": 6})
    task = DistillTask(config)
    trainer = Trainer(config, progress=False, log=lambda _m: None, task=task)
    batch = task.batch(0, 2)
    assert batch.lengths is not None  # packed conversations
    logits, targets = token_logits(trainer.model, batch)
    counted = targets != -100
    assert int(counted.sum()) == batch.target_count()
    # Every counted target is an assistant token (its label), and each conversation alone gives the same logits.
    answers = {tuple(e.labels) for e in task.inner.train}
    assert answers and int(counted.sum()) < len(targets) // 2
    from lmforge.train.loop import Batch

    first = task.inner.train[task.inner.rows[int(task.inner._order(0)[0])][0]]
    alone_logits, alone_targets = token_logits(trainer.model, Batch(torch.tensor([first.ids]),
                                                                    torch.tensor([first.labels])))
    n = len(first.ids) - 1
    with torch.no_grad():
        assert torch.allclose(logits[:n], alone_logits, atol=1e-4)
    assert torch.equal(targets[:n], alone_targets)
    report = trainer.run()
    assert report["steps"] == 2 and "val_top1_agreement" in report["validation"][-1]


# -- the command ---------------------------------------------------------------------------------------

def _run(args, timeout=300):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(LMFORGE + args, capture_output=True, text=True, timeout=timeout, env=env)


def _flags(config_overrides: dict) -> list[str]:
    flags = []
    for key, value in config_overrides.items():
        flags += [f"--{key}", json.dumps(value) if not isinstance(value, str) else value]
    return flags


@pytest.mark.slow
def test_distill_command_end_to_end(teacher_dir, text_source, tmp_path):
    out = tmp_path / "run"
    flags = _flags({"teacher.model": str(teacher_dir), "student.keep-every": 2, "data.path": str(tmp_path / "rows"),
                    "data.sources": [str(text_source)], "data.seq-len": 32, "train.max-steps": 4,
                    "train.batch-size": 2, "train.eval-interval": 2, "train.save-interval": 2,
                    "schedule.warmup-steps": 1, "optim.lr": 3e-3, "eval.heldout-tokens": 96,
                    "eval.decode-tokens": 4, "eval.decode-rounds": 1, "eval.prompts": ["The river", "A city"]})
    result = _run(["distill", "distill-tiny", "--out", str(out), "--quiet", "--json", *flags])
    assert result.returncode == 0, result.stderr[-3000:]
    payload = json.loads(result.stdout.strip().splitlines()[-1])
    c = payload["comparison"]
    assert set(c["models"]) == {"teacher", "student", "baseline"}
    t, s, b = (c["models"][k] for k in ("teacher", "student", "baseline"))
    assert s["layers"] == b["layers"] == 2 and t["layers"] == 4 and s["parameters"] < t["parameters"]
    for m in (s, b):
        assert 0 <= m["heldout_top1_agreement"] <= 1 and 0 <= m["greedy_token_agreement"] <= 1
        assert m["heldout_ppl"] > 1 and m["decode_tokens_per_s"] > 0
    assert payload["baseline"]["distill"]["alpha"] == 0.0 and payload["baseline"]["steps"] == 4
    assert (out / "comparison.md").read_text().startswith("# Distillation")
    assert (out / "baseline" / "model" / "model.safetensors").is_file()
    student = out / "model"
    # transformers loads the student and agrees with lmforge's own load of it.
    from transformers import AutoModelForCausalLM

    from lmforge.model.checkpoint import load_hf_model

    ids = torch.tensor([[1, 50, 300, 4000, 7]])
    hf = AutoModelForCausalLM.from_pretrained(str(student), dtype=torch.float32).eval()
    with torch.no_grad():
        assert torch.allclose(hf(ids).logits, load_hf_model(student)(ids), atol=1e-4)
    generated = _run(["generate", str(student), "--prompt", "The river", "--max-tokens", "3", "--temperature",
                      "0", "--json"], timeout=120)
    assert generated.returncode == 0, generated.stderr
    # --resume after completion trains nothing again and gives the same comparison figures.
    again = _run(["distill", "distill-tiny", "--out", str(out), "--quiet", "--json", "--resume", *flags])
    assert again.returncode == 0, again.stderr[-3000:]
    rerun = json.loads(again.stdout.strip().splitlines()[-1])["comparison"]["models"]
    assert rerun["student"]["heldout_ppl"] == pytest.approx(s["heldout_ppl"], rel=1e-6)


# -- errors -------------------------------------------------------------------------------------------

def test_bad_recipe_values_are_refused_with_one_message():
    cases = {"distill.temperature": (0, "temperature must be > 0"), "distill.alpha": (1.5, r"alpha must be in \[0, 1\]"),
             "distill.kl": ("sideways", "distill.kl must be one of"), "data.kind": ("images", "data.kind must be one of"),
             "student.keep_every": (0, "student.keep_every must be positive")}
    for key, (value, message) in cases.items():
        with pytest.raises(LmforgeError, match=message):
            load_distill_recipe(None, {key: value})
    with pytest.raises(LmforgeError, match="alpha must be"):
        load_distill_recipe(None, {"distill.alpha": -0.1})
    with pytest.raises(LmforgeError, match="top_k needs distill.kl forward"):
        load_distill_recipe(None, {"distill.top_k": 8, "distill.kl": "reverse"})
    with pytest.raises(LmforgeError, match="apply to student.init random"):
        load_distill_recipe(None, {"student.n_embd": 128})
    with pytest.raises(LmforgeError, match="unknown field distill.beta"):
        load_distill_recipe(None, {"distill.beta": 1})


def test_student_with_another_vocabulary_or_tokenizer_is_refused(tokenizer, tiny_hf_dirs, teacher_dir, tmp_path):
    from lmforge.tune.distill import StudentSection, build_student, check_same_tokenizer

    teacher = _tiny_teacher(tokenizer)
    other, _ = tiny_hf_dirs["llama"]  # 320 token ids
    with pytest.raises(LmforgeError, match="320 token ids, the teacher 49152"):
        build_student(StudentSection(init=str(other)), teacher, tokenizer)

    class Shifted:  # the same number of ids, different ids for the same text
        vocab_size, eos_id = tokenizer.vocab_size, tokenizer.eos_id

        def encode(self, text, add_special_tokens=False):
            return [i + 1 for i in tokenizer.encode(text, add_special_tokens=False)]

    with pytest.raises(LmforgeError, match="another tokenizer than the teacher"):
        check_same_tokenizer(Shifted(), tokenizer, "student x")
    student, info = build_student(StudentSection(init=str(teacher_dir)), teacher, tokenizer)  # same tokenizer: fine
    assert info == {"init": str(teacher_dir)} and student.config.n_layer == 4


@pytest.mark.slow
def test_bad_input_on_the_command_line_is_one_line(tmp_path, teacher_dir):
    result = _run(["distill", "--distill.temperature", "-1", "--out", str(tmp_path / "r")], timeout=60)
    assert result.returncode == 1 and "distill.temperature must be > 0" in result.stderr
    assert "Traceback" not in result.stderr
    result = _run(["distill", "--teacher.model", str(teacher_dir), "--student.layers", "[0, 9]",
                   "--data.kind", "chat", "--data.train", str(tmp_path / "none.jsonl"), "--data.generate", "null",
                   "--out", str(tmp_path / "r2")], timeout=120)
    assert result.returncode == 1 and "Traceback" not in result.stderr and "lmforge: error:" in result.stderr


def test_shipped_distill_recipes_load_and_every_field_is_a_flag():
    from lmforge.cli.common import SHIPPED_RECIPES
    from lmforge.tune.distill import option_names

    recipes = sorted(SHIPPED_RECIPES.glob("distill-*.yaml"))
    assert {r.stem for r in recipes} >= {"distill-smollm2", "distill-tiny"}
    for recipe in recipes:
        config = load_distill_recipe(recipe)
        assert config.train.out.startswith("runs/") and config.distill.alpha > 0
    assert {"distill.alpha", "distill.temperature", "distill.kl", "distill.top_k", "student.keep_every",
            "student.n_layer", "data.kind", "eval.draft_tokens"} <= set(option_names())


@pytest.mark.slow
def test_ddp_two_processes_equal_one(teacher_dir, text_source, tmp_path):
    """2 processes x 2 rows = 1 process x 4 rows, for the distilled run and the baseline after it
    (both runs share one process group); the comparison is rank 0's."""
    from lmforge.tune.distill import distill

    options = {"train.max_steps": 3, "train.eval_interval": 3, "train.save_interval": 3, "train.batch_size": 4,
               "eval.heldout_tokens": 0, "eval.decode_rounds": 1}
    distill(_config(teacher_dir, text_source, tmp_path / "one", **options), **QUIET)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "lmforge"]
    flags = _flags({"teacher.model": str(teacher_dir), "student.keep-every": 2, "data.path": str(tmp_path / "rows"),
                    "data.sources": [str(text_source)], "data.seq-len": 32, "data.val-fraction": 0.1,
                    "train.max-steps": 3, "train.batch-size": 2, "train.eval-interval": 3, "train.save-interval": 3,
                    "train.eval-batches": 2, "schedule.warmup-steps": 1, "optim.lr": 3e-3, "train.plots": False,
                    "train.distributed": "ddp", "eval.heldout-tokens": 0, "eval.decode-tokens": 4,
                    "eval.decode-rounds": 1, "eval.prompts": ["The river", "A city"]})
    result = subprocess.run(torchrun + ["distill", "--quiet", "--out", str(tmp_path / "two"), *flags],
                            capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    for run in ("", "baseline"):
        one, two = _losses(tmp_path / "one" / run), _losses(tmp_path / "two" / run)
        assert sorted(two) == [1, 2, 3]
        for step in one:
            assert two[step] == pytest.approx(one[step], rel=1e-5), (run, step)
    assert (tmp_path / "two" / "comparison.json").is_file()
