"""``lmforge translate`` on a tiny saved Marian-style model, and the translation task on the loop."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from lmforge.cli import main
from tests.conftest import make_tiny_translator
from lmforge.model.seq2seq_io import load_seq2seq

pytestmark = pytest.mark.usefixtures("one_thread")


SENTENCES = ["In the beginning God created the heaven and the earth.", "And God said, Let there be light.",
             "EN el principio crió Dios los cielos y la tierra.", "Y dijo Dios: Sea la luz: y fué la luz."]


@pytest.fixture(scope="module")
def tiny_translator(tmp_path_factory):
    return make_tiny_translator(tmp_path_factory.mktemp("translator") / "model", SENTENCES)


def run(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_translate_lines_as_json_keeps_empty_lines(capsys, tmp_path, tiny_translator):
    from lmforge.tune.translation import translate_texts

    path, model, tokenizer = tiny_translator
    source = tmp_path / "in.txt"
    source.write_text("And God said.\n\nLet there be light.\n", encoding="utf-8")
    code, out, err = run(capsys, "translate", str(path), str(source), "--num-beams", "2", "--max-tokens", "6",
                         "--json")
    assert code == 0, err
    records = [json.loads(line) for line in out.splitlines()]
    assert [r["source"] for r in records] == ["And God said.", "", "Let there be light."]
    assert records[1]["translation"] == ""
    loaded = load_seq2seq(path)
    expected = translate_texts(loaded, tokenizer, ["And God said.", "Let there be light."], num_beams=2,
                               max_new_tokens=6)
    assert [records[0]["translation"], records[2]["translation"]] == expected
    # plain output: one translation per input line
    code, out, _ = run(capsys, "translate", str(path), str(source), "--num-beams", "1", "--max-tokens", "6")
    assert code == 0 and len(out.splitlines()) == 3


def test_translate_user_errors_are_one_line(capsys, tmp_path, tiny_translator):
    path, _, _ = tiny_translator
    code, _, err = run(capsys, "translate", str(path), str(tmp_path / "missing.txt"))
    assert code == 1 and "no such input file" in err and "Traceback" not in err
    code, _, err = run(capsys, "translate", str(tmp_path), str(path / "config.json"))
    assert code == 1 and "config.json" in err
    code, _, err = run(capsys, "translate", str(path), "--train.max-steps", "3")
    assert code == 1 and "translate train" in err
    code, _, err = run(capsys, "translate", str(path), "--num-beams", "0")
    assert code == 1 and "--num-beams" in err


def test_recipe_prints_and_validates(capsys):
    import yaml

    code, out, _ = run(capsys, "translate", "train", "translate-bible-en-es", "--print-recipe",
                       "--train.max-steps", "7", "--schedule.warmup-steps", "2")
    assert code == 0
    recipe = yaml.safe_load(out)
    assert recipe["train"]["max_steps"] == 7 and recipe["data"]["target"] == "rv1909"
    code, _, err = run(capsys, "translate", "train", "translate-bible-en-es", "--print-recipe",
                       "--data.max-len", "1000")
    assert code == 1 and "max_len" in err
    # a combination the chosen layout cannot hold fails before any data or training work
    code, _, err = run(capsys, "translate", "train", "translate-bible-en-es", "--print-recipe",
                       "--model.norm-position", "pre")
    assert code == 1 and "use model.family t5" in err
    code, _, err = run(capsys, "translate", "train", "translate-bible-en-es", "--print-recipe",
                       "--model.family", "t5", "--model.norm-position", "pre")
    assert code == 1 and "scale_embedding false" in err


def test_a_t5_translator_is_the_t5_layout_transformers_reads(tmp_path):
    """model.family t5 builds a pre-norm RMSNorm model with relative positions and no biases,
    written as T5ForConditionalGeneration with the same logits."""
    import transformers

    from lmforge.model.seq2seq_io import write_seq2seq_files
    from lmforge.tokenizer.train import train_tokenizer
    from lmforge.tune.translation import TranslationTask, load_translation_recipe

    config = load_translation_recipe("lmforge/recipes/translate-bible-en-es.yaml", {
        "model.family": "t5", "model.norm_position": "pre", "model.scale_embedding": False,
        "model.gated_mlp": True, "model.activation": "gelu_new", "model.n_embd": 32, "model.n_head": 4,
        "model.intermediate_size": 40, "model.n_layer": 1, "model.n_decoder_layer": 2})
    task = TranslationTask(config)
    task.tokenizer = train_tokenizer(["in the beginning was the word", "en el principio era el verbo"] * 4,
                                     algo="unigram", vocab_size=60, special_tokens=("<pad>", "</s>", "<unk>"))
    task.pad, task.eos = 0, 1
    torch.manual_seed(0)
    model = task.build_model(None).eval()
    c = model.config
    assert (c.family, c.norm, c.position, c.bias, c.attention_scale, c.final_logits_bias) == \
        ("t5", "rmsnorm", "relative", False, False, False)
    write_seq2seq_files(model, tmp_path, task.tokenizer)
    theirs = transformers.T5ForConditionalGeneration.from_pretrained(tmp_path).eval()
    vocab = task.tokenizer.vocab_size
    src, tgt = torch.randint(3, vocab, (2, 9)), torch.randint(3, vocab, (2, 5))
    with torch.no_grad():
        assert (model(src, tgt) - theirs(input_ids=src, decoder_input_ids=tgt).logits).abs().max() < 1e-5


def test_batches_are_a_pure_function_of_the_position_and_cover_an_epoch():
    from lmforge.tune.translation import TranslationConfig, TranslationTask

    task = TranslationTask(TranslationConfig())
    rng = np.random.default_rng(0)
    task.src = [list(rng.integers(3, 50, size=int(n))) + [2] for n in rng.integers(2, 30, size=50)]
    task.tgt = [list(rng.integers(3, 50, size=int(n))) + [2] for n in rng.integers(2, 30, size=50)]
    task.pad = 1
    picked = [i for p in range(0, 50, 5) for i in task._pick(p, 5)]
    assert sorted(picked) == list(range(50))  # one epoch sees every pair once
    assert task._pick(10, 5) == task._pick(10, 5)
    batch = task.batch(0, 5)
    assert batch.count == int((batch.labels != -100).sum())
    assert batch.extra["attention_mask"].sum() + batch.count == batch.tokens


needs_diatheke = pytest.mark.skipif(shutil.which("diatheke") is None, reason="diatheke (SWORD) is not installed")


@pytest.mark.slow
@needs_diatheke
def test_a_few_training_steps_on_the_bible_through_the_loop(tmp_path):
    from lmforge.tune.translation import load_translation_recipe, train_translator

    config = load_translation_recipe("lmforge/recipes/translate-bible-en-es.yaml", {
        "train.out": str(tmp_path / "run"), "train.max_steps": 4, "train.eval_interval": 4, "train.batch_size": 8,
        "schedule.warmup_steps": 1, "model.n_embd": 32, "model.intermediate_size": 48, "model.n_layer": 1,
        "model.n_decoder_layer": 1, "eval.validation_examples": 4, "eval.loss_examples": 8, "eval.test_examples": 4,
        "eval.max_new_tokens": 6, "data.cache": str(tmp_path / "corpus"), "data.tokenizer_vocab_size": 800,
        "train.plots": False})
    report = train_translator(config, progress=False, log=lambda _m: None)
    assert report["steps"] == 4 and report["final_train_loss"] < report["first_train_loss"]
    assert set(report["test"]) == {"verses", "greedy", "beam4"}
    model = load_seq2seq(report["output"])
    assert model.config.vocab_size == 800
    test_books = set(config.data.test_books)
    train_refs = [json.loads(line)["reference"] for line in (tmp_path / "corpus" / "train.jsonl").open()]
    assert not any(ref.rsplit(" ", 1)[0] in test_books for ref in train_refs)


@pytest.mark.slow  # builds the Bible corpus and its tokenizer, then trains three times
@needs_diatheke
def test_an_interrupted_translator_run_resumes_exactly(tmp_path):
    """Stopped after step 2 and resumed, a run ends with the weights of one that never stopped."""
    from lmforge.errors import LmforgeError
    from lmforge.train import checkpoint as ckpt
    from lmforge.tune.translation import load_translation_recipe, train_translator

    def config(out, **more):
        return load_translation_recipe("lmforge/recipes/translate-bible-en-es.yaml", {
            "train.out": str(out), "train.max_steps": 4, "train.eval_interval": 100, "train.save_interval": 2,
            "train.batch_size": 4, "schedule.warmup_steps": 1, "model.n_embd": 16, "model.intermediate_size": 24,
            "model.n_layer": 1, "model.n_decoder_layer": 1, "model.n_head": 2, "eval.validation_examples": 0,
            "eval.loss_examples": 4, "eval.test_examples": 2, "eval.max_new_tokens": 3,
            "data.cache": str(tmp_path / "corpus"), "data.tokenizer_vocab_size": 400, "train.plots": False, **more})

    quiet = {"progress": False, "log": lambda _m: None}
    whole = train_translator(config(tmp_path / "whole"), **quiet)
    train_translator(config(tmp_path / "parts", **{"train.stop_at_step": 2}), **quiet)
    saved = ckpt.load_checkpoint(ckpt.latest_checkpoint(tmp_path / "parts" / "checkpoints"))
    assert saved["state"]["step"] == 2 and saved["optimizer"]["state"]  # Adam moments were kept
    with pytest.raises(LmforgeError, match="--resume"):
        train_translator(config(tmp_path / "parts"), **quiet)
    resumed = train_translator(config(tmp_path / "parts"), resume=True, **quiet)
    assert resumed["steps"] == whole["steps"] == 4
    a, b = load_seq2seq(whole["output"]), load_seq2seq(resumed["output"])
    for name, tensor in a.state_dict().items():
        torch.testing.assert_close(b.state_dict()[name], tensor, rtol=0, atol=1e-6, msg=name)
