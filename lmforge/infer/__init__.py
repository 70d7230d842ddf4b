"""Inference: sampling, the generation engine, weight layout for fast decoding."""

from .engine import Completion, Generator
from .sampling import SamplingParams

__all__ = ["Completion", "Generator", "SamplingParams"]
