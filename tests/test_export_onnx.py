"""ONNX export: the decoder with its KV cache as inputs/outputs, run in onnxruntime, must give
lmforge's logits (prefill and cached decode steps) and lmforge's greedy tokens."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("onnx", reason="onnx not installed")
pytest.importorskip("onnxruntime", reason="onnxruntime not installed")

from lmforge.errors import LmforgeError  # noqa: E402
from lmforge.infer.engine import Generator  # noqa: E402
from lmforge.infer.export_onnx import DATA_FILE, GRAPH_FILE, OPSET, OnnxRunner, export_onnx  # noqa: E402
from lmforge.infer.sampling import SamplingParams  # noqa: E402
from lmforge.model.checkpoint import load_hf_model  # noqa: E402
from lmforge.model.kv_cache import KVCache  # noqa: E402
from tests.conftest import FAMILIES, VOCAB  # noqa: E402

TOL = 1e-4


@pytest.fixture(scope="module")
def exported(tiny_hf_dirs, tmp_path_factory):
    """family -> (lmforge model, its ONNX export directory)."""
    out = {}
    for family in FAMILIES:
        model = load_hf_model(tiny_hf_dirs[family][0])
        out[family] = (model, export_onnx(model, tmp_path_factory.mktemp("onnx") / family).directory)
    return out


def _check_prefill_and_steps(model, runner, prompt: list[int], steps: int = 6) -> None:
    ids = torch.tensor([prompt])
    with torch.no_grad():
        ref = model(ids)
    logits, past = runner.forward(ids.numpy(), runner.empty_past(1))
    assert logits.shape == tuple(ref.shape)
    np.testing.assert_allclose(logits, ref.numpy(), atol=TOL, rtol=0)
    cache = KVCache.for_model(model.config, 1, len(prompt) + steps, torch.float32, "cpu")
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        model(ids, cache=cache, start=0)
        for step in range(steps):
            token = torch.randint(0, model.config.vocab_size, (1, 1), generator=generator)
            ref = model(token, cache=cache, start=len(prompt) + step)
            logits, past = runner.forward(token.numpy(), past)
            np.testing.assert_allclose(logits, ref.numpy(), atol=TOL, rtol=0)
    # The presents are the whole cache so far: kv heads only, every position.
    assert past[0].shape == (1, model.config.n_kv_head, len(prompt) + steps, model.config.head_dim)
    np.testing.assert_allclose(past[0], cache.k[0, :, :, : len(prompt) + steps].numpy(), atol=TOL, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_onnxruntime_matches_lmforge_prefill_and_cached_decode(exported, family):
    model, directory = exported[family]
    runner = OnnxRunner(directory)
    # 20 tokens: longer than mistral's 8-token sliding window, so the window mask is exercised.
    prompt = torch.randint(0, VOCAB, (20,), generator=torch.Generator().manual_seed(7)).tolist()
    _check_prefill_and_steps(model, runner, prompt)


@pytest.mark.parametrize("family", FAMILIES)
def test_onnx_greedy_tokens_equal_the_engines(exported, family):
    model, directory = exported[family]
    prompt = [5, 17, 42, 99, 3, 250, 11]
    want = Generator(model).generate(prompt, SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True))[0]
    got = OnnxRunner(directory).generate(prompt, 16)
    assert len(want.token_ids) == 16
    assert got == want.token_ids


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_padded_batch_rows_equal_single_rows(exported, family):
    """A left-padded batch (attention_mask 0 on pads, positions counted from each row's first real
    token) gives every row the logits it gets alone, in prefill and in a decode step."""
    model, directory = exported[family]
    runner = OnnxRunner(directory)
    rows = [[7, 8, 9, 10, 11, 12], [30, 31, 32]]
    width = max(map(len, rows))
    ids = np.zeros((2, width), np.int64)
    mask = np.zeros((2, width), np.int64)
    positions = np.zeros((2, width), np.int64)
    for r, row in enumerate(rows):
        ids[r, width - len(row):] = row
        mask[r, width - len(row):] = 1
        positions[r, width - len(row):] = np.arange(len(row))
    logits, past = runner.forward(ids, runner.empty_past(2), mask, positions)
    nxt = np.array([[1], [2]], np.int64)
    step_mask = np.concatenate([mask, np.ones((2, 1), np.int64)], axis=1)
    step_logits, _ = runner.forward(nxt, past, step_mask, np.array([[len(rows[0])], [len(rows[1])]]))
    for r, row in enumerate(rows):
        with torch.no_grad():
            alone = model(torch.tensor([row + [int(nxt[r, 0])]])).numpy()[0]
        np.testing.assert_allclose(logits[r, width - len(row):], alone[: len(row)], atol=TOL, rtol=0)
        np.testing.assert_allclose(step_logits[r, 0], alone[-1], atol=TOL, rtol=0)


def test_graph_has_named_cache_io_dynamic_axes_and_external_data(exported):
    import onnx

    model, directory = exported["qwen2"]
    graph_path = directory / GRAPH_FILE
    assert (directory / DATA_FILE).stat().st_size > 0
    proto = onnx.load(str(graph_path), load_external_data=False)
    assert max(op.version for op in proto.opset_import if op.domain in ("", "ai.onnx")) == OPSET
    # Weights live in the data file: the graph file holds structure only.
    assert graph_path.stat().st_size < (directory / DATA_FILE).stat().st_size
    external = [t for t in proto.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    assert "model.embed.weight" in {t.name for t in external}
    # The tied head is the embedding, stored once (a Transpose node, not a second copy).
    assert not [t for t in proto.graph.initializer if list(t.dims) == [model.config.n_embd, model.config.vocab_size]]
    inputs = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in proto.graph.input}
    outputs = {o.name: [d.dim_param or d.dim_value for d in o.type.tensor_type.shape.dim] for o in proto.graph.output}
    c = model.config
    assert list(inputs)[:3] == ["input_ids", "attention_mask", "position_ids"]
    assert inputs["input_ids"] == ["batch", "seq"]
    assert inputs["past_key_1"] == ["batch", c.n_kv_head, "past_seq", c.head_dim]
    assert list(outputs)[0] == "logits" and outputs["logits"] == ["batch", "seq", c.vocab_size]
    assert outputs["present_value_1"][0] == "batch" and outputs["present_value_1"][1] == c.n_kv_head
    assert len(inputs) == 3 + 2 * c.n_layer and len(outputs) == 1 + 2 * c.n_layer


def test_export_refuses_encoders_and_existing_output(tmp_path, exported):
    from lmforge.model.config import ModelConfig
    from lmforge.model.transformer import Transformer

    encoder = Transformer(ModelConfig(family="bert", causal=False, norm="layernorm", mlp="gelu", position="learned",
                                      norm_position="post", lm_head=False))
    with pytest.raises(LmforgeError, match="encoder"):
        export_onnx(encoder, tmp_path / "enc")
    assert not (tmp_path / "enc").exists() and list(tmp_path.iterdir()) == []
    model, _ = exported["llama"]
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("mine")
    with pytest.raises(LmforgeError, match="already exists"):
        export_onnx(model, tmp_path / "taken")
    assert (tmp_path / "taken" / "keep.txt").read_text() == "mine"
    with pytest.raises(LmforgeError, match="not an lmforge ONNX export"):
        OnnxRunner(tmp_path / "taken")


def test_cli_export_onnx_checks_the_result(tiny_hf_dirs, tmp_path, capsys):
    from lmforge.cli import main

    out = tmp_path / "llama-onnx"
    assert main(["export", "onnx", str(tiny_hf_dirs["llama"][0]), "--out", str(out), "--check-tokens", "8"]) == 0
    line = capsys.readouterr().out
    assert "ONNX opset 17" in line and "same top token at 100%" in line
    diff = float(line.split("max |logit difference| ")[1].split(",")[0])
    assert diff < TOL
    assert (out / GRAPH_FILE).is_file() and (out / "lmforge_onnx.json").is_file()
    # Bad input: one clear line, exit status 1, nothing written.
    assert main(["export", "onnx", str(tiny_hf_dirs["llama"][0]), "--out", str(tmp_path / "x"), "--type", "q4_0"]) == 1
    assert "--type applies to gguf" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
    assert main(["export", "onnx", str(tmp_path / "missing"), "--out", str(tmp_path / "y")]) == 1
    assert "no such file" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["llama-onnx"]


@pytest.mark.slow
def test_default_model_onnx_export_matches_lmforge(tmp_path, default_lm):
    """The real default model (SmolLM2-135M, 30 layers, GQA 9/3): logits within 1e-4 for prefill
    and cached steps, and the same 16 greedy tokens as lmforge's engine."""
    from lmforge.model.loading import load_model
    from lmforge.model.registry import resolve

    model = load_model(resolve(None))
    directory = export_onnx(model, tmp_path / "smol").directory
    runner = OnnxRunner(directory)
    prompt = default_lm.tokenizer.encode("The capital of France is")
    _check_prefill_and_steps(model, runner, prompt, steps=4)
    want = default_lm.complete([prompt], max_tokens=16, temperature=0.0, ignore_eos=True)[0].token_ids
    assert runner.generate(prompt, 16) == want


def test_a_bfloat16_model_exports_in_float32_and_keeps_its_dtype(tmp_path):
    from lmforge.model.config import ModelConfig
    from lmforge.model.transformer import Transformer

    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=64, n_embd=32, n_head=2, intermediate_size=64)).eval()
    reference = Transformer(model.config).eval()
    half = model.to(torch.bfloat16)
    reference.load_state_dict({k: v.float() for k, v in half.state_dict().items()})
    runner = OnnxRunner(export_onnx(half, tmp_path / "bf16").directory)
    assert half.embed.weight.dtype == torch.bfloat16
    ids = torch.tensor([[3, 1, 4, 1, 5, 9]])
    logits, _ = runner.forward(ids.numpy(), runner.empty_past(1))
    with torch.no_grad():
        np.testing.assert_allclose(logits, reference(ids).numpy(), atol=TOL, rtol=0)
