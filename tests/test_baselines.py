"""`lmforge baseline`: one corpus, one tokenizer, the same test tokens for every model."""

from __future__ import annotations

import json

import numpy as np
import pytest

from lmforge.cli import main

WORDS = ("the river city north old people king war church music water village early small music many first "
         "language history land school world great house empire people island science public under between "
         "during found became which while after before their other would could these those years later").split()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """40 plain-text articles of English words and a built ``ROOT/data`` (vocabulary 300, rows of 32)."""
    base = tmp_path_factory.mktemp("baselines")
    texts = base / "texts"
    texts.mkdir()
    rng = np.random.default_rng(0)
    for i in range(40):
        sentences = [" ".join(rng.choice(WORDS, size=rng.integers(6, 12))).capitalize() + "." for _ in range(14)]
        (texts / f"article{i:02d}.txt").write_text(" ".join(sentences) + "\n", encoding="utf-8")
    root = base / "runs"
    flags = ["--root", str(root), "--source", str(texts), "--vocab-size", "300", "--seq-len", "32",
             "--val-fraction", "0.2", "--test-fraction", "0.2", "--quiet"]
    assert main(["baseline", "prepare", *flags]) == 0
    return root, flags


def test_prepare_splits_by_article_and_ngram_scores_the_test_rows(corpus, capsys):
    root, flags = corpus
    capsys.readouterr()
    index = json.loads((root / "data" / "index.json").read_text())
    assert set(index["splits"]) == {"train", "validation", "test"} and index["vocab_size"] == 300
    assert main(["baseline", "prepare", *flags]) == 0  # built once; a second call reuses it
    capsys.readouterr()
    assert main(["baseline", "train", "ngram", "--order", "3", *flags]) == 0
    result = json.loads(capsys.readouterr().out)
    test_rows = index["splits"]["test"]["rows"]
    assert result["tokens"] == test_rows * 31  # every row's tokens after the first
    assert 1 < result["perplexity"] < 300
    assert main(["baseline", "eval", "ngram-3", *flags]) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["perplexity"] == pytest.approx(result["perplexity"], rel=1e-12)
    # a unigram is worse than the trigram on the same tokens
    assert main(["baseline", "train", "ngram", "--order", "1", *flags]) == 0
    assert json.loads(capsys.readouterr().out)["perplexity"] > result["perplexity"]
    # the trigram as an ARPA file, its words the tokenizer's tokens, scores as the counted model
    from lmforge.eval.baselines import BaselineConfig, load_rows, load_tokenizer
    from lmforge.model.arpa import ArpaLM, arpa_words
    from lmforge.model.ngram import NGramLM

    assert main(["baseline", "arpa", "ngram-3", *flags]) == 0
    arpa = ArpaLM.load(root / "ngram-3" / "model.arpa")
    config = BaselineConfig(root=str(root))
    tokenizer = load_tokenizer(config)
    words = arpa_words([tokenizer.id_to_token(i) or "" for i in range(tokenizer.vocab_size)], tokenizer.vocab_size)
    assert sum(w.startswith("<id:") for w in words) < 5  # byte-level tokens are whitespace-free: names kept
    row = load_rows(config, "test")[0]
    np.testing.assert_allclose(arpa.token_logprobs(row, words), NGramLM.load(root / "ngram-3" / "ngram.safetensors")
                               .token_logprobs(row), atol=1e-7)
    capsys.readouterr()
    assert main(["baseline", "arpa", "lstm", *flags]) != 0
    assert "no trained n-gram model 'lstm'" in capsys.readouterr().err


@pytest.mark.slow
def test_every_model_trains_and_the_comparison_lines_them_up(corpus, capsys):
    root, flags = corpus
    tiny = ["--steps", "4", "--eval-interval", "2", "--eval-rows", "4", "--gen-tokens", "4", "--batch-size", "4",
            "--bptt", "8", "--lstm-hidden", "16", "--gru-hidden", "16", "--rnn-layers", "1", "--n-layer", "1",
            "--n-embd", "16", "--n-head", "2", "--n-kv-head", "1", "--intermediate-size", "32",
            "--transformer-rows", "2"]
    assert main(["baseline", "train", "ngram", "--order", "2", *flags]) == 0
    results = {}
    for kind in ("lstm", "gru", "transformer"):
        capsys.readouterr()
        assert main(["baseline", "train", kind, *tiny, *flags]) == 0
        results[kind] = json.loads(capsys.readouterr().out)
        assert main(["baseline", "eval", kind, *flags]) == 0
        assert json.loads(capsys.readouterr().out)["perplexity"] == pytest.approx(results[kind]["perplexity"],
                                                                                rel=1e-5)
    assert len({r["tokens"] for r in results.values()}) == 1
    stored = json.loads((root / "lstm" / "result.json").read_text())
    assert [c["step"] for c in stored["validation"]] == [0, 2, 4]
    assert 0 < stored["cpu_per_wall"] <= 1
    assert stored["cpu_seconds"] == pytest.approx(stored["train_seconds"] * stored["cpu_per_wall"])
    assert stored["validation"][-1]["cpu_seconds"] <= stored["validation"][-1]["seconds"]
    transformer = json.loads((root / "transformer" / "result.json").read_text())
    assert [c["step"] for c in transformer["validation"]] == [2, 4]
    assert transformer["validation"][1]["seconds"] >= transformer["validation"][0]["seconds"] > 0
    capsys.readouterr()
    assert main(["baseline", "compare", *flags]) == 0
    table = capsys.readouterr().out
    for name in ("ngram-2", "lstm", "gru", "transformer"):
        assert f"| {name} |" in table
    comparison = json.loads((root / "comparison.json").read_text())
    names = [r["model"] for r in comparison["rows"]]
    assert names.index("ngram-2") < names.index("lstm") < names.index("gru") < names.index("transformer")
    assert (root / "comparison.png").stat().st_size > 1000


def test_errors_end_in_one_message(tmp_path, capsys):
    assert main(["baseline", "train", "lstm", "--root", str(tmp_path)]) == 1
    assert "baseline prepare" in capsys.readouterr().err
    assert main(["baseline", "compare", "--root", str(tmp_path)]) == 1
    assert "no trained baselines" in capsys.readouterr().err
    assert main(["baseline", "train", "ngram", "--order", "0", "--root", str(tmp_path)]) == 1
    assert "order" in capsys.readouterr().err
