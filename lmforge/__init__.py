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
__all__ = ["LmforgeError", "load", "__version__"]

if TYPE_CHECKING:  # pragma: no cover
    from .api import LoadedModel


def load(model: str | None = None, **kwargs: Any) -> "LoadedModel":
    """Load a model by registered name, Hugging Face directory or .gguf path; see `lmforge.api.load`."""
    from .api import load as _load

    return _load(model, **kwargs)
