"""Augmentation and class imbalance (D8): EDA edits keep labels and words, resampling balances
classes, inverse-frequency weights, focal loss against cross-entropy and a hand-derived value."""

from __future__ import annotations

import math
import random
from collections import Counter

import pytest
import torch
import torch.nn.functional as F

from lmforge.errors import LmforgeError
from lmforge.tune.augment import (augment_records, class_counts, class_weights, eda, focal_loss, oversample,
                                  undersample)

TEXT = "the film is a quiet and moving portrait of a good family"


def test_eda_operations():
    rng = random.Random(0)
    swapped = eda(TEXT, rng, alpha=0.2, operation="swap")
    assert sorted(swapped.split()) == sorted(TEXT.split()) and swapped != TEXT
    deleted = eda(TEXT, rng, alpha=0.3, operation="delete").split()
    assert 1 <= len(deleted) < len(TEXT.split()) and Counter(deleted) <= Counter(TEXT.split())
    synonyms = {"good": ["fine", "decent"], "quiet": ["calm"]}
    replaced = eda(TEXT, rng, alpha=0.2, synonyms=synonyms, operation="synonym").split()
    assert len(replaced) == len(TEXT.split()) and ("good" not in replaced or "quiet" not in replaced)
    inserted = eda(TEXT, rng, alpha=0.1, synonyms=synonyms, operation="insert").split()
    assert len(inserted) == len(TEXT.split()) + 1 and {"fine", "decent", "calm"} & set(inserted)
    with pytest.raises(LmforgeError, match="not available"):
        eda(TEXT, rng, operation="synonym")  # no synonyms given
    assert eda("one", rng) == "one"


def test_augmented_records_keep_labels_and_the_instruction():
    records = [{"messages": [{"role": "user", "content": f"Is this review positive or negative?\n\n{TEXT}"},
                             {"role": "assistant", "content": "positive"}], "answer": "positive"}]
    out = augment_records(records, copies=3, seed=1, alpha=0.2)
    assert len(out) == 4 and out[0] == records[0]
    for r in out[1:]:
        assert r["augmented"] == "eda" and r["answer"] == "positive" and r["messages"][1]["content"] == "positive"
        instruction, _, body = r["messages"][0]["content"].partition("\n\n")
        assert instruction == "Is this review positive or negative?" and body != TEXT
    assert augment_records(records, 3, seed=1, alpha=0.2) == out  # seeded


def test_resampling_and_class_weights():
    records = [{"answer": "pos", "i": i} for i in range(7)] + [{"answer": "neg", "i": i} for i in range(3)]
    assert class_counts(records) == {"neg": 3, "pos": 7}
    over = oversample(records, seed=0)
    assert class_counts(over) == {"neg": 7, "pos": 7}
    neg = Counter(r["i"] for r in over if r["answer"] == "neg")
    assert set(neg) == {0, 1, 2} and max(neg.values()) - min(neg.values()) <= 1  # spread evenly
    under = undersample(records, seed=0)
    assert class_counts(under) == {"neg": 3, "pos": 3}
    weights = class_weights([r["answer"] for r in records])
    assert weights == {"pos": pytest.approx(10 / 14), "neg": pytest.approx(10 / 6)}
    assert sum(weights[r["answer"]] for r in records) / len(records) == pytest.approx(1.0)


def test_focal_loss():
    torch.manual_seed(0)
    logits, targets = torch.randn(6, 3), torch.tensor([0, 1, 2, 2, 1, 0])
    weight = torch.tensor([0.5, 1.0, 2.0])
    assert focal_loss(logits, targets, gamma=0.0).item() == pytest.approx(F.cross_entropy(logits, targets).item(), rel=1e-6)
    assert focal_loss(logits, targets, gamma=0.0, weight=weight).item() == pytest.approx(
        F.cross_entropy(logits, targets, weight=weight).item(), rel=1e-6)
    # By hand: two classes, p_t = sigmoid(2) for the target; gamma = 2.
    p = 1 / (1 + math.exp(-2.0))
    value = focal_loss(torch.tensor([[2.0, 0.0]]), torch.tensor([0]), gamma=2.0).item()
    assert value == pytest.approx(-((1 - p) ** 2) * math.log(p), rel=1e-5)  # float32
    # Confident examples lose more of their loss than hard ones.
    easy, hard = focal_loss(torch.tensor([[4.0, 0.0], [0.0, 0.5]]), torch.tensor([0, 0]), reduction="none")
    ce = F.cross_entropy(torch.tensor([[4.0, 0.0], [0.0, 0.5]]), torch.tensor([0, 0]), reduction="none")
    assert easy / ce[0] < hard / ce[1]


def test_written_sentiment_set_with_augmentation_and_balance(tmp_path):
    import json

    from lmforge.tune.datasets import write_dataset

    info = write_dataset("sentiment", tmp_path / "s", seed=0, augment_copies=1, balance="oversample")
    assert info["counts"] == {"train": 280, "validation": 20, "test": 40}
    assert info["class_balance"]["train"] == {"negative": 140, "positive": 140}
    rows = {s: [json.loads(x) for x in (tmp_path / "s" / f"{s}.jsonl").read_text().splitlines()]
            for s in ("train", "validation", "test")}
    assert sum(r.get("augmented") == "eda" for r in rows["train"]) == 140
    assert not any("augmented" in r for r in rows["validation"] + rows["test"])
    body = {s: {r["messages"][0]["content"].partition("\n\n")[2] for r in v} for s, v in rows.items()}
    assert not (body["train"] & body["test"]) and not (body["train"] & body["validation"])
    with pytest.raises(LmforgeError, match="computed from the exact question"):
        write_dataset("arithmetic", tmp_path / "a", augment_copies=1)
