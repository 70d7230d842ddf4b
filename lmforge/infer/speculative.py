"""Speculative decoding (I3): draft several tokens cheaply, let the model check them in one forward.

A batch-1 decode step is bound by reading every weight once, whatever the number of
positions it computes, so scoring k+1 positions costs about as much as scoring one.
A *drafter* guesses the next k tokens; the target model runs once over the last real
token and the k guesses, which gives its distribution at each of the k+1 positions; the
guesses are accepted left to right while the acceptance rule allows, the first rejected
one is replaced by a token drawn from a corrected distribution, and when all k pass the
last position yields one more token for free. Each verification step therefore yields
between 1 and k+1 tokens, and the result has exactly the target's distribution:

- greedy: a guess is accepted while it equals the target's arg-max (after the same
  penalties as plain decoding), so the text equals plain greedy decoding;
- sampling: a guess x drawn from the drafter's q is accepted with probability
  min(1, p(x)/q(x)), p being what plain sampling would draw from (penalties,
  temperature, top-k/top-p/min-p); on rejection the token comes from
  normalize(max(0, p - q)). A deterministic drafter (prompt lookup) has q = a point
  mass on x: x is accepted with probability p(x), otherwise drawn from p without x.

Three drafters share one small interface (`propose`):

- `NgramDrafter`: prompt lookup. The last n tokens are searched for earlier in the
  prompt and the generated text; the tokens that followed the latest match are the
  guess. No model at all: it shines where the answer copies from the prompt
  (summaries, rewrites, extraction, code edits).
- `ModelDrafter` over a small model sharing the tokenizer (`load_draft_model`, e.g. a
  student made by `lmforge distill`), with its own KV cache.
- `ModelDrafter` over `first_layers(target, n)`: the target's own first n blocks, its
  final norm and head (self-speculation; no training, no extra weights).

Where the scheduler speculates (`Scheduler._decode_step`): only while a single row is
running, the row uses no adapter and no JSON constraint, and a KV cache is kept. A
batch of several rows already reads the weights once for all of them, so the step is
no longer bound by one row's weight traffic; rows would also accept different numbers
of tokens. Any other case takes the plain one-token step, unchanged.

Rolling back the KV cache costs nothing: the cache has no length of its own. A row's
length is its `DecodeState.position`, the verification writes keys and values at the
k+1 positions, and the positions of rejected guesses lie beyond the new length, where
the next step overwrites them before any query can attend to them (the attention mask
only admits keys up to each query's own position). The drafter's cache works the same
way, keyed by the tokens it holds: it re-feeds only what differs from them.

Seeded sampling stays reproducible run to run, but draws a different sequence of
random numbers than plain decoding does, so a seeded text under speculation differs
from the plain one (the distribution is the same; tests/test_speculative.py checks it).
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from typing import Callable, Protocol

import torch
from torch import nn

from ..errors import LmforgeError
from ..model.kv_cache import KVCache
from .layout import torch_threads_for
from .request import DecodeState, token_logprobs
from .sampling import SamplingParams, draw, penalized_logits, sampling_distribution

METHODS = ("ngram", "draft", "layers")


@dataclass
class Draft:
    """Guessed tokens, and the distributions q [n, V] they were drawn from (None: chosen deterministically)."""

    tokens: list[int] = field(default_factory=list)
    probs: torch.Tensor | None = None


class Drafter(Protocol):
    name: str

    def propose(self, tokens: list[int], k: int, params: SamplingParams,
                generator: torch.Generator | None) -> Draft:
        """Up to `k` tokens likely to follow `tokens` (prompt and generated ids so far)."""
        ...


class NgramDrafter:
    """Prompt lookup: the continuation of the latest earlier occurrence of the last n tokens.

    The longest n in max_ngram..min_ngram with a match wins (a longer match is better
    evidence that the text is being copied). The search scans back from the end, so its
    cost grows with the sequence (a few microseconds per hundred tokens).
    """

    name = "ngram"

    def __init__(self, max_ngram: int = 3, min_ngram: int = 1) -> None:
        if not 1 <= min_ngram <= max_ngram:
            raise LmforgeError(f"n-gram sizes must satisfy 1 <= min <= max, got {min_ngram}..{max_ngram}")
        self.max_ngram, self.min_ngram = max_ngram, min_ngram

    def propose(self, tokens: list[int], k: int, params: SamplingParams | None = None,
                generator: torch.Generator | None = None) -> Draft:
        size = len(tokens)
        for n in range(min(self.max_ngram, size - 1), self.min_ngram - 1, -1):
            tail = tokens[size - n:]
            first = tail[0]
            # Latest occurrence that ends before the tail itself and has a token after it.
            for i in range(size - n - 1, -1, -1):
                if tokens[i] == first and tokens[i:i + n] == tail:
                    return Draft(tokens[i + n:i + n + k])
        return Draft()


def first_layers(model: nn.Module, n: int) -> nn.Module:
    """A view of `model` that runs its first `n` blocks, then its final norm and head.

    The view shares every module and parameter with `model` (no copy, no extra memory
    besides its own KV cache); only its block list and `config.n_layer` differ.
    """
    total = model.config.n_layer
    if not 1 <= n < total:
        raise LmforgeError(f"a self-speculative draft needs 1..{total - 1} of the model's {total} layers, got {n}")
    view = copy.copy(model)  # shallow: __dict__ copied, modules and parameters shared
    view._modules = dict(model._modules)
    view._modules["layers"] = nn.ModuleList(list(model.layers)[:n])
    view.config = dataclasses.replace(model.config, n_layer=n)
    return view


class ModelDrafter:
    """Guesses from a small language model run one token at a time over its own KV cache.

    The cache is kept across steps and requests: `cached` lists the tokens whose keys
    and values it holds, and each proposal feeds only the tokens after the longest
    common prefix with the new sequence (after a rejection, the accepted guesses are
    already there; a new request sharing a system prompt reuses it).
    """

    def __init__(self, model: nn.Module, name: str = "draft") -> None:
        self.model = model
        self.name = name
        self.cache: KVCache | None = None
        self.cached: list[int] = []

    def _reserve(self, length: int) -> None:
        context = self.model.config.max_position_embeddings
        if self.cache is not None and self.cache.max_len >= length:
            return
        size = min(context, max(length, 256, 2 * (self.cache.max_len if self.cache else 0)))
        weight = self.model.embed.weight
        grown = KVCache.for_model(self.model.config, 1, size, weight.dtype, weight.device)
        if self.cache is not None:
            keep = len(self.cached)
            grown.k[:, :, :, :keep] = self.cache.k[:, :, :, :keep]
            grown.v[:, :, :, :keep] = self.cache.v[:, :, :, :keep]
        self.cache = grown

    def _logits(self, ids: list[int], start: int) -> torch.Tensor:
        x = torch.tensor([ids], dtype=torch.long, device=self.model.embed.weight.device)
        with torch_threads_for(len(ids)):
            return self.model(x, cache=self.cache, start=start, last_only=True)[0, -1]

    def propose(self, tokens: list[int], k: int, params: SamplingParams,
                generator: torch.Generator | None) -> Draft:
        if len(tokens) + k > self.model.config.max_position_embeddings:
            return Draft()  # past the draft's context: the scheduler takes plain steps
        self._reserve(len(tokens) + k)
        common = 0
        limit = min(len(self.cached), len(tokens) - 1)  # at least one token is fed, for its logits
        while common < limit and self.cached[common] == tokens[common]:
            common += 1
        logits = self._logits(tokens[common:], common)
        self.cached = list(tokens)
        guesses, probs = [], []
        for i in range(k):
            if params.greedy:
                token = int(logits.argmax())
            else:
                # Any q works for exactness as long as the guess is drawn from it; the
                # target's temperature and truncation make q closer to p (more accepted).
                q = sampling_distribution(torch.nan_to_num(logits.float(), nan=float("-inf")), params)
                token = draw(q, generator)
                probs.append(q)
            guesses.append(token)
            if i + 1 < k:
                logits = self._logits([token], len(self.cached))
                self.cached.append(token)
        return Draft(guesses, torch.stack(probs) if probs else None)


def load_draft_model(path: str, target: nn.Module, tokenizer) -> ModelDrafter:
    """A draft model from a name or directory, checked to share the target's vocabulary."""
    from .loaded import load

    weight = target.embed.weight
    draft = load(path, dtype=weight.dtype, device=str(weight.device))
    if draft.config.vocab_size != target.config.vocab_size:
        raise LmforgeError(f"the draft model {path} has a vocabulary of {draft.config.vocab_size} tokens, the "
                           f"target {target.config.vocab_size}: a draft must share the target's tokenizer")
    if tokenizer is not None and draft.tokenizer is not None:
        probe = "Speculative decoding: the draft's tokens 42, ÿ and 漢字 must mean the same."
        if draft.tokenizer.encode(probe, add_special_tokens=False) != tokenizer.encode(probe, add_special_tokens=False):
            raise LmforgeError(f"the draft model {path} tokenizes text differently from the target: "
                               "a draft must share the target's tokenizer")
    return ModelDrafter(draft.model.eval(), name="draft")


@dataclass
class SpeculativeStats:
    """How speculation went: verification steps, guesses proposed and accepted, tokens produced."""

    steps: int = 0  # target forwards over a draft
    proposed: int = 0
    accepted: int = 0
    tokens: int = 0  # tokens those steps appended (accepted guesses, corrections and bonus tokens)

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0

    @property
    def tokens_per_step(self) -> float:
        return self.tokens / self.steps if self.steps else 0.0


class Speculator:
    """A drafter and how many tokens it guesses per step: what a `Scheduler` speculates with."""

    def __init__(self, drafter: Drafter, num_draft_tokens: int = 4) -> None:
        if num_draft_tokens < 1:
            raise LmforgeError(f"--num-draft-tokens must be at least 1, got {num_draft_tokens}")
        self.drafter = drafter
        self.num_draft_tokens = num_draft_tokens
        self.stats = SpeculativeStats()

    def draft_length(self, state: DecodeState) -> int:
        """Guesses to make for this row now: 0 where speculation would not be exact or cannot help.

        At most the budget left minus one (a step may yield k+1 tokens); this also keeps
        the verification inside the row's KV cache, which holds prompt + budget positions.
        """
        if state.json is not None:  # constrained choice masks by a parser state per token: plain steps
            return 0
        return max(0, min(self.num_draft_tokens, state.budget - len(state.generated) - 1))

    def propose(self, state: DecodeState, k: int) -> Draft:
        return self.drafter.propose(state.prompt_ids + state.generated, k, state.params, state.generator)

    def accept(self, state: DecodeState, logits: torch.Tensor, draft: Draft, emit: Callable[[str], None]) -> int:
        """Append the verified tokens to `state` (`emit` gets each text delta); return how many guesses passed.

        `logits` [k+1, V]: the target's logits after the last real token and after each
        guess. Tokens are appended one at a time, so the penalties, stop strings, end
        tokens and budget see each one exactly as in plain decoding.
        """
        passed = 0
        self.stats.steps += 1
        self.stats.proposed += len(draft.tokens)
        before = len(state.generated)
        for j, guess in enumerate(draft.tokens):
            token, ok = self._check(state, logits[j], guess, None if draft.probs is None else draft.probs[j])
            emit(state.append(token))
            passed += ok
            if not ok or state.finished:
                break
        else:
            if not state.finished:
                emit(state.append(state.choose(logits[len(draft.tokens)])))
        self.stats.accepted += passed
        self.stats.tokens += len(state.generated) - before + (state.end_token is not None)
        return passed

    @staticmethod
    def _check(state: DecodeState, logits: torch.Tensor, guess: int, q: torch.Tensor | None) -> tuple[int, bool]:
        """The token at one position: the guess if accepted, else a correction; and whether accepted."""
        params = state.params
        if params.greedy:  # the plain path's own choice (penalties and log-probs included)
            token = state.choose(logits)
            return token, token == guess
        seen = state.context[: len(state.prompt_ids) + len(state.generated)] if state.context is not None \
            else torch.empty(0, dtype=torch.long)
        p = sampling_distribution(penalized_logits(logits, params, seen, state.counts), params).double()
        q_guess = 1.0 if q is None else float(q[guess])
        ratio = 1.0 if q_guess <= 0 else min(1.0, float(p[guess]) / q_guess)
        u = float(torch.rand((), generator=state.generator, dtype=torch.float64))
        if u < ratio:
            token, ok = guess, True
        else:
            if q is None:
                residual = p.clone()
                residual[guess] = 0.0
            else:
                residual = (p - q.double()).clamp_(min=0.0)
            if float(residual.sum()) <= 0.0:  # only by rounding: p equals q (or is a point mass on the guess)
                residual = p
            token, ok = draw(residual, state.generator), False
        if params.logprobs is not None:
            state._pending_logprobs = token_logprobs(logits, token, params.logprobs)
        return token, ok


def make_speculator(method: str | None, model: nn.Module, tokenizer=None, num_draft_tokens: int = 4,
                    draft_model: str | None = None, draft_layers: int = 0, max_ngram: int = 3,
                    min_ngram: int = 1) -> Speculator | None:
    """The `Speculator` for a method name (None or "none": no speculation).

    ngram: prompt lookup (n-grams of `max_ngram`..`min_ngram` tokens); draft: the model at
    `draft_model`; layers: the target's first `draft_layers` blocks (0: a quarter of them).
    """
    if method in (None, "none"):
        if draft_model:
            raise LmforgeError("--draft-model is used by --speculative draft only")
        return None
    if method not in METHODS:
        raise LmforgeError(f"--speculative must be one of none, {', '.join(METHODS)}; got {method!r}")
    if method == "draft":
        if not draft_model:
            raise LmforgeError("--speculative draft needs --draft-model PATH (a model sharing the tokenizer)")
        drafter = load_draft_model(draft_model, model, tokenizer)
    elif draft_model:
        raise LmforgeError("--draft-model is used by --speculative draft only")
    elif method == "layers":
        drafter = ModelDrafter(first_layers(model, draft_layers or max(1, model.config.n_layer // 4)), name="layers")
    else:
        drafter = NgramDrafter(max_ngram=max_ngram, min_ngram=min_ngram)
    return Speculator(drafter, num_draft_tokens)
