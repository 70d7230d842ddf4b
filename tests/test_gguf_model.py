"""GGUF checkpoints of each supported architecture, written here from tiny HF models.

The files follow llama.cpp's conventions (tensor names, reversed dims, q/k rows permuted
for the Llama architecture only), so loading them back must reproduce the HF logits.
The default model's test checks the same loader against a real llama.cpp file.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lmforge.model.gguf_io import load_gguf_model
from tests.conftest import VOCAB


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's converter: rotate-half rows -> interleaved pairs."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(path, arch: str, hf_model, extra_tensors=None) -> None:
    import gguf

    c = hf_model.config
    sd = {k: v.detach().float().numpy() for k, v in hf_model.state_dict().items()}
    w = gguf.GGUFWriter(str(path), arch)
    if arch == "gpt2":
        w.add_block_count(c.n_layer)
        w.add_context_length(c.n_positions)
        w.add_embedding_length(c.n_embd)
        w.add_feed_forward_length(4 * c.n_embd)
        w.add_head_count(c.n_head)
        w.add_layer_norm_eps(c.layer_norm_epsilon)
        tensors = {"token_embd.weight": sd["transformer.wte.weight"], "position_embd.weight": sd["transformer.wpe.weight"],
                   "output_norm.weight": sd["transformer.ln_f.weight"], "output_norm.bias": sd["transformer.ln_f.bias"]}
        for i in range(c.n_layer):
            p = f"transformer.h.{i}."
            for ours, theirs, transpose in [("attn_norm", "ln_1", False), ("ffn_norm", "ln_2", False),
                                            ("attn_qkv", "attn.c_attn", True), ("attn_output", "attn.c_proj", True),
                                            ("ffn_up", "mlp.c_fc", True), ("ffn_down", "mlp.c_proj", True)]:
                weight = sd[p + theirs + ".weight"]
                tensors[f"blk.{i}.{ours}.weight"] = np.ascontiguousarray(weight.T if transpose else weight)
                tensors[f"blk.{i}.{ours}.bias"] = sd[p + theirs + ".bias"]
    else:
        w.add_block_count(c.num_hidden_layers)
        w.add_context_length(c.max_position_embeddings)
        w.add_embedding_length(c.hidden_size)
        w.add_feed_forward_length(c.intermediate_size)
        w.add_head_count(c.num_attention_heads)
        w.add_head_count_kv(c.num_key_value_heads)
        w.add_layer_norm_rms_eps(c.rms_norm_eps)
        w.add_rope_freq_base(c.rope_parameters["rope_theta"] if hasattr(c, "rope_parameters") and c.rope_parameters else c.rope_theta)
        w.add_vocab_size(c.vocab_size)
        tensors = {"token_embd.weight": sd["model.embed_tokens.weight"], "output_norm.weight": sd["model.norm.weight"]}
        if not c.tie_word_embeddings:
            tensors["output.weight"] = sd["lm_head.weight"]
        names = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
                 "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
                 "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
        for i in range(c.num_hidden_layers):
            for theirs, ours in names.items():
                for kind in ("weight", "bias"):
                    key = f"model.layers.{i}.{theirs}.{kind}"
                    if key not in sd:
                        continue
                    t = sd[key]
                    if arch == "llama" and ours in ("attn_q", "attn_k"):
                        heads = c.num_attention_heads if ours == "attn_q" else c.num_key_value_heads
                        t = _permute(t, heads)
                    tensors[f"blk.{i}.{ours}.{kind}"] = t
    tensors.update(extra_tensors or {})
    for name, array in tensors.items():
        # Norms stay F32 as llama.cpp does; matrices go F16 to exercise conversion.
        w.add_tensor(name, array.astype(np.float16) if array.ndim == 2 else array.astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("family, arch", [("llama", "llama"), ("qwen2", "qwen2"), ("gpt2", "gpt2")])
def test_gguf_of_each_architecture_matches_hf(family, arch, tiny_hf_dirs, tmp_path):
    _, hf = tiny_hf_dirs[family]
    if family == "llama":
        # GGUF "llama" has no Llama-3 scaling keys: compare against an unscaled copy.
        import transformers as T

        cfg = hf.config.to_dict()
        cfg.pop("rope_scaling", None)
        rp = dict(cfg.get("rope_parameters") or {})
        cfg["rope_parameters"] = {"rope_type": "default", "rope_theta": rp.get("rope_theta", 500000.0)}
        plain = T.LlamaConfig(**{k: v for k, v in cfg.items() if k not in ("architectures", "transformers_version")})
        plain._attn_implementation = "eager"
        ref = T.LlamaForCausalLM(plain).eval()
        ref.load_state_dict(hf.state_dict())
        hf = ref
    path = tmp_path / f"tiny-{arch}.gguf"
    write_gguf(path, arch, hf)
    ours = load_gguf_model(path)
    assert ours.config.family == family
    ids = torch.randint(3, VOCAB, (1, 24), generator=torch.Generator().manual_seed(6))
    # Matrices were stored as fp16, so the reference is the HF model with the same rounding.
    hf_rounded = type(hf)(hf.config).eval()
    hf_rounded.load_state_dict({k: (v.half().float() if v.ndim == 2 else v) for k, v in hf.state_dict().items()})
    with torch.no_grad():
        expected = hf_rounded(ids).logits
        got = ours(ids)
    assert (got - expected).abs().max().item() <= 1e-4


def test_llama31_style_rope_freqs_tensor(tiny_hf_dirs, tmp_path):
    """Llama 3.1 GGUFs carry RoPE scaling as a rope_freqs tensor of per-frequency divisors."""
    import gguf
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    _, hf = tiny_hf_dirs["llama"]  # Llama-3 scaled RoPE
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](hf.config, "cpu")
    head_dim = hf.config.hidden_size // hf.config.num_attention_heads
    theta = hf.config.rope_parameters["rope_theta"]
    plain = 1.0 / (theta ** (torch.arange(0, head_dim, 2).float() / head_dim))
    path = tmp_path / "llama31.gguf"
    write_gguf(path, "llama", hf, extra_tensors={"rope_freqs.weight": (plain / scaled).numpy().astype(np.float32)})
    ours = load_gguf_model(path)
    assert ours.config.rope_scaling["rope_type"] == "factors"
    hf_rounded = type(hf)(hf.config).eval()
    hf_rounded.load_state_dict({k: (v.half().float() if v.ndim == 2 else v) for k, v in hf.state_dict().items()})
    ids = torch.randint(3, VOCAB, (1, 100), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        assert (ours(ids) - hf_rounded(ids).logits).abs().max().item() <= 1e-4
    # config.json cannot express explicit factors: saving refuses clearly instead of writing a wrong model.
    from lmforge.errors import LmforgeError
    from lmforge.model.checkpoint import save_hf_model

    with pytest.raises(LmforgeError, match="per-frequency factors"):
        save_hf_model(ours, tmp_path / "out")
    assert not (tmp_path / "out").exists()
