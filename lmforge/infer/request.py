"""Per-request decoding state, advanced by the `Scheduler`'s step (which `Generator` drives).

A `DecodeState` owns everything about one sequence that does not live in the model or
the KV cache: the sampled tokens, the text decoded so far (never split inside a UTF-8
character), its own random generator, stop strings, the token budget, optional
log-probabilities, and why it ended.
"""

from __future__ import annotations

import torch

from ..errors import LmforgeError
from ..tokenizer import IncrementalDecoder
from .sampling import SamplingParams, plain, sample_next, sample_rows
from .json_schema import SchemaPrefix
from .structured import JsonPrefix, constrained_choice


def check_prompt(ids: list[int], params: SamplingParams, context_length: int, vocab_size: int) -> int:
    """Validate prompt ids against the model; return the token budget that fits the context."""
    if not ids:
        raise LmforgeError("the prompt is empty (it encodes to no tokens)")
    if len(ids) >= context_length:
        raise LmforgeError(
            f"the prompt has {len(ids)} tokens but the model's context holds {context_length}"
            " (including at least one generated token); shorten the prompt"
        )
    if max(ids) >= vocab_size or min(ids) < 0:
        raise LmforgeError(f"token ids must lie in [0, {vocab_size})")
    return min(params.max_tokens, context_length - len(ids))


def end_token_ids(config, tokenizer) -> frozenset[int]:
    """Every token that ends a sequence: the tokenizer's end tokens and the model config's.

    A model may declare several (`eos_token_id` in config.json can be a list, e.g. one
    token ending documents and one ending chat turns), and the tokenizer may know more
    (end-of-turn specials, generation_config.json). Stopping on the union is what the
    model's authors meant by any of them.
    """
    declared = config.eos_token_id
    ids = set(declared) if isinstance(declared, (list, tuple)) else {declared}
    ids.discard(None)
    if tokenizer is not None:
        ids |= tokenizer.eos_ids  # its eos_id included
    return frozenset(ids)


def token_logprobs(logits: torch.Tensor, token: int, top: int) -> tuple[float, dict[int, float]]:
    """Log-prob of `token` and the `top` most likely alternatives, from raw logits [V]."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    alternatives: dict[int, float] = {}
    if top:
        values, ids = torch.topk(logp, top)
        alternatives = dict(zip(ids.tolist(), values.tolist()))
    return float(logp[token]), alternatives


class DecodeState:
    """Decoding state of one prompt: tokens so far, text so far, and why it ended."""

    def __init__(
        self, prompt_ids: list[int], params: SamplingParams, budget: int, tokenizer, eos_ids, device, vocab_size: int
    ) -> None:
        self.prompt_ids = prompt_ids
        self.params = params
        self.budget = budget
        self.eos_ids = set() if params.ignore_eos else set(eos_ids)
        self.generated: list[int] = []
        # Without a tokenizer the engine still generates token ids (text stays empty).
        self.decoder = IncrementalDecoder(tokenizer, skip_special_tokens=True) if tokenizer is not None else None
        self.text = ""
        self.emitted = 0
        self.finish_reason: str | None = None
        self.generator = params.make_generator(device)
        # Log-probabilities under the model's own distribution (before sampling transforms).
        self.token_logprobs: list[float] = []
        self.top_logprobs: list[dict[int, float]] = []
        self._pending_logprobs: tuple[float, dict[int, float]] | None = None
        # The end token that finished the sequence, and its log-probs when asked for. It is
        # kept apart from `generated` (it is not part of the answer's text or token count),
        # but clients that score with echo + logprobs expect an entry for every token the
        # model produced, this one included.
        self.end_token: int | None = None
        self.end_logprobs: tuple[float, dict[int, float]] | None = None
        self.json = None
        if params.json_object or params.json_schema is not None:
            if tokenizer is None or tokenizer.token_bytes(0) is None:
                raise LmforgeError("JSON output needs a byte-level tokenizer")
            self.json = SchemaPrefix(params.json_schema) if params.json_schema is not None else JsonPrefix()
        self.tokenizer = tokenizer
        self.counts = None
        if params.presence_penalty or params.frequency_penalty:
            self.counts = torch.zeros(vocab_size, dtype=torch.int32, device=device)
        self.context = None
        if params.repetition_penalty != 1.0:
            # Preallocated so the penalty's context grows without reallocating each step.
            self.context = torch.empty(len(prompt_ids) + budget, dtype=torch.long, device=device)
            self.context[: len(prompt_ids)] = torch.tensor(prompt_ids, dtype=torch.long)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def position(self) -> int:
        """Cache position of the next token fed to the model."""
        return len(self.prompt_ids) + len(self.generated) - 1

    def choose(self, logits: torch.Tensor) -> int:
        seen = self.context[: len(self.prompt_ids) + len(self.generated)] if self.context is not None else torch.empty(0, dtype=torch.long)
        if self.json is not None:
            def draw(row: torch.Tensor) -> int:
                return sample_next(row, self.params, seen, self.generator, self.counts)

            token = constrained_choice(logits, self.json, self.tokenizer.token_bytes, self.eos_ids, draw)
        else:
            token = sample_next(logits, self.params, seen, self.generator, self.counts)
        if self.params.logprobs is not None:
            self._pending_logprobs = token_logprobs(logits, token, self.params.logprobs)
        return token

    @staticmethod
    def choose_rows(states: list["DecodeState"], logits: torch.Tensor) -> list[int]:
        """`choose` of every state, row i of `logits` [B, V] for `states[i]`: the same tokens, with
        the rows that need only a temperature (or none) sampled together (`sample_rows`)."""
        together = [i for i, s in enumerate(states) if s.json is None and plain(s.params)] if len(states) > 1 else []
        tokens: list[int | None] = [None] * len(states)
        if together:
            rows = logits if len(together) == len(states) else logits[together]
            picked = sample_rows(rows, [states[i].params for i in together], [states[i].generator for i in together])
            for i, token in zip(together, picked):
                tokens[i] = token
        for i, state in enumerate(states):
            if tokens[i] is None:
                tokens[i] = state.choose(logits[i])
            elif state.params.logprobs is not None:
                state._pending_logprobs = token_logprobs(logits[i], tokens[i], state.params.logprobs)
        return tokens

    def append(self, token: int) -> str:
        """Record a sampled token; return the text that is now safe to show."""
        if token in self.eos_ids:
            self.end_token, self.end_logprobs = token, self._pending_logprobs
            self.finish_reason = "stop"
            self._flush()
            return self._release()
        self.generated.append(token)
        if self.counts is not None:
            self.counts[token] += 1
        if self._pending_logprobs is not None:
            self.token_logprobs.append(self._pending_logprobs[0])
            self.top_logprobs.append(self._pending_logprobs[1])
        if self.context is not None:
            self.context[len(self.prompt_ids) + len(self.generated) - 1] = token
        before = len(self.text)
        if self.decoder is not None:
            self.text += self.decoder.push(token)
        if self.json is not None and self.json.done:
            self.finish_reason = "stop"  # the object is closed: nothing valid may follow
            self._flush()
        elif self.params.stop and self._cut_at_stop(before):
            self.finish_reason = "stop"
        elif len(self.generated) >= self.budget:
            self.finish_reason = "length"
            self._flush()
            self._cut_at_stop(before)
        return self._release()

    def _flush(self) -> None:
        if self.decoder is not None:
            self.text += self.decoder.flush()

    def _cut_at_stop(self, before: int) -> bool:
        longest = max(len(s) for s in self.params.stop) if self.params.stop else 0
        window_start = max(0, before - longest + 1)
        hits = [i for s in self.params.stop if (i := self.text.find(s, window_start)) != -1]
        if hits:
            self.text = self.text[: min(hits)]
            return True
        return False

    def _release(self) -> str:
        """Text not yet emitted, minus a tail that might still become a stop string."""
        end = len(self.text)
        if not self.finished:
            for stop in self.params.stop:
                for k in range(min(len(stop) - 1, len(self.text)), 0, -1):
                    if self.text.endswith(stop[:k]):
                        end = min(end, len(self.text) - k)
                        break
        delta = self.text[self.emitted : end]
        self.emitted = max(self.emitted, end)
        return delta
