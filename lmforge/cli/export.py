"""``lmforge export onnx|gguf MODEL --out PATH``: a model for onnxruntime or llama.cpp-style runtimes;
see lmforge/infer/export.py."""

from __future__ import annotations

import argparse
import sys

from lmforge.cli import common
from lmforge.errors import LmforgeError


def cmd_export(args: argparse.Namespace) -> int:
    import torch

    from lmforge.infer.export import ExportOptions, export_model
    from lmforge.io.progress import Progress
    from lmforge.model.loading import load_model, load_tokenizer
    from lmforge.model.registry import resolve

    options = common.config_from_args(ExportOptions, args)
    spec = resolve(args.model)
    progress = Progress(f"loading {spec.name}", unit="tensors", log_every=5.0)
    model = load_model(spec, dtype=torch.float32, progress=progress)  # plain weights, no inference layout
    progress.close()
    tokenizer = None
    if options.tokenizer:
        try:
            tokenizer = load_tokenizer(spec)
        except LmforgeError as exc:
            print(f"note: exporting without a tokenizer ({exc})", file=sys.stderr)
    progress = Progress(f"writing {args.target}", unit="tensors" if args.target == "gguf" else "stages",
                        log_every=5.0)
    summary = export_model(model, args.target, options, tokenizer=tokenizer, name=spec.name, progress=progress)
    progress.close()
    what = (f"ONNX opset {summary['opset']}" if args.target == "onnx"
            else f"GGUF {summary['type'].upper()} ({summary['quantized']} quantized tensors, "
                 f"{summary['kept_f16']} kept F16)")
    line = f"exported {spec.name} as {what}: wrote {summary['out']} ({summary['bytes'] / 2**20:.1f} MiB)"
    if "check_max_abs_diff" in summary:
        line += (f"; check on {options.check_tokens} tokens: max |logit difference| "
                 f"{summary['check_max_abs_diff']:.2e}, same top token at {summary['check_same_argmax']:.0%} "
                 "of positions")
    print(line)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    from lmforge.infer.export import TARGETS, ExportOptions

    p = sub.add_parser("export", help="export a model as an ONNX decoder (with KV cache) or a GGUF file")
    p.add_argument("target", choices=TARGETS, help="onnx (a directory for onnxruntime) or gguf (one file)")
    common.add_model_argument(p)
    common.add_config_flags(p, ExportOptions, "export")
    p.set_defaults(func=cmd_export)
