"""Continuous batching (I2): requests join and leave the running batch at every decode step.

A static batch waits for its slowest member: a 10-token answer that shares a batch with
a 500-token answer holds its slot, idle, until the long one ends. The `Scheduler` keeps a
fixed pool of KV-cache rows instead. At every step it

1. admits waiting requests into free rows and prefills them (one forward per group; a
   prompt cached but for a short tail is fed through the decode steps instead),
2. runs one decode step for every running row at once, each row at its own position
   and with its own sampling settings, stop conditions and random generator,
3. retires rows whose request finished (end token, stop string, budget, cancellation)
   so that the next step can admit someone new.

Running rows are kept contiguous (rows 0..n-1): when row i finishes, a running row from
the end is moved into it. The move costs one copy of that request's keys and values,
once; in exchange every decode step reads a plain slice of the cache, with no gather.

`Scheduler.step` is that round, and it is the only decode loop of lmforge. A server
calls `start()`: one background thread then owns the model (PyTorch work is never run
from two threads) and repeats `step()` while there is work; callers interact through
`RequestHandle`s, from plain threads or from asyncio. Offline generation
(`lmforge.infer.engine.Generator`) builds a scheduler sized for its prompts, never
starts the thread, and calls `step()` itself on the caller's thread until all are done.

With an `AdapterBank` (lmforge/infer/adapters.py) each request may name a LoRA adapter;
rows with different adapters (and base rows) share the same prefill and decode forwards,
the bank told before each forward which adapter each row uses. Prefix-cache entries are
kept per adapter, since an adapter changes the keys and values from its first adapted
layer on.

A new prompt whose keys and values the prefix cache holds but for a short tail (at most
`feed_tokens`) joins the running rows without a prefill forward: the next decode steps feed
its tail one token each, and the step that takes its last prompt token gives its first
token (`_feeds`). A row more costs a batched step its own arithmetic only; a prefill would
read every weight and stop every running stream while it runs.

With `use_cache=False` there is no KV cache: every step recomputes each row's whole
sequence (prompt and generated tokens) from scratch, one row at a time. Nothing else
changes, so comparing the two modes tests the cache alone, everything from sampling
to stop conditions being the same code.

With a `Speculator` (lmforge/infer/speculative.py), a step that has a single running row
lets a drafter guess the next k tokens and verifies them with one forward over k+1
positions, appending up to k+1 tokens; any other step is the plain one-token step.

Chunked prefill (`prefill_chunk` > 0): a prompt whose uncached part is longer than
`prefill_chunk` tokens is not prefilled in one forward, which would stall every running
stream for as long as that forward takes (seconds for a few thousand tokens on a CPU).
It takes the last cache row instead and is prefilled a chunk per step, each chunk
attending to the chunks before it through the cache, between the decode steps of the
running rows. A chunk holds at most `prefill_chunk` tokens, and while streams are
running, as many as take about one decode step (each chunk's size is the last one's
scaled by the ratio of the decode step's time to its time, at least `min_chunk`), so a
running stream's gap between tokens about doubles instead of growing by the whole
prefill. While streams run, a chunk rides in their decode step's forward instead
(`mixed_chunks`, the default; `Transformer.forward_segments`): the rows of both are
concatenated, so every weight is read once for both and the chunk costs its own
arithmetic and attention, not a forward of its own; it is then sized so that the step
grows by about `mixed_step_share` of a plain decode step. When its last chunk is in,
its first token is sampled and its keys and values move to the first free row (one copy) to join the running batch. One long
prompt is chunked at a time; requests queued behind it wait in order. The chunks give
the same result as one forward up to float rounding (other product shapes), like the
prefix cache's reused keys and values.

Paged KV cache (`kv_cache="paged"`, lmforge/model/paged_kv.py): the cache is a pool of
blocks of `kv_block_size` positions instead of `max_batch` rows of `max_seq_len`, so a
memory budget holds as many requests as their actual lengths allow rather than as many
as their worst case does. A waiting request is admitted (in queue order) when the free
blocks hold its prompt plus one block of decode room, with one block left over for each
running row (each claims one within the next `kv_block_size` steps; without that margin
a readmitted request would be preempted again at once); a running row claims a block each
time its tokens cross into a new one and gives them all back when it ends. Moving a row
(compaction, a chunked prompt joining the batch) moves its block table, not its keys and
values. When a decode step finds no free block for some row, the most recently admitted
request is preempted: its blocks are freed and it goes back to the head of the queue,
keeping its tokens, text and random generator; readmitted, it recomputes its keys and
values in one prefill of prompt + answer so far and decodes on (recompute, as vLLM does,
rather than pausing it on its blocks: a paused row keeps the memory the others are short
of, and the oldest row alone might then find none). The prefix cache shares the pool's
blocks by reference (`PagedPrefixCache`): a hit points the new row's block table at the
blocks that hold the prefix, admitted by the blocks it still needs, and a prefilled prompt's
full blocks are kept by taking a reference, so no keys or values are copied either way. The
shared blocks are whole blocks before the row's first computed position, so no row ever
writes into one. Blocks only the prefix cache still holds count as free: a row that needs a
block evicts the least recently used of them before anyone is preempted. The pool is the
prefix cache's budget then (`prefix_cache_bytes` only switches it on or off).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from ..errors import LmforgeError
from ..io.allocator import keep_freed_memory
from ..model.kv_cache import KVCache
from ..model.paged_kv import PagedKVCache, blocks_for, contiguous_rows_in
from . import decode_kernels
from .bf16_prefill import generation_products
from .layout import prepack, release_openmp_threads, torch_threads_for, uses_numpy_blas
from .prefix_cache import PagedPrefixCache, PrefixCache
from .request import DecodeState, check_prompt, end_token_ids
from .sampling import SamplingParams


KV_CACHE_KINDS = ("contiguous", "paged")


class QueueFull(LmforgeError):
    """The waiting queue is at its bound; the caller should retry later."""


class ShuttingDown(LmforgeError):
    """The scheduler no longer accepts requests."""


@dataclass
class Event:
    """What a handle receives: a text delta, and at the end a `final` event."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[dict[int, float]] = field(default_factory=list)
    final: bool = False
    finish_reason: str | None = None
    error: str | None = None


class RequestHandle:
    """A submitted request: iterate its events (sync or async), or wait for the result.

    A handle submitted with `stream=False` receives one event only, the final one, which
    carries the whole text, tokens and log-probs.
    """

    def __init__(
        self, request_id: int, prompt_ids: list[int], loop: asyncio.AbstractEventLoop | None, stream: bool = True
    ) -> None:
        self.id = request_id
        self.prompt_ids = prompt_ids
        self.loop = loop
        self.stream = stream
        self._sent_tokens = 0  # tokens already handed out in events
        self._queue: asyncio.Queue | queue.Queue = asyncio.Queue() if loop is not None else queue.Queue()
        self.cancelled = False
        self.submitted_at = time.perf_counter()
        self.first_token_at: float | None = None
        self.finished_at: float | None = None
        self.state: DecodeState | None = None
        self.cached = 0  # prompt tokens served from the prefix cache
        self.prefilled = 0  # prompt tokens in the cache so far (chunked prefill)
        self.feed = 0  # prompt tokens still to feed through decode steps (a short uncached tail)
        self.adapter = 0  # index in the scheduler's AdapterBank; 0: the base model
        self.admitted = 0  # admission order (paged cache: the newest is preempted first)
        self.preemptions = 0  # times its blocks were taken back and it was queued again
        self.shared: list[int] = []  # paged prefix-cache blocks pinned for it between admission and prefill

    def cancel(self) -> None:
        """Stop generating (e.g. the client disconnected); the row is freed at the next step."""
        self.cancelled = True

    def __iter__(self):
        while True:
            event = self._queue.get()
            yield event
            if event.final:
                return

    async def events(self):
        while True:
            event = await self._queue.get()
            yield event
            if event.final:
                return

    def poll(self) -> list[Event]:
        """The events delivered so far, without waiting (for callers that run `Scheduler.step`)."""
        events = []
        while True:
            try:
                events.append(self._queue.get_nowait())
            except (queue.Empty, asyncio.QueueEmpty):
                return events

    def result(self) -> Event:
        """Block until done; one event with the whole text, tokens and log-probs."""
        total = Event()
        for event in self:
            _merge(total, event)
        return total

    async def aresult(self) -> Event:
        total = Event()
        async for event in self.events():
            _merge(total, event)
        return total


def _average(previous: float, value: float, weight: float = 0.2) -> float:
    """Exponential moving average (the first value starts it)."""
    return value if not previous else (1 - weight) * previous + weight * value


def _deliver(items: list[tuple[RequestHandle, Event]]) -> None:
    for handle, event in items:
        handle._queue.put_nowait(event)


def _merge(total: Event, event: Event) -> None:
    total.text += event.text
    total.token_ids += event.token_ids
    total.logprobs += event.logprobs
    total.top_logprobs += event.top_logprobs
    if event.final:
        total.final, total.finish_reason, total.error = True, event.finish_reason, event.error


@dataclass
class SchedulerStats:
    """Counters the server exports as metrics."""

    waiting: int = 0
    running: int = 0
    steps: int = 0
    generated_tokens: int = 0
    prompt_tokens: int = 0
    cached_prompt_tokens: int = 0  # prompt tokens whose keys/values came from the prefix cache
    fed_prompts: int = 0  # prompts whose uncached tail went through decode steps, not a prefill
    finished: int = 0
    prefilling: int = 0  # long prompts being prefilled chunk by chunk (0 or 1)
    prefill_chunks: int = 0
    kv_blocks_total: int = 0  # paged cache: blocks in the pool (0: a contiguous cache)
    kv_blocks_free: int = 0
    preempted: int = 0  # paged cache: requests sent back to the queue when blocks ran out


class Scheduler:
    """Continuous-batching generation over one model: `step()` by hand, or a background thread.

    `max_seq_len` bounds prompt + completion (the model's context at most) and is the
    number of KV-cache positions per row: a caller that knows its requests, like
    `Generator`, asks for no more than the longest of them needs.

    `kv_cache`: "contiguous" (`max_batch` rows of `max_seq_len` positions) or "paged"
    (blocks of `kv_block_size` positions shared by up to `max_batch` rows).
    `kv_memory_bytes` (0: no budget) bounds the cache: a contiguous cache gets as many
    rows as fit (at most `max_batch`), a paged one as many blocks as fit; without a
    budget a paged cache gets the blocks of the contiguous cache's memory.
    `cache_buffer`: a contiguous `KVCache` to use instead of allocating one (at least
    `max_batch` rows of `max_seq_len` positions; what it holds is overwritten).

    `prefix_cache_bytes`: the copying prefix cache's budget; with a paged cache whose
    prefix cache shares blocks (`prefix_sharing`, the default) any positive value turns it
    on and the pool itself bounds it. `prefix_sharing=False` keeps the copying cache on a
    paged pool too (for comparison).
    """

    def __init__(
        self,
        model,
        tokenizer,
        max_batch: int = 16,
        max_seq_len: int | None = None,
        max_waiting: int = 64,
        max_prefill_tokens: int = 2048,
        prefix_cache_bytes: int = 128 << 20,
        on_finish: Callable[[RequestHandle], None] | None = None,
        use_cache: bool = True,
        adapters=None,
        speculator=None,
        prefill_chunk: int = 0,
        kv_cache: str = "contiguous",
        kv_block_size: int = 16,
        kv_memory_bytes: int = 0,
        mixed_chunks: bool = True,
        prefix_sharing: bool = True,
        feed_tokens: int = 8,
        cache_buffer: KVCache | None = None,
    ) -> None:
        if max_batch < 1:  # no row could ever be admitted: every request would wait forever
            raise LmforgeError(f"max_batch must be at least 1, got {max_batch}")
        check_kv_options(kv_cache, kv_block_size, kv_memory_bytes)
        self.model = model
        self.tokenizer = tokenizer
        self.adapters = adapters  # an AdapterBank installed on `model`, or None
        self.speculator = speculator  # a speculative.Speculator, or None
        self.max_seq_len = min(max_seq_len or model.config.max_position_embeddings, model.config.max_position_embeddings)
        self.paged = use_cache and kv_cache == "paged"
        self.kv_block_size = kv_block_size
        dtype = model.embed.weight.dtype
        if use_cache and not self.paged and kv_memory_bytes:
            max_batch = min(max_batch, self._rows_in_budget(kv_memory_bytes, dtype))
        self.max_batch = max_batch
        self.max_waiting = max_waiting
        self.max_prefill_tokens = max_prefill_tokens
        if prefill_chunk < 0:
            raise LmforgeError(f"prefill_chunk must be 0 (off) or a positive number of tokens, got {prefill_chunk}")
        # Chunking needs a cache to continue from and a spare row to fill.
        self.prefill_chunk = prefill_chunk if use_cache and max_batch > 1 else 0
        self._chunking: RequestHandle | None = None  # the long prompt being prefilled in the last row
        self.mixed_chunks = mixed_chunks  # a chunk rides in the running rows' decode forward (see _mixed_step)
        if feed_tokens < 0:
            raise LmforgeError(f"feed_tokens must be 0 (off) or a positive number of tokens, got {feed_tokens}")
        self.feed_tokens = feed_tokens  # see `_feeds`
        # Measured as the scheduler runs: a chunk is sized to take about as long as a decode
        # step (a moving average), so a running stream's token gap about doubles at most.
        self._decode_seconds = 0.0
        self._chunk_fit = 0  # tokens a chunk should hold to take one decode step (0: not measured yet)
        self._chunk_token_seconds = 0.0  # a chunk token's cost in a mixed step (moving average)
        self.prefix_cache = PrefixCache(prefix_cache_bytes) if prefix_cache_bytes > 0 and use_cache else None
        self._outbox: list[tuple[RequestHandle, Event]] = []
        self.on_finish = on_finish
        self.device = next(model.parameters()).device
        self.eos_ids = end_token_ids(model.config, tokenizer)
        self.cache = None
        if self.paged:
            self.cache = PagedKVCache.for_model(model.config, self._blocks_in_budget(kv_memory_bytes, dtype),
                                                kv_block_size, max_batch, self.max_seq_len, dtype, self.device)
        elif use_cache and cache_buffer is not None:
            if not cache_buffer.fits(model.config, max_batch, self.max_seq_len, dtype, self.device):
                raise LmforgeError(f"the cache buffer given cannot hold {max_batch} rows of {self.max_seq_len} "
                                   "positions of this model")
            self.cache = cache_buffer
        elif use_cache:
            self.cache = KVCache.for_model(model.config, max_batch, self.max_seq_len, dtype, self.device)
        if self.paged and prefix_sharing and self.prefix_cache is not None:
            self.prefix_cache = PagedPrefixCache(self.cache)  # blocks of the pool, held by reference
        self.shares_prefix = isinstance(self.prefix_cache, PagedPrefixCache)
        self._admissions = itertools.count(1)
        self.numpy_blas = uses_numpy_blas(model)
        self.stats = SchedulerStats()
        self._ids = itertools.count(1)
        self._waiting: list[tuple[RequestHandle, SamplingParams, int]] = []
        self._jobs: list[tuple[Callable[[], Any], queue.Queue]] = []
        self._rows: list[RequestHandle] = []  # running requests; index = cache row
        self._lock = threading.Condition()
        self._accepting = True
        self._thread: threading.Thread | None = None
        self._count_blocks()

    def _rows_in_budget(self, budget: int, dtype: torch.dtype) -> int:
        """Contiguous rows of `max_seq_len` positions that fit `budget` bytes (at least one, or an error)."""
        rows = contiguous_rows_in(budget, self.model.config, self.max_seq_len, dtype)
        if rows < 1:
            row = PagedKVCache.block_bytes(self.model.config, self.max_seq_len, dtype)
            raise LmforgeError(f"a KV-cache budget of {budget / 2**20:.1f} MiB holds no row of {self.max_seq_len} "
                               f"positions ({row / 2**20:.1f} MiB each); raise --kv-memory-mb or lower "
                               "--max-seq-len")
        return rows

    def _blocks_in_budget(self, budget: int, dtype: torch.dtype) -> int:
        """Paged blocks for `budget` bytes (the scratch block included), or the contiguous cache's memory."""
        per_row = blocks_for(self.max_seq_len, self.kv_block_size)
        if not budget:
            return self.max_batch * per_row
        blocks = budget // PagedKVCache.block_bytes(self.model.config, self.kv_block_size, dtype) - 1
        if blocks < per_row:
            # A request of max_seq_len tokens must fit alone, or preempting it would never end.
            raise LmforgeError(f"a KV-cache budget of {budget / 2**20:.1f} MiB holds {max(blocks, 0)} blocks of "
                               f"{self.kv_block_size} positions, fewer than one sequence of {self.max_seq_len} "
                               f"tokens needs ({per_row}); raise --kv-memory-mb or lower --max-seq-len")
        return blocks

    # ----------------------------------------------------------------- public API
    def start(self) -> "Scheduler":
        """Serve requests from a background thread (without it, call `step()` yourself)."""
        if self._thread is None:
            prepack(self.model)  # batched steps' weights, made now rather than during the first request
            if self.device.type == "cpu":
                release_openmp_threads()  # see its docstring: the scheduler thread runs the model from now on
                keep_freed_memory()  # its arena would hand scratch memory back every step (lmforge/io/allocator.py)
            self._thread = threading.Thread(target=self._loop, name="lmforge-scheduler", daemon=True)
            self._thread.start()
        return self

    def submit(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        loop: asyncio.AbstractEventLoop | None = None,
        stream: bool = True,
        adapter: int = 0,
    ) -> RequestHandle:
        """Queue a request; raises `LmforgeError` for bad input, `QueueFull` when saturated.

        `adapter`: the index of a LoRA adapter in the scheduler's `AdapterBank` (0: the base).
        """
        prompt_ids = list(prompt_ids)
        budget = check_prompt(prompt_ids, params, self.max_seq_len, self.model.config.vocab_size)
        if adapter:
            if self.adapters is None:
                raise LmforgeError(f"adapter {adapter} requested, but this scheduler serves no adapters")
            self.adapters.check(adapter)
        handle = RequestHandle(next(self._ids), prompt_ids, loop, stream)
        handle.adapter = adapter
        with self._lock:
            if not self._accepting:
                raise ShuttingDown("the server is shutting down")
            if len(self._waiting) >= self.max_waiting:
                raise QueueFull(f"too many requests waiting ({self.max_waiting}); retry later")
            self._waiting.append((handle, params, budget))
            self.stats.waiting = len(self._waiting)
            self._lock.notify()
        return handle

    def run(self, fn: Callable[[], Any]) -> Any:
        """Run `fn` on the scheduler thread between steps (for work that needs the model)."""
        if self._thread is None:  # nobody else runs the model: the caller's thread is the scheduler's
            try:
                return fn()
            finally:
                decode_kernels.forget_check(self.model)
        done: queue.Queue = queue.Queue()
        with self._lock:
            self._jobs.append((fn, done))
            self._lock.notify()
        ok, value = done.get()
        if not ok:
            raise value
        return value

    def shutdown(self, drain: bool = True, timeout: float | None = None) -> None:
        """Stop accepting; with `drain`, finish what is running and waiting, else cancel it."""
        with self._lock:
            self._accepting = False
            if not drain:
                for handle, _, _ in self._waiting:
                    handle.cancel()
                for handle in self._rows:
                    handle.cancel()
            self._lock.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def idle(self) -> bool:
        return not self._rows and not self._waiting and self._chunking is None

    # --------------------------------------------------------------- the loop
    def step(self) -> bool:
        """One round: queued jobs, admission, prefill, one decode step, retirement.

        Events are delivered to the handles before it returns. Returns whether requests
        remain (running or waiting). An exception ends every request it touched with an
        `error` event, then propagates.
        """
        if self._thread is not None and threading.current_thread() is not self._thread:
            raise RuntimeError("this scheduler was started: its own thread runs the steps")
        with self._lock:
            jobs, self._jobs = self._jobs, []
            admitted, long = [], None
            capacity = self.max_batch - (self._chunking is not None)
            free = self.cache.free_blocks if self.paged else 0
            while self._waiting and len(self._rows) + len(admitted) < capacity:
                item = self._waiting[0]
                if self._long(item) and (self._chunking is not None or long is not None):
                    break  # one long prompt at a time; the queue keeps its order
                if self.paged:
                    need = self._blocks_to_admit(item)
                    # One block stays free for each running row, which claims one within the
                    # next block_size steps: admitting into that margin would preempt at once.
                    rows = len(self._rows) + len(admitted) + (long is not None) + (self._chunking is not None)
                    if need and need + rows > free:
                        break  # the queue keeps its order: the head waits for blocks
                    free -= need
                    self._pin_prefix(item)
                item[0].admitted = next(self._admissions)
                if self._long(item):
                    long = self._waiting.pop(0)
                    capacity -= 1  # it takes the last row
                    continue
                admitted.append(self._waiting.pop(0))
            self.stats.waiting = len(self._waiting)
        for fn, done in jobs:
            try:
                done.put((True, fn()))
            except BaseException as exc:  # handed back to the caller's thread
                done.put((False, exc))
        if jobs:  # they may have changed the model
            decode_kernels.forget_check(self.model)
        try:
            # Generation may use bf16 prefill products (bf16_prefill.py); the jobs above, which
            # score prompts, ran with float32 products.
            with torch.inference_mode(), generation_products():
                if long is not None:
                    self._start_chunking(*long)
                fresh = [item for item in admitted if item[0].state is None]
                streaming = bool(self._rows)  # this step decodes anyway
                for handle, _, _ in admitted:
                    if handle.state is not None:
                        self._resume(handle)
                for handle, params, _ in fresh:
                    handle.cached = self._prefix_hit(handle, params)
                fed = [item for item in fresh if streaming and self._feeds(item[0])]
                if fed:
                    self._start_feeding(fed)
                    fresh = [item for item in fresh if item[0].state is None]
                for group in self._prefill_groups(fresh):
                    self._prefill(group)
                mixable = self._mixable()
                if self._chunking is not None and not (self._rows and mixable):
                    self._prefill_chunk()
                self._retire()
                if self.paged:
                    self._claim_decode_blocks()
                if self._rows and self._chunking is not None and mixable:
                    self._mixed_step()
                    self._retire()
                elif self._rows:
                    self._timed_decode_step()
                    self._retire()
        except Exception as exc:
            self._fail(admitted + ([long] if long is not None and self._chunking is not long[0] else []),
                       f"{type(exc).__name__}: {exc}")
            raise
        finally:
            self.stats.prefilling = int(self._chunking is not None)
            self._count_blocks()
            self._flush()
        return not self.idle

    def _count_blocks(self) -> None:
        if self.paged:
            self.stats.kv_blocks_total, self.stats.kv_blocks_free = self.cache.total_blocks, self.cache.free_blocks

    def run_until_idle(self) -> None:
        """Step until every submitted request has finished (synchronous use, no thread).

        No other code runs between these steps, so the compiled decode step checks the model
        once, not at every step (`decode_kernels.steady`; jobs still make it check again)."""
        with decode_kernels.steady(self.model):
            while self.step():
                pass

    def _loop(self) -> None:
        # Other code reaches the model only through jobs (`run`), which run inside `step` and
        # make the compiled decode step check the model again (see `run_until_idle`).
        with decode_kernels.steady(self.model):
            self._serve()

    def _serve(self) -> None:
        while True:
            with self._lock:
                while self.idle and not self._jobs and self._accepting:
                    self._lock.wait()
                if self.idle and not self._jobs and not self._accepting:
                    return
            # A failed step has already answered its requests with an error event; the
            # thread goes on serving the others, since a bug must not hang every client.
            with contextlib.suppress(Exception):
                self.step()

    def _fail(self, admitted: list, error: str) -> None:
        for handle, _, _ in admitted:
            self._unpin(handle)
        running = set(map(id, self._rows))
        stranded = [h for h, _, _ in admitted if id(h) not in running and (h.state is None or not h.state.finished)]
        if self._chunking is not None:
            stranded.append(self._chunking)
            self._chunking = None
        for handle in self._rows + stranded:
            handle.finished_at = time.perf_counter()
            self._post(handle, Event(final=True, finish_reason="error", error=error))
            if self.on_finish is not None:
                self.on_finish(handle)
        self._rows.clear()
        self.stats.running = 0
        if self.paged:
            self.cache.release_all()

    def _threads(self, rows: int):
        """One PyTorch thread for single-row work beside NumPy's BLAS (see layout.py)."""
        return torch_threads_for(rows) if self.numpy_blas else contextlib.nullcontext()

    def _forward(
        self, ids: torch.Tensor, cache: KVCache | None, start, select: torch.Tensor | None = None,
        handles: list[RequestHandle] | None = None, every_position: bool = False,
    ) -> torch.Tensor:
        """Logits [B, V] of the last (or `select`ed) position of every row (row i: `handles[i]`).

        `every_position`: logits [B, L, V] of all the positions instead.
        """
        rows = contextlib.nullcontext() if self.adapters is None or handles is None else \
            self.adapters.rows([h.adapter for h in handles], self.device)  # which adapter each row uses
        with self._threads(ids.numel()), rows:
            if every_position:
                return self.model(ids, cache=cache, start=start)
            return self.model(ids, cache=cache, start=start, last_only=True, select=select)[:, -1]

    def _uncached_logits(self, handles: list[RequestHandle]) -> torch.Tensor:
        """Without a cache: each row's whole sequence, alone, unpadded (the reference computation)."""
        rows = []
        for handle in handles:
            state = handle.state
            ids = torch.tensor([state.prompt_ids + state.generated], dtype=torch.long, device=self.device)
            rows.append(self._forward(ids, None, 0, handles=[handle])[0])
        return torch.stack(rows)

    def _prefill_groups(self, admitted: list) -> list[list]:
        """Split admitted requests (their prefix-cache hits in `cached`) into prefill batches.

        A batch shares one start position (the length of its cached prefix, usually the
        same system prompt for all) and holds at most `max_prefill_tokens` padded
        tokens; sorting by length first keeps the padding small.
        """
        groups: dict[int, list[list]] = {}
        for item in sorted(admitted, key=lambda a: (a[0].cached, len(a[0].prompt_ids))):
            handle = item[0]
            batches = groups.setdefault(handle.cached, [])
            longest = len(handle.prompt_ids) - handle.cached  # sorted: the newest member is the longest
            if batches and (len(batches[-1]) + 1) * longest <= self.max_prefill_tokens:
                batches[-1].append(item)
            else:
                batches.append([item])
        return [batch for batches in groups.values() for batch in batches]

    def _prefill(self, group: list[tuple[RequestHandle, SamplingParams, int]]) -> None:
        """Prefill several new requests in one forward: prompts right-padded into a batch.

        Every member's first `cached` tokens (the same number for the whole batch) are
        copied from the prefix cache; the rest are computed. Padding sits after each
        prompt, so causal attention keeps every real token's result exact; the padded
        cache slots lie beyond the row's position and are overwritten by its later tokens
        before anything attends to them.
        """
        live = []
        for handle, params, budget in group:
            if handle.cancelled:
                self._unpin(handle)
                self._post(handle, Event(final=True, finish_reason="cancelled"))
                continue
            handle.state = self._new_state(handle, params, budget)
            live.append(handle)
        if not live:
            return
        first = len(self._rows)
        self._rows.extend(live)
        cached = live[0].cached
        if self.cache is None:
            logits = self._uncached_logits(live)
        else:
            longest = max(len(h.prompt_ids) for h in live) - cached
            ids = torch.zeros(len(live), longest, dtype=torch.long, device=self.device)
            for i, handle in enumerate(live):
                self._seat(handle, first + i)
                ids[i, : len(handle.prompt_ids) - cached] = torch.tensor(handle.prompt_ids[cached:], dtype=torch.long)
            lengths = torch.tensor([len(h.prompt_ids) - cached for h in live], device=self.device)
            logits = self._forward(ids, self.cache.rows(first, first + len(live)), cached, select=lengths - 1,
                                   handles=live)
        for i, handle in enumerate(live):
            if self.prefix_cache is not None:
                self._store_prefix(handle, first + i)
            self.stats.prompt_tokens += len(handle.prompt_ids)
            self.stats.cached_prompt_tokens += cached
            self._emit(handle, handle.state.append(handle.state.choose(logits[i])))

    def _feeds(self, handle: RequestHandle) -> bool:
        """Does this new request join the running rows with its prompt's uncached tail fed one
        token a step, instead of a prefill forward of its own?

        A prefill forward reads every weight and stops every running stream for its duration;
        a row more in a batched decode step costs that step only its own arithmetic. So a
        prompt whose keys and values the prefix cache holds but for a few tokens (at most
        `feed_tokens`: a repeated or retried prompt, a template whose tail is short) is fed
        through the next decode steps, its first token sampled from the step that takes its
        last prompt token. Only with a prefix-cache hit: a request computed in full (seeded,
        or no cache) keeps the prefill's products, whatever else runs.
        """
        # A hit always leaves the last prompt token to compute, so the tail is never empty.
        return 0 < handle.cached and len(handle.prompt_ids) - handle.cached <= self.feed_tokens and not handle.cancelled

    def _start_feeding(self, items: list[tuple[RequestHandle, SamplingParams, int]]) -> None:
        """Give each request a row holding its cached prefix; the decode steps feed the rest (`_feeds`)."""
        for handle, params, budget in items:
            handle.state = self._new_state(handle, params, budget)
            self._rows.append(handle)
            self._seat(handle, len(self._rows) - 1)
            handle.feed = len(handle.prompt_ids) - handle.cached
            self.stats.prompt_tokens += len(handle.prompt_ids)
            self.stats.cached_prompt_tokens += handle.cached
            self.stats.fed_prompts += 1

    def _seat(self, handle: RequestHandle, row: int) -> None:
        """Cache row `row` for a new request: its prefix-cache hit loaded, and (paged) the blocks of its whole prompt."""
        if handle.cached:
            self._load_prefix(handle, row, handle.cached)
        if self.paged:  # after the hit: shared blocks need no claim
            self.cache.ensure(row, len(handle.prompt_ids))  # admission counted these blocks

    def _load_prefix(self, handle: RequestHandle, row: int, length: int) -> None:
        """The prefix cache's keys/values of the first `length` prompt tokens, into cache row `row`."""
        if not self.paged:
            self.prefix_cache.load(handle.prompt_ids, length, self.cache.k[:, row], self.cache.v[:, row],
                                   handle.adapter)
            return
        if self.shares_prefix:
            # By reference: the row's table points at the pinned blocks, then the pins go.
            # Every position the row computes or pads (>= length) lies in blocks of its own.
            assert length % self.kv_block_size == 0 and length < len(handle.prompt_ids)
            assert len(handle.shared) * self.kv_block_size == length
            self.cache.share(row, handle.shared)
            self._unpin(handle)
            return
        self.cache.ensure(row, length)
        layers, _, heads, _, dim = self.cache.k.shape
        k = self.cache.k.new_empty(layers, heads, length, dim)
        v = torch.empty_like(k)
        self.prefix_cache.load(handle.prompt_ids, length, k, v, handle.adapter)
        self.cache.write_row(row, k, v)

    def _store_prefix(self, handle: RequestHandle, row: int) -> None:
        """Offer the prefix cache the keys/values of the prompt just prefilled into row `row`."""
        if self.shares_prefix:  # a reference to each full block, no copy
            self.prefix_cache.store(handle.prompt_ids, self.cache.blocks_of(row), handle.adapter)
            return
        if self.paged:
            k, v = self.cache.read_row(row, len(handle.prompt_ids))
        else:
            k, v = self.cache.k[:, row], self.cache.v[:, row]
        self.prefix_cache.store(handle.prompt_ids, k, v, handle.adapter)

    def _long(self, item: tuple[RequestHandle, SamplingParams, int]) -> bool:
        """Is this waiting request's prompt one to prefill in chunks? (A preempted one is recomputed whole.)"""
        return bool(self.prefill_chunk) and len(item[0].prompt_ids) > self.prefill_chunk and item[0].state is None

    # ------------------------------------------------------------ paged cache
    def _blocks_to_admit(self, item: tuple[RequestHandle, SamplingParams, int]) -> int:
        """Blocks a waiting request needs to be admitted: its cached positions plus one block of decode room.

        With shared prefix blocks, a hit's blocks need no claim, except those only the prefix
        cache holds now: they count as free (reclaimable) until the request shares them.
        """
        handle, params, _ = item
        if handle.cancelled:
            return 0  # admitted only to be ended
        tokens = len(handle.prompt_ids) if handle.state is None else handle.state.position
        need = blocks_for(min(tokens + self.kv_block_size, self.max_seq_len), self.kv_block_size)
        if self.shares_prefix and handle.state is None and params.seed is None:
            shared, idle = self.prefix_cache.hit_blocks(handle.prompt_ids, handle.adapter)
            need -= shared - idle
        return need

    def _claim_decode_blocks(self) -> None:
        """Give every running row the block its next token is written to, preempting while blocks run out."""
        while True:
            short = next((i for i, h in enumerate(self._rows) if not self.cache.ensure(i, h.state.position + 1)),
                         None)
            if short is None:
                return
            candidates = self._rows + ([self._chunking] if self._chunking is not None else [])
            self._preempt(max(candidates, key=lambda h: h.admitted))

    def _preempt(self, handle: RequestHandle) -> None:
        """Free a request's blocks and queue it again at the head; readmitted, it recomputes its keys and values."""
        state = handle.state
        if handle is self._chunking:  # nothing sampled yet: it starts over as a new request
            self.cache.release(self.max_batch - 1)
            self._chunking = None
            handle.state, handle.prefilled, handle.cached = None, 0, 0
        else:
            if handle.feed:  # its prompt not yet fed: it starts over as a new request too
                handle.state, handle.feed, handle.cached = None, 0, 0
            row = self._rows.index(handle)
            self.cache.release(row)
            last = len(self._rows) - 1
            if row != last:  # running rows stay contiguous
                self.cache.move(last, row)
                self._rows[row] = self._rows[last]
            self._rows.pop()
        handle.preemptions += 1
        self.stats.preempted += 1
        self.stats.running = len(self._rows)
        with self._lock:
            self._waiting.insert(0, (handle, state.params, state.budget))
            self.stats.waiting = len(self._waiting)

    def _resume(self, handle: RequestHandle) -> None:
        """Readmit a preempted request: one forward rebuilds its keys/values; its next step decodes on."""
        if handle.cancelled:
            handle.state.finish_reason = "cancelled"
            self._finish(handle)
            return
        state, row = handle.state, len(self._rows)
        ids = state.prompt_ids + state.generated[:-1]  # the last token is fed by the next decode step
        self.cache.ensure(row, len(ids) + 1)  # admission counted these blocks
        self._rows.append(handle)
        self._forward(torch.tensor([ids], dtype=torch.long, device=self.device), self.cache.rows(row, row + 1), 0,
                      handles=[handle])

    def _new_state(self, handle: RequestHandle, params: SamplingParams, budget: int) -> DecodeState:
        return DecodeState(
            handle.prompt_ids, params, budget, self.tokenizer, self.eos_ids, self.device, self.model.config.vocab_size
        )

    def _prefix_hit(self, handle: RequestHandle, params: SamplingParams) -> int:
        """Prompt tokens whose keys/values the prefix cache holds for this request.

        Reused keys/values were computed in a product of another shape, so they can differ
        from recomputed ones in the last bits, and a sampled continuation can drift from
        there. A request with an explicit seed asks for reproducibility, so it is always
        computed in full (its blocks are still stored for others).
        """
        if self.shares_prefix:
            return len(handle.shared) * self.kv_block_size  # found and pinned at admission
        if self.prefix_cache is None or params.seed is not None:
            return 0
        return self.prefix_cache.match(handle.prompt_ids, handle.adapter)

    def _pin_prefix(self, item: tuple[RequestHandle, SamplingParams, int]) -> None:
        """Paged blocks shared: take the admitted request's prefix-cache hit now, pinned, so that
        no claim made before its prefill (which may evict idle cached blocks) takes it away."""
        handle, params, _ = item
        if not self.shares_prefix or handle.state is not None or handle.cancelled or params.seed is not None:
            return
        handle.shared = self.prefix_cache.take(handle.prompt_ids, handle.adapter)

    def _unpin(self, handle: RequestHandle) -> None:
        """Drop the pins of a hit that no row took over (the request ended before its prefill)."""
        if handle.shared:
            self.cache.drop(handle.shared)
            handle.shared = []

    def _start_chunking(self, handle: RequestHandle, params: SamplingParams, budget: int) -> None:
        """Give a long prompt the last cache row, its prefix-cache hit loaded there (no forward yet)."""
        if handle.cancelled:
            self._unpin(handle)
            self._post(handle, Event(final=True, finish_reason="cancelled"))  # as `_prefill` does
            return
        handle.state = self._new_state(handle, params, budget)
        row = self.max_batch - 1
        handle.cached = self._prefix_hit(handle, params)
        if handle.cached:
            self._load_prefix(handle, row, handle.cached)
        if self.paged:  # after the hit: shared blocks need no claim
            self.cache.ensure(row, len(handle.prompt_ids))  # admission counted these blocks
        handle.prefilled = handle.cached
        self._chunking = handle
        self._chunk_token_seconds = 0.0

    def _next_chunk(self) -> list[int] | None:
        """The long prompt's next chunk of tokens; None (and the request ended) if it was cancelled."""
        handle = self._chunking
        if handle.cancelled:
            self._chunking = None
            if self.paged:
                self.cache.release(self.max_batch - 1)
            handle.state.finish_reason = "cancelled"
            self._finish(handle)
            return None
        return handle.prompt_ids[handle.prefilled: handle.prefilled + self._chunk_size()]

    def _prefill_chunk(self) -> None:
        """The next chunk of the long prompt in a forward of its own; after its last one, the row joins the running batch."""
        handle, row = self._chunking, self.max_batch - 1
        chunk = self._next_chunk()
        if chunk is None:
            return
        ids = torch.tensor([chunk], dtype=torch.long, device=self.device)
        started = time.perf_counter()
        logits = self._forward(ids, self.cache.rows(row, row + 1), handle.prefilled, handles=[handle])
        if self._rows and self._decode_seconds:
            # Scale this chunk's size by how far its time was from a decode step's: a
            # forward has a fixed cost besides its per-token one, and attention grows with
            # the prefix, so a measured rate alone overshoots.
            ratio = self._decode_seconds / max(time.perf_counter() - started, 1e-9)
            self._chunk_fit = min(self.prefill_chunk, max(self.min_chunk, int(len(chunk) * ratio)))
        self._chunk_in(chunk, logits[0])

    def _chunk_in(self, chunk: list[int], logits: torch.Tensor) -> None:
        """Book a computed chunk; after the prompt's last one, sample its first token (from
        `logits`, the last position's) and move its row into the running batch."""
        handle, row = self._chunking, self.max_batch - 1
        prompt = handle.prompt_ids
        handle.prefilled += len(chunk)
        self.stats.prefill_chunks += 1
        if handle.prefilled < len(prompt):
            return
        self._chunking = None
        target = len(self._rows)
        if target != row and self.paged:  # join the running rows, which are kept contiguous
            self.cache.move(row, target)
        elif target != row:
            self.cache.k[:, target, :, :len(prompt)] = self.cache.k[:, row, :, :len(prompt)]
            self.cache.v[:, target, :, :len(prompt)] = self.cache.v[:, row, :, :len(prompt)]
        self._rows.append(handle)
        if self.prefix_cache is not None:
            self._store_prefix(handle, target)
        self.stats.prompt_tokens += len(prompt)
        self.stats.cached_prompt_tokens += handle.cached
        self._emit(handle, handle.state.append(handle.state.choose(logits)))

    def _mixable(self) -> bool:
        """Can the long prompt's chunk ride in the running rows' decode forward? (Not with
        adapters, whose per-row bookkeeping counts batch rows, nor without a cache.)"""
        return (self.mixed_chunks and self.adapters is None and self.cache is not None
                and hasattr(self.model, "forward_segments"))

    # While streams run, a chunk that rides in their decode forward may add this share of a
    # decode step's time to the step, so running streams' gaps grow by about this much.
    mixed_step_share = 0.5
    min_mixed_chunk = 4

    def _mixed_step(self) -> None:
        """One forward for the running rows' next tokens and the long prompt's next chunk.

        A decode step of a few rows is bound by reading the weights; tokens added to the
        same forward share that read, so a chunk costs only its own arithmetic (and its
        attention over the prompt so far) instead of a forward of its own. The chunk is
        sized from the steps so far: its cost beyond a plain decode step (a moving average
        of those), per chunk token (a moving average too), fits `mixed_step_share` of a
        decode step, and it at most doubles from one step to the next.
        """
        handle, row = self._chunking, self.max_batch - 1
        chunk = self._next_chunk()
        if chunk is None:  # cancelled: a plain step for the running rows
            self._timed_decode_step()
            return
        tokens, start = self._decode_inputs()
        ids = torch.tensor([chunk], dtype=torch.long, device=self.device)
        started = time.perf_counter()
        with self._threads(len(self._rows) + len(chunk)):
            rows_logits, chunk_logits = self.model.forward_segments(
                [(tokens, self.cache.rows(0, len(self._rows)), start),
                 (ids, self.cache.rows(row, row + 1), handle.prefilled)]
            )
        elapsed = time.perf_counter() - started
        if self._decode_seconds:
            # One noisy step (a decode average above this step's time) must not blow the next
            # chunk up: the size at most doubles from one step to the next.
            per_token = max(elapsed - self._decode_seconds, 1e-6) / len(chunk)
            self._chunk_token_seconds = _average(self._chunk_token_seconds, per_token, 0.3)
            fit = min(int(self.mixed_step_share * self._decode_seconds / self._chunk_token_seconds), 2 * len(chunk))
            self._chunk_fit = min(self.prefill_chunk, max(self.min_mixed_chunk, fit))
        self.stats.steps += 1
        self._emit_rows(rows_logits)
        self._chunk_in(chunk, chunk_logits[0])

    min_chunk = 16  # a smaller chunk wastes the products' efficiency

    def _chunk_size(self) -> int:
        """`prefill_chunk` at most; with streams running, what took about one decode step last time."""
        if not self._rows:
            return self.prefill_chunk
        if not self._chunk_fit:  # streams run, nothing measured yet: start small
            return min(self.prefill_chunk, 2 * (self.min_mixed_chunk if self._mixable() else self.min_chunk))
        return self._chunk_fit

    def _decode_step(self) -> None:
        """One new token for every running row, each at its own position (or several: `_speculate`)."""
        if self.speculator is not None and len(self._rows) == 1 and self.cache is not None \
                and not self._rows[0].feed and self._speculate(self._rows[0]):
            return
        if self.cache is None:
            logits = self._uncached_logits(self._rows)
        else:
            tokens, start = self._decode_inputs()
            logits = self._forward(tokens, self.cache.rows(0, len(self._rows)), start, handles=self._rows)
        self.stats.steps += 1
        self._emit_rows(logits)

    def _timed_decode_step(self) -> None:
        """`_decode_step`, its time folded into the decode-step average that sizes chunks."""
        started = time.perf_counter()
        self._decode_step()
        self._decode_seconds = _average(self._decode_seconds, time.perf_counter() - started)

    def _decode_inputs(self) -> tuple[torch.Tensor, int | torch.Tensor]:
        """The running rows' last tokens [B, 1] and their positions (one int when all rows agree);
        a row still being fed (`_feeds`) gives its next prompt token instead."""
        tokens, positions = [], []
        for handle in self._rows:
            if handle.feed:
                at = len(handle.prompt_ids) - handle.feed
                tokens.append(handle.prompt_ids[at])
                positions.append(at)
            else:
                tokens.append(handle.state.generated[-1])
                positions.append(handle.state.position)
        ids = torch.tensor(tokens, dtype=torch.long, device=self.device).view(-1, 1)
        start = positions[0] if len(set(positions)) == 1 else torch.tensor(positions, device=self.device)
        return ids, start

    def _emit_rows(self, logits: torch.Tensor) -> None:
        """Sample and emit each running row's next token from its logits (row i: logits[i])."""
        # Sampling stays on the forward's thread budget: beside NumPy's BLAS threads (one
        # row) a second PyTorch thread for a softmax costs more than it saves.
        rows = self._rows
        if any(handle.feed for handle in rows):
            # A row still being fed took a prompt token: nothing to sample yet. The one whose
            # last prompt token this was has its whole prompt in the cache now.
            ready = []
            for i, handle in enumerate(rows):
                if handle.feed > 1:
                    handle.feed -= 1
                    continue
                if handle.feed == 1:
                    handle.feed = 0
                    if self.prefix_cache is not None:
                        self._store_prefix(handle, i)
                ready.append(i)
            if len(ready) < len(rows):
                rows, logits = [rows[i] for i in ready], logits[ready]
        if not rows:
            return
        with self._threads(len(rows)):
            tokens = DecodeState.choose_rows([handle.state for handle in rows], logits)
            for handle, token in zip(rows, tokens):
                self._emit(handle, handle.state.append(token))

    def _speculate(self, handle: RequestHandle) -> bool:
        """Draft, verify in one forward, append what passes; False (nothing done) where no draft was made.

        Rows with an adapter keep plain steps: the drafter runs the base weights only.
        """
        state = handle.state
        k = self.speculator.draft_length(state) if handle.adapter == 0 else 0
        if k < 1 or self.paged and not self.cache.ensure(0, state.position + k + 1):
            return False
        with self._threads(1):
            draft = self.speculator.propose(state, k)
        if not draft.tokens:
            return False
        ids = torch.tensor([[state.generated[-1], *draft.tokens]], dtype=torch.long, device=self.device)
        logits = self._forward(ids, self.cache.rows(0, 1), state.position, handles=[handle], every_position=True)[0]
        self.stats.steps += 1
        with self._threads(1):
            self.speculator.accept(state, logits, draft, lambda delta: self._emit(handle, delta))
        return True

    def _emit(self, handle: RequestHandle, delta: str) -> None:
        state = handle.state
        if handle.first_token_at is None:
            handle.first_token_at = time.perf_counter()
        self.stats.generated_tokens += 1
        if not handle.stream:
            return
        sent = handle._sent_tokens
        new_ids = state.generated[sent:]
        handle._sent_tokens = len(state.generated)
        event = Event(
            text=delta,
            token_ids=list(new_ids),
            logprobs=state.token_logprobs[sent:],
            top_logprobs=state.top_logprobs[sent:],
        )
        if delta or new_ids:
            self._post(handle, event)

    def _post(self, handle: RequestHandle, event: Event) -> None:
        self._outbox.append((handle, event))

    def _flush(self) -> None:
        """Hand this step's events to their consumers: one wake-up per event loop, not per event."""
        if not self._outbox:
            return
        outbox, self._outbox = self._outbox, []
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for handle, event in outbox:
            if handle.loop is None:
                handle._queue.put(event)
            else:
                by_loop.setdefault(handle.loop, []).append((handle, event))
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_deliver, items)
            except RuntimeError:  # the event loop closed: nobody is listening any more
                for handle, _ in items:
                    handle.cancelled = True

    def _retire(self) -> None:
        """Remove finished or cancelled rows, keeping running rows contiguous."""
        rows = self._rows
        for handle in rows:
            if handle.cancelled and not handle.state.finished:
                handle.state.finish_reason = "cancelled"
        finished = [h for h in rows if h.state.finished]
        self.stats.running = len(rows) - len(finished)
        if not finished:
            return
        for handle in finished:
            self._finish(handle)
        # Fill each hole below the new length with a running row from above it: at most
        # one cache copy per moved request, none when the finished rows are the last ones.
        keep = len(rows) - len(finished)
        holes = [i for i in range(keep) if rows[i].state.finished]
        movers = [j for j in range(keep, len(rows)) if not rows[j].state.finished]
        if self.paged:
            for i, handle in enumerate(rows):
                if handle.state.finished:
                    self.cache.release(i)
        for i, j in zip(holes, movers):
            if self.paged:
                self.cache.move(j, i)
            elif self.cache is not None:
                length = rows[j].state.position + 1
                self.cache.k[:, i, :, :length] = self.cache.k[:, j, :, :length]
                self.cache.v[:, i, :, :length] = self.cache.v[:, j, :, :length]
            rows[i] = rows[j]
        del rows[keep:]

    def _finish(self, handle: RequestHandle) -> None:
        state = handle.state
        handle.finished_at = time.perf_counter()
        if handle.stream:
            event = Event(text=state._release(), final=True, finish_reason=state.finish_reason)
        else:
            state._release()
            event = Event(
                text=state.text,
                token_ids=list(state.generated),
                logprobs=list(state.token_logprobs),
                top_logprobs=list(state.top_logprobs),
                final=True,
                finish_reason=state.finish_reason,
            )
        self._post(handle, event)
        self.stats.finished += 1
        if self.on_finish is not None:
            self.on_finish(handle)


def check_kv_options(kind: str, block_size: int, memory_bytes: int) -> None:
    """One clear message for a KV-cache setting no scheduler can use."""
    if kind not in KV_CACHE_KINDS:
        raise LmforgeError(f"unknown KV cache {kind!r}; choose one of {', '.join(KV_CACHE_KINDS)}")
    if block_size < 1:
        raise LmforgeError(f"the KV block size must be at least 1 position, got {block_size}")
    if memory_bytes < 0:
        raise LmforgeError(f"the KV-cache memory budget must be 0 (none) or positive, got {memory_bytes}")
