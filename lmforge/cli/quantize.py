"""``lmforge quantize [MODEL] --method rtn|gptq|awq --bits 4|8 --out FILE.gguf``: weights rounded
onto GGUF's Q4_0 / Q8_0 block grids by one of three methods; see lmforge/infer/quantize.py."""

from __future__ import annotations

import argparse
import itertools
import sys

from lmforge.cli import common
from lmforge.errors import LmforgeError


def cmd_quantize(args: argparse.Namespace) -> int:
    import torch

    from lmforge.data.corpora import load_source, split_of
    from lmforge.infer.options import QuantizeOptions
    from lmforge.infer.quantize import calibration_rows, quantizable, quantize_model, write_quantized, writable_target
    from lmforge.io.progress import Progress
    from lmforge.model.loading import load_model, load_tokenizer
    from lmforge.model.registry import resolve

    options = common.config_from_args(QuantizeOptions, args)
    writable_target(options.out, options.overwrite)  # before minutes of work, not after
    spec = resolve(args.model)
    progress = Progress(f"loading {spec.name}", unit="tensors", log_every=5.0)
    model = load_model(spec, dtype=torch.float32, progress=progress)  # plain float32 weights
    progress.close()
    quantizable(model)
    tokenizer = None
    if options.tokenizer or options.needs_calibration:
        try:
            tokenizer = load_tokenizer(spec)
        except LmforgeError as exc:
            if options.needs_calibration:
                raise LmforgeError(f"{options.method} reads calibration text, which needs the model's tokenizer: "
                                   f"{exc}") from None
            print(f"note: writing the weights without a tokenizer ({exc})", file=sys.stderr)
    rows = None
    if options.needs_calibration:
        # The training side of the corpus's hash split (the one lmforge prune uses), so a
        # held-out perplexity on the other side is measured on text calibration never saw.
        texts = (d.text for d in load_source(options.calibration) if split_of(d.text, 0.1, salt="prune") == "train")
        rows = calibration_rows(tokenizer, itertools.islice(texts, 10_000), options.calibration_sequences,
                                options.calibration_length)
    progress = Progress(f"quantizing ({options.method}, {options.bits}-bit)", unit="blocks", log_every=5.0)
    result = quantize_model(model, options, rows, progress=progress)
    progress.close()
    progress = Progress("writing gguf", unit="tensors", log_every=5.0)
    written = write_quantized(result, options.out, tokenizer=tokenizer if options.tokenizer else None,
                              name=spec.name, overwrite=options.overwrite, progress=progress)
    progress.close()
    calibrated = (f", calibrated on {result.details['calibration_tokens']:,} tokens"
                  if "calibration_tokens" in result.details else "")
    print(f"quantized {spec.name} with {options.method} to {result.qtype.upper()} in {result.seconds:.1f} s"
          f"{calibrated}: {len(result.tensors)} matrices on the grid, wrote {written.path} "
          f"({written.nbytes / 2**20:.1f} MiB)")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    from lmforge.infer.options import QuantizeOptions

    p = sub.add_parser("quantize", help="quantize a model's weights (rtn, gptq, awq) into a GGUF Q4_0/Q8_0 file")
    common.add_model_argument(p)
    common.add_config_flags(p, QuantizeOptions, "quantization")
    p.set_defaults(func=cmd_quantize)
