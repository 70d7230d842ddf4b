"""Quantization onto GGUF grids: RTN, GPTQ, AWQ (lmforge/infer/quantize.py, gptq.py, awq.py)."""

from __future__ import annotations

import copy

import gguf
import numpy as np
import pytest
import torch

from lmforge.errors import LmforgeError
from lmforge.infer.options import QuantizeOptions
from lmforge.infer.quantize import GRIDS, quantize_model, rtn, write_quantized
from lmforge.model.config import ModelConfig
from lmforge.model.gguf_write import quantize_q4_0, quantize_q8_0
from lmforge.model.transformer import Transformer

T = gguf.GGMLQuantizationType
VOCAB = 320


def tiny(family: str = "llama", tied: bool = True, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    extra = dict(qkv_bias=True) if family == "qwen2" else {}
    config = ModelConfig(family=family, vocab_size=VOCAB, n_layer=2, n_embd=64, n_head=4, n_kv_head=2,
                         intermediate_size=96, max_position_embeddings=128, norm="rmsnorm", mlp="swiglu",
                         position="rope", tie_word_embeddings=tied, **extra)
    model = Transformer(config).eval()
    with torch.no_grad():  # larger weights than the init, and a few strong input channels, as in trained models
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def calibration(n: int = 6, length: int = 48, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (1, length), generator=g) for _ in range(n)]


def correlated_inputs(n: int = 2048, cols: int = 128, seed: int = 0) -> torch.Tensor:
    """Inputs that live near a 16-dimensional subspace, with uneven channel sizes (as activations do)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 16, generator=g) @ torch.randn(16, cols, generator=g) + 0.1 * torch.randn(n, cols, generator=g)
    return x * torch.linspace(0.2, 3.0, cols)


# ------------------------------------------------------------------------------------ grids
@pytest.mark.parametrize("bits", [4, 8])
def test_rtn_gives_the_gguf_writers_bytes(bits):
    w = torch.randn(24, 96) * torch.rand(24, 1) * 3
    w[0, :32] = 0  # an all-zero block
    grid = GRIDS[bits]
    qt = rtn(w, grid)
    reference = (quantize_q4_0 if bits == 4 else quantize_q8_0)(w.numpy())
    np.testing.assert_array_equal(grid.pack(qt.scales, qt.codes), reference)
    back = gguf.quants.dequantize(reference.reshape(-1), T.Q4_0 if bits == 4 else T.Q8_0).reshape(24, 96)
    assert torch.equal(qt.dequantize(), torch.from_numpy(back))


@pytest.mark.parametrize("method", ["rtn", "gptq", "awq"])
@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_weights_lie_on_the_format_grid(method, bits):
    model = tiny()
    result = quantize_model(model, QuantizeOptions(out="x.gguf", method=method, bits=bits), calibration())
    grid = GRIDS[bits]
    assert len(result.tensors) == 2 * 4  # every block linear: rows of 64 and 96 split into blocks of 32
    for name, qt in result.tensors.items():
        codes = qt.codes.long()
        assert grid.low <= codes.min() and codes.max() <= grid.high
        assert qt.scales.dtype == torch.float16
        weight = model.get_parameter(name)
        assert torch.equal(weight, qt.dequantize())  # the model holds exactly the grid values
        # and the grid values are (fp16 scale) x (integer), block by block
        blocks = weight.view(weight.shape[0], -1, 32)
        scale = qt.scales.float().unsqueeze(-1)
        steps = torch.where(scale == 0, torch.zeros_like(blocks), blocks / scale)
        assert torch.equal(steps, steps.round())
        assert steps.min() >= grid.low - grid.offset and steps.max() <= grid.high - grid.offset


# ------------------------------------------------------------------------------------- GPTQ
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_beats_rtn_on_a_linear_layer_with_correlated_inputs(bits, act_order):
    from lmforge.infer.gptq import gptq_quantize

    x = correlated_inputs()
    w = torch.randn(64, 128)
    grid = GRIDS[bits]
    hessian = 2 * x.T @ x / x.shape[0]
    exact = x @ w.T
    err_rtn = (exact - x @ rtn(w, grid).dequantize().T).norm()
    err_gptq = (exact - x @ gptq_quantize(w, hessian, grid, block_size=64, act_order=act_order).dequantize().T).norm()
    assert err_gptq < 0.5 * err_rtn


def test_gptq_with_an_identity_hessian_is_round_to_nearest_with_its_own_scales():
    from lmforge.infer.gptq import gptq_quantize

    # With H = I no column can absorb another's error, so GPTQ must round each weight to the
    # nearest point of its block's grid (the scale picked from the untouched block).
    w = torch.randn(16, 64)
    qt = gptq_quantize(w, torch.eye(64), GRIDS[4], damp=0.0)
    d = GRIDS[4].scale(w.view(16, 2, 32)).to(torch.float16)
    assert torch.equal(qt.scales, d)
    expected = GRIDS[4].codes(w.view(16, 2, 32), d.float().unsqueeze(-1)).view(16, 64)
    assert torch.equal(qt.codes.long(), expected.long())


# -------------------------------------------------------------------------------------- AWQ
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_awq_scales_fold_into_the_model_without_changing_its_output(family):
    from lmforge.infer.awq import fold_norm, fold_up_down, fold_v_out, tie_groups

    model = tiny(family)
    ids = calibration(1)[0]
    with torch.no_grad():
        before = model(ids)
        g = torch.Generator().manual_seed(3)
        for block in model.layers:
            def scales(n):
                return torch.rand(n, generator=g) * 4 + 0.25
            fold_norm(block.attn_norm, [block.attn.qkv], scales(64))
            fold_v_out(block.attn, tie_groups(block.attn)(scales(block.attn.q_size)))
            fold_norm(block.mlp_norm, [block.mlp.fc], scales(64))
            fold_up_down(block.mlp, scales(96))
        after = model(ids)
    assert not torch.equal(model.layers[0].attn_norm.weight, tiny(family).layers[0].attn_norm.weight)
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)


def test_awq_search_never_does_worse_than_rounding_on_its_objective():
    model = tiny(seed=4)
    with torch.no_grad():  # a few loud input channels, as LLM activations have
        model.embed.weight[:, :4] *= 20
    result = quantize_model(model, QuantizeOptions(out="x.gguf", method="awq", bits=4), calibration(8))
    ratios = [r for layer in result.details["error_ratio"] for r in layer.values()]
    assert len(ratios) == 2 * 4 and max(ratios) <= 1.0
    assert min(ratios) < 0.9  # the loud channels are worth scaling somewhere
    assert any(a > 0 for layer in result.details["alphas"] for a in layer.values())


# --------------------------------------------------------------------------------- the file
@pytest.mark.parametrize("method", ["rtn", "gptq", "awq"])
@pytest.mark.parametrize("family,tied", [("llama", False), ("qwen2", True)])
def test_the_file_reads_back_bit_for_bit_in_lmforge_and_with_the_right_types(method, family, tied, tmp_path):
    from lmforge.model.gguf_io import load_gguf_model

    model = tiny(family, tied)
    options = QuantizeOptions(out=str(tmp_path / "m.gguf"), method=method, bits=4, act_order=method == "gptq")
    result = quantize_model(model, options, calibration())
    written = write_quantized(result, options.out)
    back = load_gguf_model(written.path)
    ours, theirs = result.model.state_dict(), back.state_dict()
    assert ours.keys() == theirs.keys()
    for name in ours:
        assert torch.equal(ours[name], theirs[name]), name
    ids = calibration(1, 16, seed=9)[0]
    with torch.no_grad():
        assert torch.equal(back(ids), result.model(ids))
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(str(written.path)).tensors}
    head = "token_embd.weight" if tied else "output.weight"
    assert types.pop(head) == T.Q8_0  # as write_gguf keeps the head of a 4-bit file
    for i in range(2):
        for part in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"):
            assert types.pop(f"blk.{i}.{part}.weight") == T.Q4_0
    if not tied:
        assert types.pop("token_embd.weight") == T.Q4_0
    assert set(types.values()) == {T.F32}  # norms and biases


def test_eight_bit_files_are_q8_0_throughout(tmp_path):
    result = quantize_model(tiny(), QuantizeOptions(out=str(tmp_path / "m.gguf"), method="gptq", bits=8), calibration())
    written = write_quantized(result, tmp_path / "m.gguf")
    types = {t.tensor_type for t in gguf.GGUFReader(str(written.path)).tensors if len(t.shape) > 1}
    assert types == {T.Q8_0}


# ---------------------------------------------------------------------- bad input, the CLI
def test_bad_options_are_one_clear_error():
    with pytest.raises(LmforgeError, match="--bits 3"):
        QuantizeOptions(out="m.gguf", bits=3)
    with pytest.raises(LmforgeError, match="unknown quantization method 'hqq'"):
        QuantizeOptions(out="m.gguf", method="hqq")
    with pytest.raises(LmforgeError, match="ends in .gguf"):
        QuantizeOptions(out="m.bin")
    with pytest.raises(LmforgeError, match="needs calibration text"):
        quantize_model(tiny(), QuantizeOptions(out="m.gguf", method="gptq"))


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """The tiny model saved with a byte-level BPE tokenizer of 300 tokens trained here."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    from lmforge.model.checkpoint import save_hf_model
    from lmforge.tokenizer import Tokenizer

    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(["weights rounded onto a grid of sixteen levels, block by block"] * 20, trainer)
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    tok.save(str(path))
    tokenizer = Tokenizer.from_file(path)
    tokenizer.eos_token = "<|endoftext|>"
    return save_hf_model(tiny(), tmp_path_factory.mktemp("q") / "tiny", tokenizer=tokenizer)


@pytest.mark.parametrize("argv,message", [
    (["--bits", "3"], "--bits 3 has no GGUF block type"),
    (["--method", "hqq"], None),  # argparse: not one of the choices
    (["--out", "/proc/nowhere/m.gguf"], "is not a writable directory"),
    (["--out", "FILE/m.gguf"], "is not a directory"),
])
def test_cli_bad_input_writes_nothing(tiny_dir, tmp_path, capsys, argv, message):
    from lmforge.cli import main

    out = tmp_path / "m.gguf"
    (tmp_path / "FILE").write_text("a file, not a directory")
    argv = [a.replace("FILE", str(tmp_path / "FILE")) for a in argv]
    full = ["quantize", str(tiny_dir), "--method", "rtn", "--out", str(out), *argv]
    if message is None:
        with pytest.raises(SystemExit) as exc:
            main(full)
        assert exc.value.code == 2 and "invalid choice: 'hqq'" in capsys.readouterr().err
    else:
        assert main(full) == 1
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1 and "Traceback" not in err
    assert [p.name for p in tmp_path.iterdir()] == ["FILE"] and not list(tiny_dir.parent.glob("*.gguf"))


def test_cli_writes_a_file_lmforge_loads(tiny_dir, tmp_path, capsys):
    from lmforge.cli import main
    from lmforge.model.gguf_io import load_gguf_model

    out = tmp_path / "m.gguf"
    assert main(["quantize", str(tiny_dir), "--method", "rtn", "--bits", "4", "--out", str(out)]) == 0
    assert "quantized" in capsys.readouterr().out
    model = load_gguf_model(out)
    assert model.config.vocab_size == VOCAB
    reference = quantize_model(copy.deepcopy(tiny()), QuantizeOptions(out="x.gguf", method="rtn")).model
    for name, tensor in reference.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor), name
    out.write_bytes(b"keep")
    assert main(["quantize", str(tiny_dir), "--method", "rtn", "--out", str(out)]) == 1
    assert "already exists" in capsys.readouterr().err and out.read_bytes() == b"keep"


def test_cli_gptq_calibrates_on_a_text_file(tiny_dir, tmp_path, capsys):
    from lmforge.cli import main
    from lmforge.model.gguf_io import load_gguf_model
    from lmforge.tokenizer.formats.gguf import load_gguf_tokenizer

    text = tmp_path / "calibration.txt"
    text.write_text("weights rounded onto a grid, block by block, sixteen levels each\n" * 40)
    out = tmp_path / "m.gguf"
    assert main(["quantize", str(tiny_dir), "--method", "gptq", "--calibration", str(text),
                 "--calibration-sequences", "4", "--calibration-length", "32", "--out", str(out)]) == 0
    line = capsys.readouterr().out
    assert "calibrated on 128 tokens" in line and "8 matrices on the grid" in line
    assert load_gguf_model(out).config.n_layer == 2
    assert load_gguf_tokenizer(out).encode("block by block")  # the tokenizer travels in the file


def _attention_outputs(block, xs, extra) -> torch.Tensor:
    """What reaches `block.attn.out` for every calibration row: the heads' outputs [N, q_size]."""
    seen = []
    handle = block.attn.out.register_forward_pre_hook(lambda _m, a: seen.append(a[0].reshape(-1, a[0].shape[-1])))
    with torch.no_grad():
        for x, args in zip(xs, extra):
            block(x, *args)
    handle.remove()
    return torch.cat(seen)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_value_hessians_give_the_attention_output_error_of_a_value_change(family):
    from lmforge.infer.gptq import value_hessians
    from lmforge.infer.quantize import first_block_inputs

    # A head's output moves by E_v xbar_t when its value rows move by E_v, so
    # n/2 * tr(E H E^T) with each KV head's H must equal the squared change of the real
    # attention output (rotary, causal softmax and grouped heads included).
    model = tiny(family)
    block = model.layers[1]
    xs, extra = first_block_inputs(model, calibration())
    xs = [model.layers[0](x, *args) for x, args in zip(xs, extra)]
    hessians = value_hessians(block, xs, extra)
    attn = block.attn
    before = _attention_outputs(block, xs, extra)
    change = torch.randn(attn.kv_size, attn.qkv.in_features) * 0.01
    with torch.no_grad():
        attn.qkv.weight[attn.q_size + attn.kv_size:] += change
    diff = (_attention_outputs(block, xs, extra) - before).double()
    group = attn.n_head // attn.n_kv_head
    for head, hessian in enumerate(hessians):
        cols = slice(head * group * attn.head_dim, (head + 1) * group * attn.head_dim)
        e = change[head * attn.head_dim:(head + 1) * attn.head_dim].double()
        predicted = float(torch.trace(e @ hessian.double() @ e.T)) * diff.shape[0] * group / 2
        assert predicted == pytest.approx(float((diff[:, cols] ** 2).sum()), rel=1e-4)


def test_gptq_value_rows_with_the_attention_hessian_beat_the_plain_one():
    from lmforge.infer.gptq import gptq_quantize, value_hessians
    from lmforge.infer.quantize import first_block_inputs, input_stats

    # The plain H = 2 X^T X weights every token once; the attention-weighted one is the
    # heads' output error itself, so GPTQ with it must leave less error in those outputs.
    model = tiny()
    block = model.layers[0]
    xs, extra = first_block_inputs(model, calibration(n=12))
    attn = block.attn
    gram, _, n = input_stats(block, ["attn.qkv"], xs, extra, stop=True)["attn.qkv"]
    plain = gram * (2.0 / n)
    hessians = value_hessians(block, xs, extra)
    exact = _attention_outputs(block, xs, extra)
    weight = attn.qkv.weight.detach().clone()
    errors = {}
    for kind in ("plain", "attention"):
        rows = []
        for head, hessian in enumerate(hessians):
            start = attn.q_size + attn.kv_size + head * attn.head_dim
            w = weight[start:start + attn.head_dim]
            rows.append(gptq_quantize(w, plain if kind == "plain" else hessian, GRIDS[4]).dequantize())
        with torch.no_grad():
            attn.qkv.weight[attn.q_size + attn.kv_size:] = torch.cat(rows)
        errors[kind] = float((_attention_outputs(block, xs, extra) - exact).norm())
        with torch.no_grad():
            attn.qkv.weight.copy_(weight)
    assert errors["attention"] < 0.9 * errors["plain"]
