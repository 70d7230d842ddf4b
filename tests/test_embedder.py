"""The Embedder against sentence-transformers on the real all-MiniLM-L6-v2."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

import lmforge
from lmforge.errors import LmforgeError
from lmforge.model.checkpoint import load_hf_model
from lmforge.model.transformer import Attention, Packing
from lmforge.rag.embedder import Embedder, load_embedder, pool

# Sentences written for this test (none of them from a corpus the code was tuned on), of
# very different lengths, including one far longer than the model's 256 positions.
HELD_OUT = [
    "The ferry to the island leaves every morning at seven.",
    "Boats cross to the island daily, early in the morning.",
    "My grandmother grows tomatoes and basil on her balcony.",
    "Quarterly revenue fell by four percent despite strong sales in Asia.",
    "Ok.",
    "",
    "A long, winding report about the history of the harbour, the families who fished there, "
    "the storms that closed it, and the slow return of trade after the new breakwater was built. " * 12,
    "Der Zug nach München hat zwanzig Minuten Verspätung.",
    "機器學習模型需要大量的資料。",
    "Refund requests must be filed within 30 days (see §4.2) — no exceptions!!!",
    "e = mc^2; x_{t+1} = x_t - lr * grad",
    "😀 emoji-only reply 👍",
]


@pytest.fixture(scope="module")
def embedder(minilm_dir) -> Embedder:
    return load_embedder()


@pytest.fixture(scope="module")
def reference(minilm_dir):
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(minilm_dir), device="cpu")


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def test_defaults_come_from_the_sentence_transformers_directory(embedder):
    assert embedder.name == "all-minilm-l6-v2" and embedder.model_id.startswith("all-minilm-l6-v2@")
    assert embedder.dim == 384 and embedder.max_seq_length == 256 and embedder.max_tokens == 254
    assert embedder.layout.pooling == ("mean",) and embedder.normalize
    assert embedder.model.config.family == "bert"


def test_vectors_match_sentence_transformers(embedder, reference):
    ours = embedder.encode(HELD_OUT, batch_size=4)
    theirs = reference.encode(HELD_OUT, batch_size=4)
    assert ours.shape == (len(HELD_OUT), 384) and ours.dtype == np.float32
    assert cosines(ours, theirs).min() >= 0.99999
    assert np.abs(np.linalg.norm(ours, axis=1) - 1).max() < 1e-5


def test_rankings_match_sentence_transformers(embedder, reference):
    queries = ["When does the boat to the island depart?", "How did the company do financially?",
               "What does she plant at home?"]
    ours = embedder.encode(queries) @ embedder.encode(HELD_OUT).T
    theirs = reference.encode(queries) @ reference.encode(HELD_OUT).T
    assert (np.argsort(-ours, axis=1) == np.argsort(-theirs, axis=1)).all()
    # The answers are the right sentences: either ferry sentence, the revenue, the balcony.
    assert ours.argmax(1)[0] in (0, 1) and list(ours.argmax(1)[1:]) == [3, 2]
    assert min(ours[0, 0], ours[0, 1]) > 0.5 > 0.2 > ours[0, 2]  # paraphrases close, unrelated far


def test_length_sorted_batches_keep_input_order_and_batch_size_does_not_matter(embedder):
    one_by_one = np.stack([embedder.encode([t])[0] for t in HELD_OUT])
    together = embedder.encode(HELD_OUT, batch_size=32)
    assert np.abs(one_by_one - together).max() < 1e-5


def test_long_text_is_cut_at_max_tokens(embedder):
    words = " ".join(f"word{i}" for i in range(400))
    assert embedder.count_tokens(words) > embedder.max_tokens
    kept = embedder.tokenizer.decode(embedder.tokenize([words])[0][1:-1])
    assert len(embedder.tokenize([words])[0]) == 256
    assert np.abs(embedder.encode([words]) - embedder.encode([kept])).max() < 1e-5
    assert embedder.count_tokens("hello world") == 2  # the text's own tokens, no [CLS]/[SEP]


def test_token_id_inputs_equal_text_inputs(embedder):
    ids = [embedder.tokenizer.encode(t, add_special_tokens=False) for t in HELD_OUT[:4]]
    assert np.abs(embedder.encode_ids(ids) - embedder.encode(HELD_OUT[:4])).max() < 1e-6
    with pytest.raises(LmforgeError, match="outside the vocabulary"):
        embedder.encode_ids([[5, 10**6]])
    with pytest.raises(LmforgeError, match="at most 256"):
        embedder.encode_ids([[1000] * 255])


def test_inputs_and_progress(embedder):
    assert embedder.encode([]).shape == (0, 384)
    assert embedder.encode("a single string").shape == (1, 384)
    raw = embedder.encode(HELD_OUT[:3], normalize=False)
    assert np.abs(np.linalg.norm(raw, axis=1) - 1).max() > 0.1  # mean pooling alone is not unit length
    seen = []
    embedder.encode(HELD_OUT, batch_size=5, progress=lambda done, total: seen.append((done, total)))
    assert seen == [(5, 12), (10, 12), (12, 12)]
    with pytest.raises(LmforgeError, match="text 1 is a int"):
        embedder.encode(["fine", 3])
    with pytest.raises(LmforgeError, match="batch_size"):
        embedder.encode(["x"], batch_size=0)


def test_packed_encoder_equals_padded_encoder(minilm_dir):
    """`encode_packed` (runs of equal lengths, or one padded view) equals `encode` on a padded batch."""
    model = load_hf_model(minilm_dir)
    lengths = [30, 30, 29, 12, 12, 12, 5, 2]
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 20000, (len(lengths), max(lengths)), generator=g)
    mask = (torch.arange(max(lengths)) < torch.tensor(lengths)[:, None]).long()
    packed = ids[mask.bool()]
    with torch.inference_mode():
        expected = model.encode(ids, mask)[mask.bool()]
        by_runs = model.encode_packed(packed, lengths)
        saved = Attention.max_attention_runs
        Attention.max_attention_runs = 0  # force the single padded view
        try:
            padded = model.encode_packed(packed, lengths)
        finally:
            Attention.max_attention_runs = saved
    assert Packing.from_lengths(lengths).runs == [(0, 2, 30), (60, 1, 29), (89, 3, 12), (125, 1, 5), (130, 1, 2)]
    assert (by_runs - expected).abs().max() < 1e-5 and (padded - expected).abs().max() < 1e-5


def test_pooling_modes_match_sentence_transformers(minilm_dir, tmp_path):
    """cls, max and concatenated pooling, and a directory without Normalize."""
    from sentence_transformers import SentenceTransformer

    directory = tmp_path / "variant"
    shutil.copytree(minilm_dir, directory, ignore=shutil.ignore_patterns("model.safetensors"))
    (directory / "model.safetensors").symlink_to(minilm_dir / "model.safetensors")
    modules = json.loads((directory / "modules.json").read_text())
    (directory / "modules.json").write_text(json.dumps([m for m in modules if not m["type"].endswith("Normalize")]))
    texts = HELD_OUT[:5]
    for flags in ({"pooling_mode_cls_token": True}, {"pooling_mode_max_tokens": True},
                  {"pooling_mode_mean_tokens": True, "pooling_mode_cls_token": True}):
        config = {"word_embedding_dimension": 384, **flags}
        (directory / "1_Pooling" / "config.json").write_text(json.dumps(config))
        ours = load_embedder(str(directory))
        theirs = SentenceTransformer(str(directory), device="cpu").encode(texts)
        assert ours.dim == theirs.shape[1] and not ours.normalize
        got = ours.encode(texts)
        assert np.abs(got - theirs).max() < 1e-4 and cosines(got, theirs).min() >= 0.99999


def test_pool_by_hand():
    hidden = torch.tensor([[1.0, 0.0], [3.0, 4.0], [5.0, -2.0]])  # sequences [0:2] and [2:3]
    assert pool(hidden, [2, 1], ("mean",)).tolist() == [[2.0, 2.0], [5.0, -2.0]]
    assert pool(hidden, [2, 1], ("cls",)).tolist() == [[1.0, 0.0], [5.0, -2.0]]
    assert pool(hidden, [2, 1], ("max",)).tolist() == [[3.0, 4.0], [5.0, -2.0]]
    assert pool(hidden, [2, 1], ("mean_sqrt_len",))[0].tolist() == pytest.approx([4 / 2**0.5, 4 / 2**0.5])


def test_model_id_identifies_the_model(minilm_dir, tmp_path, embedder):
    assert load_embedder().model_id == embedder.model_id
    directory = tmp_path / "changed"
    shutil.copytree(minilm_dir, directory)
    assert load_embedder(str(directory)).model_id.split("@")[1] == embedder.model_id.split("@")[1]
    weights = directory / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-4:] = bytes(4)  # one weight of the last tensor changed
    weights.write_bytes(bytes(data))
    assert load_embedder(str(directory)).model_id != load_embedder(str(minilm_dir)).model_id


def test_bad_directories_and_models_are_clear_errors(minilm_dir, tmp_path):
    with pytest.raises(LmforgeError, match="embeddings need an encoder model directory"):
        load_embedder("smollm2-135m-instruct")
    with pytest.raises(LmforgeError, match="unknown model"):
        load_embedder("no-such-embedder")
    directory = tmp_path / "dense"
    shutil.copytree(minilm_dir, directory, ignore=shutil.ignore_patterns("model.safetensors"))
    (directory / "model.safetensors").symlink_to(minilm_dir / "model.safetensors")
    modules = json.loads((directory / "modules.json").read_text())
    modules.append({"idx": 3, "name": "3", "path": "3_Dense", "type": "sentence_transformers.models.Dense"})
    (directory / "modules.json").write_text(json.dumps(modules))
    with pytest.raises(LmforgeError, match="unsupported sentence-transformers module.*Dense"):
        load_embedder(str(directory))
    (directory / "modules.json").write_text("[not json")
    with pytest.raises(LmforgeError, match="not valid JSON"):
        load_embedder(str(directory))


def test_public_api(embedder):
    assert lmforge.load_embedder is not None and "load_embedder" in lmforge.__all__
    assert np.abs(lmforge.load_embedder().encode(["hi"]) - embedder.encode(["hi"])).max() == 0
