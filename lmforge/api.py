"""`lmforge.load(...)`: one call from a model name or path to something that talks.

    >>> import lmforge
    >>> lm = lmforge.load()                      # the default model, offline
    >>> lm.generate("The capital of France is", max_tokens=8, temperature=0)
    >>> lm.chat([{"role": "user", "content": "Hi!"}])

`LoadedModel.model` is a plain `torch.nn.Module` (forward: ids -> logits) and
`LoadedModel.tokenizer` encodes and decodes; `generate`/`chat` go through the one
`Generator` of `lmforge.infer`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

from .errors import LmforgeError
from .infer import Completion, Generator, SamplingParams
from .infer.layout import optimize_for_cpu_decoding
from .model.registry import ModelSpec, resolve
from .tokenizer import Tokenizer

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}
Messages = Sequence[dict[str, Any]]


def pick_device(device: str | None) -> torch.device:
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
    """fp32 on CPU (fast and exact there); bf16 on GPUs that support it."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    if dtype not in DTYPES:
        raise LmforgeError(f"unknown dtype {dtype!r} (use {', '.join(DTYPES)})")
    return DTYPES[dtype]


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

    def complete(self, prompts: str | Sequence[str], **sampling: Any) -> list[Completion]:
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
        return self.generator.generate([self.chat_prompt(messages)], SamplingParams(**sampling))[0].text

    def stream_chat(self, messages: Messages | str, **sampling: Any) -> Iterator[str]:
        """The reply as text deltas, as they are generated."""
        return self.generator.stream(self.chat_prompt(messages), SamplingParams(**sampling))

    def stream(self, prompt: str, **sampling: Any) -> Iterator[str]:
        return self.generator.stream(prompt, SamplingParams(**sampling))


def _as_messages(messages: Messages | str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": messages}] if isinstance(messages, str) else list(messages)


def load_model(spec: ModelSpec, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu", progress=None):
    """Just the `Transformer` for a resolved spec (no tokenizer)."""
    if spec.format == "gguf":
        from .model.gguf_io import load_gguf_model

        return load_gguf_model(spec.path, dtype, device, progress=progress)
    from .model.checkpoint import load_hf_model

    return load_hf_model(spec.path, dtype, device)


def load_tokenizer(spec: ModelSpec) -> Tokenizer:
    if spec.format == "gguf":
        return Tokenizer.from_gguf(spec.path)
    if not (Path(spec.path) / "tokenizer.json").is_file():
        raise LmforgeError(f"{spec.path} has no tokenizer.json; lmforge needs it to turn text into tokens")
    return Tokenizer.from_pretrained_dir(spec.path)


def load(
    model: str | Path | None = None,
    dtype: str | torch.dtype | None = "auto",
    device: str | None = "auto",
    progress=None,
) -> LoadedModel:
    """Load a registered model name, a Hugging Face directory or a .gguf file (default: the default model)."""
    spec = resolve(model)
    dev = pick_device(device)
    tokenizer = load_tokenizer(spec)
    net = load_model(spec, pick_dtype(dtype, dev), dev, progress=progress)
    if dev.type == "cpu":
        optimize_for_cpu_decoding(net)
    return LoadedModel(net, tokenizer, spec)
