"""Turn a ``--tokenizer`` argument into a Tokenizer: a file, a directory or a model name."""

from __future__ import annotations

from pathlib import Path

from lmforge.errors import LmforgeError
from lmforge.tokenizer import Tokenizer


def resolve_tokenizer(spec: str | None) -> Tokenizer:
    """``tokenizer.json``, a directory holding one, a ``.gguf`` file, or a registered model
    name (None: the default model's tokenizer)."""
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
    from lmforge.model.registry import resolve

    model = resolve(spec)  # registered name (or explains why the argument is unusable)
    if model.format == "gguf":
        return Tokenizer.from_gguf(model.path)
    return Tokenizer.from_pretrained_dir(model.path)
