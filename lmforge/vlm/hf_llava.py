"""The captioning/VQA model in Hugging Face's ``LlavaForConditionalGeneration`` layout.

LLaVA runs the image through a vision tower, takes ``hidden_states[vision_feature_layer]``
(with layer -1: the last block's output, before the tower's final LayerNorm), keeps every
token including the class token when ``vision_feature_select_strategy`` is "full", maps
each through Linear(d_vision -> d_text), GELU, Linear(d_text -> d_text), and writes the
results over the embeddings of the ``<image>`` placeholder tokens in the prompt. lmforge's
`VisionLanguageModel` with ``vision_features="last_block"`` and ``projector_hidden`` equal
to the LM width computes exactly that, with the visual tokens as a prefix: the prompt
``<image> x image_seq_length, [BOS] ...`` gives Hugging Face the same sequence (and the
same positions, 0 onwards) as lmforge's prefix followed by ``[BOS] ...``.

What the export adds and why:

- an ``<image>`` token at the end of the vocabulary, with an all-zero embedding row and an
  all-zero output row. The embedding row is never read (the placeholders are overwritten by
  the visual tokens); the output row would give the token a logit of 0, so
  generation_config.json suppresses it, and lmforge drops the row again on loading.
- the pixel standardization lmforge does inside the model ((x - 0.5) / 0.25 on 0..1
  pixels) becomes the image processor's rescale 1/255 and normalize(mean, std).
- the ViT tower's pooler, which LLaVA's vision tower owns but never uses, is written as
  zeros so that transformers finds every weight it expects.
- ``lmforge.json``: the task, special token ids and run settings, so an exported model
  loads back into lmforge as the checkpoint it came from.

Checkpoints trained before these choices were the defaults (normed features, a projector
of hidden width 2 x LM width, or the query resampler) compute something LLaVA cannot, and
their export is refused with the reason.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from lmforge.errors import LmforgeError
from lmforge.vlm.hf_vit import (LMFORGE_META, check_exportable, load_tower, read_json, read_lmforge_meta,
                                read_weights, vit_config_from_hf, vit_hf_config, vit_state_from_hf, vit_state_to_hf,
                                write_json)

IMAGE_TOKEN = "<image>"


def _check_exportable(model, meta: dict[str, Any]) -> None:
    if meta.get("connector", "mlp") != "mlp":
        raise LmforgeError(f"this model reads the image through the {meta.get('connector')} connector; LLaVA has "
                           "only the MLP projector (train with --connector mlp)")
    if meta.get("vision_features", "normed") != "last_block":
        raise LmforgeError("this model feeds its connector the ViT's final normalized states (the earlier design); "
                           "LLaVA reads the last block's output before that LayerNorm, so it cannot be exported "
                           "(retrain it: new models use the last block's states)")
    hidden, width = model.connector.fc1.out_features, model.lm.config.n_embd
    if hidden != width:
        raise LmforgeError(f"this model's projector has hidden width {hidden}; LLaVA's is the LM width {width} "
                           "(an earlier design; retrain it)")
    check_exportable(model.encoder.config, "model")


def _add_image_token(out_dir: Path, image_id: int) -> None:
    """Append ``<image>`` as a special added token with id ``image_id`` to the saved tokenizer files."""
    path = out_dir / "tokenizer.json"
    tok = read_json(path)
    tok.setdefault("added_tokens", []).append({"id": image_id, "content": IMAGE_TOKEN, "single_word": False,
                                               "lstrip": False, "rstrip": False, "normalized": False,
                                               "special": True})
    write_json(path, tok)
    config_path = out_dir / "tokenizer_config.json"
    if config_path.is_file():
        config = read_json(config_path)
        if isinstance(config.get("added_tokens_decoder"), dict):
            config["added_tokens_decoder"][str(image_id)] = {
                "content": IMAGE_TOKEN, "lstrip": False, "normalized": False, "rstrip": False,
                "single_word": False, "special": True}
        config["image_token"] = IMAGE_TOKEN
        extra = [t for t in config.get("extra_special_tokens", []) if t != IMAGE_TOKEN] \
            if isinstance(config.get("extra_special_tokens"), list) else []
        config["extra_special_tokens"] = extra + [IMAGE_TOKEN]
        write_json(config_path, config)


def save_llava_hf(model, meta: dict[str, Any], tokenizer, out_dir: Path) -> None:
    """Write a `VisionLanguageModel` into the existing directory ``out_dir`` as a
    LlavaForConditionalGeneration checkpoint (config.json, generation_config.json,
    model.safetensors, tokenizer files with ``<image>``, preprocessor/processor configs,
    lmforge.json)."""
    from safetensors.torch import save_file

    from lmforge.model.families import hf_config_from, lmforge_to_hf

    _check_exportable(model, meta)
    lm_config = model.lm.config
    vocab = lm_config.vocab_size
    if tokenizer.vocab_size > vocab:
        raise LmforgeError(f"the tokenizer has {tokenizer.vocab_size} ids but the model only {vocab} rows")
    if tokenizer.token_to_id(IMAGE_TOKEN) is not None:
        raise LmforgeError(f"the tokenizer already has a {IMAGE_TOKEN} token")
    image_id = vocab
    text_config = dataclasses.replace(lm_config, vocab_size=vocab + 1)
    lm_state = {k: v.detach() for k, v in model.lm.state_dict().items()}
    for name in ("embed.weight", "lm_head.weight"):  # one unused (all-zero) row for <image>
        if name in lm_state:
            lm_state[name] = torch.cat([lm_state[name], lm_state[name].new_zeros(1, lm_state[name].shape[1])])
    hf_state = {"language_model." + k: v.contiguous() for k, v in lmforge_to_hf(text_config, lm_state).items()}
    vit = model.encoder.config
    hf_state.update(vit_state_to_hf({k: v for k, v in model.encoder.state_dict().items()}, vit.depth,
                                    "vision_tower."))
    hf_state["vision_tower.pooler.dense.weight"] = torch.zeros(vit.width, vit.width)
    hf_state["vision_tower.pooler.dense.bias"] = torch.zeros(vit.width)
    for ours, theirs in (("fc1", "linear_1"), ("fc2", "linear_2")):
        layer = getattr(model.connector, ours)
        hf_state[f"multi_modal_projector.{theirs}.weight"] = layer.weight.detach().contiguous()
        hf_state[f"multi_modal_projector.{theirs}.bias"] = layer.bias.detach().contiguous()
    save_file(hf_state, str(out_dir / "model.safetensors"), metadata={"format": "pt"})

    text = {k: v for k, v in hf_config_from(text_config).items() if k not in ("architectures", "torch_dtype")}
    vision = vit_hf_config(vit)
    seq = model.prefix_length
    write_json(out_dir / "config.json", {
        "architectures": ["LlavaForConditionalGeneration"], "model_type": "llava",
        "vision_config": vision, "text_config": text, "image_token_index": image_id, "image_seq_length": seq,
        "vision_feature_select_strategy": "full", "vision_feature_layer": -1, "projector_hidden_act": "gelu",
        "multimodal_projector_bias": True, "tie_word_embeddings": bool(lm_config.tie_word_embeddings),
        "torch_dtype": "float32"})
    ids = meta.get("special_ids", {})
    generation = {k: v for k, v in (("bos_token_id", ids.get("bos", lm_config.bos_token_id)),
                                    ("eos_token_id", ids.get("eos", lm_config.eos_token_id)),
                                    ("pad_token_id", ids.get("pad", lm_config.pad_token_id))) if v is not None}
    write_json(out_dir / "generation_config.json", {**generation, "suppress_tokens": [image_id]})
    tokenizer.save(out_dir)
    _add_image_token(out_dir, image_id)
    mean, std = float(model.pixel_mean), float(model.pixel_std)
    channels = vit.channels
    write_json(out_dir / "preprocessor_config.json", {
        "image_processor_type": "ViTImageProcessor", "do_resize": True,
        "size": {"height": vit.image_size, "width": vit.image_size}, "resample": 2, "do_rescale": True,
        "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": [mean] * channels,
        "image_std": [std] * channels, "do_convert_rgb": True})
    write_json(out_dir / "processor_config.json", {
        "processor_class": "LlavaProcessor", "image_token": IMAGE_TOKEN, "patch_size": vit.patch_size,
        "vision_feature_select_strategy": "full", "num_additional_image_tokens": 1})
    write_json(out_dir / LMFORGE_META, meta)


def _pixel_scaling(folder: Path) -> tuple[float, float]:
    """The image processor's normalization as lmforge's scalar (mean, std) on 0..1 pixels;
    (0, 1) when the directory has no preprocessor config (the model sees 0..1 pixels)."""
    path = folder / "preprocessor_config.json"
    if not path.is_file():
        return 0.0, 1.0
    p = read_json(path)
    if p.get("do_rescale", True) and abs(float(p.get("rescale_factor", 1 / 255)) - 1 / 255) > 1e-9:
        raise LmforgeError(f"{path}: lmforge scales pixels by 1/255, not {p.get('rescale_factor')}")
    if not p.get("do_normalize", True):
        return 0.0, 1.0
    mean, std = p.get("image_mean", [0.0]), p.get("image_std", [1.0])
    mean, std = (mean if isinstance(mean, list) else [mean]), (std if isinstance(std, list) else [std])
    if len(set(mean)) != 1 or len(set(std)) != 1:
        raise LmforgeError(f"{path}: lmforge standardizes every colour channel alike; this processor uses "
                           f"mean {mean} and std {std}")
    return float(mean[0]), float(std[0])


def load_llava_hf(folder: str | Path):
    """A LlavaForConditionalGeneration directory with a ViT vision tower and a language model
    lmforge reads (lmforge's export or transformers' own) as a `LoadedVLM`."""
    from lmforge.model.checkpoint import build_model as build_lm
    from lmforge.model.families import config_from_hf, hf_to_lmforge
    from lmforge.tokenizer.tokenizer import Tokenizer
    from lmforge.vlm.captioner import SPECIAL_TOKENS, LoadedVLM, VisionLanguageModel

    folder = Path(folder)
    where = str(folder)
    hf = read_json(folder / "config.json")
    if hf.get("model_type") != "llava":
        raise LmforgeError(f"{where} holds a {hf.get('model_type')!r} model, not a LLaVA one")
    if not (folder / "tokenizer.json").is_file():
        raise LmforgeError(f"{where} has no tokenizer.json (lmforge decodes captions with it)")
    vit = vit_config_from_hf(hf.get("vision_config") or {}, where)
    if hf.get("vision_feature_select_strategy", "default") != "full":
        raise LmforgeError(f"{where}: vision_feature_select_strategy {hf.get('vision_feature_select_strategy')!r} "
                           "drops the class token; lmforge feeds every token ('full')")
    layer = hf.get("vision_feature_layer", -2)
    if layer not in (-1, vit.depth):
        raise LmforgeError(f"{where}: vision_feature_layer {layer!r}; lmforge reads the last block's output (-1)")
    if hf.get("projector_hidden_act", "gelu") != "gelu":
        raise LmforgeError(f"{where}: projector_hidden_act {hf.get('projector_hidden_act')!r}; lmforge's projector "
                           "uses the exact 'gelu'")
    if hf.get("image_seq_length", vit.n_patches + 1) != vit.n_patches + 1:
        raise LmforgeError(f"{where}: image_seq_length {hf['image_seq_length']} differs from the tower's "
                           f"{vit.n_patches + 1} tokens (class token and patches)")
    text_hf = dict(hf.get("text_config") or {})
    text_hf.setdefault("model_type", "llama")
    text_hf.setdefault("tie_word_embeddings", hf.get("tie_word_embeddings", False))
    lm_config = config_from_hf(text_hf)
    image_id = int(hf.get("image_token_index", hf.get("image_token_id", -1)))

    state = read_weights(folder)
    lm_hf = {k.removeprefix("language_model."): v for k, v in state.items() if k.startswith("language_model.")}
    if not lm_hf:
        raise LmforgeError(f"{where} has no language_model.* weights (saved by an unsupported transformers layout)")
    lm_state = hf_to_lmforge(lm_config, lm_hf)
    if image_id == lm_config.vocab_size - 1:
        # the placeholder's row is never an input (the visual tokens replace it) and must never be generated
        lm_config = dataclasses.replace(lm_config, vocab_size=image_id)
        lm_state = {k: (v[:image_id] if k in ("embed.weight", "lm_head.weight") else v) for k, v in lm_state.items()}
    lm = build_lm(lm_config, {k: v.float() for k, v in lm_state.items()}, torch.float32)

    mean, std = _pixel_scaling(folder)
    model = VisionLanguageModel(vit, lm_config, "mlp", pixel_mean=mean, pixel_std=std,
                                vision_features="last_block", projector_hidden=lm_config.n_embd)
    model.lm = lm
    load_tower(model.encoder, vit_state_from_hf(state, vit, "vision_tower.", where), where)
    for ours, theirs in (("fc1", "linear_1"), ("fc2", "linear_2")):
        layer_ = getattr(model.connector, ours)
        try:
            weight = state[f"multi_modal_projector.{theirs}.weight"].float()
        except KeyError:
            raise LmforgeError(f"{where} lacks the weight multi_modal_projector.{theirs}.weight") from None
        bias = state.get(f"multi_modal_projector.{theirs}.bias")
        try:
            layer_.load_state_dict({"weight": weight,
                                    "bias": bias.float() if bias is not None else torch.zeros(len(weight))})
        except RuntimeError as exc:
            raise LmforgeError(f"{where}: the projector does not match the config: "
                               f"{str(exc).splitlines()[0]}") from None
    model.eval()

    tokenizer = Tokenizer.from_file(folder / "tokenizer.json")
    meta = read_lmforge_meta(folder)
    if "special_ids" not in meta:
        ids = {name: tokenizer.token_to_id(f"[{name.upper()}]") for name in ("pad", "unk", "bos", "eos", "sep")}
        if not all(t in tokenizer.get_vocab() for t in SPECIAL_TOKENS):
            ids.update({"bos": lm_config.bos_token_id, "eos": lm_config.eos_token_id,
                        "pad": lm_config.pad_token_id, "unk": tokenizer.unk_id})
        if ids["bos"] is None or ids["eos"] is None:
            raise LmforgeError(f"{where}: no BOS/EOS token ids in the tokenizer or text_config")
        meta["special_ids"] = ids
    meta.setdefault("task", "caption")
    meta.update({"kind": "vlm", "vit": dataclasses.asdict(vit), "lm": lm_config.to_dict(), "connector": "mlp",
                 "image_size": vit.image_size, "pixel_mean": mean, "pixel_std": std,
                 "vision_features": "last_block", "projector_hidden": lm_config.n_embd})
    return LoadedVLM(model, tokenizer, meta)
