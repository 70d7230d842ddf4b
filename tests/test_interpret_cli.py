"""`lmforge explain` end to end on a tiny random Llama with the default model's tokenizer, its
errors, and (slow) on the default model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lmforge.cli import main


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> Path:
    from lmforge.model.checkpoint import save_hf_model
    from lmforge.model.config import ModelConfig
    from lmforge.model.loading import resolve_tokenizer
    from lmforge.model.transformer import Transformer

    tokenizer = resolve_tokenizer(None)
    torch.manual_seed(0)
    config = ModelConfig(family="llama", vocab_size=tokenizer.vocab_size, n_layer=2, n_embd=32, n_head=4,
                         n_kv_head=2, intermediate_size=64, max_position_embeddings=256, tie_word_embeddings=True,
                         bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id)
    model = Transformer(config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    return save_hf_model(model, tmp_path_factory.mktemp("explain") / "tiny", tokenizer)


def test_explain_writes_one_self_contained_report(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "report.html"
    code = main(["explain", str(tiny_model_dir), "The capital of France is", "--out", str(out),
                 "--compare", "The capital of Italy is", "--compare-target", " Rome", "--ig-steps", "8",
                 "--figures", str(tmp_path / "figs"), "--device", "cpu"])
    assert code == 0
    page = out.read_text(encoding="utf-8")
    assert page.count("data:image/png;base64,") == 2 + 2 + 1 + 1  # two attention layers, lens x2, attributions, patching
    assert "Activation patching" in page and "Completeness" in page and "<script" not in page
    data = json.loads(out.with_suffix(".json").read_text())
    assert data["tokens"] and len(data["ids"]) == len(data["tokens"]) == 5
    assert len(data["logit_lens"]["target_rank"]) == 3 and data["logit_lens"]["target_rank"][-1] == 0
    assert len(data["patching"]["restored"]["resid"]) == 2
    assert data["patching"]["restored"]["resid"][0][3] == pytest.approx(1.0, abs=1e-3)  # France|Italy at layer 0
    assert data["patching"]["wrong_text"] == " Rome"
    ig = data["attributions"]["integrated_gradients"]
    assert abs(sum(ig["scores"]) - (ig["score"] - ig["baseline_score"])) == pytest.approx(ig["completeness_error"],
                                                                                          abs=1e-3)
    names = sorted(p.name for p in (tmp_path / "figs").iterdir())
    assert names == ["attention-layer00.png", "attention-layer01.png", "attributions.png", "logit-lens-target.png",
                     "logit-lens.png", "patching.png"]
    assert "wrote" in capsys.readouterr().out


def test_explain_target_and_layers(tiny_model_dir, tmp_path):
    out = tmp_path / "r.html"
    assert main(["explain", str(tiny_model_dir), "It costs $5 and $6, <b>my</b> friend", "--out", str(out),
                 "--layers", "1",
                 "--target", "Paris", "--contrast", " Rome", "--ig-steps", "4", "--neuron", "1:7",
                 "--device", "cpu"]) == 0
    data = json.loads(out.with_suffix(".json").read_text())
    assert data["attention_layers"] == [1]
    top = [a["value"] for a in data["neuron"]["top"]]
    assert len(top) == 10 and top == sorted(top, reverse=True)
    page = out.read_text(encoding="utf-8")
    assert "Neuron 1:7" in page and "<b>my</b>" not in page and "&lt;b&gt;my&lt;/b&gt;" in page
    assert data["target"]["text"].strip() == "Paris"
    assert data["attributions"]["occlusion"]["contrast"] is not None
    assert "Paris&#x27;) - logit(&#x27; Rome&#x27;) at the last position" in out.read_text(encoding="utf-8")


@pytest.mark.parametrize("argv,message", [
    (["x", "--compare", "a much longer corrupted prompt than the clean one"], "same token length"),
    (["", ], "empty"),
    (["word", "--layers", "7"], "past the model's last layer"),
    (["a b c d e f g h", "--max-tokens", "4"], "more than --max-tokens"),
    (["The sky is", "--ig-steps", "0"], "--ig-steps"),
    (["The sky is", "--neuron", "two"], "LAYER:INDEX"),
    (["The sky is", "--neuron", "5:0"], "out of range"),
    (["The sky is", "--weights", "q8"], "float weights"),
])
def test_explain_refuses_bad_input_with_one_message(tiny_model_dir, tmp_path, capsys, argv, message):
    prompt, *flags = argv
    if prompt == "x":
        prompt = "The sky is"
    code = main(["explain", str(tiny_model_dir), prompt, "--out", str(tmp_path / "r.html"), "--device", "cpu",
                 "--ig-steps", "2", *flags] if "--ig-steps" not in flags else
                ["explain", str(tiny_model_dir), prompt, "--out", str(tmp_path / "r.html"), *flags])
    err = capsys.readouterr().err
    assert code == 1 and message in err and "Traceback" not in err
    assert not (tmp_path / "r.html").exists()


def test_explain_refuses_a_missing_model_and_folder(tiny_model_dir, tmp_path, capsys):
    assert main(["explain", str(tmp_path / "nope"), "Hi there"]) == 1
    assert main(["explain", str(tiny_model_dir), "Hi there", "--out", str(tmp_path / "no" / "r.html"),
                 "--ig-steps", "2"]) == 1
    err = capsys.readouterr().err
    assert err.count("lmforge: error:") == 2


@pytest.mark.slow
def test_explain_on_the_default_model(tmp_path):
    out = tmp_path / "report.html"
    assert main(["explain", "The capital of France is", "--out", str(out), "--compare", "The capital of Italy is",
                 "--layers", "0,15,29", "--ig-steps", "16", "--device", "cpu"]) == 0
    data = json.loads(out.with_suffix(".json").read_text())
    assert data["target"]["text"] == " Paris"
    assert data["patching"]["wrong_text"] == " Rome"
    resid = data["patching"]["restored"]["resid"]
    assert resid[0][3] == pytest.approx(1.0, abs=1e-3)  # the swapped token itself, before any block
    assert max(abs(v) for v in resid[-1][:-1]) < 0.05 and resid[-1][-1] > 0.9  # by the end, only the last position
