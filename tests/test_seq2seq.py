"""Encoder-decoder models (T5, Marian, BART) against transformers on tiny random configs, and beam search
against transformers' generate() token for token."""

from __future__ import annotations

import json

import pytest
import torch

from lmforge.errors import LmforgeError
from lmforge.infer.beam import BeamParams, DecoderStepper, beam_search, seq2seq_generate
from lmforge.model.seq2seq import Seq2SeqConfig, Seq2SeqLM, relative_position_bucket, sinusoidal_table
from lmforge.model.seq2seq_io import load_seq2seq, save_seq2seq

VOCAB = 99


pytestmark = pytest.mark.usefixtures("one_thread")


def _t5(ff: str, tie: bool, decoder_layers: int):
    import transformers as T

    return T.T5ForConditionalGeneration(T.T5Config(
        vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=40, num_layers=2, num_decoder_layers=decoder_layers, num_heads=4,
        feed_forward_proj=ff, tie_word_embeddings=tie, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
        relative_attention_num_buckets=8, relative_attention_max_distance=20))


def _marian():
    import transformers as T

    model = T.MarianMTModel(T.MarianConfig(
        vocab_size=VOCAB, d_model=32, encoder_layers=2, decoder_layers=3, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=40, decoder_ffn_dim=40, max_position_embeddings=64,
        pad_token_id=VOCAB - 1, decoder_start_token_id=VOCAB - 1, eos_token_id=0, scale_embedding=True,
        activation_function="swish"))
    with torch.no_grad():
        model.final_logits_bias.normal_(0, 0.5)
    return model


def _bart():
    import transformers as T

    model = T.BartForConditionalGeneration(T.BartConfig(
        vocab_size=VOCAB, d_model=32, encoder_layers=2, decoder_layers=3, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=40, decoder_ffn_dim=40, max_position_embeddings=64,
        pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2, forced_eos_token_id=2,
        forced_bos_token_id=None, activation_function="gelu"))
    with torch.no_grad():  # random norms and biases, so that a misplaced one shows
        model.final_logits_bias.normal_(0, 0.5)
        for name, p in model.named_parameters():
            if "layernorm_embedding" in name or "layer_norm" in name:
                p.normal_(1.0 if name.endswith("weight") else 0.0, 0.2)
    return model


# (transformers' generate() builds its T5 cache with the encoder's layer count: equal stacks there)
BUILDERS = {"t5-gated-gelu": lambda: _t5("gated-gelu", False, 3), "t5-relu": lambda: _t5("relu", True, 2),
            "marian": _marian, "bart": _bart}


@pytest.fixture(scope="module")
def tiny_seq2seq(tmp_path_factory):
    """name -> (transformers model, lmforge model loaded from the directory transformers saved)."""
    out = {}
    for i, (name, build) in enumerate(BUILDERS.items()):
        torch.manual_seed(100 + i)
        reference = build().eval()
        path = tmp_path_factory.mktemp(name)
        reference.save_pretrained(path)
        out[name] = (reference, load_seq2seq(path), path)
    return out


def _batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    src = torch.randint(2, VOCAB - 2, (3, 9), generator=g)
    mask = torch.ones_like(src)
    mask[1, 6:] = 0
    mask[2, 3:] = 0
    return src, mask, torch.randint(2, VOCAB - 2, (3, 6), generator=g)


@pytest.mark.parametrize("name", list(BUILDERS))
def test_logits_match_transformers_with_and_without_cache(tiny_seq2seq, name):
    reference, model, _ = tiny_seq2seq[name]
    src, mask, tgt = _batch()
    with torch.no_grad():
        expected = reference(input_ids=src, attention_mask=mask, decoder_input_ids=tgt).logits
        torch.testing.assert_close(model(src, tgt, mask), expected, atol=1e-5, rtol=1e-5)
        cross = model.cross_cache(model.encode(src, mask), mask)
        cache = model.new_cache(3, 8)
        steps = [model.decode(tgt[:, :2], cross, cache, 0)]  # a 2-token prefill, then one token per step
        steps += [model.decode(tgt[:, t:t + 1], cross, cache, t) for t in range(2, tgt.shape[1])]
        torch.testing.assert_close(torch.cat(steps, 1), expected, atol=1e-5, rtol=1e-5)
    assert model.num_parameters() == model.config.num_parameters()
    # transformers keeps Marian's fixed sinusoids as parameters and its logits bias as a buffer;
    # BART's position tables are learned but have two unused rows in front
    learned = sum(p.numel() for n, p in reference.named_parameters()
                  if "embed_positions" not in n or name == "bart")
    learned += reference.final_logits_bias.numel() if name in ("marian", "bart") else 0
    learned -= 2 * 2 * 32 if name == "bart" else 0
    assert model.num_parameters() == learned


@pytest.mark.parametrize("name", list(BUILDERS))
def test_save_round_trips_through_transformers(tiny_seq2seq, name, tmp_path):
    import transformers as T

    reference, model, _ = tiny_seq2seq[name]
    target = save_seq2seq(model, tmp_path / "out")
    with pytest.raises(LmforgeError, match="already exists"):
        save_seq2seq(model, target)
    again = T.AutoModelForSeq2SeqLM.from_pretrained(target).eval()
    src, mask, tgt = _batch(1)
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=src, attention_mask=mask, decoder_input_ids=tgt).logits,
                                   reference(input_ids=src, attention_mask=mask, decoder_input_ids=tgt).logits)
    reloaded = load_seq2seq(target)
    for key, value in model.state_dict().items():
        assert torch.equal(reloaded.state_dict()[key], value), key


def test_relative_buckets_match_transformers():
    from transformers.models.t5.modeling_t5 import T5Attention

    rel = torch.arange(-300, 300)[None, :]
    for bidirectional in (True, False):
        for buckets, distance in ((32, 128), (8, 20)):
            expected = T5Attention._relative_position_bucket(rel, bidirectional, buckets, distance)
            assert torch.equal(relative_position_bucket(rel, bidirectional, buckets, distance), expected)
    # a few hand values: exact buckets near zero, the sign picks the half, far distances share the last bucket
    got = relative_position_bucket(torch.tensor([0, 1, -1, 7, 500, -500]), True, 32, 128).tolist()
    assert got == [0, 17, 1, 23, 31, 15]


def test_sinusoids_match_marian_layout():
    from transformers.models.marian.modeling_marian import MarianSinusoidalPositionalEmbedding

    table = MarianSinusoidalPositionalEmbedding(40, 10).create_weight()
    torch.testing.assert_close(sinusoidal_table(40, 10), table)
    assert sinusoidal_table(3, 4)[0].tolist() == [0.0, 0.0, 1.0, 1.0]  # sin(0) first half, cos(0) second


def test_config_errors_and_unsupported_checkpoints(tmp_path):
    with pytest.raises(ValueError, match="family"):
        Seq2SeqConfig(family="bart")
    with pytest.raises(ValueError, match="divisible"):
        Seq2SeqConfig(n_embd=30, n_head=4)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(LmforgeError, match="not an encoder-decoder"):
        load_seq2seq(tmp_path)
    with pytest.raises(LmforgeError, match="no config.json"):
        load_seq2seq(tmp_path / "missing")


def _eos_the_model_emits(reference, src, mask):
    """A token the random model produces mid-sequence when nothing stops it: made the EOS of both
    models, it ends some hypotheses early and lets others run to the limit, which is what the
    stopping rules need. (Random models repeat a few tokens; the one giving the most distinct
    lengths under greedy and beam search is taken.)"""
    with torch.no_grad():
        free = reference.generate(input_ids=src, attention_mask=mask, max_new_tokens=12, do_sample=False,
                                  eos_token_id=None, forced_eos_token_id=None)
    # greedy decoding with EOS = t stops at t's first occurrence in these rows: no more calls needed
    best, best_spread = None, 0
    for token in free[:, 1:].reshape(-1).unique().tolist():
        spread = len({len(_ids(row, token)) for row in free})
        if spread > best_spread:
            best, best_spread = token, spread
    return best


def _ids(row: torch.Tensor, eos: int) -> list[int]:
    out = []
    for token in row.tolist()[1:]:  # after the decoder start token
        if token == eos:
            break
        out.append(token)
    return out


SEARCHES = [(1, 1.0, False), (3, 1.0, False), (4, 2.0, True), (4, -1.0, "never"), (3, 0.0, True)]


@pytest.mark.parametrize("name", ["t5-relu", "marian", "bart"])
def test_greedy_and_beam_search_match_transformers_generate(tiny_seq2seq, name):
    reference, model, _ = tiny_seq2seq[name]
    # (the seed gives inputs on which the random model's outputs end at different lengths)
    g = torch.Generator().manual_seed({"bart": 11}.get(name, 5))
    src = torch.randint(2, VOCAB - 2, (4, 8), generator=g)
    mask = torch.ones_like(src)
    mask[1, 5:] = 0
    eos = _eos_the_model_emits(reference, src, mask)
    saved_eos = model.config.eos_token_id
    model.config.eos_token_id = eos
    lengths = set()
    try:
        for beams, penalty, early in SEARCHES:
            with torch.no_grad():
                expected = reference.generate(input_ids=src, attention_mask=mask, max_new_tokens=12, do_sample=False,
                                              num_beams=beams, length_penalty=penalty, early_stopping=early,
                                              eos_token_id=eos, forced_eos_token_id=None)
            got = seq2seq_generate(model, src, mask, max_new_tokens=12, num_beams=beams, length_penalty=penalty,
                                   early_stopping=early)
            assert got == [_ids(row, eos) for row in expected], (beams, penalty, early)
            lengths |= {len(ids) for ids in got}
    finally:
        model.config.eos_token_id = saved_eos
    assert len(lengths) >= 3  # some hypotheses stopped early, some ran to the limit


def test_beam_search_on_a_decoder_only_model_matches_transformers(tiny_hf_dirs):
    from lmforge.model.checkpoint import load_hf_model

    path, reference = tiny_hf_dirs["llama"]
    model = load_hf_model(path)
    prompt = torch.tensor([[5, 17, 42, 9, 100]])
    with torch.no_grad():
        free = reference.generate(prompt, max_new_tokens=10, do_sample=False, eos_token_id=None)
    eos = int(free[0, 8])
    for beams, penalty, early in SEARCHES[1:4]:
        with torch.no_grad():
            expected = reference.generate(prompt, max_new_tokens=10, do_sample=False, num_beams=beams,
                                          length_penalty=penalty, early_stopping=early, eos_token_id=eos)
        hyp = beam_search(DecoderStepper(model, prompt, beams, 10), 1,
                          BeamParams(beams, 10, penalty, early), [eos])[0]
        row = expected[0, prompt.shape[1]:].tolist()
        assert hyp.tokens == row[:len(hyp.tokens)] and (len(row) == len(hyp.tokens) or row[len(hyp.tokens)] == eos
                                                        or hyp.tokens[-1] == eos)


def test_sampling_is_seeded_and_greedy_is_the_default():
    torch.manual_seed(0)
    model = Seq2SeqLM(Seq2SeqConfig(vocab_size=50, eos_token_id=1, pad_token_id=0)).eval()
    src = torch.randint(2, 50, (2, 5))
    from lmforge.infer.sampling import SamplingParams

    a = seq2seq_generate(model, src, max_new_tokens=6, sampling=SamplingParams(temperature=1.0, seed=3))
    b = seq2seq_generate(model, src, max_new_tokens=6, sampling=SamplingParams(temperature=1.0, seed=3))
    assert a == b and all(len(x) <= 6 for x in a)
    greedy = seq2seq_generate(model, src, max_new_tokens=6)
    assert greedy == seq2seq_generate(model, src, max_new_tokens=6, sampling=SamplingParams(temperature=0.0))
    with pytest.raises(LmforgeError, match="does not sample"):
        seq2seq_generate(model, src, num_beams=2, sampling=SamplingParams(temperature=0.7))
    with pytest.raises(LmforgeError, match="early_stopping"):
        BeamParams(early_stopping="sometimes")


def test_training_step_lowers_the_loss_on_a_copy_task():
    torch.manual_seed(0)
    config = Seq2SeqConfig(vocab_size=20, n_embd=32, n_head=4, intermediate_size=64, eos_token_id=1, pad_token_id=0,
                           decoder_start_token_id=0)
    model = Seq2SeqLM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    src = torch.randint(2, 20, (16, 6))
    labels = torch.cat([src, torch.ones(16, 1, dtype=torch.long)], 1)
    losses = []
    for _ in range(25):
        logits = model(src, model.shift_right(labels))
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 20), labels.reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]


def test_an_untied_marian_head_written_by_lmforge_loads_in_transformers(tmp_path):
    import transformers as T

    torch.manual_seed(3)
    config = Seq2SeqConfig(vocab_size=VOCAB, n_embd=32, n_head=4, intermediate_size=40, max_position_embeddings=64,
                           tie_word_embeddings=False, final_logits_bias=True, scale_embedding=True,
                           pad_token_id=VOCAB - 1, eos_token_id=0, decoder_start_token_id=VOCAB - 1)
    model = Seq2SeqLM(config).eval()
    with torch.no_grad():
        model.final_logits_bias.normal_()
    assert model.lm_head.weight is not model.embed.weight
    reference = T.MarianMTModel.from_pretrained(save_seq2seq(model, tmp_path / "m")).eval()
    assert not torch.equal(reference.lm_head.weight, reference.model.shared.weight)
    src, mask, tgt = _batch(2)
    with torch.no_grad():
        torch.testing.assert_close(model(src, tgt, mask), reference(input_ids=src, attention_mask=mask,
                                                                    decoder_input_ids=tgt).logits,
                                   atol=1e-5, rtol=1e-5)
    assert not load_seq2seq(tmp_path / "m").config.tie_word_embeddings
