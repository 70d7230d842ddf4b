"""Device, dtype and loading policy: from a name or a path to a `Transformer` and a `Tokenizer`.

Every stage that needs a model (generation, serving, training from a checkpoint,
evaluation) goes through these functions, so the device and dtype rules live in one
place: fp32 weights on CPU (fast and exact there) with bf16 prefill products on CPUs that
have bf16 units, bf16 on GPUs that support it.
"""

from __future__ import annotations

from pathlib import Path

import torch

from lmforge.errors import LmforgeError
from lmforge.model.registry import ModelSpec, resolve
from lmforge.tokenizer import Tokenizer

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def pick_device(device: str | None) -> torch.device:
    """`auto` (or None): cuda, then mps, then cpu; otherwise the named device, checked."""
    if device in (None, "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        return torch.device(device)
    except RuntimeError:
        raise LmforgeError(f"unknown device {device!r} (use cpu, cuda, cuda:N or mps)") from None


def pick_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """The dtype of the weights: an explicit one as asked; "auto" is fp32 on CPU (decode reads
    every weight per token and the float32 kernels are fastest there; prefill and training
    may still multiply in bf16, see `pick_prefill_dtype` and lmforge/model/precision.py),
    bf16 on GPUs that support it."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    if dtype not in DTYPES:
        raise LmforgeError(f"unknown dtype {dtype!r} (use {', '.join(DTYPES)})")
    return DTYPES[dtype]


def pick_prefill_dtype(dtype: str | torch.dtype | None, device: torch.device, prefill: str = "auto") -> torch.dtype:
    """The dtype of a prompt's matrix products: `pick_dtype`'s, except that "auto" on a CPU
    with bf16 units (AMX, AVX512-BF16; lmforge/model/precision.py) is bf16 while the weights
    and decode stay float32. An explicit dtype is kept for every phase. `prefill` ("float32",
    "bf16") overrides the choice on a CPU; "auto" and "int8" (whose int8 products are made
    in lmforge/infer, the rest following auto) leave it to the rule above."""
    if device.type == "cpu" and prefill in ("float32", "bf16"):
        return torch.float32 if prefill == "float32" else torch.bfloat16
    picked = pick_dtype(dtype, device)
    if dtype in (None, "auto") and device.type == "cpu":
        from lmforge.model.precision import auto_plan

        return DTYPES[auto_plan("cpu").prefill]
    return picked


def load_model(spec: ModelSpec, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu", progress=None,
               need_lm_head: bool = True):
    """Just the `Transformer` for a resolved spec (no tokenizer); `progress(done, total)` per tensor.

    Encoders (BERT) have no vocabulary head and cannot generate text; unless the caller
    only wants hidden states (``need_lm_head=False``, embeddings), loading one is an error.
    """
    if spec.format == "gguf":
        from lmforge.model.gguf_io import load_gguf_model

        return load_gguf_model(spec.path, dtype, device, progress=progress)
    from lmforge.model.checkpoint import load_hf_model, read_hf_config

    if need_lm_head and not read_hf_config(Path(spec.path)).lm_head:
        raise LmforgeError(f"{spec.name} is an encoder model (it makes embeddings, not text): "
                           f"use it with `lmforge embed --model {spec.name}` or lmforge.load_embedder()")
    return load_hf_model(spec.path, dtype, device)


def load_tokenizer(spec: ModelSpec) -> Tokenizer:
    """The tokenizer that ships with a resolved model (GGUF metadata or tokenizer.json)."""
    if spec.format == "gguf":
        return Tokenizer.from_gguf(spec.path)
    if not (Path(spec.path) / "tokenizer.json").is_file():
        raise LmforgeError(f"{spec.path} has no tokenizer.json; lmforge needs it to turn text into tokens")
    return Tokenizer.from_pretrained_dir(spec.path)


def resolve_tokenizer(spec: str | None) -> Tokenizer:
    """A tokenizer from a ``--tokenizer`` argument: ``tokenizer.json``, a directory holding one,
    a ``.gguf`` file, or a registered model name (None: the default model's tokenizer)."""
    if spec is not None:
        path = Path(spec).expanduser()
        if path.is_file():
            if path.suffix.lower() == ".gguf":
                return Tokenizer.from_gguf(path)
            return Tokenizer.from_file(path)
        if path.is_dir():
            if (path / "tokenizer.json").is_file():
                return Tokenizer.from_pretrained_dir(path)
            raise LmforgeError(f"{path} has no tokenizer.json")
        if path.suffix.lower() in (".json", ".gguf"):
            raise LmforgeError(f"no such file or directory: {path}")
    return load_tokenizer(resolve(spec))  # a registered name (or an error saying why the argument is unusable)
