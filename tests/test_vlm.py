"""lmforge.vlm: the Fashion-MNIST reader and texts, ViT / CNN encoders (ViT held to
transformers' ViTModel), the dual encoder's loss and temperature, retrieval and zero-shot
metrics, training, checkpoints and the ``lmforge vlm`` command."""

from __future__ import annotations

import gzip
import json
import math
import random
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lmforge.cli import main
from lmforge.errors import LmforgeError
from lmforge.vlm import fashion_mnist as fm
from lmforge.vlm.clip import DualEncoder, contrastive_loss, recall_at_k, retrieval, zero_shot_scores
from lmforge.vlm.encoders import (CNNConfig, ConvNet, ImageClassifier, TextConfig, TextEncoder, ViTConfig,
                                  VisionTransformer)

INSTALLED = Path(fm.DEFAULT_DIR, "t10k-images-idx3-ubyte.gz").is_file()
needs_data = pytest.mark.skipif(not INSTALLED, reason="Fashion-MNIST not installed (scripts/install-fashion-mnist.sh)")


pytestmark = pytest.mark.usefixtures("one_thread")


def write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture
def tiny_dataset(tmp_path):
    """A Fashion-MNIST-shaped folder: 40 train and 20 test images of blobs of class-dependent size."""
    rng = np.random.default_rng(0)
    for split, n in (("train", 40), ("test", 20)):
        labels = np.arange(n) % 10
        images = np.zeros((n, 28, 28), dtype=np.uint8)
        for i, c in enumerate(labels):
            side = 4 + 2 * int(c)
            images[i, 2:2 + side, 2:2 + side] = rng.integers(60, 255)
        write_idx(tmp_path / fm.FILES[split][0], images)
        write_idx(tmp_path / fm.FILES[split][1], labels)
    return tmp_path


# ---- data and texts -------------------------------------------------------------------------

def test_idx_reader_returns_the_written_arrays_and_limits(tiny_dataset):
    images, labels = fm.load_split("test", str(tiny_dataset))
    assert images.shape == (20, 28, 28) and images.dtype == np.uint8
    assert labels.tolist() == [i % 10 for i in range(20)]
    first, _ = fm.load_split("train", str(tiny_dataset), limit=5)
    assert first.shape == (5, 28, 28)
    x = fm.to_tensor(images[:2])
    assert x.shape == (2, 1, 28, 28) and float(x.max()) <= 1.0 and float(x.min()) == 0.0


def test_missing_or_bad_data_ends_in_one_message(tmp_path):
    with pytest.raises(LmforgeError, match="install-fashion-mnist.sh"):
        fm.load_split("train", str(tmp_path / "nowhere"))
    with pytest.raises(LmforgeError, match="train or test"):
        fm.load_split("validation", str(tmp_path))
    (tmp_path / fm.FILES["test"][0]).write_bytes(gzip.compress(b"\x00\x00\x0d\x01junk"))
    (tmp_path / fm.FILES["test"][1]).write_bytes(gzip.compress(b"\x00\x00\x08\x01\x00\x00\x00\x02\x01"))
    with pytest.raises(LmforgeError, match="not an idx file"):
        fm.load_split("test", str(tmp_path))


@needs_data
def test_official_split_sizes_and_balanced_classes():
    train_images, train_labels = fm.load_split("train")
    test_images, test_labels = fm.load_split("test")
    assert train_images.shape == (60000, 28, 28) and test_images.shape == (10000, 28, 28)
    assert np.bincount(train_labels).tolist() == [6000] * 10
    assert np.bincount(test_labels).tolist() == [1000] * 10


def test_attributes_are_measured_from_pixels_and_binned_in_terciles():
    images = np.zeros((3, 28, 28), dtype=np.uint8)
    images[0, :14, :] = 255  # half the frame, full intensity
    images[1, :7, :] = 51  # a quarter, 0.2 intensity
    brightness, area = fm.measure(images)
    assert brightness.tolist() == pytest.approx([1.0, 0.2, 0.0])
    assert area.tolist() == pytest.approx([0.5, 0.25, 0.0])
    rng = np.random.default_rng(1)
    many = (rng.random((300, 28, 28)) * rng.random((300, 1, 1)) * 255).astype(np.uint8)
    labels = np.arange(300) % 10
    bins = fm.AttributeBins.fit(many, labels)
    b, s = bins.assign(many, labels)
    assert np.bincount(b, minlength=3).tolist() == [100, 100, 100]
    assert all(abs(n - 100) <= 10 for n in np.bincount(s, minlength=3))


def test_captions_name_the_class_and_prompts_are_held_out():
    rng = random.Random(0)
    for label in range(10):
        for _ in range(5):
            text = fm.caption(label, 0, 2, rng)
            assert any(noun in text for noun in fm.SYNONYMS[label])
            assert not (" a a" in text or " an a " in text.replace("an ankle", ""))
    assert fm.captions(np.array([3, 9]), np.array([0, 2]), np.array([1, 1]), seed=5) == \
        fm.captions(np.array([3, 9]), np.array([0, 2]), np.array([1, 1]), seed=5)
    assert set(fm.PROMPT_TEMPLATES).isdisjoint(t.replace("{thing}", "{noun}") for t in fm.TRAIN_TEMPLATES)
    assert fm.prompts(9)[0] == "this is an ankle boot."
    assert fm.retrieval_caption(4, 0, 2) == "a dark large coat"
    assert fm.retrieval_caption(9, 2, 0) == "a light small ankle boot"


# ---- encoders ---------------------------------------------------------------------------

def test_vit_matches_transformers_vitmodel():
    from transformers import ViTConfig as HFViTConfig, ViTModel

    torch.manual_seed(0)
    ours = VisionTransformer(ViTConfig(patch_size=7, width=32, depth=2, heads=4, mlp_ratio=2)).eval()
    hf = ViTModel(HFViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                              image_size=28, patch_size=7, num_channels=1, layer_norm_eps=1e-6,
                              hidden_act="gelu"), add_pooling_layer=False).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0, 0.2)
        e = hf.embeddings
        ours.cls_token.copy_(e.cls_token)
        ours.pos_embed.copy_(e.position_embeddings)
        ours.patch.weight.copy_(e.patch_embeddings.projection.weight)
        ours.patch.bias.copy_(e.patch_embeddings.projection.bias)
        for block, layer in zip(ours.blocks, hf.layers):
            a = layer.attention
            block.attn.qkv.weight.copy_(torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]))
            block.attn.qkv.bias.copy_(torch.cat([a.q_proj.bias, a.k_proj.bias, a.v_proj.bias]))
            block.attn.out.weight.copy_(a.o_proj.weight)
            block.attn.out.bias.copy_(a.o_proj.bias)
            block.attn_norm.load_state_dict(layer.layernorm_before.state_dict())
            block.mlp_norm.load_state_dict(layer.layernorm_after.state_dict())
            block.mlp.fc.load_state_dict(layer.mlp.fc1.state_dict())
            block.mlp.proj.load_state_dict(layer.mlp.fc2.state_dict())
        ours.norm.load_state_dict(hf.layernorm.state_dict())
        images = torch.rand(3, 1, 28, 28)
        expected = hf(pixel_values=images).last_hidden_state
        torch.testing.assert_close(ours.tokens(images), expected, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(ours(images), expected[:, 0], atol=1e-5, rtol=1e-4)


def test_vit_attention_is_bidirectional_and_pools_as_configured():
    torch.manual_seed(0)
    vit = VisionTransformer(ViTConfig(patch_size=7, width=32, depth=1, heads=4)).eval()
    images = torch.rand(2, 1, 28, 28)
    changed = images.clone()
    changed[:, :, 21:, 21:] = 0  # only the last patch: a causal model's class token would not notice
    with torch.no_grad():
        assert not torch.allclose(vit(images), vit(changed))
        vit.config.pool = "mean"
        tokens = vit.tokens(images)
        torch.testing.assert_close(vit(images), tokens[:, 1:].mean(1))
    assert tokens.shape == (2, 17, 32)
    with pytest.raises(ValueError, match="does not divide"):
        ViTConfig(patch_size=5)


def test_cnn_and_classifier_shapes_and_gradients():
    torch.manual_seed(0)
    model = ImageClassifier(ConvNet(CNNConfig(widths=(4, 8, 16))), 10)
    logits = model(torch.rand(5, 1, 28, 28))
    assert logits.shape == (5, 10)
    F.cross_entropy(logits, torch.arange(5)).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_text_encoder_ignores_padding():
    torch.manual_seed(0)
    enc = TextEncoder(TextConfig(vocab_size=20, width=16, depth=1, heads=2, max_length=8)).eval()
    ids = torch.tensor([[3, 4, 5, 0, 0], [3, 4, 5, 9, 9]])
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    with torch.no_grad():
        out = enc(ids, mask)
        alone = enc(ids[:1, :3], mask[:1, :3])
    torch.testing.assert_close(out[0], alone[0], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(out[0], out[1])


# ---- the dual encoder -----------------------------------------------------------------------

def tiny_clip(vocab: int = 30, pool: str = "cls") -> DualEncoder:
    image = VisionTransformer(ViTConfig(patch_size=7, width=32, depth=1, heads=4, pool=pool))
    return DualEncoder(image, TextEncoder(TextConfig(vocab_size=vocab, width=32, depth=1, heads=4, max_length=8)), 16)


def test_contrastive_loss_equals_the_direct_computation_and_transformers():
    from transformers.models.clip.modeling_clip import image_text_contrastive_loss

    torch.manual_seed(0)
    img = F.normalize(torch.randn(6, 8), dim=-1)
    txt = F.normalize(torch.randn(6, 8), dim=-1)
    scale = torch.tensor(7.5)
    total = 0.0
    for i in range(6):
        row = [float(scale * img[i] @ txt[j]) for j in range(6)]
        col = [float(scale * img[j] @ txt[i]) for j in range(6)]
        total += (math.log(sum(math.exp(v) for v in row)) - row[i]) + (math.log(sum(math.exp(v) for v in col)) - col[i])
    expected = total / 12
    assert float(contrastive_loss(img, txt, scale)) == pytest.approx(expected, rel=1e-5)
    assert float(contrastive_loss(img, txt, scale)) == pytest.approx(
        float(image_text_contrastive_loss(scale * txt @ img.T)), rel=1e-6)
    # perfectly aligned pairs with a large scale: the loss goes to zero
    assert float(contrastive_loss(img[:3] * 0 + torch.eye(3, 8), torch.eye(3, 8), torch.tensor(100.0))) < 1e-30 + 1e-6


def test_gradient_reaches_the_temperature_and_the_scale_is_clamped():
    torch.manual_seed(0)
    model = tiny_clip()
    assert model.logit_scale().item() == pytest.approx(1 / 0.07, rel=1e-5)
    loss = model(torch.rand(4, 1, 28, 28), torch.randint(1, 30, (4, 5)), torch.ones(4, 5, dtype=torch.long))
    loss.backward()
    assert model.log_scale.grad is not None and float(model.log_scale.grad) != 0.0
    assert model.image_proj.weight.grad.abs().sum() > 0 and model.text_proj.weight.grad.abs().sum() > 0
    with torch.no_grad():
        model.log_scale.fill_(10.0)
    model.clamp_scale()
    assert float(model.logit_scale()) == pytest.approx(100.0)
    with torch.no_grad():
        model.log_scale.fill_(-3.0)
    model.clamp_scale()
    assert float(model.logit_scale()) == pytest.approx(1.0)


def test_a_tiny_contrastive_run_lowers_the_loss():
    torch.manual_seed(0)
    model = tiny_clip(pool="mean")
    # 8 distinct "images" (a bright square in a different place) paired with 8 distinct "captions"
    images = torch.zeros(8, 1, 28, 28)
    for i in range(8):
        images[i, 0, (i // 4) * 14:(i // 4) * 14 + 14, (i % 4) * 7:(i % 4) * 7 + 7] = 1.0
    ids = torch.tensor([[1 + i, 10 + i % 3, 20 + i // 3] for i in range(8)])
    mask = torch.ones_like(ids)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(60):
        loss = model(images, ids, mask)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        model.clamp_scale()
        losses.append(loss.item())
    assert losses[0] > math.log(8) and losses[-1] < 0.5 * losses[0]


def test_recall_at_k_against_hand_values():
    sim = torch.tensor([[0.9, 0.1, 0.0], [0.8, 0.7, 0.0], [0.1, 0.2, 0.3]])
    # query 0: right item ranked 1st; query 1: 2nd; query 2: 1st
    assert recall_at_k(sim, torch.eye(3, dtype=torch.bool), (1, 2, 3)) == {1: pytest.approx(2 / 3), 2: 1.0, 3: 1.0}
    result = retrieval(F.normalize(torch.eye(3), dim=-1), F.normalize(torch.eye(3), dim=-1))
    assert result.image_to_text == {1: 1.0, 5: 1.0, 10: 1.0}
    # identical texts count as right: image 1 retrieving text 0 (same words as its own) is a hit
    same = retrieval(torch.tensor([[1.0, 0.0], [1.0, 0.0]]), torch.tensor([[1.0, 0.0], [0.0, 1.0]]), ["a", "a"], (1,))
    strict = retrieval(torch.tensor([[1.0, 0.0], [1.0, 0.0]]), torch.tensor([[1.0, 0.0], [0.0, 1.0]]), None, (1,))
    assert same.image_to_text[1] == 1.0 and strict.image_to_text[1] == 0.5


def test_zero_shot_picks_the_nearest_class():
    classes = F.normalize(torch.eye(3, 4), dim=-1)
    images = F.normalize(torch.tensor([[0.1, 0.9, 0.0, 0.0], [0.0, 0.2, 0.7, 0.0]]), dim=-1)
    assert zero_shot_scores(images, classes).argmax(1).tolist() == [1, 2]


# ---- training, checkpoints, the command ---------------------------------------------------

TINY_FLAGS = ["--max-steps", "6", "--batch-size", "8", "--warmup-steps", "1", "--patch-size", "7", "--width", "16",
              "--depth", "1", "--heads", "2", "--text-width", "16", "--text-depth", "1", "--embed-dim", "8",
              "--vocab-size", "120", "--retrieval-size", "10", "--threads", "1"]


def test_cli_trains_evaluates_and_classifies(tiny_dataset, tmp_path, capsys):
    from PIL import Image

    out = tmp_path / "clip"
    assert main(["vlm", "train", "clip", "--quiet", "--json", "--data-dir", str(tiny_dataset), "--out", str(out),
                 *TINY_FLAGS]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["kind"] == "clip" and report["steps"] == 6 and report["test_images"] == 20
    assert 0.0 <= report["zero_shot_accuracy"] <= 1.0 and set(report["retrieval"]["image_to_text"]) == {"1", "5", "10"}
    assert {p.name for p in out.iterdir()} >= {"config.json", "model.safetensors", "tokenizer.json", "metrics.json",
                                              "train.jsonl", "confusion.png"}
    assert json.loads((out / "config.json").read_text())["prompt_templates"] == list(fm.PROMPT_TEMPLATES)
    assert not list(tmp_path.glob(".clip*"))  # nothing half-written left beside it

    assert main(["vlm", "eval", str(out), "--data-dir", str(tiny_dataset), "--retrieval-size", "10",
                 "--out", str(tmp_path / "eval")]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    assert evaluated["zero_shot_accuracy"] == pytest.approx(report["zero_shot_accuracy"])
    written = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert written["recall_curve"]["k"][:3] == [1, 2, 3]
    assert written["recall_curve"]["image_to_text"][9] == pytest.approx(evaluated["retrieval"]["image_to_text"]["10"])
    assert (tmp_path / "eval" / "recall.png").stat().st_size > 0 and (out / "recall.png").is_file()

    # a photo-like file (dark garment on a light background) is inverted to Fashion-MNIST's look
    picture = np.full((56, 56), 255, dtype=np.uint8)
    picture[10:40, 10:40] = 0
    Image.fromarray(picture).save(tmp_path / "item.png")
    assert main(["vlm", "classify", str(out), str(tmp_path / "item.png"), "test:3", "--json", "--top", "2",
                 "--data-dir", str(tiny_dataset)]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["image"] for r in lines] == [str(tmp_path / "item.png"), "test:3"]
    assert all(len(r["top"]) == 2 and r["label"] in fm.CLASS_NAMES for r in lines)
    assert sum(t["probability"] for t in lines[0]["top"]) <= 1.0 + 1e-6


def test_trained_classifier_checkpoint_round_trips(tiny_dataset, tmp_path, capsys):
    from lmforge.vlm.config import VisionTrainConfig
    from lmforge.vlm.train import load_checkpoint, predict_classes, train

    report = train(VisionTrainConfig(kind="cnn", out=str(tmp_path / "cnn"), data_dir=str(tiny_dataset), max_steps=4,
                                     batch_size=8, warmup_steps=1, threads=1), progress=False)
    assert report["kind"] == "cnn" and 0.0 <= report["accuracy"] <= 1.0
    ckpt = load_checkpoint(tmp_path / "cnn")
    images = fm.to_tensor(fm.load_split("test", str(tiny_dataset))[0])
    predictions = predict_classes(ckpt.model, images).numpy()
    assert float((predictions == np.arange(20) % 10).mean()) == pytest.approx(report["accuracy"])


def test_user_errors_end_in_one_message(tiny_dataset, tmp_path, capsys):
    assert main(["vlm", "eval", str(tmp_path / "nothing")]) == 1
    assert "not a vision checkpoint" in capsys.readouterr().err
    assert main(["vlm", "train", "vit", "--patch-size", "5", "--data-dir", str(tiny_dataset)]) == 1
    assert "does not divide" in capsys.readouterr().err
    assert main(["vlm", "train", "cnn", "--data-dir", str(tmp_path / "none"), "--out", str(tmp_path / "x")]) == 1
    assert "install-fashion-mnist.sh" in capsys.readouterr().err


# ---- connectors -----------------------------------------------------------------------------

def test_connectors_shapes_gates_and_masks():
    from lmforge.vlm.connectors import CrossAttention, GatedCrossAttention, MLPProjector, QueryResampler

    torch.manual_seed(0)
    patches = torch.randn(2, 17, 32)  # a ViT's class token + 16 patches
    text = torch.randn(2, 5, 48)
    assert MLPProjector(32, 48)(patches).shape == (2, 17, 48)

    gated = GatedCrossAttention(48, 32, heads=4)
    torch.testing.assert_close(gated(text, patches), text)  # closed gates: the language model is unchanged
    gated(text, patches).sum().backward()
    assert float(gated.attn_gate.grad) != 0.0  # ... and training can open them
    with torch.no_grad():
        gated.attn_gate.fill_(1.0)
    assert not torch.allclose(gated(text, patches), text)

    # a masked-out context position has no influence
    attn = CrossAttention(48, 32, heads=4)
    mask = torch.ones(2, 17, dtype=torch.long)
    mask[:, -1] = 0
    changed = patches.clone()
    changed[:, -1] += 5.0
    torch.testing.assert_close(attn(text, patches, mask), attn(text, changed, mask))
    assert not torch.allclose(attn(text, patches), attn(text, changed))

    # a resampler gives the same number of visual tokens for any number of patches
    resampler = QueryResampler(48, 32, heads=4, queries=6)
    assert resampler(patches).shape == (2, 6, 48)
    assert resampler(torch.randn(2, 50, 32)).shape == (2, 6, 48)


def test_read_image_inverts_photos_and_reads_split_images(tiny_dataset, tmp_path):
    from PIL import Image

    from lmforge.vlm.train import read_image

    picture = np.full((56, 56), 250, dtype=np.uint8)
    picture[14:42, 14:42] = 10  # a dark object on a light background, as photos are
    Image.fromarray(picture).save(tmp_path / "photo.png")
    x = read_image(str(tmp_path / "photo.png"))
    assert x.shape == (1, 28, 28)
    assert float(x[0, 14, 14]) > 0.9 and float(x[0, 0, 0]) < 0.1  # now light on black, like Fashion-MNIST
    assert float(read_image(str(tmp_path / "photo.png"), invert="no")[0, 14, 14]) < 0.1
    images, _ = fm.load_split("test", str(tiny_dataset))
    torch.testing.assert_close(read_image("test:4", str(tiny_dataset)), fm.to_tensor(images[4:5])[0])
    with pytest.raises(LmforgeError, match="test:N"):
        read_image("test:99", str(tiny_dataset))
    (tmp_path / "notes.png").write_text("not an image")
    with pytest.raises(LmforgeError, match="not an image"):
        read_image(str(tmp_path / "notes.png"))


@pytest.mark.slow
@needs_data
def test_training_bins_split_the_training_images_in_thirds():
    images, labels = fm.load_split("train")
    bins = fm.training_bins()
    brightness, size = bins.assign(images, labels)
    assert all(abs(n - 20000) < 200 for n in np.bincount(brightness, minlength=3))
    for c in range(10):
        # areas are whole pixel counts, so ties at the cut points move a few dozen images
        assert all(abs(n - 2000) < 100 for n in np.bincount(size[labels == c], minlength=3))
