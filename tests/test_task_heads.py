"""Task heads: sequence and token classifiers on both families equal transformers' classes
(both ways through a saved directory, tiny random configs), losses and class weights by hand."""

from __future__ import annotations

import math

import pytest
import torch

from lmforge.errors import LmforgeError
from lmforge.tune.heads import (ClassifierModel, backbone_of, balanced_class_weights, classification_loss,
                                classifier_from_model, hf_head_architecture, language_model_of, load_classifier,
                                save_classifier)

VOCAB = 120
PAD = 0


def _perturb(model, scale=0.05):
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * scale)
    return model.eval()


def _hf_config(family: str, labels: list[str]):
    import transformers as T

    extra = dict(num_labels=len(labels), id2label=dict(enumerate(labels)), label2id={n: i for i, n in enumerate(labels)},
                 pad_token_id=PAD)
    if family == "bert":
        return T.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                            intermediate_size=48, max_position_embeddings=64, **extra)
    return T.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, **extra)


def _rows(seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([7, 3, 11, 5])
    ids = torch.full((4, 11), PAD)
    for i, n in enumerate(lengths.tolist()):
        ids[i, :n] = torch.randint(3, VOCAB, (n,), generator=gen)
    mask = (torch.arange(11) < lengths[:, None]).long()
    return ids, mask


@pytest.mark.parametrize("family", ["bert", "llama"])
@pytest.mark.parametrize("task", ["sequence", "token"])
def test_heads_match_transformers_both_ways(tmp_path, family, task):
    import transformers as T

    labels = ["O", "B-X", "I-X"] if task == "token" else ["negative", "neutral", "positive"]
    auto = T.AutoModelForSequenceClassification if task == "sequence" else T.AutoModelForTokenClassification
    torch.manual_seed(3)
    hf = _perturb(auto.from_config(_hf_config(family, labels)))
    hf.save_pretrained(tmp_path / "hf")
    ours = load_classifier(tmp_path / "hf")
    assert (ours.task, ours.labels) == (task, labels)
    assert ours.pooling == ("cls" if family == "bert" else "last") or task == "token"
    ids, mask = _rows()
    with torch.no_grad():
        theirs = hf(input_ids=ids, attention_mask=mask).logits
        mine = ours(ids, mask)
    assert mine.shape == theirs.shape
    real = mask.bool() if task == "token" else slice(None)  # padded positions mean nothing
    assert torch.allclose(mine[real], theirs[real], atol=1e-5), (mine - theirs).abs().max()
    # lmforge's save loads into transformers as the class of this family and head, same logits.
    with torch.no_grad():
        ours.score.weight.add_(0.3)  # make sure the saved head is the live one
        mine = ours(ids, mask)
    save_classifier(ours, tmp_path / "ours")
    again = auto.from_pretrained(tmp_path / "ours").eval()
    assert type(again).__name__ == hf_head_architecture(ours.config, task)
    assert again.config.id2label == dict(enumerate(labels))
    with torch.no_grad():
        back = again(input_ids=ids, attention_mask=mask).logits
    assert torch.allclose(mine[real], back[real], atol=1e-5)


def test_decoder_sequence_head_reads_the_last_real_token():
    from lmforge.model.config import ModelConfig
    from lmforge.model.transformer import Transformer

    torch.manual_seed(0)
    lm = Transformer(ModelConfig(vocab_size=VOCAB, n_embd=32, n_head=4, n_kv_head=2, n_layer=2, intermediate_size=48))
    model = classifier_from_model(lm, ["a", "b"], pad_token_id=PAD).eval()
    assert not model.config.lm_head and lm.config.lm_head  # the language model itself is untouched
    ids, mask = _rows()
    with torch.no_grad():
        out = model(ids, mask)
        changed = ids.clone()
        changed[1, 5] = 7  # a pad position of row 1 (3 real tokens): nothing changes
        assert torch.allclose(model(changed, mask), out)
        changed[1, 2] = (changed[1, 2] + 1) % VOCAB  # its last real token: row 1 changes, only it
        moved = model(changed, mask)
    assert not torch.allclose(moved[1], out[1]) and torch.allclose(moved[[0, 2, 3]], out[[0, 2, 3]])
    # The body under the old vocabulary head is the language model again.
    again = language_model_of(model, lm)
    with torch.no_grad():
        assert torch.allclose(again(ids), lm(ids), atol=1e-6)


def test_mean_pooling_is_marked_for_transformers(tmp_path):
    from lmforge.model.config import ModelConfig
    from lmforge.model.transformer import Transformer

    torch.manual_seed(0)
    lm = Transformer(ModelConfig(vocab_size=VOCAB, n_embd=32, n_head=4, n_kv_head=2, n_layer=2, intermediate_size=48))
    model = classifier_from_model(lm, ["a", "b"], pooling="mean").eval()
    ids, mask = _rows()
    hidden = model.backbone.encode(ids, mask)
    expected = model.score(torch.stack([hidden[i, :int(mask[i].sum())].mean(0) for i in range(4)]))
    with torch.no_grad():
        assert torch.allclose(model(ids, mask), expected, atol=1e-6)
    save_classifier(model, tmp_path / "m")
    again = load_classifier(tmp_path / "m")
    assert again.pooling == "mean"
    with torch.no_grad():
        assert torch.allclose(again(ids, mask), model(ids, mask), atol=1e-6)


def test_classification_loss_values():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    targets = torch.tensor([0, 0, -100])
    p = torch.softmax(logits, -1)
    ce = [-math.log(p[0, 0]), -math.log(p[1, 0])]
    assert classification_loss(logits, targets).item() == pytest.approx(sum(ce), rel=1e-6)
    assert classification_loss(logits, targets, reduction="mean").item() == pytest.approx(sum(ce) / 2, rel=1e-6)
    # Class weights scale each target's term; focal loss multiplies by (1 - p_t)^gamma.
    w = torch.tensor([3.0, 1.0])
    assert classification_loss(logits, targets, w).item() == pytest.approx(3 * sum(ce), rel=1e-6)
    focal = sum((1 - float(p[i, 0])) ** 2 * c for i, c in enumerate(ce))
    assert classification_loss(logits, targets, focal_gamma=2.0).item() == pytest.approx(focal, rel=1e-6)
    # It equals torch's cross-entropy (sum) with gamma 0 and no weights.
    ref = torch.nn.functional.cross_entropy(logits, targets, ignore_index=-100, reduction="sum")
    assert classification_loss(logits, targets).item() == pytest.approx(ref.item(), rel=1e-6)
    assert balanced_class_weights([30, 10, 0]) == pytest.approx([40 / 90, 40 / 30, 0.0])


def test_bad_heads_are_refused(tmp_path):
    from lmforge.model.checkpoint import save_hf_model
    from lmforge.model.config import ModelConfig
    from lmforge.model.transformer import Transformer

    lm = Transformer(ModelConfig(vocab_size=VOCAB, n_embd=32, n_head=4, n_kv_head=2, n_layer=2, intermediate_size=48))
    with pytest.raises(LmforgeError, match="pool with 'last'"):
        ClassifierModel(backbone_of(lm), ["a", "b"], pooling="cls")
    with pytest.raises(LmforgeError, match="unknown head task"):
        ClassifierModel(backbone_of(lm), ["a"], task="span")
    with pytest.raises(LmforgeError, match="each named once"):
        ClassifierModel(backbone_of(lm), ["a", "a"])
    save_hf_model(lm, tmp_path / "lm")
    with pytest.raises(LmforgeError, match="not a classifier"):
        load_classifier(tmp_path / "lm")
