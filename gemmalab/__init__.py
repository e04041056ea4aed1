"""gemmalab: Gemma 3 in plain PyTorch.

    import gemmalab
    lm = gemmalab.load()                      # the embedded Gemma 3 270M (GGUF)
    print(lm.generate("The capital of France is", max_new_tokens=16, temperature=0).text)

    vlm = gemmalab.load("gemma-3-4b-it/")    # a Gemma3ForConditionalGeneration directory
    print(vlm.generate("Describe <start_of_image> in one line.", images=["cat.jpg"]).text)
"""
from .config import (MULTIMODAL_PRESETS, PRESETS, Gemma3Config, Gemma3MultimodalConfig, get_config,
                     get_multimodal_config)
from .generate import GenerationResult, PromptTooLongError, SamplingParams
from .images import ImageError, PanAndScan
from .lm import LM, load

__all__ = ["load", "LM", "Gemma3Config", "get_config", "PRESETS", "GenerationResult",
           "SamplingParams", "PromptTooLongError", "Gemma3MultimodalConfig", "get_multimodal_config",
           "MULTIMODAL_PRESETS", "PanAndScan", "ImageError"]
__version__ = "0.1.0"
