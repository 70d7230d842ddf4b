"""``lmforge models``, ``lmforge info`` and ``lmforge convert``: what models there are, what they cost, other formats."""

from __future__ import annotations

import argparse
import json
import sys

from lmforge.cli.common import MODEL_HELP, add_model_argument
from lmforge.errors import LmforgeError


def cmd_convert(args: argparse.Namespace) -> int:
    import torch

    from lmforge.model.checkpoint import save_hf_model
    from lmforge.model.loading import load_model, load_tokenizer, pick_dtype
    from lmforge.model.registry import resolve

    spec = resolve(args.src)
    dtype = pick_dtype(args.dtype, torch.device("cpu"))  # converted on the CPU: "auto" is float32
    model = load_model(spec, dtype=dtype)
    try:
        tokenizer = load_tokenizer(spec)
    except LmforgeError as exc:
        print(f"note: saving without a tokenizer ({exc})", file=sys.stderr)
        tokenizer = None
    out = save_hf_model(model, args.dst, tokenizer=tokenizer, overwrite=args.overwrite)
    print(f"wrote {out} ({model.num_parameters():,} parameters, {str(dtype).removeprefix('torch.')})")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from lmforge.model.registry import DEFAULT_MODEL, REGISTRY

    for name, entry in REGISTRY.items():
        try:
            where = str(entry.path())
        except LmforgeError:
            where = f"not installed ({entry.install})"
        default = " (default)" if name == DEFAULT_MODEL else ""
        print(f"{name}{default}\n  {entry.description}\n  {where}")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from lmforge.model.info import describe

    info = describe(args.model)
    if args.json:
        print(json.dumps(info, indent=2, default=str))
        return 0
    print(f"model: {info['name']} ({info['format']}, {info['path']})")
    for key, value in info["config"].items():
        if key != "extra":
            print(f"  {key}: {value}")
    print(f"parameters: {info['parameters']:,}")
    print("weights in memory:")
    for dtype, size in info["weight_bytes"].items():
        print(f"  {dtype:>9}: {size / 2**20:8.1f} MiB")
    kv = info.get("kv_cache_bytes_per_token")
    if kv is None:
        print("KV cache: none (an encoder reads its whole input in one pass)")
        return 0
    print(f"KV cache per token: {kv['float32'] / 1024:.1f} KiB fp32, {kv['bfloat16'] / 1024:.1f} KiB bf16 "
          f"({kv['float32'] * info['config']['max_position_embeddings'] / 2**20:.0f} MiB fp32 for the full context)")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("convert", help="save a model as a Hugging Face directory")
    p.add_argument("src", help=MODEL_HELP)
    p.add_argument("dst", help="output directory")
    p.add_argument("--dtype", default="float32", help="weights dtype (default float32)")
    p.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("models", help="list registered models")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("info", help="config, parameter count and memory of a model")
    add_model_argument(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_info)
