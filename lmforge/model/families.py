"""Model families as data (M6): Hugging Face config keys -> `ModelConfig`, and weight names.

Adding a family means adding a `Family` entry: how its config.json maps onto
`ModelConfig`, and where each lmforge weight lives in its checkpoints. The model code
never changes.

lmforge's own parameter names (one layer shown):
    embed.weight, pos_embed.weight (learned positions only), norm.weight/.bias, lm_head.weight
    type_embed.weight, embed_norm.weight/.bias (encoders only)
    layers.{i}.attn_norm.*, layers.{i}.attn.qkv.*, layers.{i}.attn.out.*,
    layers.{i}.mlp_norm.*, layers.{i}.mlp.fc.* (SwiGLU: gate rows then up rows), layers.{i}.mlp.proj.*
    mixture of experts (Mixtral): layers.{i}.mlp.router.weight [E, D], layers.{i}.mlp.w_in
    [E, 2F, D] (each expert's gate rows then up rows), layers.{i}.mlp.w_out [E, D, F]
In a post-norm block (BERT) attn_norm follows the attention's residual add and mlp_norm
the feed-forward's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from ..errors import LmforgeError
from .config import ModelConfig


@dataclass(frozen=True)
class Family:
    name: str
    hf_model_type: str
    hf_architecture: str
    # lmforge name (after "layers.{i}.") -> HF names (after the HF layer prefix); several
    # names are concatenated along dim 0 (rows) to form the fused lmforge matrix.
    layer_map: dict[str, tuple[str, ...]]
    top_map: dict[str, str]  # non-layer weights: lmforge name -> HF name
    hf_layer_prefix: str
    transposed: tuple[str, ...] = ()  # HF weights stored [in, out] (GPT-2's Conv1D)
    # Checkpoints with a task head keep the base model under this prefix (BertForMaskedLM:
    # "bert.encoder..."); it is dropped when present. Names missing from the maps (poolers,
    # task heads) are ignored.
    optional_prefix: str = ""
    # Old spellings of weight-name endings, rewritten on load (TF-era BERT: LayerNorm.gamma).
    legacy_suffixes: tuple[tuple[str, str], ...] = ()
    to_config: Callable[[dict[str, Any]], ModelConfig] | None = None
    from_config: Callable[[ModelConfig], dict[str, Any]] | None = None


def _rope_from_hf(hf: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """RoPE base and scaling from either the legacy keys or transformers 5's `rope_parameters`."""
    params = dict(hf.get("rope_parameters") or {})
    theta = float(params.pop("rope_theta", hf.get("rope_theta", 10000.0)))
    scaling = hf.get("rope_scaling") or (params if params.get("rope_type", "default") != "default" else None)
    if scaling:
        scaling = {k: v for k, v in scaling.items() if k != "rope_theta"}
        scaling.setdefault("rope_type", scaling.get("type", "default"))
        if scaling["rope_type"] == "default":
            scaling = None
    return theta, scaling


def _llama_like_config(family: str) -> Callable[[dict[str, Any]], ModelConfig]:
    def convert(hf: dict[str, Any]) -> ModelConfig:
        theta, scaling = _rope_from_hf(hf)
        n_head = hf["num_attention_heads"]
        window = None
        if family in ("mistral", "mixtral") or (family == "qwen2" and hf.get("use_sliding_window")):
            window = hf.get("sliding_window")
        act = hf.get("hidden_act", "silu")
        if act != "silu":
            raise LmforgeError(f"unsupported activation {act!r} for a {family} model (expected silu)")
        moe = {}
        if family == "mixtral":
            moe = dict(num_experts=hf.get("num_local_experts", 8), experts_per_token=hf.get("num_experts_per_tok", 2),
                       router_aux_loss_coef=float(hf.get("router_aux_loss_coef", 0.001)),
                       router_jitter_noise=float(hf.get("router_jitter_noise") or 0.0))
        return ModelConfig(
            family=family,
            vocab_size=hf["vocab_size"],
            n_layer=hf["num_hidden_layers"],
            n_embd=hf["hidden_size"],
            n_head=n_head,
            n_kv_head=hf.get("num_key_value_heads") or n_head,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // n_head,
            intermediate_size=hf["intermediate_size"],
            max_position_embeddings=hf.get("max_position_embeddings", 2048),
            norm="rmsnorm",
            norm_eps=hf.get("rms_norm_eps", 1e-6),
            mlp="swiglu",
            position="rope",
            rope_theta=theta,
            rope_scaling=scaling,
            qkv_bias=family == "qwen2" or bool(hf.get("attention_bias", False)),
            out_bias=family != "qwen2" and bool(hf.get("attention_bias", False)),
            mlp_bias=bool(hf.get("mlp_bias", False)),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            sliding_window=window,
            bos_token_id=hf.get("bos_token_id"),
            eos_token_id=hf.get("eos_token_id"),
            pad_token_id=hf.get("pad_token_id"),
            **moe,
        )

    return convert


def _llama_like_hf(family: str) -> Callable[[ModelConfig], dict[str, Any]]:
    def convert(c: ModelConfig) -> dict[str, Any]:
        hf: dict[str, Any] = {
            "vocab_size": c.vocab_size,
            "num_hidden_layers": c.n_layer,
            "hidden_size": c.n_embd,
            "num_attention_heads": c.n_head,
            "num_key_value_heads": c.n_kv_head,
            "head_dim": c.head_dim,
            "intermediate_size": c.intermediate_size,
            "max_position_embeddings": c.max_position_embeddings,
            "rms_norm_eps": c.norm_eps,
            "hidden_act": "silu",
            "rope_theta": c.rope_theta,
            "rope_scaling": c.rope_scaling,
            "tie_word_embeddings": c.tie_word_embeddings,
        }
        if family == "llama":
            hf["attention_bias"] = c.qkv_bias
            hf["mlp_bias"] = c.mlp_bias
        if family in ("mistral", "mixtral"):
            hf["sliding_window"] = c.sliding_window
        if family == "mixtral":
            hf.update(num_local_experts=c.num_experts, num_experts_per_tok=c.experts_per_token,
                      router_aux_loss_coef=c.router_aux_loss_coef, router_jitter_noise=c.router_jitter_noise)
        if family == "qwen2":
            hf["use_sliding_window"] = c.sliding_window is not None
            hf["sliding_window"] = c.sliding_window
        return hf

    return convert


def _gpt2_config(hf: dict[str, Any]) -> ModelConfig:
    act = hf.get("activation_function", "gelu_new")
    approx = {"gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "gelu": "none"}.get(act)
    if approx is None:
        raise LmforgeError(f"unsupported GPT-2 activation {act!r}")
    d = hf["n_embd"]
    return ModelConfig(
        family="gpt2",
        vocab_size=hf["vocab_size"],
        n_layer=hf["n_layer"],
        n_embd=d,
        n_head=hf["n_head"],
        intermediate_size=hf.get("n_inner") or 4 * d,
        max_position_embeddings=hf.get("n_positions", 1024),
        norm="layernorm",
        norm_eps=hf.get("layer_norm_epsilon", 1e-5),
        mlp="gelu",
        gelu_approximate=approx,
        position="learned",
        qkv_bias=True,
        out_bias=True,
        mlp_bias=True,
        tie_word_embeddings=hf.get("tie_word_embeddings", True),
        bos_token_id=hf.get("bos_token_id"),
        eos_token_id=hf.get("eos_token_id"),
        pad_token_id=hf.get("pad_token_id"),
    )


def _gpt2_hf(c: ModelConfig) -> dict[str, Any]:
    return {
        "vocab_size": c.vocab_size,
        "n_layer": c.n_layer,
        "n_embd": c.n_embd,
        "n_head": c.n_head,
        "n_inner": c.intermediate_size,
        "n_positions": c.max_position_embeddings,
        "n_ctx": c.max_position_embeddings,
        "layer_norm_epsilon": c.norm_eps,
        "activation_function": "gelu_new" if c.gelu_approximate == "tanh" else "gelu",
        "tie_word_embeddings": c.tie_word_embeddings,
    }


def _bert_config(hf: dict[str, Any]) -> ModelConfig:
    act = hf.get("hidden_act", "gelu")
    approx = {"gelu": "none", "gelu_new": "tanh", "gelu_pytorch_tanh": "tanh"}.get(act)
    if approx is None:
        raise LmforgeError(f"unsupported BERT activation {act!r} (expected gelu)")
    kind = hf.get("position_embedding_type", "absolute")
    if kind != "absolute":
        raise LmforgeError(f"unsupported BERT position_embedding_type {kind!r} (lmforge reads absolute positions)")
    if hf.get("is_decoder"):
        raise LmforgeError("this BERT checkpoint is configured as a decoder (is_decoder=true); lmforge reads BERT encoders")
    return ModelConfig(
        family="bert",
        vocab_size=hf["vocab_size"],
        n_layer=hf["num_hidden_layers"],
        n_embd=hf["hidden_size"],
        n_head=hf["num_attention_heads"],
        intermediate_size=hf["intermediate_size"],
        max_position_embeddings=hf.get("max_position_embeddings", 512),
        norm="layernorm",
        norm_eps=hf.get("layer_norm_eps", 1e-12),
        mlp="gelu",
        gelu_approximate=approx,
        position="learned",
        qkv_bias=True,
        out_bias=True,
        mlp_bias=True,
        tie_word_embeddings=False,
        pad_token_id=hf.get("pad_token_id"),
        causal=False,
        norm_position="post",
        type_vocab_size=hf.get("type_vocab_size", 2),
        embedding_norm=True,
        lm_head=False,
    )


def _bert_hf(c: ModelConfig) -> dict[str, Any]:
    return {
        "vocab_size": c.vocab_size,
        "num_hidden_layers": c.n_layer,
        "hidden_size": c.n_embd,
        "num_attention_heads": c.n_head,
        "intermediate_size": c.intermediate_size,
        "max_position_embeddings": c.max_position_embeddings,
        "type_vocab_size": c.type_vocab_size,
        "layer_norm_eps": c.norm_eps,
        "hidden_act": "gelu" if c.gelu_approximate == "none" else "gelu_pytorch_tanh",
        "position_embedding_type": "absolute",
    }


_LLAMA_LAYER = {
    "attn_norm.weight": ("input_layernorm.weight",),
    "attn.qkv.weight": ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"),
    "attn.qkv.bias": ("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"),
    "attn.out.weight": ("self_attn.o_proj.weight",),
    "attn.out.bias": ("self_attn.o_proj.bias",),
    "mlp_norm.weight": ("post_attention_layernorm.weight",),
    "mlp.fc.weight": ("mlp.gate_proj.weight", "mlp.up_proj.weight"),
    "mlp.fc.bias": ("mlp.gate_proj.bias", "mlp.up_proj.bias"),
    "mlp.proj.weight": ("mlp.down_proj.weight",),
    "mlp.proj.bias": ("mlp.down_proj.bias",),
}
# Mixtral: attention and norms as Llama; the feed-forward is a router plus experts, which
# `_experts_from_hf` / `_experts_to_hf` convert (per-expert w1/w3/w2 matrices in checkpoints,
# fused [E, ...] tensors in transformers 5's modules).
_MIXTRAL_LAYER = {k: v for k, v in _LLAMA_LAYER.items() if not k.startswith("mlp.")}
_MIXTRAL_LAYER["mlp.router.weight"] = ("block_sparse_moe.gate.weight",)
_LLAMA_TOP = {"embed.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight", "lm_head.weight": "lm_head.weight"}


def _llama_like(name: str, model_type: str, arch: str) -> Family:
    return Family(
        name=name,
        hf_model_type=model_type,
        hf_architecture=arch,
        layer_map=_MIXTRAL_LAYER if name == "mixtral" else _LLAMA_LAYER,
        top_map=_LLAMA_TOP,
        hf_layer_prefix="model.layers.{i}.",
        to_config=_llama_like_config(name),
        from_config=_llama_like_hf(name),
    )


MOE_FAMILIES = ("mixtral",)

FAMILIES: dict[str, Family] = {
    "llama": _llama_like("llama", "llama", "LlamaForCausalLM"),
    "qwen2": _llama_like("qwen2", "qwen2", "Qwen2ForCausalLM"),
    "mistral": _llama_like("mistral", "mistral", "MistralForCausalLM"),
    "mixtral": _llama_like("mixtral", "mixtral", "MixtralForCausalLM"),
    "gpt2": Family(
        name="gpt2",
        hf_model_type="gpt2",
        hf_architecture="GPT2LMHeadModel",
        layer_map={
            "attn_norm.weight": ("ln_1.weight",),
            "attn_norm.bias": ("ln_1.bias",),
            "attn.qkv.weight": ("attn.c_attn.weight",),
            "attn.qkv.bias": ("attn.c_attn.bias",),
            "attn.out.weight": ("attn.c_proj.weight",),
            "attn.out.bias": ("attn.c_proj.bias",),
            "mlp_norm.weight": ("ln_2.weight",),
            "mlp_norm.bias": ("ln_2.bias",),
            "mlp.fc.weight": ("mlp.c_fc.weight",),
            "mlp.fc.bias": ("mlp.c_fc.bias",),
            "mlp.proj.weight": ("mlp.c_proj.weight",),
            "mlp.proj.bias": ("mlp.c_proj.bias",),
        },
        top_map={
            "embed.weight": "transformer.wte.weight",
            "pos_embed.weight": "transformer.wpe.weight",
            "norm.weight": "transformer.ln_f.weight",
            "norm.bias": "transformer.ln_f.bias",
            "lm_head.weight": "lm_head.weight",
        },
        hf_layer_prefix="transformer.h.{i}.",
        transposed=("attn.qkv.weight", "attn.out.weight", "mlp.fc.weight", "mlp.proj.weight"),
        to_config=_gpt2_config,
        from_config=_gpt2_hf,
    ),
    "bert": Family(
        name="bert",
        hf_model_type="bert",
        hf_architecture="BertModel",
        layer_map={
            "attn.qkv.weight": ("attention.self.query.weight", "attention.self.key.weight", "attention.self.value.weight"),
            "attn.qkv.bias": ("attention.self.query.bias", "attention.self.key.bias", "attention.self.value.bias"),
            "attn.out.weight": ("attention.output.dense.weight",),
            "attn.out.bias": ("attention.output.dense.bias",),
            "attn_norm.weight": ("attention.output.LayerNorm.weight",),
            "attn_norm.bias": ("attention.output.LayerNorm.bias",),
            "mlp.fc.weight": ("intermediate.dense.weight",),
            "mlp.fc.bias": ("intermediate.dense.bias",),
            "mlp.proj.weight": ("output.dense.weight",),
            "mlp.proj.bias": ("output.dense.bias",),
            "mlp_norm.weight": ("output.LayerNorm.weight",),
            "mlp_norm.bias": ("output.LayerNorm.bias",),
        },
        top_map={
            "embed.weight": "embeddings.word_embeddings.weight",
            "pos_embed.weight": "embeddings.position_embeddings.weight",
            "type_embed.weight": "embeddings.token_type_embeddings.weight",
            "embed_norm.weight": "embeddings.LayerNorm.weight",
            "embed_norm.bias": "embeddings.LayerNorm.bias",
        },
        hf_layer_prefix="encoder.layer.{i}.",
        to_config=_bert_config,
        from_config=_bert_hf,
        optional_prefix="bert.",
        legacy_suffixes=(("LayerNorm.gamma", "LayerNorm.weight"), ("LayerNorm.beta", "LayerNorm.bias")),
    ),
}


def family_for_hf_config(hf: dict[str, Any]) -> Family:
    model_type = hf.get("model_type")
    for family in FAMILIES.values():
        if family.hf_model_type == model_type:
            return family
    supported = ", ".join(sorted(f.hf_model_type for f in FAMILIES.values()))
    raise LmforgeError(f"unsupported model_type {model_type!r} in config.json (supported: {supported})")


def config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    family = family_for_hf_config(hf)
    try:
        return family.to_config(hf)
    except KeyError as missing:
        raise LmforgeError(f"config.json for a {family.name} model lacks the key {missing}") from None


def hf_config_from(config: ModelConfig) -> dict[str, Any]:
    family = FAMILIES[config.family]
    if (config.rope_scaling or {}).get("rope_type") == "factors":
        raise LmforgeError(
            "this model's RoPE uses explicit per-frequency factors (from a GGUF rope_freqs tensor), "
            "which config.json cannot express; it cannot be saved in the Hugging Face layout"
        )
    if config.num_experts and family.name not in MOE_FAMILIES:
        raise LmforgeError(f"a {config.family} checkpoint has no place for {config.num_experts} experts per layer: "
                           f"give a mixture of experts family={' or '.join(MOE_FAMILIES)}")
    hf = {"architectures": [family.hf_architecture], "model_type": family.hf_model_type, **config.extra}
    hf.update(family.from_config(config))
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if getattr(config, key) is not None:
            hf[key] = getattr(config, key)
    hf["torch_dtype"] = "float32"
    return hf


def hf_to_lmforge(config: ModelConfig, hf_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename (and fuse, transpose) a Hugging Face state dict into lmforge names."""
    family = FAMILIES[config.family]
    if family.name == "gpt2" and not any(k.startswith("transformer.") for k in hf_state):
        hf_state = {("transformer." + k if not k.startswith("lm_head") else k): v for k, v in hf_state.items()}
    if family.optional_prefix:
        cut = len(family.optional_prefix)
        hf_state = {(k[cut:] if k.startswith(family.optional_prefix) else k): v for k, v in hf_state.items()}
    for old, new in family.legacy_suffixes:
        hf_state = {(k[: -len(old)] + new if k.endswith(old) else k): v for k, v in hf_state.items()}
    if config.num_experts:
        # transformers 5 names the block "mlp" in memory; checkpoints say "block_sparse_moe".
        hf_state = {k.replace(".mlp.gate.", ".block_sparse_moe.gate."): v for k, v in hf_state.items()}
    out: dict[str, torch.Tensor] = {}
    for ours, theirs in family.top_map.items():
        if theirs in hf_state:
            out[ours] = hf_state[theirs]
    for i in range(config.n_layer):
        prefix = family.hf_layer_prefix.format(i=i)
        for ours, theirs in family.layer_map.items():
            parts = [hf_state.get(prefix + t) for t in theirs]
            if all(p is None for p in parts):
                continue
            if any(p is None for p in parts):
                missing = [prefix + t for t, p in zip(theirs, parts) if p is None]
                raise LmforgeError(f"checkpoint is missing {', '.join(missing)}")
            tensor = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
            if ours in family.transposed:
                tensor = tensor.t()
            out[f"layers.{i}.{ours}"] = tensor.contiguous()
        if config.num_experts:
            out.update(_experts_from_hf(config, hf_state, prefix, f"layers.{i}.mlp."))
    return out


def _experts_from_hf(config: ModelConfig, hf_state: dict[str, torch.Tensor], prefix: str,
                     ours: str) -> dict[str, torch.Tensor]:
    """One layer's experts as lmforge's w_in [E, 2F, D] / w_out [E, D, F], from per-expert
    w1 (gate), w3 (up), w2 (down) matrices or transformers 5's fused gate_up_proj / down_proj."""
    fused_in, fused_out = prefix + "mlp.experts.gate_up_proj", prefix + "mlp.experts.down_proj"
    if fused_in in hf_state and fused_out in hf_state:
        return {ours + "w_in": hf_state[fused_in].contiguous(), ours + "w_out": hf_state[fused_out].contiguous()}
    gates, ups, downs = [], [], []
    for e in range(config.num_experts):
        names = [f"{prefix}block_sparse_moe.experts.{e}.{w}.weight" for w in ("w1", "w3", "w2")]
        missing = [n for n in names if n not in hf_state]
        if missing:
            raise LmforgeError(f"checkpoint is missing {', '.join(missing)}")
        gate, up, down = (hf_state[n] for n in names)
        gates.append(gate)
        ups.append(up)
        downs.append(down)
    w_in = torch.cat([torch.stack(gates), torch.stack(ups)], dim=1)
    return {ours + "w_in": w_in.contiguous(), ours + "w_out": torch.stack(downs).contiguous()}


def lmforge_to_hf(config: ModelConfig, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of `hf_to_lmforge`: split fused matrices and rename to HF names."""
    family = FAMILIES[config.family]
    out: dict[str, torch.Tensor] = {}
    for ours, theirs in family.top_map.items():
        if ours in state and not (ours == "lm_head.weight" and config.tie_word_embeddings):
            out[theirs] = state[ours]
    sizes = {
        "attn.qkv": (config.q_size, config.kv_size, config.kv_size),
        "mlp.fc": (config.intermediate_size, config.intermediate_size),
    }
    for i in range(config.n_layer):
        prefix = family.hf_layer_prefix.format(i=i)
        for ours, theirs in family.layer_map.items():
            tensor = state.get(f"layers.{i}.{ours}")
            if tensor is None:
                continue
            if ours in family.transposed:
                tensor = tensor.t()
            if len(theirs) == 1:
                out[prefix + theirs[0]] = tensor.contiguous()
            else:
                chunks = tensor.split(sizes[ours.rsplit(".", 1)[0]], dim=0)
                for name, chunk in zip(theirs, chunks):
                    out[prefix + name] = chunk.contiguous()
        w_in, w_out = state.get(f"layers.{i}.mlp.w_in"), state.get(f"layers.{i}.mlp.w_out")
        if config.num_experts and w_in is not None and w_out is not None:
            # Written as Mixtral checkpoints are (and as transformers 5 saves them): one
            # w1 (gate), w3 (up) and w2 (down) matrix per expert.
            gate, up = w_in.split(config.intermediate_size, dim=1)
            for e in range(config.num_experts):
                base = f"{prefix}block_sparse_moe.experts.{e}."
                out[base + "w1.weight"] = gate[e].contiguous()
                out[base + "w3.weight"] = up[e].contiguous()
                out[base + "w2.weight"] = w_out[e].contiguous()
    return out
