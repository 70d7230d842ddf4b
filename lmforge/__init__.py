"""lmforge: a hackable end-to-end LLM toolkit.

`import lmforge` is cheap: heavy modules (torch, the model) load on first use.

    >>> import lmforge
    >>> lm = lmforge.load()  # the default model, SmolLM2-135M-Instruct
    >>> print(lm.chat("What is the capital of France?", temperature=0))
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .errors import LmforgeError

__version__ = "0.1.0"
__all__ = ["LmforgeError", "connect", "load", "__version__"]

if TYPE_CHECKING:  # pragma: no cover
    from .api import LoadedModel


def load(model: str | None = None, **kwargs: Any) -> "LoadedModel":
    """Load a model by registered name, Hugging Face directory or .gguf path; see `lmforge.api.load`."""
    from .api import load as _load

    return _load(model, **kwargs)


def connect(base_url: str, api_key: str | None = None, model: str | None = None):
    """A model behind an OpenAI-compatible endpoint, with the same text interface as `load`."""
    from .infer.remote import RemoteModel

    return RemoteModel(base_url, api_key, model)
