"""`lmforge.load(...)`: one call from a model name or path to something that talks.

    >>> import lmforge
    >>> lm = lmforge.load()                      # the default model, offline
    >>> lm.generate("The capital of France is", max_tokens=8, temperature=0)
    >>> lm.chat([{"role": "user", "content": "Hi!"}])
    >>> lmforge.load_embedder().encode(["a sentence"])   # [1, 384] float32, unit length

`LoadedModel.model` is a plain `torch.nn.Module` (forward: ids -> logits) and
`LoadedModel.tokenizer` encodes and decodes; `generate`/`chat` go through the one
decode engine of `lmforge.infer`. This module only gathers the public API; the code
lives in its layer (device, dtype and loading policy in `lmforge.model.loading`).
"""

from __future__ import annotations

from lmforge.errors import LmforgeError
from lmforge.infer.engine import Completion, Generator
from lmforge.infer.loaded import LoadedModel, Messages, load
from lmforge.infer.sampling import SamplingParams
from lmforge.model.loading import DTYPES, load_model, load_tokenizer, pick_device, pick_dtype, resolve_tokenizer
from lmforge.model.registry import ModelSpec, resolve
from lmforge.rag.embedder import Embedder, load_embedder
from lmforge.tokenizer import Tokenizer

__all__ = ["DTYPES", "Completion", "Embedder", "Generator", "LmforgeError", "LoadedModel", "Messages", "ModelSpec",
           "SamplingParams", "Tokenizer", "load", "load_embedder", "load_model", "load_tokenizer", "pick_device",
           "pick_dtype", "resolve", "resolve_tokenizer"]
