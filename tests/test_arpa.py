"""The ARPA writer and reader (lmforge/model/arpa.py): an interpolated Kneser-Ney model written
as a back-off model must give the same probabilities through the back-off rule, every
distribution must still sum to one, and a reader of any ARPA file follows that rule.
(KenLM reading the same files is checked by benchmarks/ngram_arpa.py; see docs/benchmarks.md.)"""

from __future__ import annotations

import math

import numpy as np
import pytest

from lmforge.errors import LmforgeError
from lmforge.model.arpa import ArpaLM, arpa_words, write_arpa
from lmforge.model.ngram import NGramLM

V = 30


@pytest.fixture(scope="module")
def fitted():
    rng = np.random.default_rng(0)
    # ids 27..29 never occur: the unigram floor (1/V) is all they get
    train = [rng.integers(0, V - 3, size=int(rng.integers(5, 60))) for _ in range(40)]
    return NGramLM(4, V).fit(train), train, rng


@pytest.mark.parametrize("order", [1, 2, 4])
def test_written_model_scores_like_the_counted_one(tmp_path, order):
    rng = np.random.default_rng(order)
    train = [rng.integers(0, V - 3, size=int(rng.integers(5, 60))) for _ in range(40)]
    model = NGramLM(order, V).fit(train)
    arpa = ArpaLM.load(write_arpa(model, tmp_path / "m.arpa"))
    words = arpa_words(None, V)
    # held-out sequences over the whole vocabulary (unseen n-grams, unseen words) and training ones
    for seq in [rng.integers(0, V, size=40) for _ in range(4)] + train[:2]:
        np.testing.assert_allclose(arpa.token_logprobs(seq, words, first=0), model.token_logprobs(seq, first=0),
                                   rtol=0, atol=1e-7)


def test_back_off_distributions_sum_to_one(fitted, tmp_path):
    model, train, rng = fitted
    arpa = ArpaLM.load(write_arpa(model, tmp_path / "m.arpa"))
    words = arpa_words(None, V)
    contexts = [[], [5], list(train[0][:3]), list(train[1][4:7]), [29, 28, 27], list(rng.integers(0, V, 3))]
    for context in contexts:
        total = sum(math.exp(arpa.logprob([words[c] for c in context], w)) for w in words)
        assert total == pytest.approx(1.0, abs=1e-7), context


def test_file_layout_and_word_names(fitted, tmp_path):
    model, _, _ = fitted
    tokens = [f"tok{i}" for i in range(V)]
    tokens[3], tokens[4], tokens[5], tokens[6] = "two words", "<s>", "dup", "dup"
    words = arpa_words(tokens, V)
    assert words[0] == "tok0" and words[3] == "<id:3>" and words[4] == "<id:4>" and words[5:7] == ["<id:5>", "<id:6>"]
    path = write_arpa(model, tmp_path / "named.arpa", tokens)
    text = path.read_text(encoding="utf-8").splitlines()
    assert text[0] == "\\data\\" and text[-1] == "\\end\\"
    counts = [int(line.split("=")[1]) for line in text if line.startswith("ngram ")]
    assert counts == [V + 3] + model.num_ngrams()[1:]  # the whole vocabulary and the three markers
    arpa = ArpaLM.load(path)
    assert {"<s>", "</s>", "<unk>", "tok0", "<id:3>"} <= {w[0] for w in arpa.tables[0]}
    seq = [0, 3, 5, 6, 1, 2]
    np.testing.assert_allclose(arpa.token_logprobs(seq, words), model.token_logprobs(seq), atol=1e-7)


def test_reader_errors(tmp_path, fitted):
    with pytest.raises(LmforgeError, match="no ARPA file"):
        ArpaLM.load(tmp_path / "missing.arpa")
    model, _, _ = fitted
    good = write_arpa(model, tmp_path / "good.arpa").read_text(encoding="utf-8")
    cut = good[: good.index("\n", len(good) // 2) + 1]  # stops after a whole line
    (tmp_path / "cut.arpa").write_text(cut, encoding="utf-8")
    with pytest.raises(LmforgeError, match="not a complete ARPA file"):
        ArpaLM.load(tmp_path / "cut.arpa")
    (tmp_path / "torn.arpa").write_text(cut[:-8] + "\n\\end\\\n", encoding="utf-8")  # the last line torn
    with pytest.raises(LmforgeError, match="fields|do not match|not a readable ARPA file"):
        ArpaLM.load(tmp_path / "torn.arpa")
    (tmp_path / "bad.arpa").write_text(good.replace("\n-", "\nx-", 1), encoding="utf-8")  # a probability that is no number
    with pytest.raises(LmforgeError, match="not a readable ARPA file"):
        ArpaLM.load(tmp_path / "bad.arpa")
    with pytest.raises(LmforgeError, match="not in the model's vocabulary"):
        ArpaLM.load(tmp_path / "good.arpa").logprob([], "no-such-word")
    with pytest.raises(LmforgeError, match="token strings for a vocabulary"):
        arpa_words(["a"], V)
