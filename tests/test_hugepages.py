"""Weights copied into 2 MiB pages (lmforge/io/hugepages.py): values, layouts and tying kept, each
tensor its own storage (saving and copying work as before), the mapping marked for huge pages."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from lmforge.io import hugepages

needs_thp = pytest.mark.skipif(not hugepages.available(), reason="no transparent huge pages on this system")


@needs_thp
def test_move_keeps_values_layouts_and_tying(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(50, 24), nn.Linear(24, 40), nn.Linear(40, 24), nn.Linear(24, 50, bias=False))
    model[3].weight = model[0].weight  # tied, as a language model's head and embedding
    with torch.no_grad():
        model[1].weight.data = model[1].weight.data.t().contiguous().t()  # column-major
    before = {k: v.clone() for k, v in model.state_dict().items()}
    weights = [model[1].weight, model[2].weight, model[3].weight, model[0].weight, model[1].bias]
    region = hugepages.move_to_huge_pages(weights)
    assert region is not None and hugepages.eligible(model[2].weight)
    assert model[3].weight is model[0].weight  # the one Parameter moved once
    assert not model[1].weight.is_contiguous() and model[1].weight.t().is_contiguous()
    base = region.address
    for w in weights:
        assert base <= w.data_ptr() < base + region.nbytes and w.data_ptr() % hugepages.ALIGN == 0
        assert w.untyped_storage().data_ptr() == w.data_ptr()  # a storage of its own
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)
    x = torch.randint(0, 50, (3, 5))
    out = model(x)
    out.sum().backward()  # still trainable parameters
    assert model[1].weight.grad is not None
    save_file({k: v.contiguous() for k, v in model.state_dict().items() if k != "3.weight"}, tmp_path / "m.safetensors")
    loaded = load_file(tmp_path / "m.safetensors")
    torch.testing.assert_close(loaded["2.weight"], before["2.weight"], rtol=0, atol=0)
    twin = copy.deepcopy(model)
    torch.testing.assert_close(twin(x), model(x), rtol=0, atol=0)
    del region  # the tensors keep their memory alive
    torch.testing.assert_close(model[2].weight, before["2.weight"], rtol=0, atol=0)


def test_switched_off_moves_nothing(monkeypatch):
    monkeypatch.setenv("LMFORGE_HUGE_PAGES", "0")
    w = torch.randn(8, 8)
    ptr = w.data_ptr()
    assert not hugepages.available() and hugepages.move_to_huge_pages([w]) is None and w.data_ptr() == ptr


@needs_thp
def test_caches_in_huge_pages_are_zero_writable_and_outlive_their_region():
    """A large key/value cache gets huge-page memory (read as zeros, writable, kept alive by the
    tensor); a small one, or any with huge pages switched off, is an ordinary tensor."""
    import gc

    from lmforge.model.kv_cache import KVCache
    from lmforge.model.paged_kv import PagedKVCache

    cache = KVCache(4, 2, 1024, 2, 64)  # 4 MiB each for k and v
    assert hugepages.eligible(cache.k) and hugepages.eligible(cache.v)
    assert cache.k.shape == (4, 2, 2, 1024, 64) and cache.k.dtype == torch.float32
    assert not cache.k.any() and not cache.v.any()
    gc.collect()
    cache.k[1, 0, 1, 5] = 2.5
    assert float(cache.k.sum()) == 2.5 * 64 and cache.k.data_ptr() != cache.v.data_ptr()
    paged = PagedKVCache(4, 512, 16, 2, 256, 2, 64, torch.bfloat16)  # 4.2 MB each
    assert hugepages.eligible(paged.k) and paged.k.dtype == torch.bfloat16 and not paged.k.any()
    assert hugepages.zeros((4, 4), torch.float32) is None  # too small to be worth a mapping


def test_caches_switched_off_are_ordinary(monkeypatch):
    from lmforge.model.kv_cache import KVCache

    monkeypatch.setenv("LMFORGE_HUGE_PAGES", "0")
    cache = KVCache(4, 2, 1024, 2, 64)
    assert hugepages.zeros((1 << 22,), torch.float32) is None
    assert not cache.k.any() and cache.k.untyped_storage().nbytes() == cache.k.numel() * 4
