"""The model layer: `ModelConfig`, the `Transformer`, its KV cache, and checkpoint I/O."""

from .config import ModelConfig
from .kv_cache import KVCache
from .transformer import Transformer

__all__ = ["KVCache", "ModelConfig", "Transformer"]
