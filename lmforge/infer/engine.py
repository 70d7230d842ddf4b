"""The generation engine (I1, I2 static batching, M9): prefill, then decode with a KV cache.

`Generator.generate` runs a batch of prompts of different lengths together. Each prompt
is prefilled on its own row of one preallocated `KVCache` (prefill is compute-bound, so
batching it buys little and would need padding); then every decode step feeds one token
per row through the model at once, each row at its own position. A row that finishes
(end-of-sequence token, stop string, token budget) stops advancing while the others go
on. `Generator.stream` runs one prompt and yields text as it is produced.
"""

from __future__ import annotations

import contextlib

import time
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch

from ..errors import LmforgeError
from ..model.kv_cache import KVCache
from .layout import torch_threads_for, uses_numpy_blas
from .request import DecodeState, check_prompt
from .sampling import SamplingParams


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    prompt_tokens: int
    finish_reason: str  # "stop" (end token or stop string) or "length" (token budget)
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)


class Generator:
    """Generates text with a `Transformer` and a `Tokenizer`; the one decoding path of lmforge."""

    def __init__(self, model, tokenizer=None) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.context_length = model.config.max_position_embeddings
        self.numpy_blas = uses_numpy_blas(model)
        self.eos_ids = set(getattr(tokenizer, "eos_ids", None) or ())
        if not self.eos_ids:
            eos = model.config.eos_token_id if tokenizer is None else tokenizer.eos_id
            self.eos_ids = set(eos) if isinstance(eos, list) else ({eos} if eos is not None else set())

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _requests(self, prompts: Sequence[str | list[int]], params) -> list[DecodeState]:
        if not prompts:
            raise LmforgeError("no prompts given")
        plist = params if isinstance(params, (list, tuple)) else [params] * len(prompts)
        if len(plist) != len(prompts):
            raise LmforgeError(f"{len(prompts)} prompts but {len(plist)} sampling settings")
        requests = []
        for prompt, p in zip(prompts, plist):
            if isinstance(prompt, str) and self.tokenizer is None:
                raise LmforgeError("this generator has no tokenizer: give prompts as token ids")
            ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
            budget = check_prompt(ids, p, self.context_length, self.model.config.vocab_size)
            requests.append(DecodeState(ids, p, budget, self.tokenizer, self.eos_ids, self.device, self.model.config.vocab_size))
        return requests

    def _steps(self, requests: list[DecodeState], use_cache: bool, timings: dict) -> Iterator[tuple[int, str]]:
        """Run prefill and decode, yielding (request index, new text) as tokens arrive."""
        model, device = self.model, self.device
        t0 = time.perf_counter()
        with torch.inference_mode():
            cache = None
            if use_cache:
                length = max(len(r.prompt_ids) + r.budget for r in requests)
                dtype = model.embed.weight.dtype
                cache = KVCache.for_model(model.config, len(requests), length, dtype, device)
            # Neighbouring prompts of equal length are prefilled together (no padding needed).
            i = 0
            while i < len(requests):
                j = i + 1
                while j < len(requests) and len(requests[j].prompt_ids) == len(requests[i].prompt_ids):
                    j += 1
                ids = torch.tensor([r.prompt_ids for r in requests[i:j]], dtype=torch.long, device=device)
                rows_cache = cache.rows(i, j) if cache is not None else None
                logits = self._forward(ids, cache=rows_cache, start=0)
                for k in range(i, j):
                    yield k, requests[k].append(requests[k].choose(logits[k - i]))
                i = j
            timings["prefill"] = time.perf_counter() - t0
            while True:
                active = [i for i, r in enumerate(requests) if not r.finished]
                if not active:
                    break
                if use_cache:
                    logits = self._decode_step(requests, cache)
                else:
                    logits = {}
                    for i in active:
                        ids = torch.tensor([requests[i].prompt_ids + requests[i].generated], device=device)
                        logits[i] = self._forward(ids)[0]
                with self._sampling_threads(len(requests)):  # as in Scheduler._decode_step
                    chosen = [(i, requests[i].choose(logits[i])) for i in active]
                for i, token in chosen:
                    yield i, requests[i].append(token)
        timings["decode"] = time.perf_counter() - t0 - timings["prefill"]

    def _decode_step(self, requests: list[DecodeState], cache: KVCache) -> torch.Tensor:
        """One token for every row; finished rows rewrite their last slot and are ignored."""
        last = [r.generated[-1] if r.generated else r.prompt_ids[-1] for r in requests]
        positions = [r.position for r in requests]
        tokens = torch.tensor(last, dtype=torch.long, device=self.device).view(-1, 1)
        if len(set(positions)) == 1:
            start: int | torch.Tensor = positions[0]
        else:
            start = torch.tensor(positions, dtype=torch.long, device=self.device)
        return self._forward(tokens, cache=cache, start=start)

    def _sampling_threads(self, rows: int):
        return torch_threads_for(rows) if self.numpy_blas else contextlib.nullcontext()

    def _forward(self, ids: torch.Tensor, cache: KVCache | None = None, start: int | torch.Tensor = 0) -> torch.Tensor:
        """Last-position logits [B, V]; small steps run PyTorch single-threaded beside NumPy's BLAS."""
        if not self.numpy_blas:
            return self.model(ids, cache=cache, start=start, last_only=True)[:, -1]
        with torch_threads_for(ids.numel()):
            return self.model(ids, cache=cache, start=start, last_only=True)[:, -1]

    def generate(
        self,
        prompts: str | list[int] | Sequence[str | list[int]],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_cache: bool = True,
    ) -> list[Completion]:
        """Complete each prompt (a string or a list of token ids); one `Completion` each."""
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        requests = self._requests(list(prompts), params or SamplingParams())
        timings: dict[str, float] = {}
        for _ in self._steps(requests, use_cache, timings):
            pass
        return [
            Completion(r.text, r.generated, len(r.prompt_ids), r.finish_reason, timings["prefill"], timings["decode"])
            for r in requests
        ]

    def stream(self, prompt: str | list[int], params: SamplingParams | None = None) -> Iterator[str]:
        """Yield the completion of one prompt as text deltas (never a split character)."""
        requests = self._requests([prompt], params or SamplingParams())
        self.last_stream = requests[0]
        for _, delta in self._steps(requests, True, {}):
            if delta:
                yield delta
