"""`lmforge eval perplexity | metrics | ratings`: outputs, reports, progress and user errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import lmforge.cli.eval_perplexity
from lmforge.cli import main
from lmforge.eval.metrics import compute_metrics
from lmforge.eval.perplexity import perplexity

ROOT = Path(__file__).resolve().parents[1]


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def assert_user_error(code, err, message):
    assert code == 1
    assert err.startswith("lmforge: error: ") and err.count("\n") == 1, err
    assert message in err and "Traceback" not in err


def test_perplexity_cli_json_and_report(capsys, monkeypatch, tmp_path, default_lm):
    monkeypatch.setattr(lmforge.cli.eval_perplexity, "load_local", lambda name, args: default_lm)  # reuse the session's model
    text = (ROOT / "LICENSE").read_text(encoding="utf-8")[2000:2400]
    file = tmp_path / "held_out.txt"
    file.write_text(text, encoding="utf-8")
    code, out, err = run_cli(capsys, "eval", "perplexity", "--file", file, "--window", 48, "--stride", 24,
                             "--json", "--out", tmp_path / "report")
    assert code == 0, err
    result = json.loads(out)
    expected = perplexity(default_lm, text, window=48, stride=24)
    assert (result["window"], result["stride"], result["tokens"]) == (48, 24, expected.tokens) and result["windows"] > 1
    assert result["ppl"] == pytest.approx(expected.ppl, rel=1e-9)
    assert result["bpb"] == pytest.approx(expected.bpb, rel=1e-9)
    assert json.loads((tmp_path / "report" / "perplexity.json").read_text())["ppl"] == pytest.approx(result["ppl"])
    table = (tmp_path / "report" / "perplexity.md").read_text()
    assert "| bits/byte |" in table and f"{expected.ppl:.4f}" in table
    code, out, _ = run_cli(capsys, "eval", "perplexity", "--file", file, "--window", 48, "--no-prefix")
    assert code == 0 and out.startswith(f"{default_lm.name}: perplexity ") and "bits/byte" in out


@pytest.mark.parametrize("argv, message", [
    (["--file", "/nonexistent/text.txt"], "does not exist"),
    (["--file", "EMPTY"], "no text to score"),
    (["--file", "TEXT", "--window", "16", "--stride", "32"], "stride must be between 1 and the window"),
    (["--file", "TEXT", "--window", "0"], "window must be at least 1"),
    (["--file", "BADJSONL"], "not valid JSON"),
])
def test_perplexity_cli_user_errors(capsys, tmp_path, argv, message):
    (tmp_path / "empty.txt").write_text("  \n", encoding="utf-8")
    (tmp_path / "text.txt").write_text("Some text.", encoding="utf-8")
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{oops\n', encoding="utf-8")
    names = {"EMPTY": "empty.txt", "TEXT": "text.txt", "BADJSONL": "bad.jsonl"}
    argv = [str(tmp_path / names[a]) if a in names else a for a in argv]
    code, _, err = run_cli(capsys, "eval", "perplexity", *argv)  # fails before any model is loaded
    assert_user_error(code, err, message)


def test_metrics_cli(capsys, tmp_path):
    preds = ["The cat sat on the mat.", "A quick brown fox jumps over the lazy dog."]
    refs = ["The cat is sitting on the mat.", "The quick brown fox jumped over the lazy dog."]
    alt = ["A cat sat on a mat.", "A fast brown fox leaps over a lazy dog."]
    (tmp_path / "pred.txt").write_text("\n".join(preds) + "\n", encoding="utf-8")
    (tmp_path / "ref.txt").write_text("\n".join(refs) + "\n", encoding="utf-8")
    (tmp_path / "alt.jsonl").write_text("".join(json.dumps({"text": a}) + "\n" for a in alt), encoding="utf-8")
    code, out, err = run_cli(capsys, "eval", "metrics", "--predictions", tmp_path / "pred.txt",
                             "--references", tmp_path / "ref.txt", "--references", tmp_path / "alt.jsonl",
                             "--json", "--out", tmp_path / "out")
    assert code == 0, err
    result = json.loads(out)
    expected = compute_metrics(preds, [[r, a] for r, a in zip(refs, alt)])
    assert result["scores"]["bleu"]["score"] == pytest.approx(expected["bleu"]["score"])
    assert result["scores"]["rouge"]["rougeL"]["f"] == pytest.approx(expected["rouge"]["rougeL"]["f"])
    assert result["scores"]["meteor"]["score"] == pytest.approx(expected["meteor"]["score"])
    md = (tmp_path / "out" / "metrics.md").read_text()
    assert "| BLEU |" in md and "| rougeLsum |" in md and "signature" in md
    code, out, _ = run_cli(capsys, "eval", "metrics", "--predictions", tmp_path / "pred.txt",
                           "--references", tmp_path / "ref.txt", "--metrics", "rouge,chrf")
    assert code == 0 and "chrF" in out and "rouge1" in out and "BLEU" not in out


def test_metrics_cli_chinese(capsys, tmp_path):
    (tmp_path / "p.txt").write_text("猫坐在垫子上\n", encoding="utf-8")
    (tmp_path / "r.txt").write_text("猫坐在地毯上\n", encoding="utf-8")
    code, out, err = run_cli(capsys, "eval", "metrics", "--predictions", tmp_path / "p.txt",
                             "--references", tmp_path / "r.txt", "--lang", "zh", "--json")
    assert code == 0, err
    scores = json.loads(out)["scores"]
    assert scores["rouge"]["rouge1"]["f"] == pytest.approx(4 / 6)
    assert scores["bleu"]["signature"].endswith("tok:zh|smooth:exp|version:" + scores["bleu"]["signature"].split(":")[-1])


def test_metrics_cli_user_errors(capsys, tmp_path):
    (tmp_path / "p.txt").write_text("a\nb\n", encoding="utf-8")
    (tmp_path / "r.txt").write_text("a\n", encoding="utf-8")
    code, _, err = run_cli(capsys, "eval", "metrics", "--predictions", tmp_path / "p.txt",
                           "--references", tmp_path / "r.txt")
    assert_user_error(code, err, "2 predictions but 1 references")
    code, _, err = run_cli(capsys, "eval", "metrics", "--predictions", tmp_path / "p.txt",
                           "--references", tmp_path / "p.txt", "--metrics", "bleu,bertscore")
    assert_user_error(code, err, "unknown metric(s) bertscore")
    code, _, err = run_cli(capsys, "eval", "metrics", "--predictions", tmp_path / "missing.txt",
                           "--references", tmp_path / "r.txt")
    assert_user_error(code, err, "does not exist")


def test_ratings_cli_with_export(capsys, tmp_path):
    records = [
        {"item": "q1", "rater": "ana", "a": "m1", "b": "m2", "winner": "a", "prompt": "Say hi",
         "response_a": "Hi!", "response_b": "Go away."},
        {"item": "q1", "rater": "bo", "a": "m1", "b": "m2", "winner": "tie", "prompt": "Say hi",
         "response_a": "Hi!", "response_b": "Go away."},
        {"item": "q2", "rater": "ana", "a": "m2", "b": "m1", "winner": "b", "prompt": "2+2?",
         "response_a": "5", "response_b": "4"},
        {"item": "q3", "rater": "ana", "a": "m2", "b": "m1", "winner": "a", "prompt": "Capital of France?",
         "response_a": "Paris", "response_b": "Lyon"},
        {"item": "q1", "rater": "ana", "system": "m1", "rating": 5},
        {"item": "q1", "rater": "bo", "system": "m1", "rating": 4},
    ]
    file = tmp_path / "ann.jsonl"
    file.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    code, out, err = run_cli(capsys, "eval", "ratings", "--file", file, "--export-pairs", tmp_path / "pairs.jsonl",
                             "--out", tmp_path / "rep", "--json", "--interval", "bootstrap")
    assert code == 0, err
    summary = json.loads(out)
    assert summary["comparisons"] == 4 and summary["ratings"] == 2
    assert summary["win_rates"][0]["system"] == "m1" and summary["win_rates"][0]["win_rate"] == pytest.approx(2.5 / 4)
    pairs = [json.loads(line) for line in (tmp_path / "pairs.jsonl").read_text().splitlines()]
    assert [(p["prompt"], p["chosen"], p["rejected"]) for p in pairs] == [
        ("Say hi", "Hi!", "Go away."), ("2+2?", "4", "5"), ("Capital of France?", "Paris", "Lyon")]
    md = (tmp_path / "rep" / "ratings.md").read_text()
    assert "## Pairwise preferences" in md and "| Bradley-Terry |" in md and "## Likert ratings" in md
    code, out, _ = run_cli(capsys, "eval", "ratings", "--file", file)
    assert code == 0 and out.startswith("# Human evaluation")


def test_ratings_cli_user_errors(capsys, tmp_path):
    file = tmp_path / "ann.jsonl"
    file.write_text('{"item": "q1", "rater": "a", "system": "m1", "rating": 3}\n{"item": 1, "winner": "x"}\n')
    code, _, err = run_cli(capsys, "eval", "ratings", "--file", file)
    assert_user_error(code, err, "ann.jsonl:2")
    file.write_text('{"item": "q1", "rater": "a", "system": "m1", "rating": 3}\n')
    code, _, err = run_cli(capsys, "eval", "ratings", "--file", file, "--export-pairs", tmp_path / "x.jsonl")
    assert_user_error(code, err, "no pairwise judgements")
    assert not (tmp_path / "x.jsonl").exists()
