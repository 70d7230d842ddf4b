"""The intent router: a saved classifier scoring texts, and its calibrated confidence floor."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lmforge.assistant.router import IntentRouter, calibrate
from lmforge.errors import LmforgeError


def test_calibrate_picks_the_lowest_floor_within_the_error_budget():
    # top confidences 0.9 (right), 0.8 (right), 0.7 (wrong), 0.6 (right), 0.5 (wrong)
    probs = np.array([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.6, 0.4], [0.5, 0.5]])
    truth = [0, 0, 0, 0, 1]
    strict = calibrate(probs, truth, max_error=0.0)
    assert strict["threshold"] == 0.8 and strict["coverage"] == 0.4 and strict["accepted_accuracy"] == 1.0
    loose = calibrate(probs, truth, max_error=0.25)  # 0.9, 0.8, 0.7(wrong), 0.6: 1 error in 4
    assert loose["threshold"] == 0.6 and loose["coverage"] == 0.8 and loose["accuracy"] == 0.6
    assert calibrate(probs, truth, max_error=0.5)["threshold"] == 0.0  # everything accepted
    nothing = calibrate(np.array([[0.4, 0.6]]), [0], max_error=0.0)
    assert nothing["coverage"] == 0.0 and nothing["threshold"] > 0.6


@pytest.fixture(scope="module")
def tiny_router_dir(tmp_path_factory):
    from lmforge.model.config import ModelConfig
    from lmforge.model.loading import resolve_tokenizer
    from lmforge.model.transformer import Transformer
    from lmforge.tune.heads import classifier_from_model, save_classifier

    tokenizer = resolve_tokenizer(None)
    torch.manual_seed(0)
    lm = Transformer(ModelConfig(vocab_size=tokenizer.vocab_size, n_embd=32, n_head=4, n_kv_head=2, n_layer=2,
                                 intermediate_size=48))
    model = classifier_from_model(lm, ["faq", "order_status", "abuse"]).eval()
    run = tmp_path_factory.mktemp("router")
    save_classifier(model, run / "model", tokenizer)
    return run, model, tokenizer


def test_the_saved_classifier_scores_texts_like_the_model(tiny_router_dir):
    from lmforge.tune.classify import SequenceClassifier, encode_text

    run, model, tokenizer = tiny_router_dir
    clf = SequenceClassifier(run / "model")
    texts = ["where is my order A10042?", "you useless bot", "Do gift cards expire?"]
    probs = clf.probabilities(texts, batch_size=2)
    for text, row in zip(texts, probs):
        ids = torch.tensor([encode_text(tokenizer, text, 64)])
        with torch.no_grad():
            expected = torch.softmax(model(ids, torch.ones_like(ids)), -1)[0].numpy()
        np.testing.assert_allclose(row, expected, atol=1e-5)


def test_router_routes_with_its_floor_and_saves_it(tiny_router_dir):
    run, _, _ = tiny_router_dir
    router = IntentRouter.load(run)
    records = [{"text": t, "label": lab} for t, lab in [("hi", "faq"), ("order A10001", "order_status"),
                                                       ("idiot", "abuse"), ("returns?", "faq")]]
    result = router.calibrate(records, max_error=0.0)
    assert 0.0 <= result["coverage"] <= 1.0 and router.threshold == result["threshold"]
    router.save_settings(run)
    again = IntentRouter.load(run)
    assert again.threshold == router.threshold
    route = again.route("where is my order?")
    assert route.intent in ("faq", "order_status", "abuse") and route.confident == (route.confidence >= again.threshold)
    assert sum(route.scores.values()) == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(LmforgeError, match="not the router's labels"):
        router.calibrate([{"text": "x", "label": "weather"}])
    with pytest.raises(LmforgeError, match="no trained router"):
        IntentRouter.load(run / "nowhere")
