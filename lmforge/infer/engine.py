"""Offline generation (I1, M9): the `Scheduler`'s step, driven synchronously.

lmforge has one decode loop, `Scheduler.step` (continuous batching over a KV cache; see
scheduler.py). `Generator` is its synchronous driver, the way an offline engine drives
the same engine a server runs: `generate` builds a scheduler whose batch holds all of
its prompts (or `max_batch` of them, the others joining as rows free up) and whose cache
is just long enough for the longest one, submits them, and calls `step()` on the
caller's thread until every request has finished (no background thread). `stream` does
the same for one prompt and yields the text of each step's events.

Whatever a `Generator` produces, a server running the same scheduler produces for the
same request, token for token: greedy or seeded (each request has its own random
generator), with the same end tokens (`request.end_token_ids`), stop strings and budget.

A generator keeps the key/value cache of its last call (on the CPU, up to
`SPARE_CACHE_BYTES`) and hands it to the next call whose prompts fit it, cleared: writing
into freshly mapped memory costs the operating system a page fault per page, and for a
512-token prompt of the default model those faults (23.6 MB of cache) took 10-60 ms of a
~300 ms prefill on a 2-core Xeon, more than the attention itself.

`use_cache=False` runs the same step without a KV cache: each step recomputes every
row's full sequence. It is slow (quadratic) and exists as the reference that the cached
path must equal exactly (tests/test_model_parity.py).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Iterator, Sequence

from ..errors import LmforgeError
from ..model.kv_cache import KVCache
from .request import check_prompt
from .sampling import SamplingParams
from .scheduler import RequestHandle, Scheduler


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    prompt_tokens: int
    finish_reason: str  # "stop" (end token or stop string) or "length" (token budget)
    # Time to the first token (queueing and prefill), then from it to the last token.
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)


# The largest cache a Generator keeps between calls (see the module's docstring).
SPARE_CACHE_BYTES = 256 << 20


class Generator:
    """Generates text with a `Transformer` and a `Tokenizer` by stepping a `Scheduler` to completion."""

    def __init__(self, model, tokenizer=None, adapters=None, speculator=None) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.adapters = adapters  # an AdapterBank installed on `model` (lmforge/infer/adapters.py), or None
        # A speculative.Speculator: single-row steps draft and verify several tokens at once.
        self.speculator = speculator
        self._spare: KVCache | None = None  # the last call's cache; a running call holds none
        self._spare_lock = threading.Lock()

    def _take_cache(self, rows: int, length: int) -> KVCache | None:
        """The spare cache, cleared, where it holds `rows` rows of `length` positions; else a new one
        (None off the CPU, where the device's allocator reuses memory by itself)."""
        device = next(self.model.parameters()).device
        if device.type != "cpu":
            return None
        with self._spare_lock:
            spare, self._spare = self._spare, None
        dtype, config = self.model.embed.weight.dtype, self.model.config
        if spare is not None and spare.fits(config, rows, length, dtype, device):
            spare.clear(rows, length)
            return spare
        return KVCache.for_model(config, rows, length, dtype, device)

    def _give_back(self, cache: KVCache | None) -> None:
        if cache is not None and cache.k.device.type == "cpu" and cache.nbytes <= SPARE_CACHE_BYTES:
            with self._spare_lock:
                self._spare = cache

    def _submit(
        self, prompts: Sequence[str | list[int]], params, use_cache: bool, stream: bool, max_batch: int | None = None,
        adapter: int | Sequence[int] = 0,
    ) -> tuple[Scheduler, list[RequestHandle]]:
        """A scheduler with a row for every prompt (or `max_batch` rows), the prompts submitted to it."""
        if not prompts:
            raise LmforgeError("no prompts given")
        plist = params if isinstance(params, (list, tuple)) else [params] * len(prompts)
        if len(plist) != len(prompts):
            raise LmforgeError(f"{len(prompts)} prompts but {len(plist)} sampling settings")
        alist = list(adapter) if isinstance(adapter, (list, tuple)) else [adapter] * len(prompts)
        if len(alist) != len(prompts):
            raise LmforgeError(f"{len(prompts)} prompts but {len(alist)} adapters")
        ids = []
        for prompt in prompts:
            if isinstance(prompt, str) and self.tokenizer is None:
                raise LmforgeError("this generator has no tokenizer: give prompts as token ids")
            ids.append(self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt))
        config = self.model.config
        # Checked against the model's context here, so that errors name it; the longest
        # request then bounds the scheduler's sequences, and so its cache rows.
        longest = max(len(i) + check_prompt(i, p, config.max_position_embeddings, config.vocab_size)
                      for i, p in zip(ids, plist))
        rows = len(ids) if max_batch is None else min(len(ids), max_batch)
        scheduler = Scheduler(
            self.model,
            self.tokenizer,
            max_batch=rows,
            max_seq_len=longest,
            max_waiting=len(ids),
            # Nothing is shared across calls, and a reused prefix may differ from a
            # recomputed one in the last bits: offline results must not depend on history.
            prefix_cache_bytes=0,
            use_cache=use_cache,
            adapters=self.adapters,
            speculator=self.speculator,
            cache_buffer=self._take_cache(rows, longest) if use_cache else None,
        )
        return scheduler, [scheduler.submit(i, p, stream=stream, adapter=a) for i, p, a in zip(ids, plist, alist)]

    def generate(
        self,
        prompts: str | list[int] | Sequence[str | list[int]],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_cache: bool = True,
        max_batch: int | None = None,
        adapter: int | Sequence[int] = 0,
    ) -> list[Completion]:
        """Complete each prompt (a string or a list of token ids); one `Completion` each.

        `max_batch` bounds the rows decoded together (and so the KV cache's size): the
        other prompts wait and are admitted as rows free up, each at the next step.
        `adapter`: the LoRA adapter (index in the generator's `AdapterBank`; 0 the base) of
        every prompt, or one per prompt; rows of different adapters share each step.
        """
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        scheduler, handles = self._submit(list(prompts), params or SamplingParams(), use_cache, False, max_batch,
                                          adapter)
        try:
            scheduler.run_until_idle()
        finally:
            self._give_back(scheduler.cache)
        return [_completion(h) for h in handles]

    def stream(self, prompt: str | list[int], params: SamplingParams | None = None) -> Iterator[str]:
        """Yield the completion of one prompt as text deltas (never a split character)."""
        scheduler, (handle,) = self._submit([prompt], params or SamplingParams(), True, stream=True)
        busy = True
        try:
            while busy:
                busy = scheduler.step()
                for event in handle.poll():
                    if event.text:
                        yield event.text
        finally:
            if not busy:  # an abandoned stream's cache may still hold its rows: not handed on
                self._give_back(scheduler.cache)


def _completion(handle: RequestHandle) -> Completion:
    state = handle.state
    return Completion(
        state.text,
        state.generated,
        len(state.prompt_ids),
        state.finish_reason,
        handle.first_token_at - handle.submitted_at,
        handle.finished_at - handle.first_token_at,
    )
