"""`lmforge eval bench | judge | contamination` end to end on a tiny model, and the contamination check."""

from __future__ import annotations

import json

import pytest
import torch

from lmforge.cli import main
from lmforge.eval.bench import load_task
from lmforge.eval.contamination import check_contamination, find_overlap, ngrams, words


@pytest.fixture(scope="module")
def tiny_dir(default_lm, tmp_path_factory):
    """A tiny random model with the default model's tokenizer, saved as a Hugging Face directory."""
    from lmforge.model import ModelConfig, Transformer
    from lmforge.model.checkpoint import save_hf_model

    tokenizer = default_lm.tokenizer
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=tokenizer.vocab_size, n_layer=1, n_embd=32, n_head=2, intermediate_size=64,
                         max_position_embeddings=2048, eos_token_id=tokenizer.eos_id)
    path = tmp_path_factory.mktemp("bench") / "tiny"
    save_hf_model(Transformer(config).eval(), path, tokenizer=tokenizer)
    return str(path)


def test_bench_mmlu_writes_json_markdown_and_items(tiny_dir, tmp_path, capsys):
    out = tmp_path / "report"
    assert main(["eval", "bench", tiny_dir, "--task", "mmlu-cot-281", "--limit", "7", "--shots", "1",
                 "--json", "--out", str(out), "--device", "cpu"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["task"] == "mmlu-cot-281" and data["n"] == 7 and data["shots"] == 1
    assert set(data["metrics"]) == {"acc", "acc_stderr", "acc_norm"}
    assert data["groups"]["abstract_algebra"]["n"] == 5 and data["groups"]["anatomy"]["n"] == 2
    saved = json.loads((out / "bench-mmlu-cot-281.json").read_text())
    assert saved["metrics"] == data["metrics"]
    markdown = (out / "bench-mmlu-cot-281.md").read_text()
    assert "| abstract_algebra | 5 |" in markdown
    items = [json.loads(line) for line in (out / "bench-mmlu-cot-281-items.jsonl").read_text().splitlines()]
    assert len(items) == 7 and len(items[0]["logprobs"]) == 4
    try:
        import matplotlib  # noqa: F401  (the eval extra installs it)
    except ImportError:
        return
    assert (out / "bench-mmlu-cot-281.png").read_bytes()[:4] == b"\x89PNG"


def test_bench_chain_of_thought_with_self_consistency(tiny_dir, capsys):
    assert main(["eval", "bench", tiny_dir, "--task", "mmlu-cot-281", "--cot", "--limit", "2", "--samples", "2",
                 "--max-tokens", "6", "--json", "--device", "cpu"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["cot"] and data["kind"] == "generation" and data["samples"] == 2 and data["temperature"] == 0.7
    assert {"acc", "answered", "sample_acc"} <= set(data["metrics"])


def test_bench_humaneval_on_a_task_file(tiny_dir, tmp_path, capsys):
    (tmp_path / "add.jsonl").write_text(json.dumps({
        "id": "add", "prompt": "def add(a, b):\n", "test": "def check(f):\n    assert f(2, 3) == 5\n",
        "entry_point": "add"}) + "\n")
    (tmp_path / "add.yaml").write_text("kind: code\ndata: add.jsonl\nprompt: \"{{ prompt }}\"\nmax_tokens: 4\n"
                                       "program: \"{{ prompt }}{{ completion }}\\n{{ test }}\\ncheck({{ entry_point }})\\n\"\n"
                                       "timeout: 5\n")
    assert main(["eval", "bench", tiny_dir, "--task", str(tmp_path / "add.yaml"), "--json", "--device", "cpu"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["task"] == "add" and data["metrics"]["pass@1"] == 0.0  # a random model does not write add()


@pytest.mark.parametrize("argv,message", [
    (["--task", "nope"], "unknown task"),
    (["--task", "humaneval", "--cot"], "no 'cot' variant"),
    (["--task", "mmlu-cot-281", "--samples", "0"], "--samples must be at least 1"),
    (["--task", "humaneval", "--samples", "2", "--k", "5"], "pass@k needs"),
])
def test_bench_user_errors_are_one_line(argv, message, capsys):
    assert main(["eval", "bench", *argv]) == 1
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and err.count("\n") == 1


def test_judge_cli_compare_and_regression(tiny_dir, tmp_path, capsys):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"question": "2+2?", "answer_a": "4", "answer_b": "5"}) + "\n")
    assert main(["eval", "judge", "compare", "--file", str(pairs), "--judge", tiny_dir, "--json", "--device", "cpu",
                 "--quiet", "--judge-max-tokens", "4"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["pairs"] == 1 and data["a_wins"] + data["b_wins"] + data["ties"] == 1
    golden = tmp_path / "golden.jsonl"
    golden.write_text(json.dumps({"prompt": "Say hi", "reference": "hi"}) + "\n")
    out = tmp_path / "reg"
    assert main(["eval", "judge", "regression", "--golden", str(golden), "--baseline", tiny_dir, "--candidate", tiny_dir,
                 "--judge", tiny_dir, "--max-answer-tokens", "4", "--judge-max-tokens", "4", "--out", str(out),
                 "--device", "cpu",
                 "--quiet", "--fail-on-regression"]) == 0
    report = json.loads((out / "judge-regression.json").read_text())
    assert report["items_total"] == 1 and not report["regressed"]  # a model never regresses against itself


def test_judge_score_needs_answers_or_a_model(tmp_path, capsys):
    f = tmp_path / "q.jsonl"
    f.write_text(json.dumps({"question": "2+2?"}) + "\n")
    assert main(["eval", "judge", "score", "--file", str(f)]) == 1
    assert "give --model" in capsys.readouterr().err


# -- contamination ---------------------------------------------------------------------------------

def test_ngrams_and_words():
    assert words("Hello, World! It's 3.5") == ["hello", "world", "it", "s", "3", "5"]
    assert ngrams(["a", "b", "c"], 2) == {("a", "b"), ("b", "c")}
    assert ngrams(["a", "b"], 13) == {("a", "b")}  # shorter than n: one gram of everything


def test_find_overlap_per_item_and_across_pieces():
    items = ["one two three four five six", "alpha beta gamma delta", "short"]
    corpus = [["zero one two thr", "ee four five six seven"], "nothing here", "gamma delta but not alpha beta"]
    found, total = find_overlap(items, corpus, n=3, ids=["x", "y", "z"])
    # The split "thr|ee" breaks the 3-grams around it; "four five six" survives. The second
    # document's words never meet the third's: windows do not cross documents.
    assert [f.matched for f in found] == [1, 0, 0] and total == 17
    corpus = [["zero one two three", " four five six seven"]]
    found, _ = find_overlap(items, corpus, n=3)
    assert found[0].matched == 4 and found[0].overlap == 1.0 and found[0].contaminated


def test_contamination_finds_planted_benchmark_items(tmp_path, capsys):
    task = load_task("mmlu-cot-281")
    # The second is planted without its options: its question alone must hold a 13-gram.
    long_question = next(r for r in task.records[150:] if len(words(r["question"])) >= 20)
    planted = [task.records[10], long_question]
    filler = " ".join(f"token{i % 101} filler text" for i in range(3000))
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(filler + "\n" + planted[0]["question"] + " " + " ".join(planted[0]["choices"]) + "\n" + filler
                      + "\n" + planted[1]["question"] + "\n")
    report = check_contamination(task, corpus)
    flagged = {i.id for i in report.contaminated_items()}
    assert flagged == {planted[0]["id"], planted[1]["id"]}
    first = next(i for i in report.items if i.id == planted[0]["id"])
    assert first.overlap == 1.0
    assert report.contaminated_fraction == pytest.approx(2 / 281)
    jsonl = tmp_path / "corpus.jsonl"
    jsonl.write_text(json.dumps({"text": planted[1]["question"]}) + "\n")
    assert main(["eval", "contamination", "--task", "mmlu-cot-281", "--corpus", str(jsonl), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["contaminated_ids"] == [planted[1]["id"]] and data["items_total"] == 281
    assert main(["eval", "contamination", "--task", "mmlu-cot-281", "--corpus", str(tmp_path / "missing.txt")]) == 1
    assert "does not exist" in capsys.readouterr().err
