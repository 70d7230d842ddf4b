"""lmforge: a hackable end-to-end LLM toolkit.

`import lmforge` is cheap: heavy modules (torch, the model) load on first use.

    >>> import lmforge
    >>> lm = lmforge.load()  # the default model, SmolLM2-135M-Instruct
    >>> print(lm.chat("What is the capital of France?", temperature=0))
    >>> embedder = lmforge.load_embedder()  # all-MiniLM-L6-v2 sentence embeddings
    >>> vectors = embedder.encode(["A cat sits.", "A kitten is sitting."])
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .errors import LmforgeError

__version__ = "0.1.0"
__all__ = ["LmforgeError", "connect", "load", "load_embedder", "__version__"]

if TYPE_CHECKING:  # pragma: no cover
    from .api import Embedder, LoadedModel


def load(model: str | None = None, **kwargs: Any) -> "LoadedModel":
    """Load a model by registered name, Hugging Face directory or .gguf path; see `lmforge.api.load`."""
    from .api import load as _load

    return _load(model, **kwargs)


def load_embedder(name_or_path: str | None = None, device: str | None = None, dtype: str | None = None) -> "Embedder":
    """Sentence embeddings from a registered name or a sentence-transformers/BERT directory
    (default: all-minilm-l6-v2); see `lmforge.rag.embedder.load_embedder`."""
    from .api import load_embedder as _load_embedder

    return _load_embedder(name_or_path, device=device, dtype=dtype)


def connect(base_url: str, api_key: str | None = None, model: str | None = None):
    """A model behind an OpenAI-compatible endpoint, with the same text interface as `load`."""
    from .infer.remote import RemoteModel

    return RemoteModel(base_url, api_key, model)
