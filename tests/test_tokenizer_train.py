"""T1-T3, T6: lmforge's BPE, WordPiece and Unigram trainers.

Parity: the tokenizer.json each trainer writes is loaded by Hugging Face `tokenizers` and by
lmforge, and both must give identical ids on held-out text (other languages and scripts,
unknown characters, special tokens included). For BPE, the learned merges themselves must
equal those of `tokenizers`' BpeTrainer on the same corpus, and a hand-worked example.
"""

from __future__ import annotations

import json
import os

import pytest

from lmforge.cli import main
from lmforge.data.corpora import gensim_data_file, load_source
from lmforge.data.samples import MULTILINGUAL_SAMPLES
from lmforge.tokenizer import Tokenizer
from lmforge.tokenizer.train import train_tokenizer
from lmforge.tokenizer.train.bpe import train_bpe
from lmforge.tokenizer.train.report import quality_report
from lmforge.tokenizer.train.unigram import UnigramModel
from lmforge.tokenizer.train.wordpiece import WordPieceModel

tokenizers = pytest.importorskip("tokenizers")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="module")
def corpus() -> tuple[list[str], list[str]]:
    """(training texts, held-out texts): news articles, then other articles and other scripts."""
    news = [d.text for d in load_source("news")]
    crime = gensim_data_file("gensim/test/test_data/crime-and-punishment.txt").read_text(encoding="utf-8")
    held_out = news[200:215] + [t for texts in MULTILINGUAL_SAMPLES.values() for t in texts] + [
        crime[:1500],
        "Special <|endoftext|> tokens [SEP] and <unk> written in text, emoji 🙂🎉, tabs\tand\n\nnewlines.",
        "x" * 120 + " " + "ü" * 99 + " Ωmega 3.14159 e=mc² naïve café",
    ]
    return news[:200], held_out


def _assert_same_ids(path, held_out):
    ours = Tokenizer.from_file(path)
    theirs = tokenizers.Tokenizer.from_file(str(path))
    for text in held_out:
        assert ours.encode(text) == theirs.encode(text).ids, text[:60]
        ids = theirs.encode(text).ids
        assert ours.decode(ids, skip_special_tokens=True) == theirs.decode(ids), text[:60]
    return ours


def test_bpe_merges_match_a_hand_computed_example():
    # Pair counts: u g 20, u n 16, h u 15, ... -> "ug"; then u n 16 -> "un"; h ug 15 -> "hug";
    # p un 12 -> "pun"; then p ug and hug s both 5: the smaller ids win (p=4, ug=7 before hug=9),
    # so "pug", then "hugs", then b un 4 -> "bun".
    words = {"hug": 10, "pug": 5, "pun": 12, "bun": 4, "hugs": 5}
    result = train_bpe(words, vocab_size=14)
    assert result.merges == [("u", "g"), ("u", "n"), ("h", "ug"), ("p", "un"), ("p", "ug"), ("hug", "s"), ("b", "un")]
    assert list(result.vocab)[:7] == ["b", "g", "h", "n", "p", "s", "u"]
    # The same words through `tokenizers`' trainer give the same merges.
    hf = tokenizers.Tokenizer(tokenizers.models.BPE())
    hf.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=14, show_progress=False)
    hf.train_from_iterator([" ".join(w for w, c in words.items() for _ in range(c))], trainer)
    hf_merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" "))
                 for m in json.loads(hf.to_str())["model"]["merges"]]
    assert hf_merges == result.merges


def test_byte_level_bpe_matches_tokenizers_trainer_and_encodes_identically(corpus, tmp_path):
    train, held_out = corpus
    tok = train_tokenizer(train, "bpe", 1000)
    tok.save(tmp_path)
    hf = tokenizers.Tokenizer(tokenizers.models.BPE())
    hf.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=1000, special_tokens=["<|endoftext|>"], show_progress=False,
                                             initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    hf.train_from_iterator(train, trainer)
    ours_model = json.loads((tmp_path / "tokenizer.json").read_text())["model"]
    hf_model = json.loads(hf.to_str())["model"]
    assert ours_model["vocab"] == hf_model["vocab"]
    assert [list(m) for m in ours_model["merges"]] == [m if isinstance(m, list) else m.split(" ")
                                                       for m in hf_model["merges"]]
    loaded = _assert_same_ids(tmp_path / "tokenizer.json", held_out)
    assert all(loaded.decode(loaded.encode(t)) == t for t in held_out)  # byte level: lossless
    directory = Tokenizer.from_pretrained_dir(tmp_path)  # tokenizer_config.json names the EOS token
    assert directory.eos_token == "<|endoftext|>" and directory.encode("<|endoftext|>") == [directory.eos_id] == [0]


def test_llama3_style_bpe_encodes_identically(corpus, tmp_path):
    train, held_out = corpus
    train_tokenizer(train[:100], "bpe", 600, pre_tokenization="llama3").save(tmp_path)
    _assert_same_ids(tmp_path / "tokenizer.json", held_out)


def test_wordpiece_encodes_identically(corpus, tmp_path):
    train, held_out = corpus
    tok = train_tokenizer(train, "wordpiece", 1200)
    tok.save(tmp_path)
    loaded = _assert_same_ids(tmp_path / "tokenizer.json", held_out)
    ids = loaded.encode("the government")
    assert all(not loaded.id_to_token(i).startswith("##") for i in ids[:1])
    train_tokenizer(train[:60], "wordpiece", 500, score="ratio", lowercase=True).save(tmp_path / "ratio")
    _assert_same_ids(tmp_path / "ratio" / "tokenizer.json", held_out)


def test_unigram_encodes_identically(corpus, tmp_path):
    train, held_out = corpus
    tok = train_tokenizer(train[:120], "unigram", 800)
    tok.save(tmp_path)
    _assert_same_ids(tmp_path / "tokenizer.json", held_out)
    vocab = json.loads((tmp_path / "tokenizer.json").read_text())["model"]["vocab"]
    assert vocab[0] == ["<unk>", 0.0] and len(vocab) == 800
    scores = [s for _, s in vocab[3:]]
    assert scores == sorted(scores, reverse=True) and all(s < 0 for s in scores)


def test_wordpiece_greedy_longest_match():
    vocab = {"[UNK]": 0, "ba": 1, "##na": 2, "##n": 3, "banana": 4, "bandana": 5}
    model = WordPieceModel(vocab)
    words = ["banana", "bananana", "nanana", "ban", "bandanas"]
    out: list[int] = []
    model.encode_pieces(words, out)
    # "bananana": the longest match from the start is "banana", then "##na"; "nanana" cannot
    # start (no "na" without ##): the whole word is [UNK]; "bandanas": "s" is missing -> [UNK].
    assert out == [4, 4, 2, 0, 1, 3, 0]
    hf = tokenizers.models.WordPiece(vocab, unk_token="[UNK]")
    assert [t.id for w in words for t in hf.tokenize(w)] == out


def test_unigram_viterbi_prefers_the_most_probable_segmentation():
    model = UnigramModel([("<unk>", 0.0), ("a", -1.0), ("b", -1.0), ("c", -1.0), ("d", -1.0), ("cd", -1.5),
                          ("ab", -1.8), ("abc", -2.5), ("abcd", -2.6)])
    assert model.segment("abcdacdxx") == ["abcd", "a", "cd", "xx"]  # the unknown "xx" is fused
    assert model.encode_word("abcdacdxx") == [8, 1, 5, 0]


def test_quality_report_and_cli(corpus, tmp_path, capsys):
    train, held_out = corpus
    (tmp_path / "train.txt").write_text("\n\n".join(train[:80]), encoding="utf-8")
    (tmp_path / "held.txt").write_text("\n\n".join(held_out[:10]), encoding="utf-8")
    for algo, size in (("bpe", 500), ("unigram", 500)):
        assert main(["tokenizer", "train", "--algo", algo, "--vocab-size", str(size), "--input",
                     str(tmp_path / "train.txt"), "--out", str(tmp_path / algo), "--quiet", "--json"]) == 0
        assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["vocab_size"] == size
        tokenizers.Tokenizer.from_file(str(tmp_path / algo / "tokenizer.json"))
    assert main(["tokenizer", "report", "--tokenizer", f"bpe={tmp_path / 'bpe'}", "--tokenizer",
                 f"unigram={tmp_path / 'unigram'}", "--heldout", str(tmp_path / "held.txt"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    english = report["groups"]["en (Latin), held-out files"]
    assert english["bpe"]["unknown_rate"] == 0 and english["bpe"]["round_trip"] == 1.0
    assert 2.0 < english["bpe"]["bytes_per_token"] < 5.0
    assert report["groups"]["zh (Han), samples"]["unigram"]["unknown_rate"] > 0.2  # unseen script
    assert main(["tokenizer", "train", "--algo", "bpe", "--vocab-size", "100", "--input",
                 str(tmp_path / "train.txt"), "--out", str(tmp_path / "x"), "--quiet"]) == 1
    assert "at least 257" in capsys.readouterr().err
    direct = quality_report({"bpe": Tokenizer.from_file(tmp_path / "bpe" / "tokenizer.json")}, {"g": ["abc def"]})
    assert direct["groups"]["g"]["bpe"]["texts"] == 1
