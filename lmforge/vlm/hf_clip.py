"""The dual encoder in the layout of Hugging Face's ``CLIPModel`` (config.json of model_type
"clip", model.safetensors, tokenizer.json).

``CLIPModel`` computes what lmforge's `DualEncoder` computes when the dual encoder is built
the CLIP way (the default of ``lmforge vlm train clip``):

    vision  patch convolution without bias, class embedding, position embeddings,
            ``pre_layrnorm``, pre-norm blocks, ``post_layernorm`` on the class token's
            state, ``visual_projection``
    text    token and position embeddings, causal pre-norm blocks, ``final_layer_norm``,
            the state at the EOS token, ``text_projection``
    both    L2-normalized embeddings, logits = exp(``logit_scale``) * cosine

Where the two differ, the mapping is exact:

* lmforge's patch convolution has a bias. A bias b added to every patch token before the
  position embeddings is the same as b added to the patch rows of the position table, so
  it is folded there on export (the class token's row is untouched), and a loaded model
  gets a zero bias.
* lmforge's ViT normalizes every token at the end and pools the class token; CLIP
  normalizes the pooled class token only. With cls pooling the pooled vector is the same;
  a mean-pooled ViT has no ``CLIPModel`` counterpart and is refused.
* lmforge fuses each block's query, key and value projections into one matrix (rows: q,
  then k, then v); transformers keeps three. The rows are split and concatenated.
* transformers finds the EOS position as the first occurrence of ``eos_token_id`` in the
  ids (or, for the legacy value 2, as the position of the largest id); lmforge reads the
  last real token, which `lmforge.vlm.clip.encode_texts` makes the EOS. Both agree for
  every text lmforge encodes.

What the layout cannot hold (class names, prompt templates, the training settings) goes to
a side file, lmforge_clip.json, so that lmforge -> Hugging Face -> lmforge loses nothing; a
directory transformers wrote (no side file) loads with Fashion-MNIST's classes and prompts.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import torch

from lmforge.errors import LmforgeError
from lmforge.vlm import fashion_mnist as fm
from lmforge.vlm.clip import DualEncoder
from lmforge.vlm.encoders import TextConfig, TextEncoder, ViTConfig, VisionTransformer

SIDE_FILE = "lmforge_clip.json"
LEGACY_EOS_ID = 2  # transformers then pools at the largest id instead of looking for the EOS
CLIP_EOS_ID = 49407  # CLIPTextConfig's default (OpenAI's vocabulary)

# lmforge block parameter -> transformers CLIPEncoderLayer parameter (q/k/v handled apart)
BLOCK_NAMES = {
    "attn_norm.weight": "layer_norm1.weight", "attn_norm.bias": "layer_norm1.bias",
    "attn.out.weight": "self_attn.out_proj.weight", "attn.out.bias": "self_attn.out_proj.bias",
    "mlp_norm.weight": "layer_norm2.weight", "mlp_norm.bias": "layer_norm2.bias",
    "mlp.fc.weight": "mlp.fc1.weight", "mlp.fc.bias": "mlp.fc1.bias",
    "mlp.proj.weight": "mlp.fc2.weight", "mlp.proj.bias": "mlp.fc2.bias",
}
QKV = ("q_proj", "k_proj", "v_proj")


# ---- export -------------------------------------------------------------------------------

def check_exportable(model: DualEncoder) -> None:
    """Raise `LmforgeError` naming the first part of ``model`` that ``CLIPModel`` cannot express."""
    image, text = model.image_encoder, model.text_encoder
    if not isinstance(image, VisionTransformer):
        raise LmforgeError("only a ViT image tower has a CLIPModel counterpart (this dual encoder has a "
                           f"{type(image).__name__}); train with --encoder vit")
    if image.config.pool != "cls":
        raise LmforgeError("CLIPModel reads the class token; this ViT is mean-pooled over its patches and "
                           "cannot be written in its layout (train with --pool cls)")
    if not image.config.pre_norm:
        raise LmforgeError("CLIPModel's vision tower normalizes the embeddings before the first block; this ViT "
                           "has no such LayerNorm (train without --no-pre-norm)")
    if text.config.pool != "eos" or not text.config.causal:
        raise LmforgeError("CLIPModel's text tower is causal and read at the EOS token; this one is "
                           f"{'causal' if text.config.causal else 'bidirectional'} and {text.config.pool}-pooled "
                           "(train with --text-pool eos)")
    if text.config.eos_token_id == LEGACY_EOS_ID and text.config.eos_token_id != text.config.vocab_size - 1:
        raise LmforgeError(f"EOS id {LEGACY_EOS_ID} makes transformers pool at the largest token id instead of "
                           "the EOS, which differs for this vocabulary")


def hf_config(model: DualEncoder, tokenizer=None) -> dict[str, Any]:
    """config.json of the ``CLIPModel`` equal to ``model`` (which must pass `check_exportable`)."""
    vit, text = model.image_encoder.config, model.text_encoder.config
    special = {}
    if tokenizer is not None:
        special = {"bos_token_id": tokenizer.bos_id, "pad_token_id": tokenizer.pad_id}
    return {
        "architectures": ["CLIPModel"],
        "model_type": "clip",
        "projection_dim": model.embed_dim,
        "logit_scale_init_value": model.log_scale.item(),
        "initializer_factor": 1.0,
        "dtype": "float32",
        "text_config": {
            "model_type": "clip_text_model", "vocab_size": text.vocab_size, "hidden_size": text.width,
            "intermediate_size": text.mlp_ratio * text.width, "num_hidden_layers": text.depth,
            "num_attention_heads": text.heads, "max_position_embeddings": text.max_length,
            "hidden_act": "gelu", "layer_norm_eps": text.norm_eps, "projection_dim": model.embed_dim,
            "attention_dropout": 0.0, "dropout": 0.0, "eos_token_id": text.eos_token_id, **special,
        },
        "vision_config": {
            "model_type": "clip_vision_model", "hidden_size": vit.width, "intermediate_size": vit.mlp_ratio * vit.width,
            "num_hidden_layers": vit.depth, "num_attention_heads": vit.heads, "num_channels": vit.channels,
            "image_size": vit.image_size, "patch_size": vit.patch_size, "hidden_act": "gelu",
            "layer_norm_eps": vit.norm_eps, "projection_dim": model.embed_dim, "attention_dropout": 0.0,
            "dropout": 0.0,
        },
    }


def _blocks_to_hf(blocks: torch.nn.ModuleList, prefix: str) -> dict[str, torch.Tensor]:
    out = {}
    for i, block in enumerate(blocks):
        state = block.state_dict()
        at = f"{prefix}.encoder.layers.{i}."
        for ours, theirs in BLOCK_NAMES.items():
            out[at + theirs] = state[ours]
        for kind in ("weight", "bias"):
            for name, part in zip(QKV, state[f"attn.qkv.{kind}"].chunk(3, dim=0)):
                out[f"{at}self_attn.{name}.{kind}"] = part
    return out


def hf_state(model: DualEncoder) -> dict[str, torch.Tensor]:
    """``model``'s weights under ``CLIPModel``'s names, the patch bias folded into the positions."""
    vit, text = model.image_encoder, model.text_encoder.transformer
    positions = vit.pos_embed[0].detach().clone()
    positions[1:] += vit.patch.bias.detach()
    state = {
        "vision_model.embeddings.class_embedding": vit.cls_token.detach().reshape(-1),
        "vision_model.embeddings.patch_embedding.weight": vit.patch.weight.detach(),
        "vision_model.embeddings.position_embedding.weight": positions,
        "vision_model.pre_layrnorm.weight": vit.pre_norm.weight.detach(),
        "vision_model.pre_layrnorm.bias": vit.pre_norm.bias.detach(),
        "vision_model.post_layernorm.weight": vit.norm.weight.detach(),
        "vision_model.post_layernorm.bias": vit.norm.bias.detach(),
        "text_model.embeddings.token_embedding.weight": text.embed.weight.detach(),
        "text_model.embeddings.position_embedding.weight": text.pos_embed.weight.detach(),
        "text_model.final_layer_norm.weight": text.norm.weight.detach(),
        "text_model.final_layer_norm.bias": text.norm.bias.detach(),
        "visual_projection.weight": model.image_proj.weight.detach(),
        "text_projection.weight": model.text_proj.weight.detach(),
        "logit_scale": model.log_scale.detach().clone(),
    }
    state.update(_blocks_to_hf(vit.blocks, "vision_model"))
    state.update(_blocks_to_hf(text.layers, "text_model"))
    return {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in state.items()}


def save_clip_hf(model: DualEncoder, meta: dict, tokenizer, out_dir: Path) -> None:
    """Write ``model`` as a ``CLIPModel`` directory into the existing, empty ``out_dir``:
    config.json, model.safetensors, the tokenizer files, and lmforge's own meta (SIDE_FILE)."""
    from safetensors.torch import save_file

    check_exportable(model)
    out_dir = Path(out_dir)
    config = hf_config(model, tokenizer)
    save_file(hf_state(model), out_dir / "model.safetensors", metadata={"format": "pt"})
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    if tokenizer is not None:
        tokenizer.save(out_dir)
    (out_dir / SIDE_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")


# ---- import -------------------------------------------------------------------------------

def _number(section: dict, key: str, where: str) -> Any:
    if key not in section:
        raise LmforgeError(f"{where} has no {key}")
    return section[key]


def _tower_shape(section: dict, where: str) -> dict[str, Any]:
    """The fields every tower shares: width, depth, heads, MLP ratio, LayerNorm epsilon."""
    act = section.get("hidden_act", "quick_gelu")
    if act != "gelu":
        raise LmforgeError(f"{where} uses hidden_act {act!r}; lmforge's towers compute the exact GELU (\"gelu\") only")
    width, inner = int(_number(section, "hidden_size", where)), int(_number(section, "intermediate_size", where))
    heads = int(_number(section, "num_attention_heads", where))
    if inner % width or width % heads:
        raise LmforgeError(f"{where}: intermediate_size {inner} must be a multiple of hidden_size {width}, and "
                           f"hidden_size of num_attention_heads {heads}")
    return dict(width=width, depth=int(_number(section, "num_hidden_layers", where)), heads=heads,
                mlp_ratio=inner // width, norm_eps=float(section.get("layer_norm_eps", 1e-5)))


def _blocks_from_hf(state: dict[str, torch.Tensor], prefix: str, ours: str, depth: int) -> dict[str, torch.Tensor]:
    out = {}
    for i in range(depth):
        at = f"{prefix}.encoder.layers.{i}."
        for mine, theirs in BLOCK_NAMES.items():
            out[f"{ours}.{i}.{mine}"] = state[at + theirs]
        for kind in ("weight", "bias"):
            out[f"{ours}.{i}.attn.qkv.{kind}"] = torch.cat([state[f"{at}self_attn.{n}.{kind}"] for n in QKV])
    return out


def _lmforge_state(state: dict[str, torch.Tensor], vit: ViTConfig, text: TextConfig,
                   cls_shape: tuple[int, ...]) -> dict[str, torch.Tensor]:
    image_prefix, text_prefix = "image_encoder", "text_encoder.transformer"
    out = {
        f"{image_prefix}.cls_token": state["vision_model.embeddings.class_embedding"].reshape(cls_shape),
        f"{image_prefix}.patch.weight": state["vision_model.embeddings.patch_embedding.weight"],
        f"{image_prefix}.patch.bias": torch.zeros(vit.width),
        f"{image_prefix}.pos_embed": state["vision_model.embeddings.position_embedding.weight"].unsqueeze(0),
        f"{image_prefix}.pre_norm.weight": state["vision_model.pre_layrnorm.weight"],
        f"{image_prefix}.pre_norm.bias": state["vision_model.pre_layrnorm.bias"],
        f"{image_prefix}.norm.weight": state["vision_model.post_layernorm.weight"],
        f"{image_prefix}.norm.bias": state["vision_model.post_layernorm.bias"],
        f"{text_prefix}.embed.weight": state["text_model.embeddings.token_embedding.weight"],
        f"{text_prefix}.pos_embed.weight": state["text_model.embeddings.position_embedding.weight"],
        f"{text_prefix}.norm.weight": state["text_model.final_layer_norm.weight"],
        f"{text_prefix}.norm.bias": state["text_model.final_layer_norm.bias"],
        "image_proj.weight": state["visual_projection.weight"],
        "text_proj.weight": state["text_projection.weight"],
        "log_scale": state["logit_scale"].reshape(()),
    }
    out.update(_blocks_from_hf(state, "vision_model", f"{image_prefix}.blocks", vit.depth))
    out.update(_blocks_from_hf(state, "text_model", f"{text_prefix}.layers", text.depth))
    return {k: v.to(torch.float32) for k, v in out.items()}


def _eos_id(section: dict, tokenizer, where: str) -> int:
    """The id that ends every text. transformers looks for the config's eos_token_id, except
    for the legacy value 2, where it pools at the largest id: the EOS only when the EOS is the
    vocabulary's last id."""
    eos, vocab = int(section.get("eos_token_id", CLIP_EOS_ID)), int(_number(section, "vocab_size", where))
    if eos == LEGACY_EOS_ID:
        if tokenizer.eos_id != vocab - 1:
            raise LmforgeError(f"{where}: eos_token_id 2 makes transformers pool at the largest token id, which "
                               "is not this tokenizer's EOS; set eos_token_id to the EOS token's id")
        return vocab - 1
    if not 0 <= eos < vocab:
        raise LmforgeError(f"{where}: eos_token_id {eos} is outside the vocabulary of {vocab}")
    return eos


def load_clip_hf(folder: Path) -> tuple[DualEncoder, Any, dict]:
    """A `DualEncoder`, its tokenizer and its meta (the keys of lmforge's clip checkpoints) from a
    ``CLIPModel`` directory: one `save_clip_hf` wrote, or one transformers wrote beside a
    tokenizer.json."""
    from lmforge.model.checkpoint import read_safetensors
    from lmforge.tokenizer.tokenizer import Tokenizer

    folder = Path(folder)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise LmforgeError(f"{folder} has no config.json")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise LmforgeError(f"{config_path} is not JSON: {exc}") from None
    if config.get("model_type") != "clip":
        raise LmforgeError(f"{config_path} describes a {config.get('model_type')!r} model, not a CLIPModel")
    if not (folder / "tokenizer.json").is_file():
        raise LmforgeError(f"{folder} has no tokenizer.json: the text tower needs its tokenizer")
    tokenizer = Tokenizer.from_pretrained_dir(folder)
    text_section, vision_section = config.get("text_config") or {}, config.get("vision_config") or {}
    text_where, vision_where = f"{config_path} text_config", f"{config_path} vision_config"

    vision_size, patch = int(vision_section.get("image_size", 224)), int(vision_section.get("patch_size", 32))
    try:
        vit = ViTConfig(image_size=vision_size, channels=int(vision_section.get("num_channels", 3)), patch_size=patch,
                        pool="cls", pre_norm=True, **_tower_shape(vision_section, vision_where))
        text = TextConfig(vocab_size=int(_number(text_section, "vocab_size", text_where)),
                          max_length=int(text_section.get("max_position_embeddings", 77)), causal=True, pool="eos",
                          eos_token_id=_eos_id(text_section, tokenizer, text_where),
                          **_tower_shape(text_section, text_where))
    except ValueError as exc:
        raise LmforgeError(f"{config_path}: {exc}") from None
    embed_dim = int(config.get("projection_dim", 512))
    model = DualEncoder(VisionTransformer(vit), TextEncoder(text), embed_dim)
    hf = read_safetensors(folder)
    try:
        state = _lmforge_state(hf, vit, text, tuple(model.image_encoder.cls_token.shape))
        model.load_state_dict(state)
    except KeyError as exc:
        raise LmforgeError(f"{folder} lacks the CLIPModel weight {exc}") from None
    except RuntimeError as exc:
        raise LmforgeError(f"{folder}'s weights do not match its config.json: {str(exc).splitlines()[0]}") from None
    model.eval()

    encoder_config, text_meta = dataclasses.asdict(vit), dataclasses.asdict(text)
    meta: dict[str, Any] = {"kind": "clip", "encoder": "vit", "encoder_config": encoder_config, "text": text_meta,
                            "embed_dim": embed_dim, "classes": list(fm.CLASS_NAMES),
                            "class_nouns": list(fm.CLASS_NOUNS), "prompt_templates": list(fm.PROMPT_TEMPLATES),
                            "train_config": None}
    side = folder / SIDE_FILE
    if side.is_file():
        saved = json.loads(side.read_text(encoding="utf-8"))
        meta.update({k: v for k, v in saved.items() if k not in ("kind", "encoder", "encoder_config", "text",
                                                                   "embed_dim")})
        # The shapes lmforge wrote stand when config.json still describes the same towers
        # (they hold only the fields that were set); config.json wins where it was changed.
        if _same(ViTConfig, saved.get("encoder_config"), vit) and _same(TextConfig, saved.get("text"), text) \
                and saved.get("embed_dim") == embed_dim:
            meta.update({k: saved[k] for k in ("encoder_config", "text", "embed_dim")})
    if not math.isfinite(model.log_scale.item()):
        raise LmforgeError(f"{folder}: logit_scale is not finite")
    return model, tokenizer, meta


def _same(cls, saved: Any, built: Any) -> bool:
    try:
        return isinstance(saved, dict) and cls(**saved) == built
    except (TypeError, ValueError):
        return False
