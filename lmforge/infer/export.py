"""Export a model for other runtimes (I7): an ONNX decoder with its KV cache, or a GGUF file.

`ExportOptions` is the one description of ``lmforge export``'s settings; `export_model`
writes the target and (unless told not to) reads it back in its runtime and compares the
logits of a short prompt with lmforge's, so a broken export is caught where it is made.
The formats themselves: lmforge/infer/export_onnx.py and lmforge/model/gguf_write.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lmforge.errors import LmforgeError
from lmforge.options import option

TARGETS = ("onnx", "gguf")
GGUF_TYPES = ("f32", "f16", "q8_0", "q4_0")


@dataclass
class ExportOptions:
    out: str = option(help="output: a directory for onnx (model.onnx + model.onnx.data), a .gguf file for gguf")
    type: str = option("f16", choices=GGUF_TYPES,
                       help="gguf: tensor type of the matrices (vectors stay f32); onnx is always written in f32")
    pure: bool = option(False, help="gguf q4_0: the vocabulary head in Q4_0 too (by default it is kept in Q8_0, "
                                    "as llama.cpp keeps it at a higher precision)")
    overwrite: bool = option(False, help="replace OUT if it exists")
    tokenizer: bool = option(True, help="the tokenizer goes with the weights (tokenizer.json beside the "
                                        "ONNX graph, tokenizer.ggml.* metadata in the GGUF file); "
                                        "--no-tokenizer writes the weights only")
    check: bool = option(True, help="the result is read back in its runtime (onnxruntime, lmforge's GGUF "
                                    "loader) and its logits for a short prompt compared with lmforge's; "
                                    "--no-check skips that")
    check_tokens: int = option(16, help="length of the prompt the check runs")

    def __post_init__(self) -> None:
        if self.type not in GGUF_TYPES:
            raise LmforgeError(f"unknown GGUF type {self.type!r} (use {', '.join(GGUF_TYPES)})")
        if self.check_tokens < 1:
            raise LmforgeError("check_tokens must be at least 1")


def _check_ids(model, tokens: int):
    import torch

    generator = torch.Generator().manual_seed(0)
    limit = min(tokens, model.config.max_position_embeddings)
    return torch.randint(0, model.config.vocab_size, (1, limit), generator=generator)


def export_model(model, target: str, options: ExportOptions, tokenizer=None, name: str | None = None,
                 progress=None) -> dict[str, Any]:
    """Write `model` as `target` ("onnx" or "gguf"); a summary dict (paths, sizes, the check's figures)."""
    import numpy as np
    import torch

    if target not in TARGETS:
        raise LmforgeError(f"unknown export target {target!r} (use {' or '.join(TARGETS)})")
    tokenizer = tokenizer if options.tokenizer else None
    ids = _check_ids(model, options.check_tokens)
    summary: dict[str, Any] = {"target": target, "out": options.out}
    if target == "onnx":
        from lmforge.infer.export_onnx import OnnxRunner, export_onnx

        if options.type not in ("f16", "f32"):  # f16 is only the flag's default, which means nothing here
            raise LmforgeError("--type applies to gguf; ONNX graphs are written in float32")
        result = export_onnx(model, options.out, tokenizer=tokenizer, overwrite=options.overwrite, progress=progress)
        summary.update(opset=result.opset, seconds=round(result.seconds, 2),
                       bytes=sum(p.stat().st_size for p in result.directory.iterdir()))
        if options.check:
            runner = OnnxRunner(result.directory)
            got, _ = runner.forward(ids.numpy(), runner.empty_past(1))
            with torch.no_grad():
                ref = model(ids).float().numpy()
            summary["check_max_abs_diff"] = float(np.abs(got - ref).max())
            summary["check_same_argmax"] = float((got.argmax(-1) == ref.argmax(-1)).mean())
        return summary
    from lmforge.model.gguf_io import load_gguf_model
    from lmforge.model.gguf_write import write_gguf

    result = write_gguf(model, options.out, options.type, tokenizer=tokenizer, name=name, overwrite=options.overwrite,
                        progress=progress, pure=options.pure)
    summary.update(type=result.qtype, tensors=result.tensors, quantized=result.quantized,
                   kept_f16=result.fallback_f16, bytes=result.nbytes)
    if options.check:
        back = load_gguf_model(result.path)
        with torch.no_grad():
            ref, got = model(ids).float(), back(ids)
        summary["check_max_abs_diff"] = float((got - ref).abs().max())
        summary["check_same_argmax"] = float((got.argmax(-1) == ref.argmax(-1)).float().mean())
    return summary
