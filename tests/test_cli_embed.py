"""`lmforge embed` through the command line, on the real all-MiniLM-L6-v2."""

from __future__ import annotations

import io
import json
import subprocess
import sys

import numpy as np
import pytest

from lmforge.cli import main

LINES = ["The ferry leaves at seven.", "", "Boats cross to the island every morning.", "機器學習需要資料。"]


@pytest.fixture(scope="module")
def expected(minilm_dir):
    from lmforge.rag.embedder import load_embedder

    embedder = load_embedder()
    return embedder.encode(LINES), embedder.encode(LINES, normalize=False)


def run(capsys, *argv, stdin: str | None = None, monkeypatch=None):
    if stdin is not None:
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    code = main(["embed", *argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def vectors_of(jsonl: str) -> np.ndarray:
    records = [json.loads(line) for line in jsonl.splitlines()]
    assert [r["index"] for r in records] == list(range(len(records)))
    return np.array([r["embedding"] for r in records], dtype=np.float32)


def test_text_file_to_jsonl_on_stdout(capsys, tmp_path, expected):
    source = tmp_path / "texts.txt"
    source.write_text("\n".join(LINES) + "\n", encoding="utf-8")
    code, out, err = run(capsys, str(source))
    assert code == 0
    got = vectors_of(out)
    assert got.shape == (4, 384)
    assert np.abs(got - expected[0]).max() < 1e-7  # 9 significant digits round-trip float32
    assert "embedded 4 texts (384-d, all-minilm-l6-v2@" in err and "{" not in err


def test_stdin_npy_out_and_no_normalize(capsys, tmp_path, monkeypatch, expected):
    out_file = tmp_path / "vectors.npy"
    code, out, _ = run(capsys, "--out", str(out_file), "--no-normalize", "--batch-size", "1",
                       stdin="\n".join(LINES), monkeypatch=monkeypatch)
    assert code == 0 and out == ""
    got = np.load(out_file)
    assert got.dtype == np.float32 and got.shape == (4, 384)
    assert np.abs(got - expected[1]).max() < 1e-5
    assert abs(float(np.linalg.norm(got[0])) - 1) > 0.1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vectors.npy"]  # no temporary file left


def test_jsonl_input_with_a_field_to_jsonl_file(capsys, tmp_path, expected):
    source = tmp_path / "records.jsonl"
    source.write_text("\n".join(json.dumps({"id": i, "body": t}, ensure_ascii=False) for i, t in enumerate(LINES))
                      + "\n\n", encoding="utf-8")
    out_file = tmp_path / "out.jsonl"
    out_file.write_text("old content\n")
    code, out, _ = run(capsys, str(source), "--jsonl", "--field", "body", "--out", str(out_file))
    assert code == 0 and out == ""
    assert np.abs(vectors_of(out_file.read_text()) - expected[0]).max() < 1e-7


@pytest.mark.parametrize("argv, stdin, message", [
    (["/nonexistent/texts.txt"], None, "input file /nonexistent/texts.txt does not exist"),
    (["--out", "vectors.csv"], "x", "--out must end in .jsonl or .npy"),
    (["--batch-size", "0"], "x", "--batch-size must be a positive integer"),
    (["--field", "body"], "x", "--field applies to --jsonl inputs"),
    (["--jsonl"], '{"text": "fine"}\n{"text": 3}\n', "<stdin>:2: expected a string or an object with a 'text' string"),
    (["--jsonl"], '{"text": "fine"}\nnot json\n', "<stdin>:2: not valid JSON"),
    (["--model", "smollm2-135m-instruct"], "x", "embeddings need an encoder model directory"),
    (["--out", "/nonexistent/dir/v.npy"], "x", "cannot write /nonexistent/dir/v.npy"),
])
def test_user_errors_are_one_line(capsys, monkeypatch, argv, stdin, message, minilm_dir):
    code, out, err = run(capsys, *argv, stdin=stdin, monkeypatch=monkeypatch)
    assert code == 1 and out == ""
    assert message in err and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("lmforge: error: ")


@pytest.mark.slow
def test_a_real_pipe_through_python_m_lmforge(minilm_dir):
    done = subprocess.run([sys.executable, "-m", "lmforge", "embed"], input="first text\nsecond text\n",
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    got = vectors_of(done.stdout)
    assert got.shape == (2, 384) and np.allclose(np.linalg.norm(got, axis=1), 1, atol=1e-5)
