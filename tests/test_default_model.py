"""The default model (SmolLM2-135M-Instruct GGUF) loaded by lmforge vs transformers."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from lmforge.infer import SamplingParams


def test_default_model_config(default_lm):
    c = default_lm.config
    assert (c.family, c.n_layer, c.n_embd, c.n_head, c.n_kv_head, c.vocab_size) == ("llama", 30, 576, 9, 3, 49152)
    assert c.tie_word_embeddings
    assert default_lm.model.num_parameters() == 134_515_008


@pytest.mark.slow  # transformers' own load of the default model's GGUF file takes ~15 s
def test_logits_match_transformers_on_same_gguf(default_lm, hf_default_model):
    ids = torch.tensor([default_lm.tokenizer.encode("The quick brown fox jumps over the lazy dog. " * 6)])
    with torch.no_grad():
        ours = default_lm.model(ids)
        theirs = hf_default_model(ids).logits
    assert (ours - theirs).abs().max().item() <= 1e-3


@pytest.mark.slow  # transformers' own load of the default model's GGUF file takes ~15 s
def test_greedy_continuation_matches_transformers(default_lm, hf_default_model):
    prompt = default_lm.tokenizer.encode("Once upon a time")
    ids = torch.tensor([prompt])
    expected = hf_default_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=32,
                                         min_new_tokens=32, do_sample=False, pad_token_id=2)[0, len(prompt):]
    done = default_lm.generator.generate(prompt, SamplingParams(max_tokens=32, temperature=0, ignore_eos=True))[0]
    assert done.token_ids == expected.tolist()


def test_chat_answers_paris(default_lm):
    reply = default_lm.chat("What is the capital of France?", temperature=0, max_tokens=30)
    assert reply == "The capital of France is Paris."


def test_stream_equals_generate(default_lm):
    params = dict(temperature=0.8, seed=7, max_tokens=40)
    streamed = "".join(default_lm.stream("Write a haiku about the sea:", **params))
    assert streamed == default_lm.generate("Write a haiku about the sea:", **params)
    assert len(streamed) > 0


def test_seeded_sampling_is_reproducible_and_seed_dependent(default_lm):
    a = default_lm.generate("My favourite animal is", temperature=1.0, seed=1, max_tokens=20)
    b = default_lm.generate("My favourite animal is", temperature=1.0, seed=1, max_tokens=20)
    c = default_lm.generate("My favourite animal is", temperature=1.0, seed=2, max_tokens=20)
    assert a == b and a != c


def test_stop_string_cuts_output(default_lm):
    full = default_lm.generate("1, 2, 3, 4,", temperature=0, max_tokens=20)
    assert " 6" in full
    cut = default_lm.complete("1, 2, 3, 4,", temperature=0, max_tokens=20, stop=[" 6"])[0]
    assert cut.finish_reason == "stop"
    assert cut.text == full[: full.index(" 6")]
    streamed = "".join(default_lm.stream("1, 2, 3, 4,", temperature=0, max_tokens=20, stop=[" 6"]))
    assert streamed == cut.text


@pytest.mark.slow  # starts the model or a process: seconds
def test_cli_generate_says_paris():
    out = subprocess.run(
        [sys.executable, "-m", "lmforge", "generate", "--prompt", "The capital of France is",
         "--max-tokens", "8", "--temperature", "0", "--json"],
        capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert "Paris" in result["text"]
    assert result["completion_tokens"] <= 8 and result["prompt_tokens"] == 5


@pytest.mark.slow  # starts the model or a process: seconds
def test_cli_chat_single_message():
    out = subprocess.run(
        [sys.executable, "-m", "lmforge", "chat", "--message", "What is the capital of France?", "--temperature", "0"],
        capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "The capital of France is Paris."


@pytest.mark.slow  # starts the model or a process: seconds
def test_stream_never_splits_multibyte_characters(default_lm):
    """Emoji and CJK characters span several byte-level tokens; deltas must hold whole characters."""
    prompt = "Translate to Chinese and add emoji: I love cats. 我爱猫 😺 我爱狗 🐶 我爱"
    params = dict(temperature=0.9, seed=3, max_tokens=48)
    deltas = list(default_lm.stream(prompt, **params))
    text = "".join(deltas)
    assert text == default_lm.generate(prompt, **params)
    assert any(ord(ch) > 0x2E80 for ch in text), text  # the sample does contain multi-byte characters
    assert all("\ufffd" not in d for d in deltas)
    done = default_lm.complete(prompt, **params)[0]
    assert len(deltas) < done.completion_tokens  # some tokens ended mid-character and were held back
