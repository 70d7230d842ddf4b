"""D1, D5, D6, D7: corpora and splits, decontamination, packing, and `lmforge data prepare` end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest

from lmforge.cli import main
from lmforge.data.corpora import load_source, open_sources, split_of
from lmforge.data.decontam import Decontaminator, read_eval_items
from lmforge.data.pack import PackedDataset, ShardWriter, token_dtype
from lmforge.errors import LmforgeError
from lmforge.tokenizer import Tokenizer
from lmforge.tokenizer.train import train_tokenizer


@pytest.fixture(scope="module")
def small_tokenizer(tmp_path_factory) -> str:
    texts = [d.text for d in load_source("news")][:120]
    out = tmp_path_factory.mktemp("tok")
    train_tokenizer(texts, "bpe", 400).save(out)
    return str(out / "tokenizer.json")


def test_named_sources_and_file_formats(tmp_path):
    news = list(load_source("news"))
    assert len(news) == 300 and news[0].text.startswith("Hundreds of people have been forced")
    (tmp_path / "a.txt").write_text("first document\n\n\nsecond document\n", encoding="utf-8")
    (tmp_path / "b.jsonl").write_text('{"id": "x", "text": "hello", "lang": "en"}\n\n{"text": "world"}\n')
    assert [d.text for d in load_source(str(tmp_path / "a.txt"))] == ["first document\n\n\nsecond document"]
    assert [d.text for d in load_source(str(tmp_path / "a.txt"), split_docs="blank")] == \
        ["first document", "second document"]
    docs = list(load_source(str(tmp_path / "b.jsonl")))
    assert [(d.id.split(":")[-1], d.text, d.meta) for d in docs] == [("x", "hello", {"lang": "en"}), ("3", "world", {})]
    assert len(open_sources(str(tmp_path))) == 2  # a directory: every corpus file in it
    (tmp_path / "bad.jsonl").write_text('{"text": 1}\n')
    with pytest.raises(LmforgeError, match="bad.jsonl:1"):
        list(load_source(str(tmp_path / "bad.jsonl")))
    with pytest.raises(LmforgeError, match="no such corpus"):
        open_sources("nowhere.txt")


def test_split_is_deterministic_and_proportional():
    texts = [f"document number {i}" for i in range(20000)]
    splits = [split_of(t, 0.1, 0.05) for t in texts]
    assert splits == [split_of(t, 0.1, 0.05) for t in texts]
    assert abs(splits.count("validation") / len(texts) - 0.1) < 0.01
    assert abs(splits.count("test") / len(texts) - 0.05) < 0.01
    assert [split_of(t, 0.1, 0.05, salt="b") for t in texts] != splits


def test_decontamination_finds_13_gram_overlap(tmp_path):
    question = ("Which of the following best explains why the sky appears blue to an observer standing "
                "on the ground at noon")
    (tmp_path / "eval.jsonl").write_text(json.dumps({"question": question, "choices": ["a", "b"]}) + "\n")
    (tmp_path / "short.txt").write_text("what is the boiling point of water at sea level\n")
    index = Decontaminator.from_files([tmp_path / "eval.jsonl", tmp_path / "short.txt"])
    assert index.items == 2
    leaked = "Quiz time! " + question.upper().replace(" ", "  ") + "? Answer: scattering."
    assert index.contaminated(leaked)
    assert index.contaminated("Q: What is the boiling point of water at sea level? A: 100 C")
    assert not index.contaminated("Which of the following best explains why the sea appears blue to swimmers")
    assert read_eval_items(tmp_path / "short.txt") == ["what is the boiling point of water at sea level"]


def test_shard_writer_packs_with_eos_and_drops_the_tail(tmp_path):
    w = ShardWriter(tmp_path, "train", seq_len=4, eos_id=0, vocab_size=100, rows_per_shard=2)
    for doc in ([1, 2, 3], [4, 5], [6, 7, 8, 9, 10]):
        w.add(doc)
    entry = w.close()
    assert entry["rows"] == 3 and entry["tokens"] == 13 and entry["dropped_tail_tokens"] == 1
    rows = np.concatenate([np.load(tmp_path / s["file"]) for s in entry["shards"]])
    assert rows.dtype == np.uint16
    assert rows.tolist() == [[1, 2, 3, 0], [4, 5, 0, 6], [7, 8, 9, 10]]
    assert token_dtype(70000) == np.uint32


@pytest.mark.slow  # seconds of the fast suite: run with the slow tests
def test_prepare_end_to_end(tmp_path, small_tokenizer, capsys):
    eval_file = tmp_path / "eval.txt"
    news = [d.text for d in load_source("news")]
    eval_file.write_text(" ".join(news[5].split()[:30]) + "\n", encoding="utf-8")
    letter = ("The village fair will take place on the first Saturday of June, and all of the stalls are "
              "already booked. If you would like to help with the cake stand or the raffle, please contact "
              "the organiser at someone@example.com or call +1 415 555 0132 before the end of the month.")
    (tmp_path / "extra.txt").write_text(news[7] + "\n\n\n" + letter, encoding="utf-8")
    out = tmp_path / "prepared"
    code = main(["data", "prepare", "--source", "news", "--source", str(tmp_path / "extra.txt"),
                 "--split-docs", "blank", "--tokenizer", small_tokenizer, "--out", str(out), "--seq-len", "64",
                 "--val-fraction", "0.1", "--decontaminate", str(eval_file), "--quiet", "--json"])
    assert code == 0
    printed = json.loads(capsys.readouterr().out)
    index = json.loads((out / "index.json").read_text())
    assert printed["splits"] == index["splits"] and index["dtype"] == "uint16" and index["seq_len"] == 64
    card = json.loads((out / "scorecard.json").read_text())
    stages = card["stages"]
    assert stages["exact_dedup"]["docs_dropped"] >= 2  # news[7] repeated by extra.txt, plus real repeats
    assert stages["decontaminate"]["docs_dropped"] == 1
    assert card["pii"]["matches"] == {"email": 1, "phone": 1}
    assert card["languages"]["en"]["docs"] == card["summary"]["docs_out"]
    assert (out / "scorecard.md").read_text().startswith("# Dataset scorecard")
    tok = Tokenizer.from_file(small_tokenizer)
    train = PackedDataset(out, "train")
    assert len(train) == index["splits"]["train"]["rows"] > 0 and train[0].shape == (64,)
    total_eos = sum(int((train[i] == index["eos_id"]).sum()) for i in range(len(train)))
    assert total_eos == index["splits"]["train"]["documents"] - (index["splits"]["train"]["dropped_tail_tokens"] > 0)
    cleaned = [json.loads(line) for line in (out / "text" / "train.jsonl").read_text().splitlines()]
    assert tok.decode(train[0].tolist()).startswith(cleaned[0]["text"][:40])
    assert any("[EMAIL]" in r["text"] for r in cleaned + [json.loads(x) for x in
               (out / "text" / "validation.jsonl").read_text().splitlines()])
    # Same input, same output: splits and shards are reproducible.
    main(["data", "prepare", "--source", "news", "--source", str(tmp_path / "extra.txt"), "--split-docs", "blank",
          "--tokenizer", small_tokenizer, "--out", str(tmp_path / "again"), "--seq-len", "64",
          "--val-fraction", "0.1", "--decontaminate", str(eval_file), "--quiet"])
    assert np.array_equal(np.load(out / "train-00000.npy"), np.load(tmp_path / "again" / "train-00000.npy"))


@pytest.mark.parametrize("args,message", [
    (["--source", "nowhere"], "no such corpus"),
    (["--source", "news", "--val-fraction", "1.5"], "fraction"),
    (["--source", "news", "--decontaminate", "missing.txt"], "evaluation file not found"),
    (["--source", "news", "--weight", "wiki=2"], "not a --source"),
    (["--source", "news", "--tokenizer", "missing.json"], "no such file"),
])
def test_prepare_errors_are_one_line(tmp_path, capsys, args, message):
    assert main(["data", "prepare", *args, "--out", str(tmp_path / "o"), "--quiet"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("lmforge: error:") and message in err and "\n" not in err
    assert not list(tmp_path.iterdir())  # nothing half-written


def test_prepare_refuses_to_overwrite_without_flag(tmp_path, small_tokenizer, capsys):
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    assert main(["data", "prepare", "--source", "news", "--tokenizer", small_tokenizer, "--out", str(out),
                 "--quiet"]) == 1
    assert "--overwrite" in capsys.readouterr().err and (out / "keep.txt").read_text() == "precious"
