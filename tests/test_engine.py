"""One decode engine: offline `Generator` results equal the server's `Scheduler` results.

The server runs a started `Scheduler` (background thread, continuous batching, padded
prefill batches, rows freed and reused); `Generator` steps a scheduler of its own on the
caller's thread. The same requests must give the same tokens, finish reasons and text,
greedy or seeded, and the KV-cached step must equal the uncached one.
"""

from __future__ import annotations

import json

import pytest
import torch

from conftest import FAMILIES, VOCAB
from lmforge.errors import LmforgeError
from lmforge.infer import Generator, SamplingParams
from lmforge.infer.scheduler import Scheduler
from lmforge.model import ModelConfig, Transformer
from lmforge.model.checkpoint import load_hf_model


def serve(model, tokenizer, requests, **scheduler_kwargs):
    """Final events of `requests` [(prompt ids, params)] from a started scheduler, as a server runs it."""
    scheduler = Scheduler(model, tokenizer, max_seq_len=128, **scheduler_kwargs).start()
    try:
        handles = [scheduler.submit(ids, params) for ids, params in requests]
        return [h.result() for h in handles]
    finally:
        scheduler.shutdown()


def random_prompts(lengths, vocab, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]


def mixed_requests(prompts):
    """Greedy and seeded requests, with penalties and end tokens honoured or ignored."""
    params = []
    for i in range(len(prompts)):
        if i % 2 == 0:
            params.append(SamplingParams(max_tokens=5 + 3 * i, temperature=0, ignore_eos=i % 4 == 0))
        else:
            params.append(SamplingParams(max_tokens=5 + 3 * i, temperature=0.9, top_p=0.95, top_k=50, seed=i,
                                         repetition_penalty=1.1 if i == 1 else 1.0, presence_penalty=0.5 * (i == 3)))
    return params


@pytest.mark.parametrize("family", FAMILIES)
def test_generator_equals_server_scheduler(tiny_hf_dirs, family):
    model = load_hf_model(tiny_hf_dirs[family][0])
    prompts = random_prompts([3, 17, 9, 30, 5, 22, 12], VOCAB, seed=11)
    params = mixed_requests(prompts)
    offline = Generator(model).generate(prompts, params)
    # Three rows for seven requests and a small prefill budget: requests join and leave
    # the running batch at different steps and are prefilled in several padded batches.
    served = serve(model, None, list(zip(prompts, params)), max_batch=3, max_prefill_tokens=64)
    assert [(c.token_ids, c.finish_reason) for c in offline] == [(e.token_ids, e.finish_reason) for e in served]
    assert all(c.completion_tokens > 0 and c.prefill_seconds > 0 and c.decode_seconds >= 0 for c in offline)
    # The seeded requests did sample: their seed, not the batch, decides their tokens.
    reseeded = [SamplingParams(**{**vars(p), "seed": p.seed + 100}) if p.seed is not None else p for p in params]
    again = Generator(model).generate(prompts, reseeded)
    changed = [a.token_ids != c.token_ids for a, c, p in zip(again, offline, params) if p.seed is not None]
    assert any(changed)


def test_generator_with_fewer_rows_than_prompts_gives_the_same_completions(tiny_hf_dirs):
    gen = Generator(load_hf_model(tiny_hf_dirs["qwen2"][0]))
    prompts = random_prompts([3, 17, 9, 30, 5, 22, 12], VOCAB, seed=14)
    params = mixed_requests(prompts)
    together = gen.generate(prompts, params)
    two_rows = gen.generate(prompts, params, max_batch=2)
    assert [(c.token_ids, c.finish_reason) for c in two_rows] == [(c.token_ids, c.finish_reason) for c in together]
    with pytest.raises(LmforgeError, match="max_batch"):
        gen.generate(prompts, params, max_batch=0)


def test_generator_cache_fits_its_requests_and_each_keeps_its_budget(tiny_hf_dirs):
    gen = Generator(load_hf_model(tiny_hf_dirs["llama"][0]))  # context: 128 positions
    free = dict(temperature=0, ignore_eos=True)
    params = [SamplingParams(max_tokens=4, **free), SamplingParams(max_tokens=20, **free)]
    scheduler, _ = gen._submit([[5] * 3, [5] * 10], params, True, False)
    assert (scheduler.cache.batch, scheduler.cache.max_len) == (2, 30)  # rows: prompts; positions: 10 + 20
    # A budget cut by the model's context sizes the rows at the context; the others keep theirs.
    params = [SamplingParams(max_tokens=n, **free) for n in (4, 500, 9)]
    prompts = [[5] * 3, [5] * 10, [6] * 7]
    scheduler, _ = gen._submit(prompts, params, True, False, max_batch=2)
    assert (scheduler.cache.batch, scheduler.cache.max_len) == (2, 128)
    done = gen.generate(prompts, params, max_batch=2)
    assert [(c.completion_tokens, c.finish_reason) for c in done] == [(4, "length"), (118, "length"), (9, "length")]
    with pytest.raises(LmforgeError, match="max_batch must be at least 1"):
        Scheduler(gen.model, None, max_batch=0)


def test_generator_reuses_its_cache_cleared_and_results_do_not_depend_on_it(tiny_hf_dirs, monkeypatch):
    from lmforge.infer import engine

    model = load_hf_model(tiny_hf_dirs["llama"][0])
    gen = Generator(model)
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    short = random_prompts([12], VOCAB, seed=4)
    fresh = Generator(model).generate(short, params)
    gen.generate(random_prompts([40, 25], VOCAB, seed=3), params)
    spare = gen._spare
    assert (spare.batch, spare.max_len) == (2, 48)
    spare.k.fill_(float("nan"))  # whatever a call leaves must not reach the next one
    spare.v.fill_(float("nan"))
    again = gen.generate(short, params)
    assert gen._spare is spare  # the larger cache served the smaller call and came back
    assert [c.token_ids for c in again] == [c.token_ids for c in fresh]
    assert [c.token_ids for c in gen.generate(random_prompts([60], VOCAB, seed=5), params)]
    assert gen._spare is not spare and gen._spare.max_len == 68  # too short: a new one, kept in its place
    gen._spare = None
    list(gen.stream(short[0], params))
    assert gen._spare is not None  # a finished stream gives its cache back too
    monkeypatch.setattr(engine, "SPARE_CACHE_BYTES", 0)
    gen._spare = None
    gen.generate(short, params)
    assert gen._spare is None  # over the limit: not kept


@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_cached_step_equals_uncached_step_when_sampling(tiny_hf_dirs, family):
    gen = Generator(load_hf_model(tiny_hf_dirs[family][0]))
    prompts = random_prompts([4, 4, 21, 1, 10], VOCAB, seed=12)
    params = mixed_requests(prompts)
    cached = gen.generate(prompts, params, use_cache=True)
    uncached = gen.generate(prompts, params, use_cache=False)
    assert [(c.token_ids, c.finish_reason) for c in cached] == [(c.token_ids, c.finish_reason) for c in uncached]


def end_tokens_along(paths, avoid=frozenset()):
    """For each greedy path, (index, token): a token that, declared an end token, ends that path there.

    The token must be new in its path and absent from every other path before its own
    cut, so that each path ends at its own token and nowhere earlier.
    """
    chosen: list[tuple[int, int]] = []
    for path in paths:
        for i in range(2, len(path)):
            token = path[i]
            if token in path[:i] or token in avoid or any(token == t for _, t in chosen):
                continue
            if any(token in other[:k] for other, (k, _) in zip(paths, chosen)):
                continue
            if any(t in path[:i] for _, t in chosen):
                continue
            chosen.append((i, token))
            break
        else:
            pytest.fail(f"no usable end token along {path}")
    return chosen


def test_each_end_token_of_a_model_config_list_stops_generation(tiny_hf_dirs):
    model = load_hf_model(tiny_hf_dirs["llama"][0])
    prompts = random_prompts([6, 13], VOCAB, seed=13)
    paths = [c.token_ids for c in Generator(model).generate(prompts, SamplingParams(max_tokens=16, temperature=0, ignore_eos=True))]
    (i, a), (j, b) = end_tokens_along(paths)
    model.config.eos_token_id = [a, b]  # as config.json may declare: several end tokens

    greedy = SamplingParams(max_tokens=16, temperature=0)
    requests = [
        (prompts[0], greedy),
        (prompts[1], greedy),
        (prompts[0], SamplingParams(max_tokens=i + 1, temperature=0)),  # the last token allowed is the end token
        (prompts[0], SamplingParams(max_tokens=i, temperature=0)),  # the budget runs out just before it
        (prompts[1], SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)),
    ]
    expected = [(paths[0][:i], "stop"), (paths[1][:j], "stop"), (paths[0][:i], "stop"), (paths[0][:i], "length"),
                (paths[1], "length")]
    offline = Generator(model).generate([p for p, _ in requests], [q for _, q in requests])
    served = serve(model, None, requests, max_batch=2)
    assert [(c.token_ids, c.finish_reason) for c in offline] == expected
    assert [(e.token_ids, e.finish_reason) for e in served] == expected


@pytest.fixture(scope="module")
def default_tokenizer():
    from lmforge.model.registry import resolve
    from lmforge.tokenizer import Tokenizer

    return Tokenizer.from_gguf(resolve(None).path)  # no weights loaded


def test_each_end_token_of_tokenizer_and_config_stops_generation(default_tokenizer, tmp_path):
    from lmforge.tokenizer import Tokenizer

    torch.manual_seed(0)
    config = ModelConfig(vocab_size=default_tokenizer.vocab_size, n_layer=2, n_embd=32, n_head=2,
                         intermediate_size=64, max_position_embeddings=128)
    model = Transformer(config).eval()
    prompts = ["The sea is", "Once upon a time", "1, 2, 3,"]
    free = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    paths = [c.token_ids for c in Generator(model, default_tokenizer).generate(prompts, free)]
    (i, a), (j, b), (k, c) = end_tokens_along(paths, avoid=default_tokenizer.eos_ids)

    # Two end tokens declared by generation_config.json (as Llama 3 checkpoints do) on top
    # of the tokenizer's own, and a third by the model config.
    default_tokenizer.save(tmp_path)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [a, b]}))
    tokenizer = Tokenizer.from_pretrained_dir(tmp_path)
    assert tokenizer.eos_ids == default_tokenizer.eos_ids | {a, b}
    model.config.eos_token_id = c

    greedy = SamplingParams(max_tokens=16, temperature=0)
    gen = Generator(model, tokenizer)
    offline = gen.generate(prompts, greedy)
    served = serve(model, tokenizer, [(tokenizer.encode(p), greedy) for p in prompts])
    cuts = [paths[0][:i], paths[1][:j], paths[2][:k]]
    assert [(d.token_ids, d.finish_reason) for d in offline] == [(cut, "stop") for cut in cuts]
    assert [(e.token_ids, e.finish_reason) for e in served] == [(cut, "stop") for cut in cuts]
    # The end token's text is never shown; everything before it is.
    texts = [tokenizer.decode(cut, skip_special_tokens=True) for cut in cuts]
    assert [d.text for d in offline] == [e.text for e in served] == texts
    assert "".join(gen.stream(prompts[1], greedy)) == texts[1]


def test_a_failing_request_raises_offline_and_is_answered_with_an_error_by_the_server(tiny_hf_dirs):
    model = load_hf_model(tiny_hf_dirs["qwen2"][0])
    bad = SamplingParams(max_tokens=4, json_object=True)  # needs a tokenizer this model lacks
    good = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    with pytest.raises(LmforgeError, match="JSON output needs a byte-level tokenizer"):
        Generator(model).generate([[5, 6, 7]], bad)
    scheduler = Scheduler(model, None, max_seq_len=128).start()
    try:
        failed = scheduler.submit([5, 6, 7], bad).result()
        after = scheduler.submit([5, 6, 7], good).result()  # the thread survived the failure
    finally:
        scheduler.shutdown()
    assert failed.finish_reason == "error" and "byte-level tokenizer" in failed.error
    assert after.finish_reason == "length" and after.token_ids == Generator(model).generate([[5, 6, 7]], good)[0].token_ids
