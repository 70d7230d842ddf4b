"""Continuous batching: every request gets exactly what it would get alone.

Requests of different prompt lengths and budgets join and leave a small running batch,
are prefilled together (right-padded), and decode at different positions; greedy tokens
must equal a solo `Generator` run of the same prompt on the plain model.
"""

from __future__ import annotations

import pytest
import torch

from conftest import FAMILIES, VOCAB
from lmforge.infer.engine import Generator
from lmforge.infer.layout import BlasLinear, use_column_major_weights, use_numpy_blas
from lmforge.infer.sampling import SamplingParams
from lmforge.infer.scheduler import Scheduler
from lmforge.model.checkpoint import load_hf_model


def prompts_and_params():
    g = torch.Generator().manual_seed(4)
    lengths = [3, 17, 9, 30, 5, 22, 12, 40]
    prompts = [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in lengths]
    params = [SamplingParams(max_tokens=6 + 3 * i, temperature=0, ignore_eos=True) for i in range(len(lengths))]
    return prompts, params


@pytest.mark.parametrize("family", FAMILIES)
def test_batched_requests_equal_solo_generation(tiny_hf_dirs, family):
    path, _ = tiny_hf_dirs[family]
    plain = load_hf_model(path)
    fast = load_hf_model(path)
    use_column_major_weights(fast)
    use_numpy_blas(fast, numpy_rows=True, onednn=True)  # every kernel path, whatever calibration says
    prompts, params = prompts_and_params()
    expected = [Generator(plain).generate([p], q)[0].token_ids for p, q in zip(prompts, params)]

    # max_batch 3 with 8 requests: rows are freed and reused; a small prefill budget
    # splits the waiting requests into several padded prefill batches.
    scheduler = Scheduler(fast, None, max_batch=3, max_seq_len=128, max_prefill_tokens=64, prefix_cache_bytes=0).start()
    try:
        handles = [scheduler.submit(p, q) for p, q in zip(prompts, params)]
        got = [h.result().token_ids for h in handles]
    finally:
        scheduler.shutdown()
    assert got == expected


@pytest.mark.parametrize("family", FAMILIES)
def test_prefix_cache_reuses_shared_prefixes_exactly(tiny_hf_dirs, family):
    """Prompts sharing a 'system prompt' get the same tokens as solo runs, with most of it cached."""
    path, _ = tiny_hf_dirs[family]
    plain, fast = load_hf_model(path), use_numpy_blas(load_hf_model(path), numpy_rows=True, onednn=True)
    g = torch.Generator().manual_seed(9)
    system = torch.randint(3, VOCAB, (21,), generator=g).tolist()
    suffixes = [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in (1, 6, 13, 3, 9)]
    prompts = [system + s for s in suffixes] + [system + suffixes[1], system[:8]]  # a repeat; a short one
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    expected = [Generator(plain).generate([p], params)[0].token_ids for p in prompts]

    scheduler = Scheduler(fast, None, max_batch=3, max_seq_len=128, max_prefill_tokens=64).start()
    try:
        first = scheduler.submit(prompts[0], params).result().token_ids  # fills the cache
        rest = [scheduler.submit(p, params) for p in prompts[1:]]
        got = [first] + [h.result().token_ids for h in rest]
    finally:
        scheduler.shutdown()
    assert got == expected
    block = scheduler.prefix_cache.block
    # Every later prompt found at least the system prompt's full blocks (the short one: its
    # own full blocks minus the last token, which must be computed for its logits).
    assert scheduler.stats.cached_prompt_tokens >= 5 * (21 // block * block) + (7 // block * block)


@pytest.mark.parametrize("kv_cache", ["contiguous", "paged"])
def test_short_uncached_tails_are_fed_through_decode_steps(tiny_hf_dirs, kv_cache):
    """A prompt the prefix cache holds but for a few tokens joins the running rows: its tail goes
    through the next decode steps one token each (no prefill forward), and its answer is the
    one a solo run gives, sampled ones included; seeded requests and long tails are prefilled."""
    path, _ = tiny_hf_dirs["llama"]
    model = load_hf_model(path)
    g = torch.Generator().manual_seed(12)
    prompts = [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in (22, 19, 26)]
    greedy = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True, logprobs=2)
    sampled = SamplingParams(max_tokens=10, temperature=0.9, ignore_eos=True)

    def solo(prompt, params):
        return Generator(model).generate([prompt], params)[0]

    scheduler = Scheduler(model, None, max_batch=4, max_seq_len=64, kv_cache=kv_cache, kv_block_size=4)
    for prompt in prompts:  # fills the prefix cache, prefilled (nothing runs beside it)
        scheduler.submit(prompt, greedy)
        scheduler.run_until_idle()
    assert scheduler.stats.fed_prompts == 0
    runner = scheduler.submit(list(range(3, 12)), SamplingParams(max_tokens=30, temperature=0, ignore_eos=True))
    scheduler.step()
    prefills = []
    scheduler._prefill = lambda group, _own=scheduler._prefill: prefills.append(len(group)) or _own(group)
    fed = [scheduler.submit(prompts[0], greedy), scheduler.submit(prompts[1], sampled)]
    seeded = scheduler.submit(prompts[2], SamplingParams(max_tokens=10, temperature=0.9, ignore_eos=True, seed=3))
    scheduler.step()
    assert scheduler.stats.fed_prompts == 2 and prefills == [1]  # the seeded one alone was prefilled
    # Cached to the last full block of 4 before the last token: tails of 2 and 3 tokens, one
    # of them fed by the admission step already.
    assert [len(p) - h.cached for p, h in zip(prompts, fed)] == [2, 3] and [h.feed for h in fed] == [1, 2]
    steps = 0
    while any(h.state.generated == [] for h in fed):
        scheduler.step()
        steps += 1
    assert steps == 2 and not any(h.feed for h in fed)
    scheduler.run_until_idle()
    results = [sum((e.token_ids for e in h.poll()), []) for h in (*fed, seeded, runner)]
    assert results[0] == solo(prompts[0], greedy).token_ids
    assert results[2] == solo(prompts[2], SamplingParams(max_tokens=10, temperature=0.9, ignore_eos=True,
                                                         seed=3)).token_ids
    assert len(results[1]) == 10 and len(results[3]) == 30
    # The first token's log-probability comes from the step that fed the last prompt token.
    single = Scheduler(model, None, max_batch=1, max_seq_len=64, prefix_cache_bytes=0)
    alone = single.submit(prompts[0], greedy, stream=False)
    single.run_until_idle()
    assert fed[0].state.token_logprobs == pytest.approx(alone.result().logprobs, abs=1e-4)


def test_feeding_tails_is_off_with_feed_tokens_zero(tiny_hf_dirs):
    model = load_hf_model(tiny_hf_dirs["llama"][0])
    scheduler = Scheduler(model, None, max_batch=3, max_seq_len=64, feed_tokens=0)
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    prompt = list(range(3, 21))
    scheduler.submit(prompt, params)
    scheduler.run_until_idle()
    scheduler.submit(list(range(30, 40)), params)
    scheduler.step()
    again = scheduler.submit(prompt, params)
    scheduler.run_until_idle()
    assert scheduler.stats.fed_prompts == 0 and again.cached == 16
    with pytest.raises(Exception, match="feed_tokens"):
        Scheduler(model, None, feed_tokens=-1)


def test_prefix_cache_evicts_least_recently_used_within_budget():
    from lmforge.infer.prefix_cache import PrefixCache

    layers, heads, dim, block = 2, 1, 4, 4
    k = torch.arange(layers * heads * 64 * dim, dtype=torch.float32).view(layers, heads, 64, dim)
    per_block = 2 * layers * heads * block * dim * 4
    cache = PrefixCache(max_bytes=3 * per_block, block=block)
    a, b = list(range(100, 108)), list(range(200, 208))  # two blocks each
    cache.store(a, k, k)
    assert cache.match(a + [1]) == 8 and cache.bytes == 2 * per_block
    cache.store(b, k, k)  # 4 blocks > budget of 3: a's first block (oldest) goes
    assert cache.bytes <= 3 * per_block
    assert cache.match(a + [1]) == 0  # the chain is broken at its first block
    assert cache.match(b + [1]) == 8
    out = torch.zeros(layers, heads, 64, dim)
    cache.load(b, 8, out, out.clone())
    assert torch.equal(out[:, :, :8], k[:, :, :8])
    # A different token in the first block misses even though later blocks are equal.
    assert cache.match([0] + b[1:] + [1]) == 0


def test_packed_weights_follow_weight_updates(tiny_hf_dirs):
    path, _ = tiny_hf_dirs["llama"]
    model = use_numpy_blas(load_hf_model(path), numpy_rows=True, onednn=True)
    layer = model.layers[0].mlp.proj
    assert isinstance(layer, BlasLinear)
    x = torch.randn(4, layer.in_features)
    with torch.inference_mode():
        before = layer(x)
    with torch.no_grad():
        layer.weight.mul_(2.0)  # in place: same storage, new version
    with torch.inference_mode():
        after = layer(x)
    assert torch.allclose(after, 2 * before, atol=1e-5)
    assert torch.allclose(after, torch.nn.functional.linear(x, layer.weight), atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_chunked_prefill_gives_the_tokens_of_a_whole_prefill(tiny_hf_dirs, family):
    """Long prompts prefilled 7 tokens per step, between decode steps of running rows, decode as alone."""
    path, _ = tiny_hf_dirs[family]
    plain = load_hf_model(path)
    prompts, params = prompts_and_params()  # prompts of 3..40 tokens: 9, 17, 22, 30 and 40 are chunked
    expected = [Generator(plain).generate([p], q)[0].token_ids for p, q in zip(prompts, params)]
    scheduler = Scheduler(plain, None, max_batch=3, max_seq_len=128, prefix_cache_bytes=0, prefill_chunk=7)
    handles = [scheduler.submit(p, q) for p, q in zip(prompts, params)]
    overlapped = 0
    while scheduler.step():
        # a decode step ran for other rows while a long prompt sat half-prefilled
        overlapped += bool(scheduler.stats.prefilling and scheduler._rows)
    got = [sum((e.token_ids for e in h.poll()), []) for h in handles]
    assert got == expected
    assert overlapped >= 5
    # At most 7 tokens a chunk; a chunk riding in a decode forward may be sized smaller.
    assert scheduler.stats.prefill_chunks >= sum(-(-len(p) // 7) for p in prompts if len(p) > 7)


def test_chunked_prefill_keeps_the_queue_order_and_uses_the_prefix_cache(tiny_hf_dirs):
    path, _ = tiny_hf_dirs["llama"]
    model = load_hf_model(path)
    g = torch.Generator().manual_seed(5)
    system = torch.randint(3, VOCAB, (40,), generator=g).tolist()
    params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    long_a, long_b = system + [5, 6, 7], system + [8, 9]
    expected = [Generator(model).generate([p], params)[0].token_ids for p in (long_a, long_b, [3, 4])]
    scheduler = Scheduler(model, None, max_batch=4, max_seq_len=128, prefill_chunk=8)
    a, b, short = (scheduler.submit(p, params) for p in (long_a, long_b, [3, 4]))
    scheduler.step()
    # One long prompt at a time, and the short request queued behind the second one waits for it.
    assert scheduler._chunking is a and [h for h, _, _ in scheduler._waiting] == [b, short]
    while scheduler.step():
        pass
    assert [sum((e.token_ids for e in h.poll()), []) for h in (a, b, short)] == expected
    assert b.cached >= 32  # the second long prompt started from the first one's cached blocks


def test_a_cancelled_chunked_prefill_ends_and_frees_its_row(tiny_hf_dirs):
    path, _ = tiny_hf_dirs["llama"]
    model = load_hf_model(path)
    scheduler = Scheduler(model, None, max_batch=2, max_seq_len=128, prefix_cache_bytes=0, prefill_chunk=4)
    params = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)
    handle = scheduler.submit(list(range(3, 40)), params)
    scheduler.step()
    assert scheduler.stats.prefilling == 1
    handle.cancel()
    scheduler.step()
    events = handle.poll()
    assert events[-1].final and events[-1].finish_reason == "cancelled" and scheduler.idle
    after = scheduler.submit([3, 4, 5], params)
    scheduler.run_until_idle()
    assert len(sum((e.token_ids for e in after.poll()), [])) == 3
    with pytest.raises(Exception, match="prefill_chunk"):
        Scheduler(model, None, prefill_chunk=-1)


def test_the_server_flag_for_chunked_prefill():
    from lmforge.errors import LmforgeError
    from lmforge.serve.config import ServeRuntime

    assert ServeRuntime().prefill_chunk == 256
    with pytest.raises(LmforgeError, match="--prefill-chunk"):
        ServeRuntime(prefill_chunk=-1)


@pytest.mark.parametrize("mixed", [True, False])
def test_a_chunk_takes_about_one_decode_step_while_streams_run(tiny_hf_dirs, mixed):
    """Chunk sizing: in a forward of its own (`mixed_chunks=False`, or adapters) a chunk should take about one
    decode step; riding in the decode forward, it may add `mixed_step_share` of one."""
    model = load_hf_model(tiny_hf_dirs["llama"][0])
    scheduler = Scheduler(model, None, max_batch=3, max_seq_len=128, prefix_cache_bytes=0, prefill_chunk=64,
                          mixed_chunks=mixed)
    assert scheduler._chunk_size() == 64  # nobody streaming: the whole chunk
    scheduler._rows.append(object())
    first = 2 * (Scheduler.min_mixed_chunk if mixed else Scheduler.min_chunk)
    assert scheduler._chunk_size() == first  # streams, nothing measured yet: start small
    scheduler._chunk_fit = 50
    assert scheduler._chunk_size() == 50
    scheduler._rows.clear()
    scheduler._chunk_fit = 0
    # Measured for real: with a stream running and a decode step "lasting" 1000 s, the next
    # chunk grows toward the cap (in the decode forward, at most doubling per step); with
    # one of 1 ns, it shrinks to the floor.
    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    scheduler.submit([3, 4, 5], params)
    scheduler.step()
    scheduler.submit(list(range(3, 124)), params)
    scheduler._decode_seconds = 1000.0
    steps = scheduler.stats.steps
    scheduler.step()
    assert scheduler.stats.steps == steps + 1 and scheduler.stats.prefill_chunks == 1
    if mixed:
        assert scheduler._chunk_fit == 2 * first
        scheduler.step()
        assert scheduler._chunk_fit == 4 * first
        scheduler.step()
    assert scheduler._chunk_fit == 64
    scheduler._decode_seconds = 1e-9
    scheduler._chunk_fit = 0
    scheduler.step()
    assert scheduler._chunk_fit == (Scheduler.min_mixed_chunk if mixed else Scheduler.min_chunk)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("kind", ["contiguous", "paged"])
def test_one_forward_for_decode_rows_and_a_chunk_equals_separate_forwards(tiny_hf_dirs, family, kind):
    """`forward_segments`: decode rows at their own positions and a prompt chunk in one forward
    give each segment's logits and cache entries of its own forward."""
    from lmforge.model.kv_cache import KVCache
    from lmforge.model.paged_kv import PagedKVCache

    model = load_hf_model(tiny_hf_dirs[family][0])
    g = torch.Generator().manual_seed(7)
    a, b, c = (torch.randint(3, VOCAB, (1, n), generator=g) for n in (10, 6, 20))

    def filled():
        if kind == "paged":
            cache = PagedKVCache.for_model(model.config, 40, 4, 3, 64, torch.float32, "cpu")
            for row, n in enumerate((11, 7, 20)):
                assert cache.ensure(row, n)
        else:
            cache = KVCache.for_model(model.config, 3, 64, torch.float32, "cpu")
        with torch.inference_mode():
            model(a, cache=cache.rows(0, 1))
            model(b, cache=cache.rows(1, 2))
            model(c[:, :5], cache=cache.rows(2, 3))
        return cache

    step = torch.randint(3, VOCAB, (2, 1), generator=g)
    positions = torch.tensor([10, 6])
    chunk = c[:, 5:12]
    separate, together = filled(), filled()
    with torch.inference_mode():
        want_rows = model(step, cache=separate.rows(0, 2), start=positions, last_only=True)[:, -1]
        want_chunk = model(chunk, cache=separate.rows(2, 3), start=5, last_only=True)[:, -1]
        got_rows, got_chunk = model.forward_segments(
            [(step, together.rows(0, 2), positions), (chunk, together.rows(2, 3), 5)])
    assert got_rows.shape == want_rows.shape and got_chunk.shape == want_chunk.shape
    torch.testing.assert_close(got_rows, want_rows, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_chunk, want_chunk, atol=1e-5, rtol=1e-5)
    for row, length in ((0, 11), (1, 7), (2, 12)):  # every written key and value
        if kind == "paged":
            k1, v1 = separate.read_row(row, length)
            k2, v2 = together.read_row(row, length)
        else:
            k1, v1 = separate.k[:, row, :, :length], separate.v[:, row, :, :length]
            k2, v2 = together.k[:, row, :, :length], together.v[:, row, :, :length]
        torch.testing.assert_close(k2, k1, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(v2, v1, atol=1e-5, rtol=1e-5)
