"""Paged KV cache: blocks claimed as rows grow, freed when they end, and not one token changed.

The cache itself is checked against the preallocated `KVCache` write for write and read
for read; the scheduler on a paged cache must give every request the greedy tokens of a
solo run, through row reuse, chunked prefill, the prefix cache and preemption, and give
every block back at the end.
"""

from __future__ import annotations

import pytest
import torch

from conftest import FAMILIES, VOCAB
from lmforge.errors import LmforgeError
from lmforge.infer.engine import Generator
from lmforge.infer.sampling import SamplingParams
from lmforge.infer.scheduler import Scheduler
from lmforge.model.checkpoint import load_hf_model
from lmforge.model.kv_cache import KVCache
from lmforge.model.paged_kv import PagedKVCache


def requests(seed: int = 4, lengths=(3, 17, 9, 30, 5, 22, 12, 40)):
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in lengths]
    params = [SamplingParams(max_tokens=6 + 3 * i, temperature=0, ignore_eos=True) for i in range(len(lengths))]
    return prompts, params


def solo(model, prompts, params):
    return [Generator(model).generate([p], q)[0].token_ids for p, q in zip(prompts, params)]


def drain(scheduler, handles):
    while scheduler.step():
        pass
    return [sum((e.token_ids for e in h.poll()), []) for h in handles]


def test_writes_and_reads_equal_the_contiguous_cache():
    layers, heads, dim, size = 2, 2, 4, 4
    flat = KVCache(layers, 3, 40, heads, dim)
    paged = PagedKVCache(layers, 24, size, 3, 40, heads, dim)
    torch.manual_seed(0)
    lengths = [10, 7, 3]
    for row, n in enumerate(lengths):
        assert paged.ensure(row, n)
    # A right-padded prefill of 10 positions: rows 1 and 2 write padding past their blocks.
    k, v = torch.randn(3, heads, 10, dim), torch.randn(3, heads, 10, dim)
    view = paged.rows(0, 3)
    for layer in range(layers):
        flat.rows(0, 3).update(layer, k, v, 0, 10)
        pk, pv = view.update(layer, k, v, 0, 10)
        assert pk.shape == (3, heads, 10, dim)
        for row, n in enumerate(lengths):
            assert torch.equal(pk[row, :, :n], k[row, :, :n]) and torch.equal(pv[row, :, :n], v[row, :, :n])
    # A decode step at three different positions, two of which cross into a new block.
    positions = torch.tensor(lengths)
    for row, n in enumerate(lengths):
        assert paged.ensure(row, n + 1)
    k1, v1 = torch.randn(3, heads, 1, dim), torch.randn(3, heads, 1, dim)
    view = paged.rows(0, 3)
    for layer in range(layers):
        fk, fv = flat.rows(0, 3).update(layer, k1, v1, positions, 11)
        pk, pv = view.update(layer, k1, v1, positions, 11)
        for row, n in enumerate(lengths):
            assert torch.equal(pk[row, :, :n + 1], fk[row, :, :n + 1])
            assert torch.equal(pv[row, :, :n + 1], fv[row, :, :n + 1])
    k_row, v_row = paged.read_row(1, 8)
    assert torch.equal(k_row, flat.k[:, 1, :, :8]) and torch.equal(v_row, flat.v[:, 1, :, :8])
    # A row written whole (what a prefix-cache hit does) reads back exactly.
    assert paged.ensure(2, 9)
    paged.write_row(2, flat.k[:, 0, :, :9], flat.v[:, 0, :, :9])
    assert torch.equal(paged.read_row(2, 9)[0], flat.k[:, 0, :, :9])
    # The view offers what the model asks of a cache.
    assert paged.rows(1, 3).batch == 2 and paged.rows(1, 3).max_len == 40


def test_blocks_are_claimed_freed_and_moved_without_leaking():
    cache = PagedKVCache(1, 10, 4, 4, 32, 1, 2)
    assert (cache.total_blocks, cache.free_blocks) == (10, 10)
    assert cache.ensure(0, 9) and cache.capacity(0) == 12 and cache.free_blocks == 7
    assert cache.ensure(0, 12) and cache.free_blocks == 7  # still inside its third block
    assert cache.ensure(1, 20) and cache.free_blocks == 2
    assert not cache.ensure(2, 12)  # three needed, two free: nothing is claimed
    assert cache.free_blocks == 2 and cache.capacity(2) == 0
    row0 = cache.blocks_of(0)
    cache.move(0, 3)  # the table moves; the blocks stay where they are
    assert cache.blocks_of(3) == row0 and cache.blocks_of(0) == [] and cache.tables[0].eq(0).all()
    with pytest.raises(ValueError, match="still holds"):
        cache.move(1, 3)
    assert cache.release(1) == 5 and cache.free_blocks == 7
    assert cache.ensure(2, 28) and cache.free_blocks == 0  # freed blocks are reused at once
    cache.release_all()
    assert cache.free_blocks == cache.total_blocks and sorted(cache._free) == list(range(1, 11))
    assert cache.tables.eq(0).all()


@pytest.mark.parametrize("family", FAMILIES)
def test_paged_scheduler_gives_the_tokens_of_solo_generation(tiny_hf_dirs, family):
    """Eight requests through three rows: rows finish, their blocks are freed and reused."""
    model = load_hf_model(tiny_hf_dirs[family][0])
    prompts, params = requests()
    expected = solo(model, prompts, params)
    scheduler = Scheduler(model, None, max_batch=3, max_seq_len=128, max_prefill_tokens=64, prefix_cache_bytes=0,
                          kv_cache="paged", kv_block_size=8)
    assert scheduler.cache.total_blocks == 3 * 16  # without a budget: the contiguous cache's memory
    handles = [scheduler.submit(p, q) for p, q in zip(prompts, params)]
    claimed = 0
    while scheduler.step():
        claimed = max(claimed, scheduler.cache.total_blocks - scheduler.cache.free_blocks)
    got = [sum((e.token_ids for e in h.poll()), []) for h in handles]
    assert got == expected
    assert scheduler.stats.kv_blocks_free == scheduler.stats.kv_blocks_total == 48
    assert 0 < claimed <= 3 * -(-(40 + 27) // 8)  # never more than three rows' worth, rounded to blocks
    assert scheduler.stats.preempted == 0


def test_out_of_blocks_preempts_the_newest_and_recomputes_it(tiny_hf_dirs):
    model = load_hf_model(tiny_hf_dirs["llama"][0])
    g = torch.Generator().manual_seed(11)
    prompts = [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in (10, 6, 13, 8)]
    params = SamplingParams(max_tokens=30, temperature=0, ignore_eos=True)
    expected = solo(model, prompts, [params] * 4)
    # Blocks of 4 positions; the budget holds 20 (+ the scratch block): four prompts are
    # admitted, and as they grow to 36..43 positions (9-11 blocks each) they no longer fit.
    block = PagedKVCache.block_bytes(model.config, 4, torch.float32)
    scheduler = Scheduler(model, None, max_batch=4, max_seq_len=64, prefix_cache_bytes=0, kv_cache="paged",
                          kv_block_size=4, kv_memory_bytes=21 * block)
    assert scheduler.cache.total_blocks == 20
    handles = [scheduler.submit(p, params) for p in prompts]
    scheduler.step()
    assert scheduler.stats.running == 4  # admitted on prompt + one block of room, not on max_seq_len
    running = []
    while scheduler.step():
        running.append(scheduler.stats.running)
        assert scheduler.cache.free_blocks >= 0
    assert drain(scheduler, []) == [] and [sum((e.token_ids for e in h.poll()), []) for h in handles] == expected
    assert scheduler.stats.preempted >= 1 and min(running) < 4
    assert handles[3].preemptions >= 1 and handles[0].preemptions == 0  # the newest goes, the oldest stays
    assert scheduler.cache.free_blocks == scheduler.cache.total_blocks


def test_cancelled_rows_and_preempted_requests_free_their_blocks(tiny_hf_dirs):
    model = load_hf_model(tiny_hf_dirs["qwen2"][0])
    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    block = PagedKVCache.block_bytes(model.config, 4, torch.float32)
    scheduler = Scheduler(model, None, max_batch=3, max_seq_len=64, prefix_cache_bytes=0, kv_cache="paged",
                          kv_block_size=4, kv_memory_bytes=21 * block)
    a, b, c = (scheduler.submit(list(range(3, 3 + n)), params) for n in (12, 12, 12))
    while not scheduler.stats.preempted:
        scheduler.step()
    waiting = [h for h, _, _ in scheduler._waiting]
    assert waiting and waiting[0] is c and c.preemptions == 1  # back at the head of the queue
    c.cancel()
    a.cancel()
    scheduler.step()
    assert a.poll()[-1].finish_reason == "cancelled" and c.poll()[-1].finish_reason == "cancelled"
    assert scheduler._rows == [b]
    assert scheduler.cache.free_blocks == scheduler.cache.total_blocks - len(scheduler.cache.blocks_of(0))
    scheduler.run_until_idle()
    assert b.poll()[-1].finish_reason == "length"
    assert scheduler.cache.free_blocks == scheduler.cache.total_blocks


def test_chunked_prefill_and_the_prefix_cache_on_paged_blocks(tiny_hf_dirs):
    model = load_hf_model(tiny_hf_dirs["mistral"][0])  # sliding window: masked keys in the gathered rows
    prompts, params = requests(seed=7)
    g = torch.Generator().manual_seed(3)
    system = torch.randint(3, VOCAB, (24,), generator=g).tolist()
    prompts += [system + [5, 6], system + [7, 8, 9]]
    params += [SamplingParams(max_tokens=5, temperature=0, ignore_eos=True)] * 2
    expected = solo(model, prompts, params)
    scheduler = Scheduler(model, None, max_batch=3, max_seq_len=128, prefill_chunk=7, kv_cache="paged",
                          kv_block_size=8)
    handles = [scheduler.submit(p, q) for p, q in zip(prompts, params)]
    assert drain(scheduler, handles) == expected
    assert scheduler.stats.prefill_chunks > 0 and handles[-1].cached >= 24 // 4 * 4
    assert scheduler.cache.free_blocks == scheduler.cache.total_blocks


def test_a_budget_holds_more_paged_requests_than_contiguous_rows(tiny_hf_dirs):
    model = load_hf_model(tiny_hf_dirs["gpt2"][0])
    budget = 4 * PagedKVCache.block_bytes(model.config, 128, torch.float32)  # four rows of 128 positions
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    peaks = {}
    for kind in ("contiguous", "paged"):
        scheduler = Scheduler(model, None, max_batch=32, max_seq_len=128, prefix_cache_bytes=0, kv_cache=kind,
                              kv_memory_bytes=budget)
        handles = [scheduler.submit(list(range(3, 3 + 10 + i)), params) for i in range(20)]
        peaks[kind] = 0
        while scheduler.step():
            peaks[kind] = max(peaks[kind], scheduler.stats.running)
        assert all(h.poll()[-1].finish_reason == "length" for h in handles)
    assert peaks["contiguous"] == 4 and peaks["paged"] >= 2 * peaks["contiguous"]


def test_bad_kv_options_end_in_one_clear_error(tiny_hf_dirs):
    from lmforge.serve.config import ServeRuntime

    model = load_hf_model(tiny_hf_dirs["llama"][0])
    with pytest.raises(LmforgeError, match="unknown KV cache 'ring'"):
        Scheduler(model, None, kv_cache="ring")
    with pytest.raises(LmforgeError, match="block size"):
        Scheduler(model, None, kv_cache="paged", kv_block_size=0)
    with pytest.raises(LmforgeError, match="fewer than one sequence of 128 tokens needs"):
        Scheduler(model, None, kv_cache="paged", kv_memory_bytes=1000)
    with pytest.raises(LmforgeError, match="holds no row of 128 positions"):
        Scheduler(model, None, kv_cache="contiguous", kv_memory_bytes=1000)
    assert ServeRuntime().kv_cache == "contiguous" and ServeRuntime().kv_block_size == 16
    with pytest.raises(LmforgeError, match="--kv-cache"):
        ServeRuntime(kv_cache="ring")
    with pytest.raises(LmforgeError, match="--kv-block-size"):
        ServeRuntime(kv_block_size=0)
    with pytest.raises(LmforgeError, match="--kv-memory-mb"):
        ServeRuntime(kv_memory_mb=-1)


def test_the_server_flags_reach_the_runtime_options():
    from lmforge.cli import build_parser
    from lmforge.cli.common import config_from_args
    from lmforge.serve.config import ServeRuntime

    args = build_parser().parse_args(["serve", "--kv-cache", "paged", "--kv-block-size", "8", "--kv-memory-mb", "64"])
    runtime = config_from_args(ServeRuntime, args)
    assert (runtime.kv_cache, runtime.kv_block_size, runtime.kv_memory_mb) == ("paged", 8, 64.0)
    with pytest.raises(SystemExit):  # argparse's own one-line error for a kind it does not know
        build_parser().parse_args(["serve", "--kv-cache", "ring"])


def test_the_server_exports_the_block_pool(tiny_hf_dirs):
    from lmforge.serve.metrics import ServerMetrics

    model = load_hf_model(tiny_hf_dirs["llama"][0])
    scheduler = Scheduler(model, None, max_batch=2, max_seq_len=64, kv_cache="paged", kv_block_size=8)
    scheduler.submit([3, 4, 5, 6, 7, 8, 9, 10, 11], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
    scheduler.step()
    text = ServerMetrics(scheduler).render().decode()
    assert "lmforge_kv_blocks_total 16.0" in text and "lmforge_kv_blocks_free 14.0" in text
    assert "lmforge_preempted_requests 0.0" in text
    assert "lmforge_kv_blocks_free" not in ServerMetrics(Scheduler(model, None, max_batch=2)).render().decode()


@pytest.mark.slow
def test_the_default_model_answers_the_same_on_paged_blocks(default_lm):
    """The real model and tokenizer: three chat prompts, greedy, through a paged and a contiguous cache."""
    lm = default_lm
    questions = ["What is the capital of France?", "Name three primary colors.", "Write one sentence about rain."]
    prompts = [lm.tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=True) for q in questions]
    params = SamplingParams(max_tokens=16, temperature=0)
    texts = {}
    for kind in ("contiguous", "paged"):
        scheduler = Scheduler(lm.model, lm.tokenizer, max_batch=3, max_seq_len=256, prefix_cache_bytes=0,
                              kv_cache=kind, kv_block_size=16)
        handles = [scheduler.submit(p, params) for p in prompts]
        scheduler.run_until_idle()
        texts[kind] = ["".join(e.text for e in h.poll()) for h in handles]
    assert texts["paged"] == texts["contiguous"] and "Paris" in texts["paged"][0]
