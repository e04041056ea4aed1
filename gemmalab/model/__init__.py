"""Model modules: the text decoder and its KV cache."""
from .cache import KVCache
from .text import Gemma3

__all__ = ["Gemma3", "KVCache"]
