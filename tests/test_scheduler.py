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
    scheduler = Scheduler(fast, None, max_batch=3, max_seq_len=128, max_prefill_tokens=64).start()
    try:
        handles = [scheduler.submit(p, q) for p, q in zip(prompts, params)]
        got = [h.result().token_ids for h in handles]
    finally:
        scheduler.shutdown()
    assert got == expected


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
