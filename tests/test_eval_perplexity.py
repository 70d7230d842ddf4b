"""Sliding-window perplexity (E1): window plans, edge cases, scorers, parity with transformers."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lmforge.errors import LmforgeError
from lmforge.eval.perplexity import ModelScorer, perplexity, plan_windows, score_tokens
from lmforge.model.config import ModelConfig
from lmforge.model.transformer import Transformer

ROOT = Path(__file__).resolve().parents[1]


class ByteTokenizer:
    """Bytes as token ids; no special tokens."""

    bos_id = eos_id = None

    def encode(self, text, add_special_tokens=True):
        return list(text.encode("utf-8"))

    def decode(self, ids):
        return bytes(ids).decode("utf-8", "replace")


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=256, n_layer=2, n_embd=32, n_head=4, intermediate_size=64,
                                    max_position_embeddings=512)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)  # sharper predictions than the tiny init, so context matters
    return model


def direct_nll(model, inputs: list[int], targets: list[int]) -> float:
    with torch.no_grad():
        logits = model(torch.tensor([inputs]))[0]
    return F.cross_entropy(logits.double(), torch.tensor(targets), reduction="sum").item()


@pytest.mark.parametrize("n", [1, 2, 5, 64, 65, 66, 200])
@pytest.mark.parametrize("window,stride", [(64, 64), (64, 32), (64, 1), (1, 1), (10, 3)])
def test_plan_scores_every_target_once_within_the_window(n, window, stride):
    plans = plan_windows(n, window, stride)
    scored = [t for w in plans for t in range(w.end - w.new, w.end)]
    assert scored == list(range(1, n))
    for k, w in enumerate(plans):
        assert w.end - w.start <= window + 1  # the model reads at most `window` tokens
        assert 1 <= w.new <= w.end - w.start - 1
        if k:  # after the first slice every target has at least window - stride tokens before it
            assert (w.end - w.new) - w.start >= window - stride


def test_window_and_stride_are_validated():
    for window, stride in [(0, 1), (8, 0), (8, 9)]:
        with pytest.raises(LmforgeError):
            plan_windows(10, window, stride)


def test_text_shorter_than_window_is_one_full_forward(tiny):
    ids = torch.randint(0, 256, (40,), generator=torch.Generator().manual_seed(1)).tolist()
    nll, count, windows = score_tokens(ids, ModelScorer(tiny), window=128, stride=64)
    assert (count, windows) == (39, 1)
    assert nll == pytest.approx(direct_nll(tiny, ids[:-1], ids[1:]), rel=1e-6)


def test_stride_equal_to_window_scores_disjoint_chunks(tiny):
    ids = torch.randint(0, 256, (100,), generator=torch.Generator().manual_seed(2)).tolist()
    window = 32
    nll, count, windows = score_tokens(ids, ModelScorer(tiny), window=window, stride=window)
    expected = sum(direct_nll(tiny, ids[s : min(s + window, 99)], ids[s + 1 : s + window + 1]) for s in range(0, 99, window))
    assert (count, windows) == (99, 4)
    assert nll == pytest.approx(expected, rel=1e-6)


def test_overlapping_windows_give_each_target_its_context(tiny):
    ids = torch.randint(0, 256, (90,), generator=torch.Generator().manual_seed(3)).tolist()
    window, stride = 24, 8
    nll, count, _ = score_tokens(ids, ModelScorer(tiny), window=window, stride=stride)
    expected = 0.0
    for w in plan_windows(len(ids), window, stride):  # each new target scored from its own slice, one at a time
        for t in range(w.end - w.new, w.end):
            with torch.no_grad():
                logits = tiny(torch.tensor([ids[w.start : t]]))[0, -1].double()
            expected -= torch.log_softmax(logits, -1)[ids[t]].item()
    assert count == 89
    assert nll == pytest.approx(expected, rel=1e-6)
    wide, _, _ = score_tokens(ids, ModelScorer(tiny), window=window, stride=window)
    assert wide != pytest.approx(nll, rel=1e-6)  # less context, another value


def test_batched_equals_one_slice_at_a_time(tiny):
    ids = torch.randint(0, 256, (300,), generator=torch.Generator().manual_seed(4)).tolist()
    batched = score_tokens(ids, ModelScorer(tiny, batch_tokens=10_000), window=48, stride=16)
    plain_scorer = ModelScorer(tiny)
    single = score_tokens(ids, lambda tokens: plain_scorer(tokens), window=48, stride=16)  # no score_batch
    assert batched[1:] == single[1:]
    assert batched[0] == pytest.approx(single[0], rel=1e-6)


def test_generic_scorer_uniform_model_gives_vocabulary_size():
    text = "Perplexity of a uniform model equals its vocabulary size: héllo wörld."

    def uniform(tokens):
        return [-math.log(256)] * (len(tokens) - 1)

    result = perplexity(uniform, text, tokenizer=ByteTokenizer(), window=16, stride=4)
    n_bytes = len(text.encode())
    assert result.ppl == pytest.approx(256)
    assert result.tokens == n_bytes - 1  # no BOS: the first byte is context only...
    assert result.bytes == n_bytes - 1  # ...and its byte is not counted
    assert result.bpb == pytest.approx(8.0)
    assert result.bits_per_token == pytest.approx(8.0)


def test_scorer_errors_are_user_errors():
    with pytest.raises(LmforgeError, match="log-probs"):
        perplexity(lambda t: [-1.0], "some text here", tokenizer=ByteTokenizer(), window=8)
    with pytest.raises(LmforgeError, match="positive"):
        perplexity(lambda t: [0.5] * (len(t) - 1), "some text here", tokenizer=ByteTokenizer(), window=8)
    with pytest.raises(LmforgeError, match="window"):
        perplexity(lambda t: [-1.0] * (len(t) - 1), "some text", tokenizer=ByteTokenizer())


def test_transformer_source_with_several_texts(tiny):
    texts = ["first text, short", "a second, somewhat longer text " * 5]
    both = perplexity(tiny, texts, tokenizer=ByteTokenizer(), window=32, stride=16)
    each = [perplexity(tiny, t, tokenizer=ByteTokenizer(), window=32, stride=16) for t in texts]
    assert both.documents == 2 and both.tokens == sum(r.tokens for r in each)
    assert both.nll == pytest.approx(sum(r.nll for r in each), rel=1e-12)
    with pytest.raises(LmforgeError, match="exceeds"):
        perplexity(tiny, "x", tokenizer=ByteTokenizer(), window=1024)


def hf_sliding_window_nll(model, ids: list[int], window: int, stride: int) -> tuple[float, int]:
    """The Hugging Face perplexity recipe: labels -100 except the new tokens of each slice.

    Its slices carry the predicted last token too, hence max_length = window + 1.
    """
    seq = torch.tensor([ids])
    total, count, prev_end = 0.0, 0, 0
    for begin in range(0, len(ids), stride):
        end = min(begin + window + 1, len(ids))
        chunk = seq[:, begin:end]
        labels = chunk.clone()
        labels[:, : -(end - prev_end)] = -100
        with torch.no_grad():
            loss = model(chunk, labels=labels).loss.item()
        valid = int((labels[:, 1:] != -100).sum())
        total += loss * valid
        count += valid
        prev_end = end
        if end == len(ids):
            break
    return total, count


@pytest.mark.slow  # transformers' own load of the default model's GGUF file takes ~15 s
def test_default_model_perplexity_matches_transformers(default_lm, hf_default_model):
    text = (ROOT / "LICENSE").read_text(encoding="utf-8")[:1600]  # the Apache-2.0 license text
    window, stride = 128, 64
    ours = perplexity(default_lm, text, window=window, stride=stride)
    ids = [default_lm.tokenizer.bos_id] + default_lm.tokenizer.encode(text, add_special_tokens=False)
    nll, count = hf_sliding_window_nll(hf_default_model, ids, window, stride)
    assert ours.tokens == count == len(ids) - 1 and ours.tokens > 250
    assert ours.windows == len(plan_windows(len(ids), window, stride)) > 2
    theirs_ppl = math.exp(nll / count)
    assert abs(ours.ppl / theirs_ppl - 1) < 1e-3
    assert ours.bytes == len(text.encode())
    assert ours.bpb == pytest.approx(nll / math.log(2) / len(text.encode()), rel=1e-3)
    assert 0.3 < ours.bpb < 2.0  # a 135M model on English legal text
