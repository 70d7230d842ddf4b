"""Hugging Face layouts of the ViT classifier and the LLaVA-style captioner (lmforge/vlm/hf_*.py),
checked against transformers itself: logits in both directions, greedy generation, and the
export command."""

from __future__ import annotations

import json

import pytest
import torch

from lmforge.errors import LmforgeError

transformers = pytest.importorskip("transformers")


pytestmark = pytest.mark.usefixtures("one_thread")


def _perturb(model: torch.nn.Module, scale: float = 0.1) -> None:
    """Random init leaves biases and LayerNorms at 0 / 1; moving them makes a layout mix-up visible."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * scale)


def _vit_classifier(pool: str = "cls"):
    from lmforge.vlm.encoders import ImageClassifier, ViTConfig, VisionTransformer

    torch.manual_seed(0)
    model = ImageClassifier(VisionTransformer(ViTConfig(patch_size=7, width=32, depth=2, heads=4, pool=pool)), 10)
    _perturb(model)
    return model.eval()


def _vit_meta(model) -> dict:
    from lmforge.vlm import fashion_mnist as fm
    from lmforge.vlm.encoders import encoder_config

    return {"kind": "vit", "encoder": "vit", "encoder_config": encoder_config(model.encoder),
            "classes": list(fm.CLASS_NAMES)}


# ---- ViT classifier ----------------------------------------------------------------------

def test_vit_classifier_export_gives_transformers_the_same_logits(tmp_path):
    from transformers import ViTForImageClassification

    from lmforge.vlm.hf_vit import save_vit_hf
    from lmforge.vlm.train import load_checkpoint

    model = _vit_classifier()
    save_vit_hf(model, _vit_meta(model), tmp_path)
    hf = ViTForImageClassification.from_pretrained(tmp_path).eval()
    assert hf.config.id2label[1] == "Trouser" and hf.config.layer_norm_eps == 1e-6
    images = torch.rand(4, 1, 28, 28)
    with torch.no_grad():
        ours, theirs = model(images), hf(pixel_values=images).logits
        back = load_checkpoint(tmp_path)
        again = back.model(images)
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=0)
    torch.testing.assert_close(again, ours, atol=1e-6, rtol=0)
    assert back.kind == "vit" and back.meta["classes"][1] == "Trouser"
    processor = json.loads((tmp_path / "preprocessor_config.json").read_text())
    assert processor["rescale_factor"] == 1 / 255 and processor["do_normalize"] is False


@pytest.mark.parametrize("qkv_bias", [True, False])
def test_transformers_made_vit_classifier_loads_with_equal_logits(tmp_path, qkv_bias):
    from transformers import ViTConfig, ViTForImageClassification

    from lmforge.vlm.train import classify, load_checkpoint

    torch.manual_seed(1)
    config = ViTConfig(hidden_size=24, num_hidden_layers=2, num_attention_heads=3, intermediate_size=72,
                       image_size=28, patch_size=14, num_channels=1, qkv_bias=qkv_bias, num_labels=3,
                       id2label={0: "cat", 1: "dog", 2: "bird"}, label2id={"cat": 0, "dog": 1, "bird": 2})
    hf = ViTForImageClassification(config).eval()  # layer_norm_eps left at transformers' 1e-12
    _perturb(hf)
    hf.save_pretrained(tmp_path)
    ckpt = load_checkpoint(tmp_path)
    images = torch.rand(3, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(ckpt.model(images), hf(pixel_values=images).logits, atol=1e-5, rtol=0)
    assert ckpt.meta["classes"] == ["cat", "dog", "bird"]
    assert ckpt.model.encoder.config.norm_eps == 1e-12
    from PIL import Image

    Image.fromarray((torch.rand(28, 28) * 255).byte().numpy()).save(tmp_path / "x.png")
    assert classify(tmp_path, [str(tmp_path / "x.png")], top=2)[0]["label"] in ("cat", "dog", "bird")


def test_mean_pooled_vit_and_cnn_do_not_export(tmp_path):
    from lmforge.vlm.encoders import ConvNet, CNNConfig, ImageClassifier
    from lmforge.vlm.hf_layouts import export_checkpoint
    from lmforge.vlm.hf_vit import save_vit_hf
    from lmforge.vlm.train import save_checkpoint

    model = _vit_classifier(pool="mean")
    with pytest.raises(LmforgeError, match="class token only"):
        save_vit_hf(model, _vit_meta(model), tmp_path)
    cnn = ImageClassifier(ConvNet(CNNConfig(widths=(4, 4, 4))), 10)
    save_checkpoint(tmp_path / "cnn", cnn, {"kind": "cnn", "encoder": "cnn",
                                             "encoder_config": {"widths": [4, 4, 4]}})
    with pytest.raises(LmforgeError, match="no Hugging Face counterpart"):
        export_checkpoint(tmp_path / "cnn", tmp_path / "out")
    assert not (tmp_path / "out").exists()


# ---- LLaVA -------------------------------------------------------------------------------

def _captioner(connector: str = "mlp", **old_style):
    """A tiny random captioner with the current defaults (or, with ``old_style`` meta keys removed
    or set, one of the earlier designs) and the scene tokenizer."""
    from lmforge.vlm import captioner as cap
    from lmforge.vlm.config import CaptionTrainConfig

    torch.manual_seed(0)
    tokenizer = cap.train_scene_tokenizer(200)
    ids = cap.special_ids(tokenizer)
    config = CaptionTrainConfig(image_size=32, patch_size=16, vit_width=32, vit_depth=2, lm_width=48, lm_layers=2,
                                lm_heads=4, connector=connector, queries=4)
    meta = cap.model_meta(config, tokenizer.vocab_size, ids)
    for key, value in old_style.items():
        if value is None:
            meta.pop(key, None)
        else:
            meta[key] = value
    model = cap.build_model(meta)
    _perturb(model, 0.05)
    return cap.LoadedVLM(model.eval(), tokenizer, meta)


def test_captioner_defaults_are_llava_shaped():
    loaded = _captioner()
    assert loaded.meta["vision_features"] == "last_block" and loaded.meta["projector_hidden"] == 48
    assert loaded.model.connector.fc1.out_features == loaded.model.lm.config.n_embd


def test_training_flags_choose_the_earlier_design():
    from lmforge.vlm import captioner as cap
    from lmforge.vlm.config import CaptionTrainConfig

    ids = {"pad": 0, "unk": 1, "bos": 2, "eos": 3, "sep": 4}
    old = cap.model_meta(CaptionTrainConfig(vision_features="normed", projector_width=192), 150, ids)
    assert old["vision_features"] == "normed" and cap.build_model(old).connector.fc1.out_features == 192
    resampler = cap.model_meta(CaptionTrainConfig(connector="resampler"), 150, ids)
    assert resampler["vision_features"] == "normed" and "projector_hidden" not in resampler
    with pytest.raises(LmforgeError, match="--projector-width"):
        CaptionTrainConfig(projector_width=0)


def test_captioner_export_gives_transformers_the_same_logits_and_greedy_tokens(tmp_path):
    from transformers import LlavaForConditionalGeneration

    from lmforge.vlm import captioner as cap
    from lmforge.vlm.hf_llava import IMAGE_TOKEN, save_llava_hf
    from lmforge.tokenizer.tokenizer import Tokenizer

    loaded = _captioner()
    model, ids = loaded.model, loaded.ids
    save_llava_hf(model, {**loaded.meta, "task": "caption"}, loaded.tokenizer, tmp_path)
    hf = LlavaForConditionalGeneration.from_pretrained(tmp_path).eval()
    vocab = model.lm.config.vocab_size
    assert hf.config.image_token_id == vocab and hf.config.image_seq_length == model.prefix_length == 5
    assert Tokenizer.from_file(tmp_path / "tokenizer.json").token_to_id(IMAGE_TOKEN) == vocab

    torch.manual_seed(3)
    images = torch.rand(3, 3, 32, 32)
    pixels = (images - 0.5) / 0.25  # what the exported image processor hands the model
    text = torch.tensor([[ids["bos"], 40, 41, 42, 43], [ids["bos"], 50, 60, 70, 80], [ids["bos"], 7, 8, 9, 10]])
    prefix = torch.full((3, model.prefix_length), vocab)
    with torch.no_grad():
        ours = model(images, text)[:, model.prefix_length:]
        theirs = hf(input_ids=torch.cat([prefix, text], 1), pixel_values=pixels).logits[:, model.prefix_length:]
    assert theirs.shape[-1] == vocab + 1
    torch.testing.assert_close(theirs[..., :vocab], ours, atol=1e-5, rtol=0)

    ours_tokens = cap.generate(model, images, [[ids["bos"]]] * 3, ids["eos"], max_new_tokens=12)
    out = hf.generate(input_ids=torch.cat([prefix, text[:, :1]], 1), pixel_values=pixels, max_new_tokens=12,
                      do_sample=False)[:, model.prefix_length + 1:]
    for row, expected in zip(out.tolist(), ours_tokens):
        generated = row[:row.index(ids["eos"])] if ids["eos"] in row else row
        assert generated == expected
    assert any(len(t) > 2 for t in ours_tokens)

    back = cap.load_vlm(tmp_path)  # and back into lmforge: the same model, the <image> row dropped
    assert back.meta["special_ids"] == ids and back.model.lm.config.vocab_size == vocab
    with torch.no_grad():
        torch.testing.assert_close(back.model(images, text)[:, model.prefix_length:], ours, atol=1e-6, rtol=0)


def test_transformers_made_llava_loads_with_equal_logits(tmp_path):
    from transformers import LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, ViTConfig

    from lmforge.vlm import captioner as cap

    tokenizer = cap.train_scene_tokenizer(200)
    tokenizer.save(tmp_path)
    ids = cap.special_ids(tokenizer)
    vocab = tokenizer.vocab_size + 1  # the last row is the image placeholder
    torch.manual_seed(2)
    vision = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                       image_size=32, patch_size=8, num_channels=3)
    text = LlamaConfig(hidden_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                       intermediate_size=96, vocab_size=vocab, max_position_embeddings=64,
                       bos_token_id=ids["bos"], eos_token_id=ids["eos"], pad_token_id=ids["pad"])
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=vocab - 1, image_seq_length=17,
                         vision_feature_select_strategy="full", vision_feature_layer=-1)
    hf = LlavaForConditionalGeneration(config).eval()
    _perturb(hf, 0.05)
    hf.save_pretrained(tmp_path)

    loaded = cap.load_vlm(tmp_path)
    assert loaded.meta["task"] == "caption" and loaded.ids["bos"] == ids["bos"]
    assert loaded.model.prefix_length == 17 and loaded.model.lm.config.n_kv_head == 2
    images = torch.rand(2, 3, 32, 32)  # no preprocessor config: the model sees these pixels
    tokens = torch.tensor([[ids["bos"], 30, 31, 32], [ids["bos"], 90, 91, 92]])
    prefix = torch.full((2, 17), vocab - 1)
    with torch.no_grad():
        ours = loaded.model(images, tokens)[:, 17:]
        theirs = hf(input_ids=torch.cat([prefix, tokens], 1), pixel_values=images).logits[:, 17:, :-1]
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    assert len(loaded.caption(images, max_new_tokens=4)) == 2


@pytest.mark.parametrize("connector,old_style,message", [
    ("mlp", {"vision_features": None, "projector_hidden": None}, "final normalized states"),
    ("mlp", {"projector_hidden": None}, "hidden width 96"),
    ("resampler", {}, "resampler connector"),
])
def test_earlier_captioner_designs_do_not_export(tmp_path, connector, old_style, message):
    from lmforge.vlm.hf_layouts import export_checkpoint
    from lmforge.vlm.train import save_checkpoint

    loaded = _captioner(connector, **old_style)
    save_checkpoint(tmp_path / "old", loaded.model, loaded.meta, loaded.tokenizer)
    with pytest.raises(LmforgeError, match=message):
        export_checkpoint(tmp_path / "old", tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_old_checkpoints_keep_their_design(tmp_path):
    """No vision_features / projector_hidden in the meta: normed features and a 2 x LM-width projector."""
    from lmforge.vlm import captioner as cap
    from lmforge.vlm.train import save_checkpoint

    loaded = _captioner(vision_features=None, projector_hidden=None)
    save_checkpoint(tmp_path, loaded.model, loaded.meta, loaded.tokenizer)
    model = cap.load_vlm(tmp_path).model
    assert model.connector.fc1.out_features == 2 * 48 and model.vision_features == "normed"
    images = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        expected = model.connector(model.encoder.norm(model.encoder.tokens((images - 0.5) / 0.25, final_norm=False)))
        torch.testing.assert_close(model.image_prefix(images), expected, atol=0, rtol=0)


def test_export_command_round_trip(tmp_path, capsys):
    from transformers import LlavaForConditionalGeneration, ViTForImageClassification

    from lmforge.cli import main
    from lmforge.vlm import captioner as cap
    from lmforge.vlm.train import save_checkpoint

    vit = _vit_classifier()
    save_checkpoint(tmp_path / "vit", vit, _vit_meta(vit))
    assert main(["vlm", "export", str(tmp_path / "vit"), "--out", str(tmp_path / "vit-hf")]) == 0
    assert "ViTForImageClassification" in capsys.readouterr().out
    assert ViTForImageClassification.from_pretrained(tmp_path / "vit-hf").config.num_labels == 10

    run = tmp_path / "caption"
    assert main(["vlm", "train", "--task", "caption", "--out", str(run), "--steps", "4", "--batch-size", "8",
                 "--train-scenes", "16", "--val-scenes", "8", "--test-scenes", "2", "--vit-width", "32",
                 "--vit-depth", "1", "--lm-width", "32", "--lm-layers", "1", "--lm-heads", "2", "--quiet",
                 "--json"]) == 0
    capsys.readouterr()
    exported = tmp_path / "caption-hf"
    assert main(["vlm", "export", str(run), "--out", str(exported)]) == 0
    assert "LlavaForConditionalGeneration" in capsys.readouterr().out
    hf = LlavaForConditionalGeneration.from_pretrained(exported).eval()
    assert hf.config.vision_config.model_type == "vit" and hf.config.text_config.model_type == "llama"
    for model in (run, exported):  # the commands read both layouts and agree
        assert main(["vlm", "caption", "test:0", "test:1", "--model", str(model), "--max-new-tokens", "6"]) == 0
    first, second = capsys.readouterr().out.split("test:0")[1:]
    assert first == second
    assert main(["vlm", "eval", str(exported), "--test-scenes", "2"]) == 0
    assert "CIDEr-D" in capsys.readouterr().out
    original = cap.load_vlm(run)
    assert cap.load_vlm(exported).meta["train_config"] == original.meta["train_config"]
    for args, message in ((["export", str(run), "--out", str(exported)], "not empty"),
                          (["export", str(tmp_path / "nothing"), "--out", str(tmp_path / "x")], "no config.json")):
        assert main(["vlm"] + args) != 0
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err
