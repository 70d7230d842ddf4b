"""Tokenization: BPE encode/decode, tokenizer.json and GGUF formats, chat templates.

    from lmforge.tokenizer import Tokenizer, IncrementalDecoder

    tok = Tokenizer.from_gguf("model.gguf")            # or from_file / from_pretrained_dir
    ids = tok.encode("Hello world")
    text = tok.decode(ids)
    prompt = tok.apply_chat_template([{"role": "user", "content": "Hi"}])

Importing this package is cheap: its classes load on first use (so that the CLI, which
builds its parser on every invocation, starts at once), and Jinja and
gguf are imported only when used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lmforge.tokenizer.streaming import IncrementalDecoder
    from lmforge.tokenizer.tokenizer import Tokenizer

__all__ = ["IncrementalDecoder", "Tokenizer"]


def __getattr__(name: str) -> Any:
    if name == "Tokenizer":
        from lmforge.tokenizer.tokenizer import Tokenizer

        return Tokenizer
    if name == "IncrementalDecoder":
        from lmforge.tokenizer.streaming import IncrementalDecoder

        return IncrementalDecoder
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
