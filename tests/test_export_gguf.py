"""GGUF writing: lmforge models (and byte-level BPE tokenizers) written as F32 / F16 / Q8_0 / Q4_0,
read back by the gguf package, by lmforge's own loader and by transformers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf", reason="gguf not installed")

from lmforge.errors import LmforgeError  # noqa: E402
from lmforge.model.checkpoint import build_model, load_hf_model  # noqa: E402
from lmforge.model.gguf_io import load_gguf_model  # noqa: E402
from lmforge.model.gguf_write import (  # noqa: E402
    dequantize_q4_0,
    dequantize_q8_0,
    quantize_q4_0,
    quantize_q8_0,
    write_gguf,
)
from tests.conftest import FAMILIES, VOCAB  # noqa: E402

T = gguf.GGMLQuantizationType
IDS = torch.tensor([[5, 17, 42, 99, 3, 250, 11, 7, 64, 128, 200, 31]])  # 12 tokens: past the 8-token mistral window


def _odd_blocks():
    """Rows that exercise the edge cases: an all-zero block, ties at .5, a negative extreme."""
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((16, 128)) * rng.uniform(0.01, 3.0, (16, 1))).astype(np.float32)
    x[0, :32] = 0.0
    x[1, :32] = np.linspace(-1, 1, 32, dtype=np.float32)  # d = 1/127 and 1/8: exact .5 products
    x[2, 5] = -40.0
    return x


@pytest.mark.parametrize("qtype", ["q8_0", "q4_0"])
def test_quantizers_give_ggmls_reference_bytes(qtype):
    x = _odd_blocks()
    ours = quantize_q8_0(x) if qtype == "q8_0" else quantize_q4_0(x)
    ref = gguf.quants.quantize(x, T.Q8_0 if qtype == "q8_0" else T.Q4_0)
    assert ours.dtype == np.uint8 and ours.shape == ref.shape == (16, 128 // 32 * (34 if qtype == "q8_0" else 18))
    np.testing.assert_array_equal(ours, ref)
    back = dequantize_q8_0(ours) if qtype == "q8_0" else dequantize_q4_0(ours)
    np.testing.assert_array_equal(back, gguf.quants.dequantize(ref, T.Q8_0 if qtype == "q8_0" else T.Q4_0))


def test_quantization_error_is_within_the_block_step():
    """Q8_0 rounds to steps of max|x|/127 (error <= half a step, plus the float16 scale's rounding);
    Q4_0 to steps of max|x|/8, one step at most (the extreme opposite the scale's sign is clamped)."""
    x = _odd_blocks()
    amax = np.abs(x.reshape(-1, 32)).max(axis=1, keepdims=True)
    err8 = np.abs(dequantize_q8_0(quantize_q8_0(x)) - x).reshape(-1, 32)
    err4 = np.abs(dequantize_q4_0(quantize_q4_0(x)) - x).reshape(-1, 32)
    assert (err8 <= amax * (0.5 / 127 + 2.0**-11) + 1e-12).all()
    assert (err4 <= amax * (1 / 8 + 2.0**-8) + 1e-12).all()
    assert err8[0].max() == 0 and err4[0].max() == 0  # a zero block stays exactly zero
    with pytest.raises(ValueError, match="multiple of 32"):
        quantize_q4_0(np.zeros((2, 40), np.float32))


def _roundtrip_reference(model, qtype: str):
    """The model GGUF `qtype` should load as: each matrix quantized row by row (rows split and
    permuted by the writer stay whole rows, so blocks are the same) and dequantized again."""
    state = {}
    head = "embed.weight" if model.config.tie_word_embeddings else "lm_head.weight"
    for name, w in model.state_dict().items():
        a = w.detach().float().numpy()
        if a.ndim == 2 and qtype != "f32":
            if qtype == "f16" or a.shape[1] % 32:
                a = a.astype(np.float16).astype(np.float32)
            elif qtype == "q8_0" or name == head:  # a Q4_0 file keeps its head in Q8_0
                a = dequantize_q8_0(quantize_q8_0(a))
                a = dequantize_q8_0(quantize_q8_0(a))
            else:
                a = dequantize_q4_0(quantize_q4_0(a))
        state[name] = torch.from_numpy(np.ascontiguousarray(a))
    return build_model(model.config, state, torch.float32)


@pytest.fixture(scope="module")
def lm_models(tiny_hf_dirs):
    return {family: load_hf_model(tiny_hf_dirs[family][0]) for family in FAMILIES}


@pytest.mark.parametrize("family", FAMILIES)
def test_every_type_reads_back_in_gguf_and_lmforge(lm_models, family, tmp_path):
    model = lm_models[family]
    with torch.no_grad():
        ref = model(IDS)
    errors = {}
    for qtype in ("f32", "f16", "q8_0", "q4_0"):
        path = tmp_path / f"{family}-{qtype}.gguf"
        result = write_gguf(model, path, qtype)
        reader = gguf.GGUFReader(str(path))
        arch = {"mistral": "llama"}.get(family, family)
        assert bytes(reader.fields["general.architecture"].parts[-1]).decode() == arch
        types = {t.name: t.tensor_type for t in reader.tensors}
        shapes = {t.name: [int(n) for n in t.shape] for t in reader.tensors}
        matrix = T[qtype.upper()]
        head = "token_embd.weight" if model.config.tie_word_embeddings else "output.weight"
        assert types["blk.0.ffn_down.weight"] == matrix and types["blk.1.attn_output.weight"] == matrix
        assert types[head] == (T.Q8_0 if qtype == "q4_0" else matrix)
        assert types["blk.0.attn_norm.weight"] == T.F32 and types["output_norm.weight"] == T.F32
        # GGUF lists dimensions innermost first: [columns, rows].
        assert shapes["token_embd.weight"] == [model.config.n_embd, VOCAB]
        if family != "gpt2":
            assert shapes["blk.0.attn_k.weight"] == [model.config.n_embd, model.config.kv_size]
        assert ("output.weight" in types) == (not model.config.tie_word_embeddings)
        quantized = sum(1 for t in types.values() if t in (T.Q8_0, T.Q4_0))
        assert result.quantized == (quantized if qtype[0] == "q" else 0)
        back = load_gguf_model(path)
        assert back.config.family == family and back.config.n_kv_head == model.config.n_kv_head
        with torch.no_grad():
            got = back(IDS)
        if qtype == "f32":
            assert torch.equal(got, ref)  # the same floats, in a different file
        else:
            with torch.no_grad():
                expected = _roundtrip_reference(model, qtype)(IDS)
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
        errors[qtype] = float((got - ref).abs().max() / ref.abs().max())
    # Against the unquantized model: 16-bit floats keep ~3 decimal digits; 8-bit blocks have 127
    # levels a side, 4-bit ones 8, so Q4_0's error is several times Q8_0's.
    assert errors["f16"] < 2e-3
    assert errors["q8_0"] < 0.05
    assert errors["q4_0"] < 0.5
    assert errors["q8_0"] * 4 < errors["q4_0"]


def test_rows_that_do_not_split_into_blocks_stay_f16(tmp_path):
    from lmforge.model.config import ModelConfig
    from lmforge.model.transformer import Transformer

    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=64, n_embd=64, n_head=4, intermediate_size=100)).eval()
    result = write_gguf(model, tmp_path / "odd.gguf", "q4_0")
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(str(tmp_path / "odd.gguf")).tensors}
    assert types["blk.0.ffn_down.weight"] == T.F16  # rows of 100 values
    assert types["blk.0.ffn_up.weight"] == T.Q4_0  # rows of 64
    assert result.fallback_f16 == 2  # ffn_down of both layers
    assert types["output.weight"] == T.Q8_0
    with torch.no_grad():
        torch.testing.assert_close(load_gguf_model(tmp_path / "odd.gguf")(IDS[:, :6] % 64),
                                   _roundtrip_reference(model, "q4_0")(IDS[:, :6] % 64), atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def tiny_tokenizer(tmp_path_factory):
    """A byte-level BPE tokenizer (GPT-2 pre-tokenizer) trained on a few sentences: 300 tokens."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    from lmforge.tokenizer import Tokenizer

    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(["the quick brown fox jumps over the lazy dog " * 3,
                             "export the model to onnx and gguf files, then read them back"] * 20, trainer)
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    tok.save(str(path))
    loaded = Tokenizer.from_file(path)
    loaded.eos_token = "<|endoftext|>"
    return loaded


TEXTS = ["the quick brown fox", "Export 123 GGUF files!  then  read\nthem", "<|im_start|>user héllo<|im_end|>"]


def test_tokenizer_metadata_round_trips(lm_models, tiny_tokenizer, tmp_path):
    from lmforge.io.gguf_file import GGUFFile
    from lmforge.tokenizer import Tokenizer

    path = tmp_path / "with-tok.gguf"
    write_gguf(lm_models["qwen2"], path, "q8_0", tokenizer=tiny_tokenizer)
    meta = GGUFFile(path).metadata
    assert meta["tokenizer.ggml.model"] == "gpt2" and meta["tokenizer.ggml.pre"] == "gpt-2"
    tokens, types = list(meta["tokenizer.ggml.tokens"]), list(meta["tokenizer.ggml.token_type"])
    assert len(tokens) == VOCAB  # one token per embedding row, as llama.cpp requires
    assert tokens[0] == "<|endoftext|>" and types[0] == 3  # control
    assert tokens[310] == "[PAD310]" and types[310] == 5  # unused padding rows
    assert meta["tokenizer.ggml.eos_token_id"] == 0
    back = Tokenizer.from_gguf(path)
    for text in TEXTS:
        assert back.encode(text) == tiny_tokenizer.encode(text)
        assert back.decode(back.encode(text)) == text


def _tiny_hf(kind: str):
    import transformers

    torch.manual_seed(3)
    if kind == "llama":  # no rope scaling: transformers' GGUF loader ignores rope_freqs
        config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                          tie_word_embeddings=False)
    else:  # gpt2: transformers maps GGUF's context_length to n_ctx only, so n_positions must be its 1024
        config = transformers.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=1024)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
def test_transformers_reads_the_files(family, lm_models, tiny_hf_dirs, tiny_tokenizer, tmp_path):
    import transformers

    if family == "qwen2":
        model = lm_models["qwen2"]
    else:
        hf = _tiny_hf(family)
        hf.save_pretrained(tmp_path / "hf")
        model = load_hf_model(tmp_path / "hf")
    with torch.no_grad():
        ref = model(IDS)
    for qtype in ("f32", "q8_0", "q4_0"):
        name = f"{family}-{qtype}.gguf"
        # transformers takes a GPT-2 file's vocabulary size from its token list.
        write_gguf(model, tmp_path / name, qtype, tokenizer=tiny_tokenizer if family == "gpt2" else None)
        hf_back = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=name,
                                                                    dtype=torch.float32).eval()
        with torch.no_grad():
            got = hf_back(IDS).logits
            ours = load_gguf_model(tmp_path / name)(IDS)
        # Both dequantize the same bytes, so they agree with each other at float32 precision.
        torch.testing.assert_close(got, ours, atol=1e-4, rtol=0)
        if qtype == "f32":
            torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)


def test_write_refuses_bad_input_and_keeps_existing_files(lm_models, tmp_path):
    from lmforge.model.config import ModelConfig
    from lmforge.model.transformer import Transformer

    model = lm_models["llama"]
    with pytest.raises(LmforgeError, match="unknown GGUF type"):
        write_gguf(model, tmp_path / "a.gguf", "q5_k")
    with pytest.raises(LmforgeError, match="ends in .gguf"):
        write_gguf(model, tmp_path / "a.bin", "f16")
    encoder = Transformer(ModelConfig(family="bert", causal=False, norm="layernorm", mlp="gelu", position="learned",
                                      norm_position="post", lm_head=False))
    with pytest.raises(LmforgeError, match="encoder"):
        write_gguf(encoder, tmp_path / "enc.gguf", "f16")
    (tmp_path / "taken.gguf").write_bytes(b"mine")
    with pytest.raises(LmforgeError, match="already exists"):
        write_gguf(model, tmp_path / "taken.gguf", "f16")
    assert (tmp_path / "taken.gguf").read_bytes() == b"mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken.gguf"]  # no temporary file left behind


def test_cli_export_gguf(tiny_hf_dirs, tmp_path, capsys):
    from lmforge.cli import main

    out = tmp_path / "qwen2-q4.gguf"
    assert main(["export", "gguf", str(tiny_hf_dirs["qwen2"][0]), "--out", str(out), "--type", "q4_0"]) == 0
    line = capsys.readouterr().out
    assert "GGUF Q4_0 (15 quantized tensors, 0 kept F16)" in line and "max |logit difference|" in line
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(str(out)).tensors}
    assert types.pop("token_embd.weight") == T.Q8_0  # the (tied) head
    assert set(types.values()) == {T.Q4_0, T.F32}
    assert main(["export", "gguf", str(tiny_hf_dirs["qwen2"][0]), "--out", str(out), "--type", "q4_0",
                 "--pure", "--overwrite", "--no-check"]) == 0
    assert "check" not in capsys.readouterr().out
    assert gguf.GGUFReader(str(out)).get_tensor(0).name == "token_embd.weight"
    assert gguf.GGUFReader(str(out)).get_tensor(0).tensor_type == T.Q4_0
    out.write_bytes(b"keep")
    assert main(["export", "gguf", str(tiny_hf_dirs["qwen2"][0]), "--out", str(out)]) == 1
    assert "already exists" in capsys.readouterr().err and out.read_bytes() == b"keep"
    with pytest.raises(SystemExit):  # argparse: an unknown --type is a usage error
        main(["export", "gguf", str(tiny_hf_dirs["qwen2"][0]), "--out", str(out), "--type", "q3"])


@pytest.mark.slow
def test_default_model_gguf_with_tokenizer_reads_back_everywhere(tmp_path, default_lm):
    """The default model (its tokenizer has the smollm pre-tokenizer) as Q8_0: tensor types in the
    gguf reader, the same tokens from the written tokenizer, and lmforge's and transformers' loads
    of the file agreeing with each other and, within Q8_0's rounding, with the original."""
    import transformers

    from lmforge.io.gguf_file import GGUFFile
    from lmforge.model.loading import load_model
    from lmforge.model.registry import resolve
    from lmforge.tokenizer import Tokenizer

    model = load_model(resolve(None))
    path = tmp_path / "smol-q8_0.gguf"
    write_gguf(model, path, "q8_0", tokenizer=default_lm.tokenizer)
    meta = GGUFFile(path).metadata
    assert meta["tokenizer.ggml.pre"] == "smollm" and meta["general.architecture"] == "llama"
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(str(path)).tensors}
    assert types["blk.29.ffn_gate.weight"] == T.Q8_0 and types["blk.29.ffn_norm.weight"] == T.F32
    back_tok = Tokenizer.from_gguf(path)
    chat = default_lm.tokenizer.apply_chat_template([{"role": "user", "content": "What is 12 x 7? Answer."}],
                                                    add_generation_prompt=True)
    assert back_tok.apply_chat_template([{"role": "user", "content": "What is 12 x 7? Answer."}],
                                        add_generation_prompt=True) == chat
    ids = torch.tensor([default_lm.tokenizer.encode(chat, add_special_tokens=False)])
    assert back_tok.encode(chat, add_special_tokens=False) == ids[0].tolist()
    with torch.no_grad():
        ref = model(ids)
        ours = load_gguf_model(path)(ids)
        hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=path.name,
                                                               dtype=torch.float32).eval()
        theirs = hf(ids).logits
    torch.testing.assert_close(theirs, ours, atol=1e-3, rtol=0)
    assert float((ours - ref).abs().max() / ref.abs().max()) < 0.05
    assert (ours.argmax(-1) == ref.argmax(-1)).float().mean() > 0.9


@pytest.mark.parametrize("qtype", ["f32", "q8_0"])
def test_a_mixture_of_experts_model_round_trips(tmp_path, qtype):
    """A Mixtral-layout model written as GGUF: llama.cpp's tensor names, shapes and expert metadata,
    read back by lmforge with the same logits (f32) or those of its dequantized Q8_0 experts."""
    from lmforge.model.config import ModelConfig
    from lmforge.model.transformer import Transformer

    torch.manual_seed(3)
    config = ModelConfig(family="mixtral", vocab_size=VOCAB, n_layer=2, n_embd=64, n_head=4, n_kv_head=2,
                         intermediate_size=96, max_position_embeddings=64, num_experts=4, experts_per_token=2)
    model = Transformer(config).eval()
    path = tmp_path / f"moe-{qtype}.gguf"
    done = write_gguf(model, path, qtype)
    reader = gguf.GGUFReader(str(path))
    fields = {f.name: f.contents() for f in reader.fields.values() if f.name.startswith("llama.")}
    assert fields["llama.expert_count"] == 4 and fields["llama.expert_used_count"] == 2
    tensors = {t.name: t for t in reader.tensors}
    assert "blk.0.ffn_gate.weight" not in tensors
    assert tuple(tensors["blk.1.ffn_gate_exps.weight"].shape) == (64, 96, 4)  # GGUF lists dimensions innermost first
    assert tuple(tensors["blk.1.ffn_down_exps.weight"].shape) == (96, 64, 4)
    assert tensors["blk.0.ffn_gate_inp.weight"].tensor_type == T.F32
    want = T.F32 if qtype == "f32" else T.Q8_0
    assert tensors["blk.0.ffn_up_exps.weight"].tensor_type == want
    back = load_gguf_model(path)
    assert back.config.num_experts == 4 and back.config.experts_per_token == 2
    expected = model
    if qtype == "q8_0":
        state = {k: v.clone() for k, v in model.state_dict().items()}
        for name, w in state.items():
            if w.dim() >= 2 and not name.endswith("router.weight"):
                state[name] = torch.from_numpy(dequantize_q8_0(quantize_q8_0(w.numpy())))
        expected = build_model(config, state, torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(back(IDS), expected(IDS), atol=1e-5, rtol=1e-5)
    assert done.quantized == (0 if qtype == "f32" else done.tensors - 2 * 2 - 1 - 2)  # not norms, router vectors
