"""gemmalab: Gemma 3 in plain PyTorch.

    import gemmalab
    lm = gemmalab.load()                      # the embedded Gemma 3 270M (GGUF)
    print(lm.generate("The capital of France is", max_new_tokens=16, temperature=0).text)
"""
from .config import PRESETS, Gemma3Config, get_config
from .generate import GenerationResult, PromptTooLongError, SamplingParams
from .lm import LM, load

__all__ = ["load", "LM", "Gemma3Config", "get_config", "PRESETS", "GenerationResult",
           "SamplingParams", "PromptTooLongError"]
__version__ = "0.1.0"
