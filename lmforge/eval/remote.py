"""Log-probabilities from an OpenAI-compatible endpoint, for perplexity and multiple choice (E1, E3).

A completions endpoint that accepts token-id prompts and answers `echo=true, logprobs=k,
max_tokens=0` returns, for every prompt token, log p(token | tokens before it): exactly
what the local scorers compute from logits. `RemoteScorer` turns that into both scorer
interfaces of the evaluation layer:

- perplexity (`perplexity.py`): `scorer(tokens)` and `scorer.score_batch(slices, last)`;
- log-likelihood benchmarks (`bench/loglik.py`): `scorer.score(requests)` ->
  `LoglikResult` per (context, continuation) request.

Tokenization stays on this side, with the tokenizer the served model uses, so the remote
model reads the same ids as a local run and the numbers agree to float rounding. The
first answer is checked against that tokenizer: if the endpoint's token texts do not match
the local ones, it serves another model and every figure would be wrong.

Several sequences go in one request (the prompt is a list of token arrays), up to
`batch_tokens` tokens and `max_prompts` sequences; requests are retried on transport
errors and busy answers, since scoring has no side effects.
"""

from __future__ import annotations

import math
from typing import Callable, Iterator, Sequence

from ..errors import LmforgeError
from .bench.loglik import LoglikResult, Request

# Token-text comparison of the first answer: most tokens must read the same on both sides.
# Not all of them: servers differ in how they show a token that is only part of a UTF-8
# character (OpenAI writes "bytes:\xe2", lmforge a replacement character).
TOKENIZER_AGREEMENT = 0.5


class RemoteScorer:
    """Scores token sequences with a `RemoteModel`; `tokenizer` must be the served model's."""

    def __init__(self, remote, tokenizer, *, batch_tokens: int = 4096, max_prompts: int = 32,
                 context: int | None = None) -> None:
        if batch_tokens < 1 or max_prompts < 1:
            raise LmforgeError("batch_tokens and max_prompts must be positive")
        self.remote = remote
        self.tokenizer = tokenizer
        self.name = remote.name
        self.batch_tokens = batch_tokens
        self.max_prompts = max_prompts
        # Tokens the served model reads at once, when known: the perplexity window defaults
        # to it and long multiple-choice prompts are cut to it (keeping their end), as locally.
        self.context = context
        self.requests = 0  # HTTP requests sent (for reports and tests)
        self._checked = False

    # -- the transport ---------------------------------------------------------------------
    def _groups(self, sequences: Sequence[Sequence[int]]) -> Iterator[list[int]]:
        """Indices of `sequences` packed into requests of at most batch_tokens tokens / max_prompts prompts."""
        group: list[int] = []
        tokens = 0
        for i, s in enumerate(sequences):
            if group and (tokens + len(s) > self.batch_tokens or len(group) == self.max_prompts):
                yield group
                group, tokens = [], 0
            group.append(i)
            tokens += len(s)
        if group:
            yield group

    def _score(self, sequences: Sequence[Sequence[int]], top: int = 0,
               progress: Callable[[int], None] | None = None) -> list[list[float | None]]:
        """Per-token log-probs of each sequence (first: None); the top-1 log-prob too when top=1."""
        out: list = [None] * len(sequences)
        done = 0
        for group in self._groups(sequences):
            batch = [list(sequences[i]) for i in group]
            answers = self.remote.score_prompts(batch, top=top)
            self.requests += 1
            if not self._checked:
                self._check_tokenizer(batch[0], answers[0].tokens)
                self._checked = True
            for i, answer in zip(group, answers):
                out[i] = answer
            done += len(group)
            if progress is not None:
                progress(done)
        return out

    def _check_tokenizer(self, ids: list[int], tokens: list[str]) -> None:
        if not tokens:  # the endpoint does not show its tokens; nothing to compare
            return
        raw = self.tokenizer.ids_to_tokens(ids) if hasattr(self.tokenizer, "ids_to_tokens") else [None] * len(ids)
        same = sum(got in (self.tokenizer.decode([t]), r) for got, t, r in zip(tokens, ids, raw))
        if same < TOKENIZER_AGREEMENT * len(ids):
            raise LmforgeError(f"{self.remote.base_url} reads these token ids as other text than the local tokenizer "
                               f"does ({same} of {len(ids)} tokens agree): pass --tokenizer of the served model")

    # -- perplexity: Scorer / BatchScorer ---------------------------------------------------------
    def __call__(self, tokens: Sequence[int]) -> list[float]:
        return self.score_batch([tokens], [len(tokens) - 1])[0]

    def score_batch(self, slices: Sequence[Sequence[int]], last: Sequence[int]) -> list[list[float]]:
        """For each slice, the log-probs of its last `last[i]` tokens given everything before."""
        for i, s in enumerate(slices):
            if len(s) < 2 or not 0 <= last[i] <= len(s) - 1:
                raise ValueError(f"slice {i} of {len(s)} tokens cannot score its last {last[i]}")
        answers = self._score(slices)
        return [a.logprobs[len(a.logprobs) - n:] if n else [] for a, n in zip(answers, last)]

    # -- multiple choice: the LoglikelihoodScorer interface ---------------------------------------
    def score(self, requests: Sequence[Request], progress: Callable[[int, int], None] | None = None
              ) -> list[LoglikResult]:
        """One `LoglikResult` per (context, continuation) request, in order."""
        sequences: list[list[int]] = []  # distinct token sequences to send
        placed: list[tuple[int, int]] = []  # per request: (sequence, number of continuation tokens)
        index: dict[tuple[int, ...], int] = {}
        for context, continuation in requests:
            if not context:
                raise ValueError("a log-likelihood request needs at least one context token (e.g. BOS)")
            if not continuation:
                raise ValueError("a log-likelihood request needs at least one continuation token")
            whole = list(context) + list(continuation)
            if self.context and len(whole) > self.context + 1:
                if len(continuation) > self.context:
                    raise ValueError(f"a continuation of {len(continuation)} tokens does not fit the "
                                     f"{self.context}-token context")
                whole = whole[len(whole) - self.context - 1:]  # keep the end, as the local scorer does
            key = tuple(whole)
            if key not in index:  # identical requests (the same choice asked twice) are sent once
                index[key] = len(sequences)
                sequences.append(whole)
            placed.append((index[key], len(continuation)))
        # Longest first, so requests are packed evenly; the order does not change any value.
        order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i]))
        report = None
        if progress is not None:  # counted in requests, like the local scorer; sequences stand for several
            def report(done: int) -> None:
                progress(min(len(requests), round(done * len(requests) / len(sequences))), len(requests))
        answers = self._score([sequences[i] for i in order], top=1, progress=report)
        by_sequence = {i: a for i, a in zip(order, answers)}
        results = []
        for seq, n in placed:
            answer = by_sequence[seq]
            chosen = answer.logprobs[-n:]
            if any(v is None or math.isnan(v) for v in chosen):
                raise LmforgeError(f"{self.remote.base_url} returned a missing log-probability for a continuation token")
            tops = answer.top[-n:]
            # Greedy when every token is as likely as the most likely one (the top-1 entry);
            # an endpoint that gives no alternatives cannot tell, so the answer is False.
            greedy = all(isinstance(t, dict) and t and v >= max(t.values()) for v, t in zip(chosen, tops))
            results.append(LoglikResult(math.fsum(chosen), bool(greedy), n))
        return results


def served_context(remote) -> int | None:
    """The context length the endpoint reports for its model (vLLM: max_model_len), if any."""
    try:
        entries = remote.list_models()
    except LmforgeError:  # not every endpoint lists models; an unreachable one fails on the first request
        return None
    for entry in entries:
        if isinstance(entry, dict) and entry.get("id") == remote.name:
            for key in ("max_model_len", "context_length", "context_window"):
                value = entry.get(key)
                if isinstance(value, int) and value > 1:
                    return value - 1  # the slice carries one token more than the model reads
    return None


def connect_scorer(base_url: str, api_key: str | None, model: str | None, tokenizer: str | None, *,
                   batch_tokens: int = 4096, timeout: float = 300.0, retries: int = 2) -> RemoteScorer:
    """A `RemoteScorer` for the command line: endpoint, served model name and local tokenizer."""
    import os

    from ..model.loading import resolve_tokenizer
    from ..infer.remote import RemoteModel

    if timeout <= 0:
        raise LmforgeError("--request-timeout must be positive")
    if retries < 0:
        raise LmforgeError("--retries must be >= 0")
    local = resolve_tokenizer(tokenizer)  # a bad --tokenizer fails before any request
    remote = RemoteModel(base_url, api_key or os.environ.get("OPENAI_API_KEY"), model, timeout=timeout,
                         retries=retries)
    return RemoteScorer(remote, local, batch_tokens=batch_tokens, context=served_context(remote))
