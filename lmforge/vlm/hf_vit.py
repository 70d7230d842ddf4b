"""The ViT image classifier in Hugging Face's ``ViTForImageClassification`` layout.

lmforge's `VisionTransformer` and Hugging Face's ViT compute the same function: a strided
convolution cuts the image into patches, a learned class token is prepended, learned
positions are added, pre-norm blocks (LayerNorm, attention with biased q/k/v, LayerNorm,
GELU MLP) run over the tokens, and a final LayerNorm follows. The classifier reads the
class token's final state. What differs is bookkeeping:

- lmforge fuses q, k and v into one ``attn.qkv`` matrix; the Hugging Face checkpoint holds
  three (``attention.attention.query/key/value``), stacked in that order along the output.
- the LayerNorm epsilon is a config field on both sides (lmforge's default is 1e-6,
  transformers' 1e-12), so it is written and read, not assumed.
- Hugging Face classifies from the class token only; a mean-pooled lmforge ViT has no
  counterpart and is refused on export.

The names written are the on-disk ones transformers itself saves (``vit.encoder.layer.N``);
transformers 5 renames them to its in-memory names when it loads them. The LLaVA layout
(hf_llava.py) reuses the same tower under the ``vision_tower.`` prefix.

lmforge feeds the classifier pixels in 0..1 with no standardization, so the
preprocessor_config.json written beside the weights rescales by 1/255 and does not
normalize. The run's own settings travel in ``lmforge.json`` so that a round trip through
the Hugging Face layout gives back the same checkpoint metadata.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch

from lmforge.errors import LmforgeError
from lmforge.vlm.encoders import ImageClassifier, ViTConfig, VisionTransformer

LMFORGE_META = "lmforge.json"
# lmforge's block names -> Hugging Face's (per layer, below "encoder.layer.N.")
_LAYER_NAMES = {
    "attn_norm": "layernorm_before",
    "attn.out": "attention.output.dense",
    "mlp_norm": "layernorm_after",
    "mlp.fc": "intermediate.dense",
    "mlp.proj": "output.dense",
}
_QKV = ("attention.attention.query", "attention.attention.key", "attention.attention.value")


def read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise LmforgeError(f"{path.parent} has no {path.name}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise LmforgeError(f"{path} is not valid JSON: {exc}") from None


def write_json(path: Path, value: dict[str, Any]) -> None:
    path.write_text(json.dumps(value, indent=2) + "\n", encoding="utf-8")


def read_lmforge_meta(folder: Path) -> dict[str, Any]:
    """lmforge's own metadata written beside an exported checkpoint ({} for a transformers-made one)."""
    path = folder / LMFORGE_META
    return read_json(path) if path.is_file() else {}


# ---- the vision tower --------------------------------------------------------------------

def check_exportable(config: ViTConfig, what: str) -> None:
    """Refuse ViTs that Hugging Face's ViT cannot express."""
    if getattr(config, "pre_norm", False):
        raise LmforgeError(f"this {what}'s ViT normalizes its embeddings before the first block, which "
                           "Hugging Face's ViT has no place for")


def vit_hf_config(config: ViTConfig) -> dict[str, Any]:
    """The ``model_type: vit`` fields describing lmforge's tower (a classifier adds its labels)."""
    return {"model_type": "vit", "hidden_size": config.width, "num_hidden_layers": config.depth,
            "num_attention_heads": config.heads, "intermediate_size": config.mlp_ratio * config.width,
            "hidden_act": "gelu", "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0,
            "layer_norm_eps": getattr(config, "norm_eps", 1e-6), "image_size": config.image_size,
            "patch_size": config.patch_size, "num_channels": config.channels, "qkv_bias": True,
            "encoder_stride": config.patch_size}


def vit_config_from_hf(hf: dict[str, Any], where: str) -> ViTConfig:
    """An lmforge `ViTConfig` (class-token pooling) for a Hugging Face ``vit`` config, or one clear
    error naming what lmforge's ViT cannot compute."""
    if hf.get("model_type") != "vit":
        raise LmforgeError(f"{where}: the vision tower is a {hf.get('model_type')!r} model; lmforge loads 'vit' ones")
    act = hf.get("hidden_act", "gelu")
    if act != "gelu":
        raise LmforgeError(f"{where}: hidden_act {act!r} is not supported (lmforge's ViT uses the exact 'gelu')")
    try:
        width, intermediate = int(hf["hidden_size"]), int(hf["intermediate_size"])
        image_size, patch_size = hf["image_size"], hf["patch_size"]
        if not (isinstance(image_size, int) and isinstance(patch_size, int)):
            raise LmforgeError(f"{where}: lmforge's ViT needs square images and patches (one integer each)")
        if intermediate % width:
            raise LmforgeError(f"{where}: intermediate_size {intermediate} is not a multiple of hidden_size {width}")
        return ViTConfig(image_size=image_size, channels=int(hf.get("num_channels", 3)), patch_size=patch_size,
                         width=width, depth=int(hf["num_hidden_layers"]), heads=int(hf["num_attention_heads"]),
                         mlp_ratio=intermediate // width, pool="cls",
                         norm_eps=float(hf.get("layer_norm_eps", 1e-12)))
    except KeyError as missing:
        raise LmforgeError(f"{where}: the vit config lacks {missing}") from None
    except ValueError as exc:
        raise LmforgeError(f"{where}: {exc}") from None


def vit_state_to_hf(state: dict[str, torch.Tensor], depth: int, prefix: str) -> dict[str, torch.Tensor]:
    """lmforge `VisionTransformer` weights (names relative to the tower) -> Hugging Face ViTModel names."""
    out = {prefix + "embeddings.cls_token": state["cls_token"],
           prefix + "embeddings.position_embeddings": state["pos_embed"],
           prefix + "embeddings.patch_embeddings.projection.weight": state["patch.weight"],
           prefix + "embeddings.patch_embeddings.projection.bias": state["patch.bias"],
           prefix + "layernorm.weight": state["norm.weight"], prefix + "layernorm.bias": state["norm.bias"]}
    for i in range(depth):
        ours, theirs = f"blocks.{i}.", f"{prefix}encoder.layer.{i}."
        for name, hf_name in _LAYER_NAMES.items():
            for leaf in ("weight", "bias"):
                out[f"{theirs}{hf_name}.{leaf}"] = state[f"{ours}{name}.{leaf}"]
        for leaf in ("weight", "bias"):
            for hf_name, part in zip(_QKV, state[f"{ours}attn.qkv.{leaf}"].chunk(3, dim=0)):
                out[f"{theirs}{hf_name}.{leaf}"] = part
    return {k: v.detach().contiguous() for k, v in out.items()}


def vit_state_from_hf(hf_state: dict[str, torch.Tensor], config: ViTConfig, prefix: str,
                      where: str) -> dict[str, torch.Tensor]:
    """Inverse of `vit_state_to_hf`. A checkpoint written with ``qkv_bias: false`` has no q/k/v
    biases: lmforge's attention always has them, and zeros compute the same thing."""
    def take(name: str) -> torch.Tensor:
        try:
            return hf_state[prefix + name]
        except KeyError:
            raise LmforgeError(f"{where} lacks the weight {prefix + name}") from None

    out = {"cls_token": take("embeddings.cls_token"), "pos_embed": take("embeddings.position_embeddings"),
           "patch.weight": take("embeddings.patch_embeddings.projection.weight"),
           "patch.bias": take("embeddings.patch_embeddings.projection.bias"),
           "norm.weight": take("layernorm.weight"), "norm.bias": take("layernorm.bias")}
    for i in range(config.depth):
        ours, theirs = f"blocks.{i}.", f"encoder.layer.{i}."
        for name, hf_name in _LAYER_NAMES.items():
            for leaf in ("weight", "bias"):
                out[f"{ours}{name}.{leaf}"] = take(f"{theirs}{hf_name}.{leaf}")
        weights = [take(f"{theirs}{n}.weight") for n in _QKV]
        biases = [hf_state.get(f"{prefix}{theirs}{n}.bias") for n in _QKV]
        out[f"{ours}attn.qkv.weight"] = torch.cat(weights, dim=0)
        out[f"{ours}attn.qkv.bias"] = torch.cat([b if b is not None else torch.zeros(len(w), dtype=w.dtype)
                                                 for b, w in zip(biases, weights)], dim=0)
    return {k: v.float().contiguous() for k, v in out.items()}


def load_tower(tower: VisionTransformer, state: dict[str, torch.Tensor], where: str) -> None:
    try:
        tower.load_state_dict(state)
    except RuntimeError as exc:
        raise LmforgeError(f"{where}: the weights do not match the config: {str(exc).splitlines()[0]}") from None


def read_weights(folder: Path) -> dict[str, torch.Tensor]:
    from lmforge.model.checkpoint import read_safetensors

    return read_safetensors(folder)


# ---- the classifier ----------------------------------------------------------------------

def save_vit_hf(model: ImageClassifier, meta: dict[str, Any], out_dir: Path) -> None:
    """Write ``model`` into the existing directory ``out_dir`` as a ViTForImageClassification
    checkpoint (config.json, model.safetensors, preprocessor_config.json, lmforge.json)."""
    from safetensors.torch import save_file

    from lmforge.vlm import fashion_mnist as fm

    encoder = model.encoder
    if not isinstance(encoder, VisionTransformer):
        raise LmforgeError("only a ViT classifier has a Hugging Face layout (the CNN baseline has none)")
    config = encoder.config
    if config.pool != "cls":
        raise LmforgeError(f"this ViT classifies from the {config.pool} of the patch tokens; Hugging Face's "
                           "ViTForImageClassification reads the class token only (train with --pool cls)")
    check_exportable(config, "classifier")
    classes = list(meta.get("classes") or fm.CLASS_NAMES)
    if len(classes) != model.head.out_features:
        raise LmforgeError(f"the checkpoint names {len(classes)} classes but its head has {model.head.out_features}")
    state = {k.removeprefix("encoder."): v for k, v in model.state_dict().items() if k.startswith("encoder.")}
    hf_state = vit_state_to_hf(state, config.depth, "vit.")
    hf_state["classifier.weight"] = model.head.weight.detach().contiguous()
    hf_state["classifier.bias"] = model.head.bias.detach().contiguous()
    save_file(hf_state, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    hf = {"architectures": ["ViTForImageClassification"], **vit_hf_config(config),
          "id2label": {str(i): name for i, name in enumerate(classes)},
          "label2id": {name: i for i, name in enumerate(classes)}, "torch_dtype": "float32"}
    write_json(out_dir / "config.json", hf)
    write_json(out_dir / "preprocessor_config.json", {
        "image_processor_type": "ViTImageProcessor", "do_resize": True,
        "size": {"height": config.image_size, "width": config.image_size}, "resample": 2,
        "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": False,
        "image_mean": [0.0] * config.channels, "image_std": [1.0] * config.channels})
    write_json(out_dir / LMFORGE_META, meta)


def load_vit_hf(folder: str | Path) -> tuple[ImageClassifier, dict[str, Any]]:
    """A ViTForImageClassification directory (lmforge's export or transformers' own) as an lmforge
    `ImageClassifier` and checkpoint metadata (kind "vit", the class names from id2label)."""
    folder = Path(folder)
    hf = read_json(folder / "config.json")
    where = str(folder)
    config = vit_config_from_hf(hf, where)
    processor = folder / "preprocessor_config.json"
    if processor.is_file():
        p = read_json(processor)
        mean, std = p.get("image_mean", [0.0]), p.get("image_std", [1.0])
        if p.get("do_normalize", True) and (any(m != 0 for m in mean) or any(s != 1 for s in std)):
            raise LmforgeError(f"{processor} standardizes pixels (mean {mean}, std {std}); lmforge's classifier "
                               "feeds them in 0..1 unchanged")
    labels = hf.get("id2label") or {}
    try:
        classes = [labels[str(i)] for i in range(len(labels))]
    except KeyError:
        raise LmforgeError(f"{where}: id2label must number its classes 0..{len(labels) - 1}") from None
    if not classes:
        raise LmforgeError(f"{where}: config.json has no id2label (the classifier's classes)")
    hf_state = read_weights(folder)
    model = ImageClassifier(VisionTransformer(config), len(classes))
    load_tower(model.encoder, vit_state_from_hf(hf_state, config, "vit.", where), where)
    try:
        model.head.load_state_dict({"weight": hf_state["classifier.weight"].float(),
                                    "bias": hf_state["classifier.bias"].float()})
    except KeyError as missing:
        raise LmforgeError(f"{where} lacks the weight {missing}") from None
    except RuntimeError as exc:
        raise LmforgeError(f"{where}: the classifier does not match id2label: {str(exc).splitlines()[0]}") from None
    meta = read_lmforge_meta(folder)
    meta.update({"kind": "vit", "encoder": "vit", "encoder_config": dataclasses.asdict(config), "classes": classes})
    return model.eval(), meta
