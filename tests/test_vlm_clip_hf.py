"""lmforge.vlm.hf_clip: the dual encoder written as, and read from, transformers' ``CLIPModel``
layout, held to transformers' own CLIPModel; the CLIP-style design as the training default;
checkpoints of the earlier design loading as before."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from lmforge.errors import LmforgeError
from lmforge.vlm import fashion_mnist as fm
from lmforge.vlm.clip import DualEncoder, embed_texts, encode_texts
from lmforge.vlm.config import VisionTrainConfig
from lmforge.vlm.encoders import (CNNConfig, ConvNet, TextConfig, TextEncoder, ViTConfig, VisionTransformer,
                                  encoder_config)
from lmforge.vlm.hf_clip import SIDE_FILE, load_clip_hf, save_clip_hf
from lmforge.vlm.train import load_checkpoint, save_checkpoint, train_caption_tokenizer

transformers = pytest.importorskip("transformers")

CAPTIONS = ["a photo of a dark small coat", "a bag", "a picture showing a bright large ankle boot on black",
            "this is a pullover.", "a medium sneaker"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tokenizer():
    n = np.arange(200)
    texts = fm.captions(n % 10, n % 3, (n // 7) % 3, seed=0)
    return train_caption_tokenizer(texts + CAPTIONS, 120)


def randomize(model: torch.nn.Module, seed: int = 0) -> None:
    """Every parameter random (norm scales and biases, the class token and the patch bias start
    at constants), so a parameter mapped to the wrong place shows in the outputs."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("log_scale") or name == "logit_scale":
                p.fill_(2.3)
            elif p.dim() == 1 and ("norm" in name or "layer_norm" in name or "layrnorm" in name) \
                    and name.endswith("weight"):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=generator))
            else:
                p.copy_(0.2 * torch.randn(p.shape, generator=generator))


def clip_style(tokenizer, vit: dict | None = None, text: dict | None = None) -> DualEncoder:
    """A tiny dual encoder of the CLIPModel-compatible design (the training default)."""
    vit_config = ViTConfig(**{**dict(patch_size=7, width=32, depth=2, heads=4, pool="cls", pre_norm=True),
                              **(vit or {})})
    text_config = dict(vocab_size=tokenizer.vocab_size, width=24, depth=2, heads=3, max_length=16, causal=True,
                       pool="eos", eos_token_id=tokenizer.eos_id)
    text_config.update(text or {})
    model = DualEncoder(VisionTransformer(vit_config), TextEncoder(TextConfig(**text_config)), 16)
    randomize(model)
    return model.eval()


def images(n: int = 5) -> torch.Tensor:
    return torch.rand(n, 1, 28, 28, generator=torch.Generator().manual_seed(1))


def meta_of(model: DualEncoder) -> dict:
    return {"kind": "clip", "encoder": "vit", "encoder_config": encoder_config(model.image_encoder),
            "text": dataclasses.asdict(model.text_encoder.config), "embed_dim": model.embed_dim,
            "classes": list(fm.CLASS_NAMES), "class_nouns": list(fm.CLASS_NOUNS),
            "prompt_templates": list(fm.PROMPT_TEMPLATES), "train_config": {"seed": 0, "epochs": 2.0}}


def hf_outputs(folder, pixels, ids, mask):
    hf = transformers.CLIPModel.from_pretrained(folder).eval()
    with torch.no_grad():
        return hf(input_ids=ids, pixel_values=pixels, attention_mask=mask)


def test_exported_model_matches_transformers_clipmodel(tokenizer, tmp_path):
    model = clip_style(tokenizer)
    assert model.image_encoder.patch.bias.abs().min() > 0  # the bias to fold is really there
    save_clip_hf(model, meta_of(model), tokenizer, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "clip" and config["architectures"] == ["CLIPModel"]
    assert config["text_config"]["eos_token_id"] == tokenizer.eos_id != 2

    ids, mask = encode_texts(tokenizer, CAPTIONS, 16, model.eos_token_id)
    lengths = mask.sum(1)
    assert len(set(lengths.tolist())) >= 3 and bool((mask == 0).any())  # padded, of different lengths
    assert (ids[torch.arange(len(ids)), lengths - 1] == tokenizer.eos_id).all()
    pixels = images()
    out = hf_outputs(tmp_path, pixels, ids, mask)
    with torch.no_grad():
        image_embeds, text_embeds = model.encode_images(pixels), model.encode_texts(ids, mask)
        logits = model.logit_scale() * image_embeds @ text_embeds.T
    torch.testing.assert_close(out.image_embeds, image_embeds, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.text_embeds, text_embeds, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.logits_per_image, logits, atol=1e-5, rtol=1e-5)
    assert logits.std() > 0.5  # embeddings that differ, not a degenerate match


def test_round_trip_through_the_layout_keeps_meta_and_outputs(tokenizer, tmp_path):
    model = clip_style(tokenizer)
    meta = meta_of(model)
    save_clip_hf(model, meta, tokenizer, tmp_path)
    assert json.loads((tmp_path / SIDE_FILE).read_text()) == meta
    loaded, loaded_tokenizer, loaded_meta = load_clip_hf(tmp_path)
    assert loaded_meta == meta
    assert loaded_tokenizer.encode("a dark coat") == tokenizer.encode("a dark coat")
    assert loaded_tokenizer.eos_id == tokenizer.eos_id
    ids, mask = encode_texts(tokenizer, CAPTIONS, 16, loaded.eos_token_id)
    pixels = images()
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode_images(pixels), model.encode_images(pixels), atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(loaded.encode_texts(ids, mask), model.encode_texts(ids, mask), atol=1e-6, rtol=1e-5)
    assert loaded.log_scale.item() == model.log_scale.item()


def tiny_hf_config(tokenizer, **text):
    return transformers.CLIPConfig(
        text_config=dict(vocab_size=tokenizer.vocab_size, hidden_size=24, intermediate_size=72, num_hidden_layers=2,
                         num_attention_heads=3, max_position_embeddings=16, hidden_act="gelu", layer_norm_eps=1e-5,
                         eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id, **text),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           num_channels=1, image_size=28, patch_size=7, hidden_act="gelu", layer_norm_eps=1e-5),
        projection_dim=16)


def test_transformers_made_clipmodel_loads(tokenizer, tmp_path):
    torch.manual_seed(0)
    hf = transformers.CLIPModel(tiny_hf_config(tokenizer)).eval()
    randomize(hf, seed=3)
    hf.save_pretrained(tmp_path)
    tokenizer.save(tmp_path)
    model, loaded_tokenizer, meta = load_clip_hf(tmp_path)
    assert set(meta) == set(meta_of(model)) and meta["train_config"] is None
    assert meta["text"]["mlp_ratio"] == 3 and meta["text"]["eos_token_id"] == tokenizer.eos_id
    # what lmforge's checkpoint loader builds from this meta is the same model
    save_checkpoint(tmp_path / "lmforge", model, meta, loaded_tokenizer)
    again = load_checkpoint(tmp_path / "lmforge").model

    ids, mask = encode_texts(loaded_tokenizer, CAPTIONS, meta["text"]["max_length"], model.eos_token_id)
    pixels = images()
    with torch.no_grad():
        out = hf(input_ids=ids, pixel_values=pixels, attention_mask=mask)
        for m in (model, again):
            image_embeds, text_embeds = m.encode_images(pixels), m.encode_texts(ids, mask)
            torch.testing.assert_close(image_embeds, out.image_embeds, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(text_embeds, out.text_embeds, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(m.logit_scale() * image_embeds @ text_embeds.T, out.logits_per_image,
                                       atol=1e-5, rtol=1e-5)


def test_layouts_clipmodel_cannot_express_are_refused(tokenizer, tmp_path):
    cases = {
        "mean-pooled": clip_style(tokenizer, vit={"pool": "mean"}),
        "LayerNorm": clip_style(tokenizer, vit={"pre_norm": False}),
        "--text-pool eos": clip_style(tokenizer, text={"causal": False, "pool": "mean", "eos_token_id": None}),
        "ViT": DualEncoder(ConvNet(CNNConfig(widths=(4, 8, 8))), clip_style(tokenizer).text_encoder, 16),
    }
    for words, model in cases.items():
        with pytest.raises(LmforgeError, match=words):
            save_clip_hf(model, {}, tokenizer, tmp_path)
        assert not list(tmp_path.iterdir())  # refused before writing anything

    hf = transformers.CLIPModel(tiny_hf_config(tokenizer)).eval()
    hf.config.text_config.hidden_act = "quick_gelu"
    hf.save_pretrained(tmp_path / "quick")
    tokenizer.save(tmp_path / "quick")
    with pytest.raises(LmforgeError, match="quick_gelu"):
        load_clip_hf(tmp_path / "quick")
    hf.config.text_config.hidden_act = "gelu"
    hf.config.text_config.eos_token_id = 2  # transformers' legacy rule: pool at the largest id
    hf.save_pretrained(tmp_path / "legacy")
    tokenizer.save(tmp_path / "legacy")
    with pytest.raises(LmforgeError, match="largest token id"):
        load_clip_hf(tmp_path / "legacy")


def test_checkpoint_of_the_earlier_design_loads_and_computes_as_before(tokenizer, tmp_path):
    """A checkpoint written before the CLIP-style options existed: no pre_norm in its ViT, no
    causal / pool / eos keys in its text tower. It must build the same bidirectional,
    mean-pooled model and encode texts without an EOS."""
    torch.manual_seed(0)
    vit = dict(patch_size=7, width=32, depth=1, heads=4, mlp_ratio=2, pool="mean")
    text = dict(vocab_size=tokenizer.vocab_size, width=32, depth=1, heads=2, max_length=24)
    model = DualEncoder(VisionTransformer(ViTConfig(**vit)), TextEncoder(TextConfig(**text)), 16).eval()
    meta = {"kind": "clip", "encoder": "vit", "encoder_config": vit, "text": text, "embed_dim": 16}
    save_checkpoint(tmp_path / "old", model, meta, tokenizer)
    loaded = load_checkpoint(tmp_path / "old").model
    assert set(loaded.state_dict()) == set(model.state_dict())
    assert not any("pre_norm" in k for k in loaded.state_dict())
    assert loaded.eos_token_id is None and not loaded.text_encoder.transformer.config.causal

    rows = [tokenizer.encode(t.lower()) for t in CAPTIONS]  # the earlier batching: no EOS appended
    ids = torch.zeros(len(rows), max(map(len, rows)), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, :len(r)], mask[i, :len(r)] = torch.tensor(r), 1
    with torch.no_grad():
        states = model.text_encoder.transformer.encode(ids, mask)
        by_hand = torch.nn.functional.normalize(
            model.text_proj((states * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)), dim=-1)
        torch.testing.assert_close(embed_texts(loaded, tokenizer, CAPTIONS, 24), by_hand, atol=1e-6, rtol=1e-5)
        pixels = images()
        torch.testing.assert_close(loaded.encode_images(pixels), model.encode_images(pixels), atol=0, rtol=0)
        # bidirectional: a later token changes the first token's state
        changed = ids.clone()
        changed[0, 1] = (changed[0, 1] + 1) % tokenizer.vocab_size
        assert not torch.allclose(loaded.text_encoder.transformer.encode(changed, mask)[0, 0], states[0, 0])


def test_training_defaults_are_the_clipmodel_design():
    clip = VisionTrainConfig(kind="clip")
    assert clip.text_pool == "eos" and clip.image_encoder_config()["pre_norm"] is True
    assert clip.image_encoder_config()["pool"] == "cls"
    assert "pre_norm" not in VisionTrainConfig(kind="clip", pre_norm=False).image_encoder_config()
    assert "pre_norm" not in VisionTrainConfig(kind="vit").image_encoder_config()  # the classifier is unchanged
