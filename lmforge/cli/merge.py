"""``lmforge merge``: fold a LoRA or (IA)3 adapter (lmforge's or PEFT's) into its base model and
write a Hugging Face directory that needs no adapter code to load."""

from __future__ import annotations

import argparse
import sys

from lmforge.cli import common
from lmforge.errors import LmforgeError


def cmd_merge(args: argparse.Namespace) -> int:
    import torch

    from lmforge.io.progress import Progress
    from lmforge.model.checkpoint import save_hf_model
    from lmforge.model.loading import load_model, load_tokenizer, pick_dtype
    from lmforge.model.registry import resolve
    from lmforge.tune.peft import load_adapter, merge_and_unload

    spec = resolve(args.model)
    dtype = pick_dtype(args.dtype, torch.device("cpu"))  # merged on the CPU: "auto" is float32
    progress = Progress(f"loading {spec.name}", unit="tensors", log_every=5.0)
    model = load_model(spec, dtype=dtype, progress=progress)
    progress.close()
    base_name = None if args.ignore_base_name else (args.model or spec.name)
    model = load_adapter(model, args.adapter, base_model_name_or_path=base_name)
    method = model.peft_options.method
    if method not in ("lora", "ia3", "bitfit"):
        raise LmforgeError(f"a {method} adapter adds computation of its own and cannot be merged into the weights "
                           "(LoRA, (IA)3 and BitFit adapters can)")
    model = merge_and_unload(model)
    try:
        tokenizer = load_tokenizer(spec)
    except LmforgeError as exc:
        print(f"note: saving without a tokenizer ({exc})", file=sys.stderr)
        tokenizer = None
    out = save_hf_model(model, args.out, tokenizer=tokenizer, overwrite=args.overwrite)
    print(f"merged the {method} adapter {args.adapter} into {spec.name}: wrote {out} "
          f"({model.num_parameters():,} parameters, {str(dtype).removeprefix('torch.')})")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("merge", help="merge a LoRA / (IA)3 adapter into its base model (a Hugging Face directory)")
    p.add_argument("--model", default=None, help=common.MODEL_HELP)
    p.add_argument("--adapter", required=True, help="adapter directory (adapter_config.json + adapter_model.safetensors)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--dtype", default="float32", help="weights dtype (default float32)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.add_argument("--ignore-base-name", action="store_true",
                   help="merge even when the adapter names a different base model (shapes are still checked)")
    p.set_defaults(func=cmd_merge)
