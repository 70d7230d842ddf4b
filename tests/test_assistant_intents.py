"""The generated intent data: split by template, balanced, deterministic, readable by `finetune classify`."""

from __future__ import annotations

import json

from lmforge.assistant.intents import INTENTS, make_intent_dataset, template_splits, write_intent_dataset


def test_templates_of_a_split_never_appear_in_another():
    splits = make_intent_dataset(seed=0, per_intent={"train": 40, "validation": 10, "test": 10})
    used = {s: {r["template"] for r in rows} for s, rows in splits.items()}
    assert not used["train"] & used["test"] and not used["train"] & used["validation"]
    assert not used["validation"] & used["test"]
    texts = [r["text"] for rows in splits.values() for r in rows]
    assert len(texts) == len(set(texts))
    for split, rows in splits.items():
        assert {i: sum(r["label"] == i for r in rows) for i in INTENTS} == \
            {i: {"train": 40, "validation": 10, "test": 10}[split] for i in INTENTS}
    assert all(r["page"] for rows in splits.values() for r in rows if r["label"] == "faq")
    for intent, parts in template_splits(0).items():
        assert parts["test"] and parts["validation"] and parts["train"], intent


def test_the_same_seed_gives_the_same_messages():
    a = make_intent_dataset(seed=3, per_intent={"train": 5, "validation": 2, "test": 2})
    b = make_intent_dataset(seed=3, per_intent={"train": 5, "validation": 2, "test": 2})
    c = make_intent_dataset(seed=4, per_intent={"train": 5, "validation": 2, "test": 2})
    assert a == b and a != c


def test_written_splits_are_the_classification_layout(tmp_path):
    from lmforge.tune.classify import ClassifyDataSection, load_splits, task_of

    write_intent_dataset(tmp_path / "intents", per_intent={"train": 8, "validation": 3, "test": 3})
    info = json.loads((tmp_path / "intents" / "dataset.json").read_text())
    assert info["counts"]["test"] == {i: 3 for i in INTENTS}
    rows = [json.loads(line) for line in (tmp_path / "intents" / "test.jsonl").read_text().splitlines()]
    assert len(rows) == 21 and {r["label"] for r in rows} == set(INTENTS)
    splits = load_splits(ClassifyDataSection(dataset=str(tmp_path / "intents")))
    assert task_of(splits) == "sequence" and [len(splits[s]) for s in ("train", "validation", "test")] == [56, 21, 21]
