"""Classification fine-tuning: word-piece label alignment against the tokenizers library, the
generated tagging set's splits, a tiny classifier that learns through the one training loop,
and ``lmforge finetune classify`` end to end on a tiny model."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from lmforge.errors import LmforgeError
from lmforge.tune.classify import (ClassificationTask, encode_words, entity_splits, labels_of, load_classify_recipe,
                                   sentiment_splits, special_tokens)
from lmforge.tune.heads import IGNORE_INDEX


@pytest.fixture(scope="module")
def tiny_bert_dir(minilm_dir, tmp_path_factory):
    """A 2-layer random BERT with all-MiniLM-L6-v2's WordPiece tokenizer (vocabulary 30522)."""
    import transformers as T

    torch.manual_seed(0)
    config = T.BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                          intermediate_size=48, max_position_embeddings=128)
    path = tmp_path_factory.mktemp("tiny-bert-wordpiece")
    T.BertModel(config).save_pretrained(path)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(minilm_dir / name, path / name)
    return path


def test_first_piece_labels_match_word_ids(minilm_dir):
    from tokenizers import Tokenizer as Reference

    from lmforge.tokenizer import Tokenizer

    ours = Tokenizer.from_pretrained_dir(minilm_dir)
    ref = Reference.from_file(str(minilm_dir / "tokenizer.json"))
    ref.no_truncation()
    ref.no_padding()
    words = ["Fatima", "Okafor", "walked", "12.5", "km", "around", "Valparaiso", "on", "2023-03-05", "."]
    tags = list(range(len(words)))
    enc = encode_words(ours, words, tags, 64)
    theirs = ref.encode(words, is_pretokenized=True)
    assert enc.ids == theirs.ids
    # The tag sits on the first piece of each word, -100 on the others and on [CLS]/[SEP].
    first = {}
    for position, word in enumerate(theirs.word_ids):
        if word is not None and word not in first:
            first[word] = position
    expected = [first.get(w) == p and w is not None for p, w in enumerate(theirs.word_ids)]
    assert [label != IGNORE_INDEX for label in enc.target] == expected
    assert [enc.target[p] for p in enc.word_starts] == tags
    # Cut at max_len: whole words only, special tokens kept.
    short = encode_words(ours, words, tags, 8)
    assert len(short.ids) <= 8 and short.ids[-1] == theirs.ids[-1] and len(short.word_starts) < len(words)


def test_byte_level_words_encode_like_the_sentence(default_lm):
    tok = default_lm.tokenizer
    words = ["Ana", "flew", "to", "Buenos", "Aires", "on", "5", "March", "2024", "."]
    enc = encode_words(tok, words, [0] * len(words), 64)
    before, after = special_tokens(tok)
    assert enc.ids == before + tok.encode(" ".join(words), add_special_tokens=False) + after


def test_entity_splits_are_disjoint_and_tags_are_checkable():
    splits = entity_splits(0, {"train": 300, "validation": 50, "test": 80})
    texts = {s: {" ".join(r["tokens"]) for r in v} for s, v in splits.items()}
    assert [len(v) for v in splits.values()] == [300, 50, 80]
    assert not (texts["train"] & texts["test"]) and not (texts["train"] & texts["validation"])
    train_words = {w for r in splits["train"] for w in r["tokens"]}
    for r in splits["test"]:
        assert len(r["tokens"]) == len(r["tags"])
        for word, tag in zip(r["tokens"], r["tags"]):
            if tag in ("B-PER", "B-LOC"):
                assert word not in train_words  # unseen names and cities in the test split
            if tag == "B-QTY":
                assert word.replace(".", "").isdigit()
    assert labels_of(splits["train"], "token") == ["O", "B-DATE", "I-DATE", "B-LOC", "I-LOC", "B-PER", "I-PER",
                                                   "B-QTY", "I-QTY"]
    assert entity_splits(0, {"train": 300, "validation": 50, "test": 80}) == splits  # deterministic


def test_sentiment_splits_reuse_the_pang_lee_split():
    splits = sentiment_splits(0)
    assert {s: len(v) for s, v in splits.items()} == {"train": 140, "validation": 20, "test": 40}
    assert all(r["label"] in ("positive", "negative") and r["text"] and "\n" not in r["text"]
               for v in splits.values() for r in v)
    assert not ({r["text"] for r in splits["train"]} & {r["text"] for r in splits["test"]})


def _keyword_splits():
    """Sequence labels decided by one word; token tags: numbers are B-NUM."""
    import random

    rng = random.Random(0)
    fillers = ["the", "film", "was", "quite", "really", "plot", "actors", "story"]
    seq, tok = [], []
    for i in range(96):
        label = ["negative", "positive"][i % 2]
        words = rng.sample(fillers, 4) + [{"positive": "wonderful", "negative": "terrible"}[label]]
        rng.shuffle(words)
        seq.append({"text": " ".join(words), "label": label})
        words = rng.sample(fillers, 4) + [str(rng.randint(10, 999))]
        rng.shuffle(words)
        tok.append({"tokens": words, "tags": ["B-NUM" if w.isdigit() else "O" for w in words]})
    split = lambda rows: {"train": rows[:64], "validation": rows[64:80], "test": rows[80:]}  # noqa: E731
    return split(seq), split(tok)


@pytest.mark.parametrize("kind", ["sequence", "token"])
def test_tiny_classifier_learns_through_the_loop(tiny_bert_dir, tmp_path, kind):
    from lmforge.tune.classify import classify

    seq, tok = _keyword_splits()
    config = load_classify_recipe(None, {"model.init_from": str(tiny_bert_dir), "train.max_steps": 40,
                                         "train.batch_size": 16, "optim.lr": 3e-3, "schedule.warmup_steps": 2,
                                         "train.eval_interval": 40, "train.out": str(tmp_path / "run"),
                                         "train.threads": 1, "train.plots": False})
    report = classify(config, progress=False, log=lambda _m: None, splits=seq if kind == "sequence" else tok)
    test = report["test"]
    if kind == "sequence":
        assert test["accuracy"] >= 0.9 and test["macro_f1"] >= 0.9, test
    else:
        assert test["entity_f1"] >= 0.9, test
    assert report["train_seconds"] > 0 and report["trainable_fraction"] == 1.0
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert saved["confusion_matrix"] == test["confusion_matrix"]
    # The saved model predicts what the run measured.
    from lmforge.tune.heads import load_classifier

    model = load_classifier(tmp_path / "run" / "model")
    task = ClassificationTask(config, seq if kind == "sequence" else tok)
    task.setup(type("T", (), {"log": staticmethod(lambda _m: None)})())
    again = task.score(model, "test")
    key = "accuracy" if kind == "sequence" else "entity_f1"
    assert again[key] == pytest.approx(test[key])


def test_class_weights_and_lora_head(tiny_bert_dir, tmp_path):
    from lmforge.train.loop import Trainer

    seq, _ = _keyword_splits()
    seq["train"] = [r for r in seq["train"] if r["label"] == "positive"] + \
        [r for r in seq["train"] if r["label"] == "negative"][:8]
    config = load_classify_recipe(None, {"model.init_from": str(tiny_bert_dir), "train.max_steps": 1,
                                         "head.balanced_weights": True, "peft.method": "lora",
                                         "schedule.warmup_steps": 0,
                                         "train.out": str(tmp_path / "w"), "train.plots": False})
    task = ClassificationTask(config, seq)
    trainer = Trainer(config, task=task, progress=False, log=lambda _m: None)
    assert task.class_weights == pytest.approx([40 / 16, 40 / 64])  # negative is rare, weighs more
    trainable = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert trainable and all("lora" in n or n.startswith(("score.", "pooler.")) for n in trainable)
    assert {"score.weight", "score.bias", "pooler.weight"} <= trainable
    assert task.trainable / task.total < 0.2


def test_bad_recipes_are_refused(tiny_bert_dir, tmp_path):
    with pytest.raises(LmforgeError, match="head.task"):
        load_classify_recipe(None, {"head.task": "span"})
    with pytest.raises(LmforgeError, match="neither"):
        from lmforge.tune.classify import load_splits

        load_splits(load_classify_recipe(None, {"data.dataset": str(tmp_path / "missing")}).data)
    config = load_classify_recipe(None, {"model.init_from": str(tiny_bert_dir), "head.task": "token",
                                         "train.out": str(tmp_path / "x")})
    from lmforge.tune.classify import classify

    with pytest.raises(LmforgeError, match="data is for sequence"):
        classify(config, progress=False, log=lambda _m: None, splits=_keyword_splits()[0])


def test_cli_classify_end_to_end(tiny_bert_dir, tmp_path, capsys):
    from lmforge.cli import main

    seq, _ = _keyword_splits()
    data = tmp_path / "data"
    data.mkdir()
    for split, rows in seq.items():
        (data / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "run"
    args = ["finetune", "classify", "classify-sentiment-minilm", "--model.init-from", str(tiny_bert_dir),
            "--data.dataset", str(data), "--train.max-steps", "4", "--train.eval-interval", "2",
            "--schedule.warmup-steps", "1", "--out", str(out), "--quiet"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "test split (16 texts): accuracy" in printed and "| true \\ predicted |" in printed
    assert (out / "model" / "config.json").is_file() and (out / "plots" / "confusion.png").is_file()
    report = json.loads((out / "report.json").read_text())
    assert report["steps"] == 4 and [e["step"] for e in report["validation"]] == [2, 4]
    assert "Test split (16 texts): accuracy" in (out / "report.md").read_text()
    assert main(args[:3] + ["--head.focal-gamma", "-1"]) == 1
    assert "focal_gamma" in capsys.readouterr().err


def test_cli_writes_the_entity_set(tmp_path, capsys):
    from lmforge.cli import main

    assert main(["finetune", "data", "entities", "--out", str(tmp_path / "ent"), "--train-size", "40",
                 "--validation-size", "10", "--test-size", "20", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["counts"] == {"train": 40, "validation": 10, "test": 20} and info["task"] == "token"
    rows = [json.loads(line) for line in (tmp_path / "ent" / "test.jsonl").read_text().splitlines()]
    assert len(rows) == 20 and all(len(r["tokens"]) == len(r["tags"]) for r in rows)
    assert info["entities"]["test"] == sum(t.startswith("B-") for r in rows for t in r["tags"])
