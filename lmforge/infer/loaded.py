"""A loaded model: a `Transformer`, its `Tokenizer` and the generator that drives them.

`load(...)` goes from a registered name, a Hugging Face directory or a .gguf file to a
`LoadedModel` whose `generate`/`chat`/`stream` take sampling settings as keyword
arguments; `lmforge.load` is this function.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch

from lmforge.errors import LmforgeError
from lmforge.infer.engine import Completion, Generator
from lmforge.infer.layout import optimize_for_cpu_decoding
from lmforge.infer.sampling import SamplingParams
from lmforge.model.loading import load_model, load_tokenizer, pick_device, pick_dtype, pick_prefill_dtype
from lmforge.model.registry import ModelSpec, resolve
from lmforge.tokenizer import Tokenizer

Messages = Sequence[dict[str, Any]]


class LoadedModel:
    """A model, its tokenizer and a generator, with sampling settings as keyword arguments."""

    def __init__(self, model, tokenizer: Tokenizer, spec: ModelSpec) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.spec = spec
        self.generator = Generator(model, tokenizer)

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def config(self):
        return self.model.config

    def complete(self, prompts: str | list[int] | Sequence[str | list[int]], **sampling: Any) -> list[Completion]:
        """Completions with token counts, finish reasons and timings."""
        return self.generator.generate(prompts, SamplingParams(**sampling))

    def generate(self, prompt: str, **sampling: Any) -> str:
        """The text that follows `prompt` (no chat template applied)."""
        return self.complete(prompt, **sampling)[0].text

    def chat_prompt(self, messages: Messages | str) -> list[int]:
        """Token ids of the conversation rendered by the model's chat template, ready for the reply."""
        text = self.tokenizer.apply_chat_template(_as_messages(messages), add_generation_prompt=True)
        return self.tokenizer.encode(text, add_special_tokens=False)

    def chat(self, messages: Messages | str, **sampling: Any) -> str:
        """The assistant's reply to a conversation (a list of {"role", "content"} dicts, or one user message)."""
        return self.complete([self.chat_prompt(messages)], **sampling)[0].text

    def stream_chat(self, messages: Messages | str, **sampling: Any) -> Iterator[str]:
        """The reply as text deltas, as they are generated."""
        return self.stream(self.chat_prompt(messages), **sampling)

    def stream(self, prompt: str | list[int], **sampling: Any) -> Iterator[str]:
        return self.generator.stream(prompt, SamplingParams(**sampling))


def _as_messages(messages: Messages | str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": messages}] if isinstance(messages, str) else list(messages)


PREFILL_CHOICES = ("auto", "float32", "bf16", "int8")


def load(
    model: str | Path | None = None,
    dtype: str | torch.dtype | None = "auto",
    device: str | None = "auto",
    progress=None,
    prepare: Callable[[torch.nn.Module], torch.nn.Module] | None = None,
    weights: str = "float",
    prefill: str = "auto",
) -> LoadedModel:
    """Load a registered model name, a Hugging Face directory or a .gguf file (default: the default model).

    `prepare` changes the loaded network before the CPU decoding layout is built (which covers
    plain linear layers only), e.g. merging an adapter into it.

    `weights`: "float" (the weights in `dtype`), or "q4" / "q8": the block linears (and the
    vocabulary head) kept as int4 group-wise / int8 per-row weights on CPU, a GGUF file's 4-bit
    blocks read straight into them (lmforge/infer/quant_gguf.py).

    `prefill`: the precision of a prompt's matrix products on a CPU (decode keeps the float32
    weights and kernels either way): "auto" (bf16 where the CPU has bf16 units, see
    lmforge/model/precision.py), "float32", "bf16", or "int8" (dynamic per-token int8
    activations against smoothed int8 weights, calibrated at load on the handbook text that
    ships with lmforge; lmforge/infer/int8_prefill.py).
    """
    if prefill not in PREFILL_CHOICES:
        raise LmforgeError(f"unknown prefill precision {prefill!r} (use {', '.join(PREFILL_CHOICES)})")
    if weights != "float":
        from lmforge.infer.quant_gguf import weight_bits

        weight_bits(weights)  # an unknown value fails before anything is read
    spec = resolve(model)
    # The quantized kernels are CPU ones: "auto" means the CPU for them.
    dev = pick_device("cpu" if weights != "float" and device in (None, "auto") else device)
    tokenizer = load_tokenizer(spec)
    if prefill != "auto" and (weights != "float" or dev.type != "cpu"):
        raise LmforgeError(f"--prefill {prefill} is a CPU path for float weights; leave it at auto "
                           + ("with quantized weights" if weights != "float" else f"on {dev.type}"))
    if prefill in ("bf16", "int8") and pick_dtype(dtype, dev) != torch.float32:
        raise LmforgeError(f"--prefill {prefill} multiplies beside float32 weights; use --dtype float32 or auto")
    if weights != "float":
        from lmforge.infer.quant_gguf import load_quantized_model

        net = load_quantized_model(spec, weights, dev, pick_dtype(dtype, dev), progress, prepare)
        return LoadedModel(net, tokenizer, spec)
    net = load_model(spec, pick_dtype(dtype, dev), dev, progress=progress)
    if prepare is not None:
        net = prepare(net).eval()
    if dev.type == "cpu":
        optimize_for_cpu_decoding(net, pick_prefill_dtype(dtype, dev, prefill))  # bf16 prefill where the CPU has it
        if prefill == "int8":
            from .int8_prefill import calibrate_for_generation, cpu_int8_units

            if not cpu_int8_units():
                import warnings

                warnings.warn("this CPU reports no integer dot-product units (AVX512-VNNI, AVX-VNNI, AMX-INT8): "
                              "int8 prefill products may run slower than float32 here", stacklevel=2)
            calibrate_for_generation(net, tokenizer)
    return LoadedModel(net, tokenizer, spec)
