"""Inference: sampling, the generation engine, weight layout for fast decoding.

The names below load on first use, so importing a light submodule (the option
dataclasses of lmforge/infer/options.py, read when the command line is built) does
not import PyTorch.
"""

__all__ = ["Completion", "Generator", "SamplingParams"]


def __getattr__(name: str):
    if name in ("Completion", "Generator"):
        from . import engine

        return getattr(engine, name)
    if name == "SamplingParams":
        from .sampling import SamplingParams

        return SamplingParams
    raise AttributeError(f"module 'lmforge.infer' has no attribute {name!r}")
