"""Model modules: the text decoder, its KV cache, and the vision encoder + multimodal wrapper."""
from .cache import KVCache
from .multimodal import Gemma3Multimodal
from .text import Gemma3

__all__ = ["Gemma3", "Gemma3Multimodal", "KVCache"]
