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


# ---------------------------------------------------------------- prefix blocks shared by reference
def shared_prefix_requests(seed: int, system_len: int, suffixes=(1, 6, 13, 3)):
    g = torch.Generator().manual_seed(seed)
    system = torch.randint(3, VOCAB, (system_len,), generator=g).tolist()
    return system, [system + torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in suffixes]


def assert_nothing_leaks(scheduler):
    """Every reference gone, every block back on the free list, every table pointing at the scratch block."""
    cache = scheduler.cache
    scheduler.prefix_cache.clear()
    assert cache.unreferenced_blocks == cache.free_blocks == cache.total_blocks
    assert sorted(cache._free) == list(range(1, cache.total_blocks + 1))
    assert not any(cache._refs) and cache.reclaimable_blocks == 0 and cache.tables.eq(0).all()


def test_shared_blocks_are_read_only_and_counted():
    cache = PagedKVCache(1, 12, 4, 3, 32, 1, 2)
    assert cache.ensure(0, 10) and cache.blocks_of(0) == [1, 2, 3]
    cache.hold(1)
    cache.hold(2)  # what a prefix cache does with row 0's two full blocks
    cache.share(1, [1, 2])  # row 1 starts with them: no block claimed
    assert cache.unreferenced_blocks == 9 and [cache.refcount(b) for b in (1, 2, 3)] == [3, 3, 1]
    assert cache.ensure(1, 11) and cache.blocks_of(1) == [1, 2, 4] and cache.unreferenced_blocks == 8
    with pytest.raises(ValueError, match="still holds"):
        cache.share(1, [1])
    # Row 1 may write from position 8 (its own block 4) but not into positions 0..7.
    k = torch.ones(1, 1, 3, 2)
    cache.rows(1, 2).update(0, k, k, 8, 11)
    with pytest.raises(RuntimeError, match=r"shared KV blocks \[2\]"):
        cache.rows(1, 2).update(0, k, k, 6, 9)
    with pytest.raises(RuntimeError, match="shared KV blocks"):
        cache.write_row(1, torch.ones(1, 1, 4, 2), torch.ones(1, 1, 4, 2))
    with pytest.raises(RuntimeError, match="shared KV blocks"):  # a decode step at per-row positions
        cache.rows(0, 2).update(0, torch.ones(2, 1, 1, 2), torch.ones(2, 1, 1, 2), torch.tensor([10, 3]), 11)
    # Releasing the rows leaves the held blocks idle: reclaimable, counted as free, not yet on the free list.
    cache.release(0)
    cache.move(1, 2)
    assert cache.reclaimable_blocks == 0  # no evictor: nobody could give them back
    cache.evictor = lambda n: 0
    cache.release(2)
    assert cache.reclaimable_blocks == 2 and cache.unreferenced_blocks == 10 and cache.free_blocks == 12
    assert [cache.refcount(b) for b in (1, 2, 3, 4)] == [1, 1, 0, 0]
    cache.retain([2])  # a pin takes it out of the reclaimable ones
    assert cache.reclaimable_blocks == 1
    cache.drop([2])
    cache.unhold(1)
    cache.unhold(2)
    assert cache.unreferenced_blocks == cache.free_blocks == 12 and not any(cache._refs)
    with pytest.raises(ValueError, match="is free"):
        cache.share(0, [5])


def test_eviction_gives_back_least_recently_used_idle_blocks_only():
    from lmforge.infer.prefix_cache import PagedPrefixCache

    cache = PagedKVCache(1, 8, 2, 2, 16, 1, 2)
    store = PagedPrefixCache(cache)
    a, b = [10, 11, 12, 13, 14], [20, 21, 22, 23, 24]
    for row, ids in enumerate((a, b)):
        assert cache.ensure(row, len(ids))
        store.store(ids, cache.blocks_of(row))
    assert len(store) == 4 and store.match(a) == 4 and store.match(a[:4]) == 2  # one token is left to compute
    cache.release(1)  # b's two full blocks are now held by the cache alone
    assert (cache.reclaimable_blocks, cache.unreferenced_blocks, cache.free_blocks) == (2, 3, 5)
    assert cache.ensure(1, 8)  # four blocks from three on the free list: one idle block is evicted
    assert store.evicted == 1 and store.match(b) == 2  # the chain's last block went first, its prefix stays
    assert store.match(a) == 4  # row 0 still uses a's blocks: never evicted
    assert not cache.ensure(1, 16)  # more than free + reclaimable: nothing claimed, nothing evicted
    assert store.evicted == 1 and len(cache.blocks_of(1)) == 4
    # Adapter salts keep chains apart: the same tokens under adapter 1 miss the base entries.
    assert store.match(a, salt=1) == 0 and store.match(a, salt=0) == 4
    cache.release_all()
    store.clear()
    assert cache.unreferenced_blocks == cache.total_blocks and not any(cache._refs)


@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_a_shared_system_prompt_is_held_once_by_reference(tiny_hf_dirs, family):
    """Requests sharing a 40-token prefix: its 5 blocks are the same pool blocks in every row, never copied,
    never written (a padded prefill batches the later ones), and the tokens are those of solo runs."""
    model = load_hf_model(tiny_hf_dirs[family][0])
    system, prompts = shared_prefix_requests(5, 40)
    params = [SamplingParams(max_tokens=8 + 2 * i, temperature=0, ignore_eos=True) for i in range(len(prompts))]
    expected = solo(model, prompts, params)
    scheduler = Scheduler(model, None, max_batch=4, max_seq_len=128, kv_cache="paged", kv_block_size=8)
    cache = scheduler.cache
    first = scheduler.submit(prompts[0], params[0])
    scheduler.step()
    shared = cache.blocks_of(0)[:5]
    assert len(scheduler.prefix_cache) == 5 and [cache.refcount(b) for b in shared] == [2] * 5
    snapshot = cache.k[:, shared].clone(), cache.v[:, shared].clone()
    in_use = cache.total_blocks - cache.unreferenced_blocks
    second = scheduler.submit(prompts[1], params[1])
    scheduler.step()
    assert cache.blocks_of(1)[:5] == shared and [cache.refcount(b) for b in shared] == [3] * 5
    assert second.cached == 40 and not set(cache.blocks_of(1)[5:]) & set(cache.blocks_of(0))
    # Only the second request's own blocks were claimed (row 0 needed none this step): no copy of the prefix.
    assert cache.total_blocks - cache.unreferenced_blocks == in_use + len(cache.blocks_of(1)) - 5
    rest = [scheduler.submit(p, q) for p, q in zip(prompts[2:], params[2:])]
    scheduler.step()  # both admitted together: one right-padded prefill from position 40
    assert [h.cached for h in rest] == [40, 40] and all(cache.blocks_of(r)[:5] == shared for r in (2, 3))
    assert [cache.refcount(b) for b in shared] == [5] * 5
    got = drain(scheduler, [first, second] + rest)
    assert got == expected
    assert torch.equal(cache.k[:, shared], snapshot[0]) and torch.equal(cache.v[:, shared], snapshot[1])
    assert scheduler.stats.cached_prompt_tokens == 3 * 40 and scheduler.prefix_cache.hits == 3 * 40
    # Ended: only the prefix cache holds blocks (the system prompt's and each prompt's own full
    # blocks), all reclaimable; cleared, every block is free again.
    assert cache.reclaimable_blocks == len(scheduler.prefix_cache) == cache.total_blocks - cache.unreferenced_blocks
    assert cache.free_blocks == cache.total_blocks
    assert_nothing_leaks(scheduler)


def test_idle_cached_blocks_are_evicted_before_any_row_is_preempted(tiny_hf_dirs):
    model = load_hf_model(tiny_hf_dirs["llama"][0])
    g = torch.Generator().manual_seed(12)
    a, b, c = (torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in (24, 10, 10))
    short, long = (SamplingParams(max_tokens=n, temperature=0, ignore_eos=True) for n in (4, 30))
    expected = solo(model, [a, b, c], [short, long, long])
    block = PagedKVCache.block_bytes(model.config, 4, torch.float32)
    scheduler = Scheduler(model, None, max_batch=3, max_seq_len=64, kv_cache="paged", kv_block_size=4,
                          kv_memory_bytes=21 * block)
    cache = scheduler.cache
    assert cache.total_blocks == 20
    first = scheduler.submit(a, short)
    assert drain(scheduler, [first]) == [expected[0]]
    # a's six full prompt blocks stay in the prefix cache, used by no row: free to claim, not on the free list.
    assert cache.reclaimable_blocks == 6 and cache.unreferenced_blocks == 14 and cache.free_blocks == 20
    handles = [scheduler.submit(b, long), scheduler.submit(c, long)]
    lowest = cache.unreferenced_blocks
    while scheduler.step():
        lowest = min(lowest, cache.unreferenced_blocks)
    assert [sum((e.token_ids for e in h.poll()), []) for h in handles] == expected[1:]
    # Two rows of 40 positions need all 20 blocks: more than the free list's 14, so the idle
    # blocks were taken back, and nobody was preempted for them.
    assert lowest == 0 and scheduler.prefix_cache.evicted == 6 and scheduler.stats.preempted == 0
    assert scheduler.prefix_cache.match(a) == 0
    assert_nothing_leaks(scheduler)


def test_adapter_and_base_rows_never_share_prefix_blocks(tiny_hf_dirs):
    from lmforge.infer.adapters import AdapterBank, LoraWeights

    model = load_hf_model(tiny_hf_dirs["qwen2"][0])
    g = torch.Generator().manual_seed(2)
    n_embd = model.config.n_embd
    layers = {}
    for i in range(model.config.n_layer):
        qkv = model.get_submodule(f"layers.{i}.attn.qkv")
        layers[f"layers.{i}.attn.qkv"] = (torch.randn(4, n_embd, generator=g) * 0.3,
                                          torch.randn(qkv.out_features, 4, generator=g) * 0.3)
    bank = AdapterBank.install(model, [LoraWeights("kv", scale=2.0, rank=4, layers=layers)])
    system, prompts = shared_prefix_requests(8, 24, suffixes=(3, 5, 2))
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    runs = [(prompts[0], 0), (prompts[0], 1), (prompts[1], 1), (prompts[2], 0)]

    def alone(prompt, adapter):
        scheduler = Scheduler(model, None, max_batch=1, max_seq_len=64, prefix_cache_bytes=0, adapters=bank)
        handle = scheduler.submit(prompt, params, adapter=adapter)
        return drain(scheduler, [handle])[0]

    expected = [alone(p, a) for p, a in runs]
    scheduler = Scheduler(model, None, max_batch=2, max_seq_len=64, kv_cache="paged", kv_block_size=8, adapters=bank)
    cache, got, blocks, cached = scheduler.cache, [], [], []
    for prompt, adapter in runs:  # one after the other, so each finds what the earlier ones stored
        handle = scheduler.submit(prompt, params, adapter=adapter)
        scheduler.step()
        blocks.append(cache.blocks_of(0)[:3])
        cached.append(handle.cached)
        got += drain(scheduler, [handle])
    assert got == expected
    assert cached == [0, 0, 24, 24]  # the adapter's first request misses the base's blocks
    assert not set(blocks[0]) & set(blocks[1])  # base and adapter keys/values live in different blocks
    assert blocks[2] == blocks[1] and blocks[3] == blocks[0]  # each salt shares its own
    assert_nothing_leaks(scheduler)


def test_admission_counts_a_hit_as_needing_only_its_own_blocks(tiny_hf_dirs):
    """A 42-token prompt whose first 40 are cached needs 2 new blocks, not 12: it joins at once on a
    pool the copying prefix cache (which needs all 12) makes it wait for."""
    model = load_hf_model(tiny_hf_dirs["gpt2"][0])
    system, (a, b) = shared_prefix_requests(3, 40, suffixes=(1, 2))
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    expected = solo(model, [a, b], [params] * 2)
    block = PagedKVCache.block_bytes(model.config, 4, torch.float32)
    together = {}
    for sharing in (True, False):
        scheduler = Scheduler(model, None, max_batch=2, max_seq_len=64, kv_cache="paged", kv_block_size=4,
                              kv_memory_bytes=21 * block, prefix_sharing=sharing)
        handles = [scheduler.submit(a, params)]
        scheduler.step()
        handles.append(scheduler.submit(b, params))
        scheduler.step()
        together[sharing] = scheduler.stats.running
        assert drain(scheduler, handles) == expected
        assert scheduler.stats.preempted == 0
    assert together == {True: 2, False: 1}
