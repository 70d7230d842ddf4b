"""Encoder-decoder checkpoints in the Hugging Face layout (T5ForConditionalGeneration, MarianMTModel,
BartForConditionalGeneration).

Each family is two pieces of data, as in families.py: how its config.json maps onto
`Seq2SeqConfig`, and where each lmforge weight lives (`weight_map`). lmforge fuses some
matrices (self-attention q|k|v into `qkv`, cross-attention k|v into `kv`, a gated
feed-forward's two input matrices into `fc`); loading concatenates the HF rows and saving
splits them again, so a round trip gives the same tensors back.

BART is the Marian family with learned positions and a LayerNorm after each stack's
embeddings (`position="learned"`, `embedding_norm=True`). Its position tables have two
extra rows in front: BART looks position p up at row p + 2 (fairseq reserved the first
rows for padding), so loading drops those rows and saving writes two zero rows back.

Saving writes into a temporary sibling directory and renames it into place (atomic).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ..errors import LmforgeError
from ..io.atomic import atomic_directory
from .seq2seq import Seq2SeqConfig, Seq2SeqLM

ARCHITECTURES = {"t5": "T5ForConditionalGeneration", "marian": "MarianMTModel", "bart": "BartForConditionalGeneration"}
BART_POSITION_OFFSET = 2  # BART's learned position p is row p + 2 of its table
_MARIAN_ACT = {"swish": "silu", "silu": "silu", "gelu": "gelu", "relu": "relu", "gelu_new": "gelu_new"}
_MARIAN_ACT_NAME = {"silu": "swish", "gelu": "gelu", "relu": "relu", "gelu_new": "gelu_new"}
_T5_ACT = {"relu": "relu", "gelu": "gelu_new", "gelu_new": "gelu_new", "silu": "silu"}  # after "gated-"


def is_seq2seq_config(hf: dict[str, Any]) -> bool:
    return hf.get("model_type") in ARCHITECTURES


# -- config.json ---------------------------------------------------------------------------

def config_from_hf(hf: dict[str, Any], has_head: bool = False) -> Seq2SeqConfig:
    """`Seq2SeqConfig` of a T5, Marian or BART config.json; `has_head`: the weights hold a separate lm_head."""
    kind = hf.get("model_type")
    try:
        if kind == "t5":
            gated, _, act = hf.get("feed_forward_proj", "relu").rpartition("-")
            if act not in _T5_ACT or gated not in ("", "gated"):
                raise LmforgeError(f"unsupported T5 feed_forward_proj {hf.get('feed_forward_proj')!r}")
            # transformers 5 writes scale_decoder_outputs; older configs say tie_word_embeddings
            scale = hf.get("scale_decoder_outputs", hf.get("tie_word_embeddings", True) is not False)
            return Seq2SeqConfig(
                family="t5", vocab_size=hf["vocab_size"], n_layer=hf["num_layers"],
                n_decoder_layer=hf.get("num_decoder_layers") or hf["num_layers"], n_embd=hf["d_model"],
                n_head=hf["num_heads"], head_dim=hf["d_kv"], intermediate_size=hf["d_ff"], norm="rmsnorm",
                norm_eps=hf.get("layer_norm_epsilon", 1e-6), norm_position="pre",
                # transformers reads "gated-gelu" as the tanh approximation, a plain "gelu" as exact GELU
                activation=_T5_ACT[act] if gated else act,
                gated_mlp=bool(gated), position="relative",
                relative_buckets=hf.get("relative_attention_num_buckets", 32),
                relative_max_distance=hf.get("relative_attention_max_distance", 128),
                attention_scale=False, bias=False, scale_embedding=False, tie_word_embeddings=not has_head,
                scale_decoder_outputs=bool(scale), final_logits_bias=False,
                pad_token_id=hf.get("pad_token_id", 0), eos_token_id=hf.get("eos_token_id", 1),
                decoder_start_token_id=hf.get("decoder_start_token_id", hf.get("pad_token_id", 0)))
        if kind in ("marian", "bart"):
            name = kind.capitalize() if kind == "marian" else "BART"
            if hf.get("decoder_vocab_size") not in (None, hf["vocab_size"]) or \
                    hf.get("share_encoder_decoder_embeddings", True) is False:
                raise LmforgeError(f"{name} models with separate source and target vocabularies are not supported")
            if hf.get("encoder_attention_heads") != hf.get("decoder_attention_heads", hf.get("encoder_attention_heads")) \
                    or hf.get("encoder_ffn_dim") != hf.get("decoder_ffn_dim", hf.get("encoder_ffn_dim")):
                raise LmforgeError(f"{name} encoder and decoder must have the same heads and feed-forward width")
            if kind == "bart" and (hf.get("normalize_before") or hf.get("add_final_layer_norm")):
                raise LmforgeError("pre-norm BART variants (mBART-style normalize_before) are not supported")
            act = hf.get("activation_function", "gelu")
            if act not in _MARIAN_ACT:
                raise LmforgeError(f"unsupported {name} activation {act!r}")
            return Seq2SeqConfig(
                family="marian", vocab_size=hf["vocab_size"], n_layer=hf["encoder_layers"],
                n_decoder_layer=hf["decoder_layers"], n_embd=hf["d_model"], n_head=hf["encoder_attention_heads"],
                intermediate_size=hf["encoder_ffn_dim"], max_position_embeddings=hf.get("max_position_embeddings", 1024),
                norm="layernorm", norm_eps=1e-5, norm_position="post", activation=_MARIAN_ACT[act],
                position="learned" if kind == "bart" else "sinusoidal", embedding_norm=kind == "bart",
                attention_scale=True, bias=True,
                scale_embedding=bool(hf.get("scale_embedding", False)), tie_word_embeddings=not has_head,
                final_logits_bias=True, pad_token_id=hf.get("pad_token_id"), eos_token_id=hf.get("eos_token_id"),
                bos_token_id=hf.get("bos_token_id"),
                decoder_start_token_id=hf.get("decoder_start_token_id", hf.get("pad_token_id")))
    except KeyError as exc:
        raise LmforgeError(f"config.json of a {kind} model lacks {exc.args[0]!r}") from None
    raise LmforgeError(f"model_type {kind!r} is not an encoder-decoder family lmforge reads (t5, marian, bart)")


def hf_config_from(config: Seq2SeqConfig) -> dict[str, Any]:
    c = config
    if c.family == "t5":
        act = "gelu" if c.gated_mlp and c.activation == "gelu_new" else c.activation
        if c.position != "relative" or c.norm != "rmsnorm" or c.norm_position != "pre" or c.bias:
            raise LmforgeError("a t5 checkpoint needs relative positions, pre-norm RMSNorm and no biases")
        return {"architectures": [ARCHITECTURES["t5"]], "model_type": "t5", "vocab_size": c.vocab_size,
                "d_model": c.n_embd, "d_kv": c.head_dim, "d_ff": c.intermediate_size, "num_layers": c.n_layer,
                "num_decoder_layers": c.n_decoder_layer, "num_heads": c.n_head,
                "relative_attention_num_buckets": c.relative_buckets,
                "relative_attention_max_distance": c.relative_max_distance, "layer_norm_epsilon": c.norm_eps,
                "feed_forward_proj": ("gated-" if c.gated_mlp else "") + act, "is_encoder_decoder": True,
                "tie_word_embeddings": c.tie_word_embeddings, "scale_decoder_outputs": c.scale_decoder_outputs,
                "pad_token_id": c.pad_token_id, "eos_token_id": c.eos_token_id,
                "decoder_start_token_id": c.decoder_start_token_id, **c.extra}
    if c.norm != "layernorm" or c.norm_position != "post" or not c.bias or c.gated_mlp:
        raise LmforgeError("a marian or bart checkpoint needs post-norm LayerNorm, biases and no gating")
    if c.position == "learned" and c.embedding_norm:
        return {"architectures": [ARCHITECTURES["bart"]], "model_type": "bart", "vocab_size": c.vocab_size,
                "d_model": c.n_embd, "encoder_layers": c.n_layer, "decoder_layers": c.n_decoder_layer,
                "encoder_attention_heads": c.n_head, "decoder_attention_heads": c.n_head,
                "encoder_ffn_dim": c.intermediate_size, "decoder_ffn_dim": c.intermediate_size,
                "max_position_embeddings": c.max_position_embeddings, "activation_function": _MARIAN_ACT_NAME[c.activation],
                "scale_embedding": c.scale_embedding, "tie_word_embeddings": c.tie_word_embeddings,
                "is_encoder_decoder": True, "dropout": c.dropout, "pad_token_id": c.pad_token_id,
                "eos_token_id": c.eos_token_id, "bos_token_id": c.bos_token_id, "forced_eos_token_id": c.eos_token_id,
                "decoder_start_token_id": c.decoder_start_token_id, **c.extra}
    if c.position != "sinusoidal" or c.embedding_norm:
        raise LmforgeError("a marian checkpoint needs sinusoidal positions and no embedding norm "
                           "(learned positions with an embedding norm are written as bart)")
    act = _MARIAN_ACT_NAME[c.activation]
    return {"architectures": [ARCHITECTURES["marian"]], "model_type": "marian", "vocab_size": c.vocab_size,
            "decoder_vocab_size": c.vocab_size, "d_model": c.n_embd, "encoder_layers": c.n_layer,
            "decoder_layers": c.n_decoder_layer, "encoder_attention_heads": c.n_head,
            "decoder_attention_heads": c.n_head, "encoder_ffn_dim": c.intermediate_size,
            "decoder_ffn_dim": c.intermediate_size, "max_position_embeddings": c.max_position_embeddings,
            "activation_function": act, "scale_embedding": c.scale_embedding, "share_encoder_decoder_embeddings": True,
            "tie_word_embeddings": c.tie_word_embeddings, "is_encoder_decoder": True, "dropout": c.dropout,
            "pad_token_id": c.pad_token_id, "eos_token_id": c.eos_token_id, "bos_token_id": c.bos_token_id,
            "forced_eos_token_id": c.eos_token_id, "decoder_start_token_id": c.decoder_start_token_id, **c.extra}


# -- weight names ---------------------------------------------------------------------------

def weight_map(config: Seq2SeqConfig) -> dict[str, tuple[str, ...]]:
    """lmforge parameter name -> the HF tensors it is made of (rows concatenated in order)."""
    out: dict[str, tuple[str, ...]] = {}
    if config.family == "t5":
        out["embed.weight"] = ("shared.weight",)
        for stack, n in (("encoder", config.n_layer), ("decoder", config.n_decoder_layer)):
            out[f"{stack}.relative_bias.weight"] = (f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight",)
            out[f"{stack}.final_norm.weight"] = (f"{stack}.final_layer_norm.weight",)
            for i in range(n):
                ours, hf = f"{stack}.layers.{i}", f"{stack}.block.{i}.layer"
                out[f"{ours}.self_attn.qkv.weight"] = tuple(f"{hf}.0.SelfAttention.{p}.weight" for p in "qkv")
                out[f"{ours}.self_attn.out.weight"] = (f"{hf}.0.SelfAttention.o.weight",)
                out[f"{ours}.self_norm.weight"] = (f"{hf}.0.layer_norm.weight",)
                ff = 1
                if stack == "decoder":
                    out[f"{ours}.cross_attn.q.weight"] = (f"{hf}.1.EncDecAttention.q.weight",)
                    out[f"{ours}.cross_attn.kv.weight"] = (f"{hf}.1.EncDecAttention.k.weight",
                                                           f"{hf}.1.EncDecAttention.v.weight")
                    out[f"{ours}.cross_attn.out.weight"] = (f"{hf}.1.EncDecAttention.o.weight",)
                    out[f"{ours}.cross_norm.weight"] = (f"{hf}.1.layer_norm.weight",)
                    ff = 2
                wi = ("wi_0", "wi_1") if config.gated_mlp else ("wi",)
                out[f"{ours}.mlp.fc.weight"] = tuple(f"{hf}.{ff}.DenseReluDense.{w}.weight" for w in wi)
                out[f"{ours}.mlp.proj.weight"] = (f"{hf}.{ff}.DenseReluDense.wo.weight",)
                out[f"{ours}.mlp_norm.weight"] = (f"{hf}.{ff}.layer_norm.weight",)
        if not config.tie_word_embeddings:
            out["lm_head.weight"] = ("lm_head.weight",)
        return out
    out["embed.weight"] = ("model.shared.weight",)
    out["final_logits_bias"] = ("final_logits_bias",)
    for stack, n in (("encoder", config.n_layer), ("decoder", config.n_decoder_layer)):
        if config.position == "learned":  # BART (the table's first two rows are dropped on loading)
            out[f"{stack}.pos_embed.weight"] = (f"model.{stack}.embed_positions.weight",)
        if config.embedding_norm:
            for p in ("weight", "bias"):
                out[f"{stack}.embed_norm.{p}"] = (f"model.{stack}.layernorm_embedding.{p}",)
        for i in range(n):
            ours, hf = f"{stack}.layers.{i}", f"model.{stack}.layers.{i}"
            for p in ("weight", "bias"):
                out[f"{ours}.self_attn.qkv.{p}"] = tuple(f"{hf}.self_attn.{x}_proj.{p}" for x in "qkv")
                out[f"{ours}.self_attn.out.{p}"] = (f"{hf}.self_attn.out_proj.{p}",)
                out[f"{ours}.self_norm.{p}"] = (f"{hf}.self_attn_layer_norm.{p}",)
                if stack == "decoder":
                    out[f"{ours}.cross_attn.q.{p}"] = (f"{hf}.encoder_attn.q_proj.{p}",)
                    out[f"{ours}.cross_attn.kv.{p}"] = (f"{hf}.encoder_attn.k_proj.{p}", f"{hf}.encoder_attn.v_proj.{p}")
                    out[f"{ours}.cross_attn.out.{p}"] = (f"{hf}.encoder_attn.out_proj.{p}",)
                    out[f"{ours}.cross_norm.{p}"] = (f"{hf}.encoder_attn_layer_norm.{p}",)
                out[f"{ours}.mlp.fc.{p}"] = (f"{hf}.fc1.{p}",)
                out[f"{ours}.mlp.proj.{p}"] = (f"{hf}.fc2.{p}",)
                out[f"{ours}.mlp_norm.{p}"] = (f"{hf}.final_layer_norm.{p}",)
    if not config.tie_word_embeddings:
        out["lm_head.weight"] = ("lm_head.weight",)
    return out


def hf_to_lmforge(config: Seq2SeqConfig, hf_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    missing = []
    for ours, names in weight_map(config).items():
        if any(n not in hf_state for n in names):
            missing += [n for n in names if n not in hf_state]
            continue
        tensors = [hf_state[n] for n in names]
        state[ours] = tensors[0] if len(tensors) == 1 else torch.cat(tensors, 0)
    if missing:
        raise LmforgeError(f"checkpoint lacks {len(missing)} weight(s) of its config, e.g. {', '.join(missing[:3])}")
    if "final_logits_bias" in state:
        state["final_logits_bias"] = state["final_logits_bias"].reshape(-1)
    for stack in ("encoder", "decoder"):
        name = f"{stack}.pos_embed.weight"
        if name in state:
            if state[name].shape[0] != config.max_position_embeddings + BART_POSITION_OFFSET:
                raise LmforgeError(f"model.{stack}.embed_positions.weight has {state[name].shape[0]} rows, a BART "
                                   f"config of {config.max_position_embeddings} positions needs "
                                   f"{config.max_position_embeddings + BART_POSITION_OFFSET}")
            state[name] = state[name][BART_POSITION_OFFSET:]
    return state


def lmforge_to_hf(config: Seq2SeqConfig, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for ours, names in weight_map(config).items():
        tensor = state[ours]
        if ours == "final_logits_bias":
            tensor = tensor.reshape(1, -1)
        elif ours.endswith(".pos_embed.weight"):  # BART's two unused rows in front
            tensor = torch.cat([tensor.new_zeros(BART_POSITION_OFFSET, tensor.shape[1]), tensor])
        for name, part in zip(names, tensor.chunk(len(names), 0)):
            out[name] = part.contiguous()
    if config.family == "marian" and not config.tie_word_embeddings:
        # transformers ties a Marian model's encoder and decoder embeddings to `shared` only when the
        # head is tied too; otherwise it reads them as separate tensors, so they are written out
        for stack in ("encoder", "decoder"):
            out[f"model.{stack}.embed_tokens.weight"] = out["model.shared.weight"].clone()
    return out


# -- directories ----------------------------------------------------------------------------

def read_config(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / "config.json"
    if not path.is_file():
        raise LmforgeError(f"{directory} has no config.json (not a Hugging Face model directory)")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise LmforgeError(f"{path} is not valid JSON: {exc}") from None


def read_seq2seq_state(directory: str | Path) -> tuple[Seq2SeqConfig, dict[str, torch.Tensor]]:
    """The config and the weights (lmforge names) of a T5, Marian or BART Hugging Face directory."""
    from .checkpoint import read_safetensors

    directory = Path(directory)
    hf = read_config(directory)
    if not is_seq2seq_config(hf):
        raise LmforgeError(f"{directory} holds a {hf.get('model_type')!r} model, not an encoder-decoder (t5, marian, bart)")
    hf_state = read_safetensors(directory)
    shared = hf_state.get("shared.weight", hf_state.get("model.shared.weight"))
    for stack in ("encoder", "decoder"):
        own = hf_state.get(f"model.{stack}.embed_tokens.weight")
        if own is not None and shared is not None and not torch.equal(own, shared):
            raise LmforgeError(f"{directory}: the {stack} has its own token embeddings; lmforge shares one table")
    head = hf_state.get("lm_head.weight")
    has_head = head is not None and (shared is None or not torch.equal(head, shared))
    config = config_from_hf(hf, has_head=has_head)
    return config, hf_to_lmforge(config, hf_state)


def load_seq2seq(directory: str | Path, dtype: torch.dtype = torch.float32, device="cpu") -> Seq2SeqLM:
    """A T5, Marian or BART Hugging Face directory (config.json + safetensors) as a `Seq2SeqLM`."""
    config, state = read_seq2seq_state(directory)
    with torch.device("meta"):
        model = Seq2SeqLM(config)
    for name, tensor in state.items():
        want = tuple(model.get_parameter(name).shape)
        if tuple(tensor.shape) != want:
            raise LmforgeError(f"weight {name} has shape {tuple(tensor.shape)}, config expects {want}")
    model.load_state_dict({k: v.to(device=device, dtype=dtype) for k, v in state.items()}, strict=False, assign=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.embed.weight
    if config.position == "sinusoidal":
        from .seq2seq import sinusoidal_table

        model.sinusoids = sinusoidal_table(config.max_position_embeddings, config.n_embd).to(device=device, dtype=dtype)
    return model.eval()


def write_seq2seq_files(model: Seq2SeqLM, directory: Path, tokenizer=None,
                        state: dict[str, torch.Tensor] | None = None) -> None:
    """config.json, generation_config.json, model.safetensors (and the tokenizer) into `directory`;
    `state`: these weights (lmforge names) instead of the model's own."""
    from safetensors.torch import save_file

    config = model.config
    state = {k: v.detach().to("cpu") for k, v in (model.state_dict() if state is None else state).items()}
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    hf_state = lmforge_to_hf(config, state)
    save_file(hf_state, directory / "model.safetensors", metadata={"format": "pt"})
    hf = hf_config_from(config)
    hf["torch_dtype"] = str(next(iter(hf_state.values())).dtype).removeprefix("torch.")
    (directory / "config.json").write_text(json.dumps(hf, indent=2) + "\n", encoding="utf-8")
    generation = {k: getattr(config, k) for k in ("bos_token_id", "eos_token_id", "pad_token_id",
                                                  "decoder_start_token_id") if getattr(config, k) is not None}
    (directory / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n", encoding="utf-8")
    if tokenizer is not None:
        tokenizer.save(directory)


def save_seq2seq(model: Seq2SeqLM, directory: str | Path, tokenizer=None, overwrite: bool = False) -> Path:
    """Write `model` (and `tokenizer`) as a Hugging Face directory that transformers loads, atomically."""
    target = Path(directory)
    if target.exists() and not overwrite:
        raise LmforgeError(f"{target} already exists (choose another path or remove it)")
    with atomic_directory(target) as staging:
        write_seq2seq_files(model, Path(staging), tokenizer)
    return target
