"""Tokenization: BPE encode/decode, tokenizer.json and GGUF formats, chat templates.

    from lmforge.tokenizer import Tokenizer, IncrementalDecoder

    tok = Tokenizer.from_gguf("model.gguf")            # or from_file / from_pretrained_dir
    ids = tok.encode("Hello world")
    text = tok.decode(ids)
    prompt = tok.apply_chat_template([{"role": "user", "content": "Hi"}])

Importing this package is cheap: Jinja and gguf are imported only when used.
"""

from lmforge.tokenizer.streaming import IncrementalDecoder
from lmforge.tokenizer.tokenizer import Tokenizer

__all__ = ["IncrementalDecoder", "Tokenizer"]
