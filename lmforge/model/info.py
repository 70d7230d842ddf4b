"""What a model is and what it costs in memory, read from its config alone (no weights loaded)."""

from __future__ import annotations

from typing import Any

from .config import ModelConfig
from .registry import resolve

BYTES_PER_PARAM = {"float32": 4, "bfloat16": 2, "float16": 2, "int8": 1, "int4": 0.5}


def read_config(spec) -> ModelConfig:
    if spec.format == "gguf":
        from .gguf_io import config_from_gguf, open_gguf

        return config_from_gguf(open_gguf(spec.path))
    from .checkpoint import read_hf_config

    return read_hf_config(spec.path)


def memory_report(config: ModelConfig) -> dict[str, Any]:
    n = config.num_parameters()
    report: dict[str, Any] = {
        "parameters": n,
        "weight_bytes": {dtype: int(n * b) for dtype, b in BYTES_PER_PARAM.items()},
    }
    if config.causal:  # an encoder reads its whole input at once: it keeps no cache
        per_token = 2 * config.n_layer * config.kv_size  # k and v, every layer
        report["kv_cache_bytes_per_token"] = {"float32": per_token * 4, "bfloat16": per_token * 2}
    return report


def describe(model: str | None) -> dict[str, Any]:
    spec = resolve(model)
    config = read_config(spec)
    return {"name": spec.name, "format": spec.format, "path": str(spec.path), "config": config.to_dict(), **memory_report(config)}
