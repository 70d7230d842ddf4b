"""Speculative decoding: exactly the target's output (greedy) or distribution (sampling).

Every drafter (prompt lookup, a separate draft model, the target's own first layers)
must leave greedy text token-identical to plain decoding, stop strings and budgets
included; sampled tokens must follow the target's distribution, which a chi-square test
checks on a tiny vocabulary (with a deliberately wrong rule as the control that the test
can fail); and the KV cache after rejected guesses must hold exactly what a plain run
would have put there.
"""

from __future__ import annotations

import functools
import json

import pytest
import torch
from scipy.stats import chisquare

from lmforge.errors import LmforgeError
from lmforge.infer.engine import Generator
from lmforge.infer.request import DecodeState
from lmforge.infer.sampling import SamplingParams, penalized_logits, sampling_distribution
from lmforge.infer.scheduler import Scheduler
from lmforge.infer.speculative import (Draft, ModelDrafter, NgramDrafter, Speculator, first_layers,
                                       make_speculator)
from lmforge.model.config import ModelConfig
from lmforge.model.kv_cache import KVCache
from lmforge.model.transformer import Transformer

# A p-value below this fails a distribution test. The draws use fixed seeds, so each test
# is deterministic; were the seeds arbitrary, a correct sampler would still pass with
# probability 0.999 per test, while the wrong rule of the control scores p < 1e-30.
ALPHA = 1e-3


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_model(vocab: int = 64, layers: int = 4, seed: int = 0, scale: float = 0.3) -> Transformer:
    """A random model whose weights are large enough for peaked, prompt-dependent outputs."""
    torch.manual_seed(seed)
    model = Transformer(ModelConfig(vocab_size=vocab, n_layer=layers, n_embd=64, n_head=4, intermediate_size=128,
                                    max_position_embeddings=256)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * scale)
    return model


def noisy_copy(model: Transformer, noise: float, seed: int) -> Transformer:
    """A draft model: the target's weights plus noise (agrees often, not always)."""
    draft = tiny_model(model.config.vocab_size, model.config.n_layer, seed)
    draft.load_state_dict(model.state_dict())
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in draft.parameters():
            p.add_(torch.randn_like(p) * noise)
    return draft


def drafters(model: Transformer) -> dict:
    return {
        "ngram": lambda k: Speculator(NgramDrafter(), k),
        "draft": lambda k: Speculator(ModelDrafter(noisy_copy(model, 0.15, seed=7)), k),
        "layers": lambda k: Speculator(ModelDrafter(first_layers(model, 2), name="layers"), k),
    }


def prompts(vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(3)
    rand = [torch.randint(3, vocab, (n,), generator=g).tolist() for n in (4, 11, 29)]
    return rand + [[5, 9, 14, 22, 31] * 5, rand[1] * 3]  # repeats: prompt lookup finds matches


GREEDY_37 = SamplingParams(max_tokens=37, temperature=0, ignore_eos=True)


@functools.cache
def plain_greedy() -> tuple[tuple[int, ...], ...]:
    """Plain greedy decoding of `prompts(64)` by a fresh `tiny_model()`: the reference every
    speculation method and k below must reproduce. It is the same for all nine, so it is
    decoded once (inside a test, under the module's one thread, like the runs it is compared to)."""
    model = tiny_model()
    return tuple(tuple(Generator(model).generate([p], GREEDY_37)[0].token_ids) for p in prompts(64))


@pytest.mark.parametrize("method", ["ngram", "draft", "layers"])
@pytest.mark.parametrize("k", [1, 3, 6])
def test_greedy_speculation_equals_plain_decoding(method, k):
    model = tiny_model()
    params = GREEDY_37
    cases = prompts(64)
    plain = [list(t) for t in plain_greedy()]
    speculator = drafters(model)[method](k)
    got = [Generator(model, speculator=speculator).generate([p], params)[0].token_ids for p in cases]
    assert got == plain
    assert all(len(t) == 37 for t in got)  # the budget holds even when a step could overshoot it
    stats = speculator.stats
    assert stats.accepted > 0 and stats.steps > 0
    # Fewer target forwards than tokens: speculation saved steps (one per accepted guess).
    assert stats.tokens == stats.steps + stats.accepted


def test_greedy_speculation_keeps_penalties_logprobs_and_end_tokens():
    model = tiny_model(seed=1)
    cases = prompts(64)
    plain_gen = Generator(model)
    # The end token is a token the plain run produces mid-way, so that a guess can hit it.
    free = SamplingParams(max_tokens=30, temperature=0, ignore_eos=True, repetition_penalty=1.3,
                          presence_penalty=0.4, logprobs=2)
    model.config.eos_token_id = plain_gen.generate([cases[3]], free)[0].token_ids[12]
    params = SamplingParams(max_tokens=30, temperature=0, repetition_penalty=1.3, presence_penalty=0.4, logprobs=2)
    for method in ("ngram", "layers"):
        for prompt in cases:
            sched_plain = Scheduler(model, None, max_batch=1, max_seq_len=128, prefix_cache_bytes=0)
            sched_spec = Scheduler(model, None, max_batch=1, max_seq_len=128, prefix_cache_bytes=0,
                                   speculator=drafters(model)[method](4))
            a = sched_plain.submit(prompt, params, stream=False)
            b = sched_spec.submit(prompt, params, stream=False)
            sched_plain.run_until_idle()
            sched_spec.run_until_idle()
            ra, rb = a.result(), b.result()
            assert rb.token_ids == ra.token_ids and rb.finish_reason == ra.finish_reason
            assert rb.logprobs == pytest.approx(ra.logprobs, abs=1e-4)
            assert [sorted(t) for t in rb.top_logprobs] == [sorted(t) for t in ra.top_logprobs]
    assert any(Generator(model).generate([p], params)[0].finish_reason == "stop" for p in cases)


@pytest.fixture(scope="module")
def default_tokenizer():
    from lmforge.model.registry import resolve
    from lmforge.tokenizer import Tokenizer

    return Tokenizer.from_gguf(resolve(None).path)


def test_stop_strings_and_streaming_equal_plain_decoding(default_tokenizer):
    torch.manual_seed(2)
    model = Transformer(ModelConfig(vocab_size=default_tokenizer.vocab_size, n_layer=3, n_embd=32, n_head=2,
                                    intermediate_size=64, max_position_embeddings=160)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    texts = ["The sea is the sea is the sea is", "Once upon a time, once upon a time", "1, 2, 3, 1, 2, 3,"]
    free = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    plain_gen = Generator(model, default_tokenizer)
    outputs = [c.text for c in plain_gen.generate(texts, free)]
    cases = []
    for prompt, out in zip(texts, outputs):
        assert len(out) > 12
        # A stop string from the middle of the plain output, and one that never appears;
        # a budget that ends the text, and one that a speculative step could overshoot.
        for stop, max_tokens in ((out[len(out) // 2:len(out) // 2 + 4], 40), ("\x00never", 7)):
            params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True, stop=[stop])
            cases.append((prompt, params, plain_gen.generate([prompt], params)[0]))
    assert {want.finish_reason for _, _, want in cases} == {"stop", "length"}
    free_ids = {prompt: default_tokenizer.encode(prompt) + c.token_ids
                for prompt, c in zip(texts, plain_gen.generate(texts, free))}
    speculators = [make_speculator("ngram", model, num_draft_tokens=5),
                   make_speculator("layers", model, num_draft_tokens=5, draft_layers=1),
                   Speculator(OracleDrafter(free_ids.values()), 5)]
    for speculator in speculators:
        spec_gen = Generator(model, default_tokenizer, speculator=speculator)
        for prompt, params, want in cases:
            got = spec_gen.generate([prompt], params)[0]
            assert (got.text, got.token_ids, got.finish_reason) == (want.text, want.token_ids, want.finish_reason)
            assert "".join(spec_gen.stream(prompt, params)) == want.text
    # Whole runs of guesses were accepted across stop strings and budgets.
    assert speculators[-1].stats.accepted > 20


class OracleDrafter:
    """Guesses the known plain continuation, with every fifth token wrong (tests only)."""

    name = "oracle"

    def __init__(self, sequences) -> None:
        self.sequences = [list(s) for s in sequences]

    def propose(self, tokens, k, params, generator):
        for seq in self.sequences:
            if seq[:len(tokens)] == tokens:
                guesses = seq[len(tokens):len(tokens) + k]
                return Draft([t if (len(tokens) + i) % 5 else (t + 1) % 100 for i, t in enumerate(guesses)])
        return Draft()

def test_kv_cache_after_rejections_equals_a_plain_prefill_and_generation_continues_exactly():
    model = tiny_model(seed=4)
    prompt = prompts(64)[2]
    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    speculator = Speculator(ModelDrafter(noisy_copy(model, 0.05, seed=11)), 6)  # a poor draft: many rejections
    scheduler = Scheduler(model, None, max_batch=1, max_seq_len=128, prefix_cache_bytes=0, speculator=speculator)
    handle = scheduler.submit(prompt, params, stream=False)
    while not handle.state or not handle.state.finished:
        scheduler.step()
        if handle.state is not None and len(handle.state.generated) >= 20:
            break
    stats = speculator.stats
    assert stats.proposed > stats.accepted > 0  # guesses were rejected
    state = handle.state
    seen = state.prompt_ids + state.generated[:-1]  # the newest token is fed by the next step
    reference = KVCache.for_model(model.config, 1, 128, torch.float32, "cpu")
    with torch.inference_mode():
        model(torch.tensor([seen]), cache=reference, start=0)
    n = len(seen)
    torch.testing.assert_close(scheduler.cache.k[:, :1, :, :n], reference.k[:, :, :, :n], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(scheduler.cache.v[:, :1, :, :n], reference.v[:, :, :, :n], atol=1e-4, rtol=1e-4)
    scheduler.run_until_idle()  # generation continues from that cache
    assert handle.result().token_ids == Generator(model).generate([prompt], params)[0].token_ids


# --------------------------------------------------------------- distribution tests
def _chi_square(observed: torch.Tensor, expected_probs: torch.Tensor) -> float:
    """p-value of observed counts against probabilities, cells with expected count < 5 pooled."""
    expected = expected_probs.double() * observed.sum()
    small = expected < 5
    obs = torch.cat([observed[~small].double(), observed[small].double().sum().view(1)])
    exp = torch.cat([expected[~small], expected[small].sum().view(1)])
    if exp[-1] == 0:
        obs, exp = obs[:-1], exp[:-1]
    return float(chisquare(obs.numpy(), exp.numpy() * obs.sum().item() / exp.sum().item()).pvalue)


def _joint_draws(params: SamplingParams, logits: torch.Tensor, draft_q: torch.Tensor | None, guesses, draws: int,
                 speculator: Speculator) -> tuple[torch.Tensor, torch.Tensor]:
    """Counts of the first two tokens (t1, t2) over many verification steps, and their exact law.

    The target here is context-free: position j always has logits[j], so the exact law of
    (t1, t2) is p0 x p1, and after a rejected first guess the second token is a plain draw
    from p1.
    """
    vocab = logits.shape[-1]
    counts = torch.zeros(vocab, vocab)
    rng = torch.Generator().manual_seed(1234)
    for i in range(draws):
        state = DecodeState([1], SamplingParams(**{**params.__dict__, "seed": i}), 8, None, set(), "cpu", vocab)
        if draft_q is None:
            draft = Draft(list(guesses))
        else:  # guesses drawn from q, as a draft model does
            draft = Draft([int(torch.multinomial(q, 1, generator=rng)) for q in draft_q], draft_q)
        speculator.accept(state, logits, draft, lambda delta: None)
        if len(state.generated) < 2:
            state.append(state.choose(logits[1]))
        counts[state.generated[0], state.generated[1]] += 1
    empty = torch.empty(0, dtype=torch.long)
    p = [sampling_distribution(penalized_logits(row, params, empty), params) for row in logits[:2]]
    return counts.flatten(), (p[0][:, None] * p[1][None, :]).flatten()


class AlwaysAccept(Speculator):
    """A wrong rule for the control: every guess passes."""

    @staticmethod
    def _check(state, logits, guess, q):
        return guess, True


@pytest.mark.parametrize("settings", [dict(temperature=1.0), dict(temperature=0.7, top_k=4),
                                      dict(temperature=1.3, top_p=0.8)])
def test_sampled_tokens_follow_the_target_distribution_with_a_draft_model(settings):
    torch.manual_seed(5)
    vocab = 6
    logits = torch.randn(3, vocab) * 1.5
    q = torch.softmax(torch.randn(2, vocab) * 1.5, -1)  # a draft that disagrees with the target
    params = SamplingParams(**settings)
    observed, law = _joint_draws(params, logits, q, None, 4000, Speculator(NgramDrafter(), 2))
    assert _chi_square(observed, law) > ALPHA
    control, _ = _joint_draws(params, logits, q, None, 4000, AlwaysAccept(NgramDrafter(), 2))
    assert _chi_square(control, law) < 1e-30  # the test can tell a wrong rule apart


def test_sampled_tokens_follow_the_target_distribution_with_prompt_lookup_guesses():
    torch.manual_seed(6)
    vocab = 6
    logits = torch.randn(3, vocab) * 1.5
    params = SamplingParams(temperature=0.9)
    for guesses in ([int(logits[0].argmax()), int(logits[1].argmin())], [int(logits[0].argmin()), 0]):
        observed, law = _joint_draws(params, logits, None, guesses, 4000, Speculator(NgramDrafter(), 2))
        assert _chi_square(observed, law) > ALPHA
        control, _ = _joint_draws(params, logits, None, guesses, 4000, AlwaysAccept(NgramDrafter(), 2))
        assert _chi_square(control, law) < 1e-30


@pytest.mark.slow  # 3,000 requests (about 10 s on two shared cores)
def test_sampled_sequences_through_the_scheduler_follow_the_model():
    """End to end: three sampled tokens per request, prompt lookup guessing, vs the model's exact law."""
    vocab = 4
    model = tiny_model(vocab=vocab, layers=2, seed=8, scale=0.4)
    prompt = [1, 2, 3, 1, 2, 3, 1, 2]
    params = [SamplingParams(max_tokens=3, temperature=1.0, ignore_eos=True, seed=i) for i in range(3000)]
    speculator = Speculator(NgramDrafter(), 2)
    scheduler = Scheduler(model, None, max_batch=1, max_waiting=len(params), max_seq_len=16, prefix_cache_bytes=0,
                          speculator=speculator)
    handles = [scheduler.submit(prompt, p, stream=False) for p in params]
    scheduler.run_until_idle()
    counts = torch.zeros(vocab ** 3)
    for h in handles:
        a, b, c = h.result().token_ids
        counts[(a * vocab + b) * vocab + c] += 1
    assert speculator.stats.accepted > 300  # speculation did happen, and often
    # The exact law of the three tokens, from uncached forwards over every continuation.
    seqs = torch.tensor([[a, b, c] for a in range(vocab) for b in range(vocab) for c in range(vocab)])
    with torch.inference_mode():
        logp = torch.log_softmax(model(torch.cat([torch.tensor(prompt).expand(len(seqs), -1), seqs], 1)), -1)
    n = len(prompt)
    law = (logp[torch.arange(len(seqs)), n - 1, seqs[:, 0]] + logp[torch.arange(len(seqs)), n, seqs[:, 1]]
           + logp[torch.arange(len(seqs)), n + 1, seqs[:, 2]]).exp()
    assert float(law.sum()) == pytest.approx(1.0, abs=1e-5)
    assert _chi_square(counts, law) > ALPHA


# ----------------------------------------------------------------------- the pieces
def test_prompt_lookup_proposes_the_continuation_of_the_latest_longest_match():
    drafter = NgramDrafter(max_ngram=3)
    assert drafter.propose([1, 2, 3, 9, 9, 1, 2, 3, 7, 8, 5, 2, 3], 3).tokens == [7, 8, 5]  # latest "2 3"
    assert drafter.propose([4, 5, 6, 1, 5, 6, 2, 4, 5, 6], 2).tokens == [1, 5]  # "4 5 6" beats the later "5 6"
    assert drafter.propose([1, 2, 3, 4], 3).tokens == []  # nothing repeats
    assert drafter.propose([7, 7], 4).tokens == [7]  # only what exists after the match


def test_first_layers_is_a_view_that_matches_a_truncated_model():
    model = tiny_model(layers=4, seed=9)
    view = first_layers(model, 2)
    assert view.config.n_layer == 2 and model.config.n_layer == 4 and len(model.layers) == 4
    assert view.layers[0] is model.layers[0] and view.lm_head is model.lm_head
    short = Transformer(ModelConfig(**{**model.config.__dict__, "n_layer": 2})).eval()
    short.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith(("layers.2", "layers.3"))})
    ids = torch.tensor([[3, 9, 27, 4, 11]])
    with torch.inference_mode():
        torch.testing.assert_close(view(ids), short(ids))


def test_make_speculator_explains_bad_settings():
    model = tiny_model(layers=4)
    assert make_speculator(None, model) is None and make_speculator("none", model) is None
    assert isinstance(make_speculator("layers", model).drafter, ModelDrafter)
    with pytest.raises(LmforgeError, match="--draft-model"):
        make_speculator("draft", model)
    with pytest.raises(LmforgeError, match="--draft-model is used by"):
        make_speculator("ngram", model, draft_model="x")
    with pytest.raises(LmforgeError, match="must be one of"):
        make_speculator("medusa", model)
    with pytest.raises(LmforgeError, match="1..3"):
        make_speculator("layers", model, draft_layers=4)
    with pytest.raises(LmforgeError, match="at least 1"):
        make_speculator("ngram", model, num_draft_tokens=0)


# ----------------------------------------------------------------------- options and CLI
def test_option_choices_match_the_engine():
    from lmforge.infer.speculative import METHODS
    from lmforge.serve.config import SPECULATIVE_METHODS, SpeculativeOptions

    assert SPECULATIVE_METHODS == ("none", *METHODS)
    assert SpeculativeOptions().speculative == "none"
    for bad, message in [(dict(speculative="draft"), "needs --draft-model"),
                         (dict(draft_model="x"), "needs --draft-model"),
                         (dict(num_draft_tokens=0), "--num-draft-tokens"), (dict(speculative="eagle"), "one of")]:
        with pytest.raises(LmforgeError, match=message):
            SpeculativeOptions(**bad)


def test_serve_command_takes_the_flags():
    from lmforge.cli import build_parser
    from lmforge.cli.common import config_from_args
    from lmforge.serve.config import SpeculativeOptions

    args = build_parser().parse_args(["serve", "--speculative", "layers", "--num-draft-tokens", "3",
                                      "--draft-layers", "2"])
    assert config_from_args(SpeculativeOptions, args) == SpeculativeOptions("layers", None, 3, 2)


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory, default_tokenizer):
    """A target and a draft (its noisy copy) in Hugging Face layout with the default tokenizer."""
    from lmforge.model.checkpoint import save_hf_model

    torch.manual_seed(12)
    config = ModelConfig(vocab_size=default_tokenizer.vocab_size, n_layer=2, n_embd=32, n_head=2,
                         intermediate_size=64, max_position_embeddings=128)
    target = Transformer(config).eval()
    with torch.no_grad():
        for p in target.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    draft = Transformer(config).eval()
    draft.load_state_dict(target.state_dict())
    with torch.no_grad():
        for p in draft.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    root = tmp_path_factory.mktemp("speculative")
    small = Transformer(ModelConfig(vocab_size=500, n_layer=1, n_embd=32, n_head=2, intermediate_size=64)).eval()
    return (save_hf_model(target, root / "target", default_tokenizer),
            save_hf_model(draft, root / "draft", default_tokenizer), save_hf_model(small, root / "other", default_tokenizer))


@pytest.mark.slow  # five model loads, each calibrating its kernels (10-60 s on shared cores)
def test_generate_command_speculates_and_prints_the_plain_text(capsys, tiny_dirs):
    from lmforge.cli import main

    target, draft, other = tiny_dirs
    common = ["generate", str(target), "--prompt", "The cat sat on the mat. The cat", "--temperature", "0",
              "--max-tokens", "12", "--json"]
    assert main(common) == 0
    plain = json.loads(capsys.readouterr().out)
    for extra in (["--speculative", "draft", "--draft-model", str(draft), "--num-draft-tokens", "3"],
                  ["--speculative", "ngram"], ["--speculative", "layers", "--draft-layers", "1"]):
        assert main(common + extra) == 0
        got = json.loads(capsys.readouterr().out)
        assert (got["text"], got["completion_tokens"]) == (plain["text"], plain["completion_tokens"])
        assert got["speculative"] == extra[1] and got["tokens_per_step"] >= 1
    assert got["draft_acceptance"] >= 0
    for extra, message in ((["--speculative", "draft"], "needs --draft-model"),
                           (["--speculative", "draft", "--draft-model", str(other)], "vocabulary of 500"),
                           (["--speculative", "layers", "--draft-layers", "2"], "1..1")):
        assert main(common + extra) == 1
        err = capsys.readouterr().err
        assert err.startswith("lmforge: error: ") and err.count("\n") == 1 and message in err


def test_a_draft_with_a_shorter_context_falls_back_to_plain_steps():
    model = tiny_model(seed=13)
    short = noisy_copy(model, 0.02, seed=14)
    short.config = ModelConfig(**{**short.config.__dict__, "max_position_embeddings": 24})
    prompt = prompts(64)[1]  # 11 tokens: speculation until the draft's context is full
    params = SamplingParams(max_tokens=30, temperature=0, ignore_eos=True)
    speculator = Speculator(ModelDrafter(short), 4)
    got = Generator(model, speculator=speculator).generate([prompt], params)[0].token_ids
    assert got == Generator(model).generate([prompt], params)[0].token_ids
    assert 0 < speculator.stats.tokens < 29  # some tokens were speculated, the rest came from plain steps


def test_the_server_exports_speculation_figures():
    import httpx

    from lmforge.model.loading import resolve_tokenizer
    from lmforge.serve.app import ServeSettings, create_app
    from tests.conftest import live_server

    tokenizer = resolve_tokenizer(None)
    model = tiny_model()  # ids below 64 are byte tokens of the real tokenizer: the text decodes
    speculator = drafters(model)["draft"](3)  # a draft model always guesses (prompt lookup may find nothing)
    scheduler = Scheduler(model, tokenizer, max_seq_len=256, speculator=speculator).start()
    app = create_app(scheduler, tokenizer, "tiny", ServeSettings(embedding_model="none"))
    with live_server(app, scheduler) as url:
        r = httpx.post(url + "/v1/completions", timeout=60,
                       json={"prompt": prompts(64)[3], "max_tokens": 12, "temperature": 0})
        assert r.status_code == 200
        text = httpx.get(url + "/metrics").text
    figures = {line.split()[0]: float(line.split()[1]) for line in text.splitlines()
               if line.startswith("lmforge_speculative_")}
    assert figures["lmforge_speculative_proposed"] == speculator.stats.proposed
    assert figures["lmforge_speculative_accepted"] == speculator.stats.accepted
    assert figures["lmforge_speculative_steps"] == speculator.stats.steps >= 1
