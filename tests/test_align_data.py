"""Generated preference pairs: deterministic, disjoint splits, checkable answers; bad input is refused."""

from __future__ import annotations

import json

import pytest

from lmforge.align.batching import collate_pairs, encode_pair
from lmforge.align.preference_data import (KINDS, PreferenceDataConfig, check_answer, check_json, generate_pairs,
                                           is_refusal, read_pairs, validate_records, write_pairs)
from lmforge.errors import LmforgeError


@pytest.fixture(scope="module")
def splits():
    return generate_pairs(PreferenceDataConfig(seed=3))


def test_deterministic_and_seed_dependent(splits):
    assert generate_pairs(PreferenceDataConfig(seed=3)) == splits
    other = generate_pairs(PreferenceDataConfig(seed=4))
    assert [r["prompt"] for r in other["train"]] != [r["prompt"] for r in splits["train"]]


def test_splits_never_share_an_item(splits):
    items = {s: {r["item"] for r in recs} for s, recs in splits.items()}
    prompts = {s: {r["prompt"] for r in recs} for s, recs in splits.items()}
    for a, b in [("train", "validation"), ("train", "test"), ("validation", "test")]:
        assert not items[a] & items[b]
        assert not prompts[a] & prompts[b]
    total = sum(len(v) for v in splits.values())
    assert 0.7 < len(splits["train"]) / total < 0.9
    ids = [r["id"] for v in splits.values() for r in v]
    assert len(ids) == len(set(ids))


def test_every_kind_and_source_is_recorded(splits):
    records = [r for v in splits.values() for r in v]
    assert {r["kind"] for r in records} == set(KINDS)
    assert all(r["source"].split(":")[0] in ("generated", "templated") for r in records)
    validate_records(records)  # chosen != rejected everywhere


def test_answers_are_checkable(splits):
    records = [r for v in splits.values() for r in v]
    arithmetic = [r for r in records if r["kind"] == "arithmetic"]
    assert all(check_answer(r, r["chosen"]) and not check_answer(r, r["rejected"]) for r in arithmetic)
    js = [r for r in records if r["kind"] == "json"]
    assert all(check_json(r, r["chosen"]) and not check_json(r, r["rejected"]) for r in js)
    harmful = [r for r in records if r["kind"] == "harmful"]
    assert all(is_refusal(r["chosen"]) and not is_refusal(r["rejected"]) for r in harmful)
    benign = [r for r in records if r["kind"] == "benign"]
    assert all(not is_refusal(r["chosen"]) and is_refusal(r["rejected"]) for r in benign)
    # A harmful subject is one item: its paraphrases all land in one split.
    subjects = {}
    for split, recs in splits.items():
        for r in recs:
            if r["kind"] == "harmful":
                subjects.setdefault(r["item"], set()).add(split)
    assert all(len(s) == 1 for s in subjects.values())


def test_bias_pairs_are_name_swapped(splits):
    bias = [r for v in splits.values() for r in v if r["kind"] == "bias"]
    prompts = {r["prompt"] for r in bias}
    swapped = 0
    for r in bias:
        words = r["prompt"].split()
        a, b = words[0], words[2]
        swapped += r["prompt"].replace(a, "\0").replace(b, a).replace("\0", b) in prompts
    assert swapped >= len(bias) - 1


def test_bad_input_is_refused(tmp_path):
    with pytest.raises(LmforgeError, match="identical"):
        validate_records([{"prompt": "p", "chosen": "same", "rejected": "same "}])
    with pytest.raises(LmforgeError, match="missing field.*rejected"):
        validate_records([{"prompt": "p", "chosen": "a"}])
    with pytest.raises(LmforgeError, match="no preference pairs"):
        validate_records([])
    with pytest.raises(LmforgeError, match="non-empty string"):
        validate_records([{"prompt": "", "chosen": "a", "rejected": "b"}])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}\n{oops\n')
    with pytest.raises(LmforgeError, match=r"bad.jsonl:2: not valid JSON"):
        read_pairs(bad)
    with pytest.raises(LmforgeError, match="does not exist"):
        read_pairs(tmp_path / "absent.jsonl")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(LmforgeError, match="no preference pairs"):
        read_pairs(empty)


def test_write_and_read_back(tmp_path, splits):
    paths = write_pairs(tmp_path, splits)
    assert read_pairs(paths["test"]) == splits["test"]
    assert json.loads(paths["train"].read_text().splitlines()[0]) == splits["train"][0]


def test_pairs_share_the_prompt_ids(default_tokenizer):
    rec = {"prompt": "What is 2 + 2?", "chosen": "4", "rejected": "5"}
    enc = encode_pair(default_tokenizer, rec, max_length=64)
    assert default_tokenizer.decode(enc.prompt).endswith("<|im_start|>assistant\n")
    assert default_tokenizer.decode(enc.chosen) == "4<|im_end|>"
    batch = collate_pairs([enc, encode_pair(default_tokenizer, {**rec, "chosen": "four"}, 64)], pad_id=0)
    assert batch.input_ids.shape[0] == 4 and batch.pairs == 2
    assert batch.response_mask[0].sum() == len(enc.chosen) and batch.response_mask[2].sum() == len(enc.rejected)
    short = encode_pair(default_tokenizer, rec, max_length=6)
    assert len(short.prompt) + max(len(short.chosen), len(short.rejected)) <= 6


@pytest.fixture(scope="module")
def default_tokenizer():
    from lmforge.model.loading import resolve_tokenizer

    return resolve_tokenizer(None)
