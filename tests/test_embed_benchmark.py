"""benchmarks/embed.py's profile: the FLOP count it divides by and the shares it reports."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from torch import nn

from lmforge.rag.embedder import load_embedder

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "embed.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("embed_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def embedder(minilm_dir):
    return load_embedder(dtype="float32", device="cpu")


def test_flops_per_token_count_every_product_of_every_layer(bench, embedder):
    linears = [m for m in embedder.model.layers.modules() if isinstance(m, nn.Linear)]
    assert len(linears) == 4 * 6
    counted = 2 * sum(m.in_features * m.out_features for m in linears)
    assert bench.linear_flops_per_token(embedder.model.config) == counted == 21_233_664


@pytest.mark.slow  # torch.profiler's start-up alone takes seconds
def test_profile_shares_cover_the_time_and_products_dominate(bench, embedder, capsys):
    texts = bench.sentences(48)
    result = bench.profile_lmforge(embedder, texts, batch=16)
    assert result["tokens"] == sum(len(r) for r in embedder.tokenize(texts))
    assert sum(result["share"].values()) == pytest.approx(1.0, abs=1e-3)
    assert max(result["share"], key=result["share"].get) == "matrix products"
    assert result["products_gflops_in_model"] > 0 and result["products_gflops_alone"] > 0
    assert "matrix products" in capsys.readouterr().out
