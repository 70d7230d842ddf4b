"""Captioning and VQA: generated scenes, prefix embeddings, decoding, metrics and the commands."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from lmforge.errors import LmforgeError
from lmforge.model.config import ModelConfig
from lmforge.model.kv_cache import KVCache
from lmforge.model.transformer import Transformer
from lmforge.vlm import scenes as sc


pytestmark = pytest.mark.usefixtures("one_thread")


# ---- scenes ------------------------------------------------------------------------------

def test_scenes_are_deterministic_and_splits_differ():
    a, b = sc.make_scene("test", 7), sc.make_scene("test", 7)
    assert a == b
    assert np.array_equal(sc.render(a), sc.render(b))
    assert sc.split_questions("test", 7) == sc.split_questions("test", 7)
    train = [sc.make_scene("train", i) for i in range(50)]
    test = [sc.make_scene("test", i) for i in range(50)]
    assert sum(s == t for s, t in zip(train, test)) == 0
    assert len({s.objects for s in train}) == 50


def test_scene_layout_rules_and_rendered_colours():
    for i in range(200):
        scene = sc.make_scene("train", i)
        objs = scene.objects
        assert 1 <= len(objs) <= sc.MAX_OBJECTS
        xs = [o.x for o in objs]
        assert xs == sorted(xs) and all(b - a > 12 for a, b in zip(xs, xs[1:]))  # distinct columns
        assert len({(o.colour, o.shape) for o in objs}) == len(objs)
        image = sc.render(scene)
        for o in objs:  # the centre pixel has the object's colour
            assert tuple(image[int(round(o.y)), int(round(o.x))]) == sc.COLOURS[o.colour]
        assert tuple(image[0, 0]) == (scene.background,) * 3 or any(o.y < 12 for o in objs)


def _check_answer(scene: sc.Scene, q: sc.Question) -> None:
    """Recompute the answer from the scene with independent, literal code."""
    objs = scene.objects
    words = q.text.replace(" ?", "").split()
    number = {n: i for i, n in enumerate(sc.NUMBERS)}
    if q.type == "count":
        assert number[q.answer] == len(objs)
    elif q.type == "count_colour":
        assert number[q.answer] == sum(o.colour == words[2] for o in objs)
    elif q.type == "count_shape":
        assert number[q.answer] == sum(o.shape + "s" == words[2] for o in objs)
    elif q.type == "exist":
        assert q.answer == ("yes" if any(o.colour == words[3] and o.shape == words[4] for o in objs) else "no")
    elif q.type == "shape":
        (match,) = [o for o in objs if o.colour == words[4]]
        assert q.answer == match.shape
    elif q.type in ("colour", "size", "relation_colour", "relation_yesno"):
        def resolve(name_words):
            found = [o for o in objs if all(w in (o.colour, o.shape, o.size) for w in name_words)]
            assert len(found) == 1, (q, scene)
            return found[0]

        if q.type == "colour":
            assert q.answer == resolve(words[4:]).colour
        elif q.type == "size":
            assert q.answer == resolve(words[4:]).size
        elif q.type == "relation_colour":
            side, ref = words[6], resolve(words[9:])
            others = [o for o in objs if (o.x < ref.x if side == "left" else o.x > ref.x)]
            nearest = min(others, key=lambda o: abs(o.x - ref.x))
            assert q.answer == nearest.colour
        else:
            i = words.index("of")
            side = words[i - 1]
            a, b = resolve(words[2:i - 1]), resolve(words[i + 2:])
            assert q.answer == ("yes" if (a.x < b.x) == (side == "left") else "no")
    else:
        raise AssertionError(q.type)


def test_every_answer_is_true_of_its_scene_and_yes_no_are_balanced():
    seen, yes = set(), {"exist": [0, 0], "relation_yesno": [0, 0]}
    for i in range(400):
        scene = sc.make_scene("train", i)
        for q in sc.questions(scene, sc.scene_rng("train", i, 1), len(sc.QUESTION_TYPES)):
            _check_answer(scene, q)
            seen.add(q.type)
            if q.type in yes:
                yes[q.type][q.answer == "yes"] += 1
    assert seen == set(sc.QUESTION_TYPES)
    for no_count, yes_count in yes.values():
        assert 0.4 < yes_count / (yes_count + no_count) < 0.6


def test_captions_name_every_object():
    scene = sc.Scene((sc.SceneObject("circle", "red", "small", 8, 30), sc.SceneObject("square", "blue", "large", 40, 20)),
                     240)
    refs = sc.captions(scene)
    assert refs == [
        "a small red circle and a large blue square",
        "there are two shapes : a red circle and a blue square",
        "from right to left : a large blue square and a small red circle",
        "one circle and one square : red circle and blue square",
        "a red circle left of a blue square",
    ]


# ---- the model core: prefix embeddings ---------------------------------------------------

def test_inputs_embeds_forward_equals_token_forward():
    torch.manual_seed(0)
    lm = Transformer(ModelConfig(vocab_size=50, n_layer=2, n_embd=32, n_head=4, intermediate_size=64)).eval()
    ids = torch.randint(0, 50, (3, 9))
    with torch.no_grad():
        expected = lm(ids)
        assert torch.equal(lm(None, inputs_embeds=lm.embed(ids)), expected)
        assert torch.equal(lm.hidden_states(None, inputs_embeds=lm.embed(ids)), lm.hidden_states(ids))
        # a cached prefill from embeddings, then token steps, matches the full forward
        cache = KVCache.for_model(lm.config, 3, 16, torch.float32, "cpu")
        first = lm(None, cache=cache, start=0, inputs_embeds=lm.embed(ids[:, :6]))
        torch.testing.assert_close(first, expected[:, :6], rtol=1e-5, atol=1e-5)
        for t in range(6, 9):
            step = lm(ids[:, t:t + 1], cache=cache, start=t)
            torch.testing.assert_close(step[:, 0], expected[:, t], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="exactly one"):
        lm(ids, inputs_embeds=lm.embed(ids))


# ---- the captioner -----------------------------------------------------------------------

def _tiny_model(task: str = "caption", connector: str = "mlp"):
    from lmforge.vlm.captioner import build_model, model_meta, special_ids, train_scene_tokenizer
    from lmforge.vlm.config import CaptionTrainConfig

    tokenizer = train_scene_tokenizer(200)
    ids = special_ids(tokenizer)
    config = CaptionTrainConfig(task=task, out="unused", vit_width=32, vit_depth=1, lm_width=32, lm_layers=1,
                                lm_heads=2, connector=connector, queries=4)
    meta = model_meta(config, tokenizer.vocab_size, ids)
    torch.manual_seed(0)
    return build_model(meta), tokenizer, ids, meta


@pytest.mark.parametrize("connector", ["mlp", "resampler"])
def test_greedy_decoding_through_the_beam_search_equals_an_argmax_loop(connector):
    from lmforge.vlm.captioner import generate, prompt_ids, to_tensor

    model, tokenizer, ids, _ = _tiny_model("vqa", connector)
    model.eval()
    scenes = [sc.make_scene("test", i) for i in range(3)]
    images = to_tensor(sc.render_batch(scenes))
    prompts = [prompt_ids(tokenizer, ids, q) for q in ("how many shapes are there ?", "is there a red circle ?",
                                                       "how many shapes are there ?")]
    got = generate(model, images, prompts, ids["eos"], num_beams=1, max_new_tokens=6)
    for i, prompt in enumerate(prompts):
        seq = list(prompt)
        out = []
        with torch.no_grad():
            for _ in range(6):
                logits = model(images[i:i + 1], torch.tensor([seq]))
                token = int(logits[0, -1].argmax())
                if token == ids["eos"]:
                    break
                out.append(token)
                seq.append(token)
        assert got[i] == out
    beams = generate(model, images, prompts, ids["eos"], num_beams=3, max_new_tokens=6)
    assert len(beams) == 3 and all(len(b) <= 6 for b in beams)


@pytest.mark.slow  # trains until the tiny model overfits (~4 s)
def test_loss_counts_only_target_tokens_and_a_tiny_model_overfits():
    from lmforge.vlm.captioner import encode_pairs, to_tensor

    model, tokenizer, ids, _ = _tiny_model("caption")
    scenes = [sc.make_scene("train", i) for i in range(4)]
    images = to_tensor(sc.render_batch(scenes))
    texts = [sc.captions(s)[0] for s in scenes]
    token_ids, target = encode_pairs(tokenizer, ids, [None] * 4, texts)
    assert token_ids[0, 0] == ids["bos"] and not target[:, 0].any()
    assert int(target.sum()) == sum(len(tokenizer.encode(t, add_special_tokens=False)) + 1 for t in texts)
    # the loss is the cross-entropy of exactly those tokens, each predicted from the position before
    with torch.no_grad():
        logits = model(images, token_ids)[:, model.prefix_length - 1:-1]
        manual = torch.nn.functional.cross_entropy(logits[target], token_ids[target])
        torch.testing.assert_close(model.loss(images, token_ids, target), manual)
    # a tiny model learns to describe 16 images; the words right after "a" (size, colour and shape
    # of the leftmost object) cannot come from the text before them: they need the image
    scenes = [sc.make_scene("train", i) for i in range(16)]
    images = to_tensor(sc.render_batch(scenes))
    token_ids, target = encode_pairs(tokenizer, ids, [None] * 16, [sc.captions(s)[0] for s in scenes])
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = None
    for _ in range(200):
        loss = model.loss(images, token_ids, target)
        first = first if first is not None else loss.item()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.1 * first
    with torch.no_grad():
        p = model.prefix_length
        predicted = model(images, token_ids)[:, p + 1:p + 4].argmax(-1)
    assert float((predicted == token_ids[:, 2:5]).float().mean()) > 0.8


def test_train_save_load_and_the_commands(tmp_path, capsys):
    from lmforge.cli import main

    out = tmp_path / "vqa"
    common = ["--steps", "6", "--batch-size", "8", "--train-scenes", "20", "--val-scenes", "8", "--test-scenes", "4",
              "--vit-width", "32", "--vit-depth", "1", "--lm-width", "32", "--lm-layers", "1", "--lm-heads", "2",
              "--quiet", "--json"]
    assert main(["vlm", "train", "--task", "vqa", "--out", str(out), "--lr", "2e-3"] + common) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["task"] == "vqa" and report["n"] == 12 and 0 <= report["accuracy"] <= 1
    assert set(report["by_type"]) <= set(sc.QUESTION_TYPES)
    saved = json.loads((out / "config.json").read_text())
    assert saved["kind"] == "vlm" and saved["train_config"]["lr"] == 2e-3
    assert json.loads((out / "metrics.json").read_text())["task"] == "vqa"
    image = tmp_path / "scene.png"
    from PIL import Image

    Image.fromarray(sc.render(sc.make_scene("val", 3))).save(image)
    assert main(["vlm", "ask", str(image), "how many shapes are there?", "--model", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["question"] == "how many shapes are there?"
    assert main(["vlm", "eval", str(out), "--test-scenes", "2", "--questions", "2"]) == 0
    assert '"n": 4' in capsys.readouterr().out
    # stage two starts from the first run's weights and vocabulary (its shape flags win)
    second = tmp_path / "caption"
    assert main(["vlm", "train", "--task", "caption", "--init", str(out), "--out", str(second),
                 "--lm-width", "64"] + common) == 0
    capsys.readouterr()
    meta = json.loads((second / "config.json").read_text())
    assert meta["task"] == "caption" and meta["init"] == str(out) and meta["lm"] == saved["lm"]
    assert main(["vlm", "caption", "test:0", "val:2", "--model", str(second), "--num-beams", "2"]) == 0
    assert [line.split("\t")[0] for line in capsys.readouterr().out.splitlines()] == ["test:0", "val:2"]
    for args, message in (
        (["ask", "test:1", "is there a red circle?", "--model", str(tmp_path / "nothing")], "not a vision-language"),
        (["ask", str(tmp_path / "missing.png"), "what?", "--model", str(out)], "no such image"),
        (["caption", "test:1", "--model", str(out)], "use lmforge vlm ask"),
        (["train", "--task", "caption", "--epochs", "2"], "--epochs do(es) not apply"),
        (["train", "vit", "--vit-width", "8"], "only apply"),
        (["train"], "give a model kind"),
    ):
        assert main(["vlm"] + args) != 0
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, (args, err)


def test_read_images_accepts_scene_specs_and_files(tmp_path):
    from lmforge.vlm.captioner import read_images

    path = tmp_path / "a.jpg"
    from PIL import Image

    Image.fromarray(sc.render(sc.make_scene("test", 2), 128)).save(path)
    batch = read_images(["test:2", str(path)], 64)
    assert batch.shape == (2, 3, 64, 64) and 0 <= float(batch.min()) and float(batch.max()) <= 1
    assert float((batch[0] - batch[1]).abs().mean()) < 0.05  # the same scene, resized and compressed
    (tmp_path / "bad.png").write_bytes(b"not an image")
    with pytest.raises(LmforgeError, match="not an image"):
        read_images([str(tmp_path / "bad.png")], 64)
    with pytest.raises(LmforgeError, match="whole number"):
        read_images(["test:x"], 64)


# ---- metrics -----------------------------------------------------------------------------

def test_cider_d_on_hand_computed_examples():
    from lmforge.eval.metrics.cider import cider_d

    # two images, one reference each: df(a) = 2 -> idf 0; b, c, "a b", "a c": idf log 2
    refs = [["a b"], ["a c"]]
    # image 0: the candidate equals the reference: unigram and bigram cosines are 1, n = 3, 4 have no
    # n-grams: 10 * (1 + 1 + 0 + 0) / 4
    assert cider_d(["a b", "a c"], refs)["per_item"] == pytest.approx([5.0, 5.0])
    # "c c" against "a c" (unigrams only): the candidate vector is (c: 2 log 2), the reference's
    # (a: 0, c: log 2); clipped: min(2 log2, log2) * log2 / (2 log2 * log2) = 0.5 -> 10 * 0.5
    result = cider_d(["a b", "c c"], refs, n=1)
    assert result["per_item"] == pytest.approx([10.0, 5.0])
    assert result["score"] == pytest.approx(7.5)
    # the length penalty: "a b b b" against "a b" (n=1): vectors (b: 3 log2) and (b: log2); clipped
    # dot log2^2 / (3 log2 * log2) = 1/3, times exp(-(4 - 2)^2 / (2 * 36))
    assert cider_d(["a b b b", "a c"], refs, n=1)["per_item"][0] == pytest.approx(10 / 3 * math.exp(-4 / 72))
    with pytest.raises(LmforgeError):
        cider_d(["a"], [[]])


def test_meteor_light_and_vqa_normalization():
    from lmforge.vlm.caption_metrics import light_stem, meteor_light, normalize_answer, vqa_accuracy

    assert [light_stem(w) for w in ("circles", "boxes", "berries", "class", "drawing", "red")] == \
        ["circle", "box", "berry", "class", "draw", "red"]
    # "red circles" vs "a red circle": red (exact) and circles~circle (stem), m = 2, one chunk
    p, r = 1.0, 2 / 3
    expected = p * r / (0.9 * p + 0.1 * r) * (1 - 0.5 * (1 / 2) ** 3)
    assert meteor_light("red circles", ["a red circle", "nothing alike"]) == pytest.approx(expected)
    assert meteor_light("blue", ["a red circle"]) == 0.0
    assert normalize_answer("Two.") == "2" == normalize_answer("2")
    assert normalize_answer("The Red") == "red"
    acc = vqa_accuracy(["two", "Yes", "blue", "no"], ["2", "yes", "red", "no"], ["count", "exist", "colour", "exist"])
    assert acc["accuracy"] == 0.75 and acc["by_type"] == {"colour": 0.0, "count": 1.0, "exist": 1.0}


def test_object_mention_scores():
    scene = sc.Scene((sc.SceneObject("circle", "red", "small", 8, 30), sc.SceneObject("square", "blue", "large", 40, 20)),
                     240)
    assert sc.mentioned_objects("two squares : red square, blue squares") == {("red", "square"), ("blue", "square")}
    right = sc.object_mention_scores(sc.captions(scene), [scene] * 5)
    assert right == {"object_precision": 1.0, "object_recall": 1.0, "hallucination_rate": 0.0, "exact_object_set": 1.0}
    wrong = sc.object_mention_scores(["a red circle and a green triangle"], [scene])
    assert wrong["object_precision"] == 0.5 and wrong["object_recall"] == 0.5 and wrong["exact_object_set"] == 0.0


def test_pope_scores_on_a_hand_example():
    from lmforge.vlm.caption_metrics import pope_scores

    # said yes to 3 (2 right, 1 hallucinated), no to 2 (1 missed object)
    scores = pope_scores(["yes", "yes", "yes", "no", "no"], ["yes", "yes", "no", "yes", "no"])
    assert scores["precision"] == pytest.approx(2 / 3) and scores["recall"] == pytest.approx(2 / 3)
    assert scores["f1"] == pytest.approx(2 / 3) and scores["yes_ratio"] == 0.6 and scores["accuracy"] == 0.6


def test_caption_scores_rank_a_right_caption_above_a_wrong_one():
    from lmforge.vlm.caption_metrics import caption_scores

    scenes = [sc.make_scene("test", i) for i in range(20)]
    refs = [sc.captions(s) for s in scenes]
    right = caption_scores([r[0] for r in refs], [r[1:] for r in refs])
    shifted = caption_scores([refs[(i + 1) % 20][0] for i in range(20)], [r[1:] for r in refs])
    for key in ("cider_d", "bleu4", "meteor_light"):
        assert right[key] > shifted[key]
