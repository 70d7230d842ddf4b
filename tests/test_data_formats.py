"""D7: SFT (Alpaca, chat, ShareGPT), preference and classification records, with validation."""

from __future__ import annotations

import json

import pytest

from lmforge.cli import main
from lmforge.data.formats import RecordError, load_records, normalize_record, summarize
from lmforge.errors import LmforgeError


def test_each_format_normalizes_to_messages_or_pairs():
    alpaca = normalize_record({"instruction": "Translate to French", "input": "cat", "output": "chat"})
    assert alpaca == {"messages": [{"role": "user", "content": "Translate to French\n\ncat"},
                                   {"role": "assistant", "content": "chat"}]}
    sharegpt = normalize_record({"conversations": [{"from": "system", "value": "Be brief."},
                                                   {"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]})
    assert [m["role"] for m in sharegpt["messages"]] == ["system", "user", "assistant"]
    pref = normalize_record({"prompt": "2+2?", "chosen": "4", "rejected": "5"})
    assert pref["chosen"] == [{"role": "assistant", "content": "4"}] and pref["prompt"][0]["role"] == "user"
    assert normalize_record({"text": "great film", "label": "positive"}) == {"text": "great film", "label": "positive"}


@pytest.mark.parametrize("record,message", [
    ({"messages": [{"role": "user", "content": "Hi"}]}, "end with an assistant"),
    ({"messages": [{"role": "assistant", "content": "Hi"}, {"role": "user", "content": "x"}]}, "turns alternate"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "b"}]}, "only come first"),
    ({"messages": [{"role": "robot", "content": "a"}]}, "unknown role"),
    ({"messages": [{"role": "user", "content": " "}, {"role": "assistant", "content": "b"}]}, "empty"),
    ({"instruction": "Do it", "output": ""}, "empty"),
    ({"prompt": "q", "chosen": "same", "rejected": "same"}, "identical"),
    ({"text": "x", "label": None}, "label"),
    ({"foo": 1}, "cannot tell the format"),
])
def test_malformed_records_are_rejected(record, message):
    with pytest.raises(RecordError, match=message):
        normalize_record(record)


def test_load_records_reports_line_numbers(tmp_path):
    path = tmp_path / "sft.jsonl"
    good = {"instruction": "Say hi", "output": "Hi"}
    path.write_text("\n".join([json.dumps(good), "{broken", json.dumps({"instruction": "x", "output": ""})]) + "\n")
    with pytest.raises(LmforgeError, match=r"2 of 3 records are not valid alpaca: sft.jsonl:2: not valid JSON.*sft.jsonl:3"):
        load_records(path)
    fmt, records, errors = load_records(path, strict=False)
    assert fmt == "alpaca" and len(records) == 1 and len(errors) == 2


def test_classification_summary_and_cli(tmp_path, capsys):
    path = tmp_path / "cls.json"
    path.write_text(json.dumps([{"text": "good", "label": "pos"}] * 3 + [{"text": "bad", "label": "neg"}]))
    fmt, records, _ = load_records(path)
    assert summarize(fmt, records)["imbalance_ratio"] == 3.0
    assert main(["data", "validate", str(path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["labels"] == {"pos": 3, "neg": 1}
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
    assert main(["data", "validate", str(bad)]) == 1
    assert "end with an assistant turn" in capsys.readouterr().err
