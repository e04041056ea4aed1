"""Build a quantized Gemma 3 from checkpoint tensors: the module swap and the choice of formats.

Modes (`gemmalab.load(mode=...)`):
- "fp32": not here; the reference model of gemmalab.model with every weight dequantized.
- "native": each matrix keeps the quantization of its file (a Q4_K_M GGUF computes on its Q4_K,
  Q5_0, Q6_K and Q8_0 blocks, bit-exact weights); float matrices (Hugging Face checkpoints, F16/F32
  GGUFs) and types without a kernel are quantized to Q8_0.
- "q8": every matrix in Q8_0 (8.5 bits per weight), from the dequantized file weights.
Activations are quantized to 8 bits per block of 32 inside the small-batch kernels; norms, RoPE,
attention and softmax stay in fp32.
"""
from __future__ import annotations

import torch
from torch import nn

from ..config import Gemma3Config
from ..model import Gemma3
from .linear import (KERNEL_TYPES, Q5_0, Q8_0, FusedDecoder, QuantEmbedding, QuantLinear,
                     prepare_blocks, quantize_q8_0)

MODES = ("fp32", "native", "q8")
QUANTIZED_MODES = ("native", "q8")
# Types read as raw blocks from a GGUF (Q5_0 is repacked to bytes for the kernels).
BLOCK_TYPES = KERNEL_TYPES | {Q5_0}


class QuantGemma3(Gemma3):
    """A Gemma3 whose matrices are QuantLinear / QuantEmbedding; one-token steps run fused."""

    mode: str = "native"
    _fuses_rows = True  # decode_step takes several tokens of one row (speculative verification)

    def decode_step(self, tokens: torch.Tensor, positions: torch.Tensor, cache,
                    rows: torch.Tensor | None = None) -> torch.Tensor:
        fused = self.__dict__.get("_fused")
        if fused is None:
            fused = self.__dict__["_fused"] = FusedDecoder(self)
        return fused(tokens, positions, cache, rows)


def _to_blocks(name: str, mode: str, shape: tuple[int, int], blocks: dict, floats: dict
               ) -> tuple[torch.Tensor, int]:
    out_features, in_features = shape
    if name in blocks:
        raw, qtype = blocks.pop(name)
        if mode == "native" or qtype == Q8_0:
            return prepare_blocks(raw, qtype, in_features)
        from .kernels import ops
        weight = ops().dequantize(raw if qtype != Q5_0 else ops().repack_q5_0(raw, in_features),
                                  qtype if qtype != Q5_0 else 201, in_features)
    else:
        weight = floats.pop(name)
    if tuple(weight.shape) != shape:
        raise ValueError(f"{name} has shape {tuple(weight.shape)}, the config implies {shape}")
    return quantize_q8_0(weight)


def build_quantized(config: Gemma3Config, blocks: dict[str, tuple[torch.Tensor, int]],
                    floats: dict[str, torch.Tensor], mode: str = "native") -> QuantGemma3:
    """A QuantGemma3 from raw GGUF blocks {name: (uint8 rows, ggml type)} and fp32 tensors.

    The dictionaries are consumed (entries are popped as they are converted) so that the source
    copies can be freed while the model is assembled.
    """
    if mode not in QUANTIZED_MODES:
        raise ValueError(f"unknown quantized mode {mode!r}; use one of {', '.join(QUANTIZED_MODES)}")
    with torch.device("meta"):
        model = QuantGemma3(config)
    model.mode = mode
    for mod_name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            full = f"{mod_name}.{child_name}" if mod_name else child_name
            if isinstance(child, nn.Linear):
                b, qtype = _to_blocks(f"{full}.weight", mode, (child.out_features, child.in_features),
                                      blocks, floats)
                setattr(module, child_name, QuantLinear(child.in_features, child.out_features, qtype, b))
            elif isinstance(child, nn.Embedding):
                b, qtype = _to_blocks(f"{full}.weight", mode, (child.num_embeddings, child.embedding_dim),
                                      blocks, floats)
                setattr(module, child_name, QuantEmbedding(child.num_embeddings, child.embedding_dim,
                                                           qtype, b))
    # what is left are the norms (fp32 parameters)
    expected = {k for k, _ in model.named_parameters()}
    missing = sorted(expected - set(floats))
    if missing:
        raise ValueError(f"missing {len(missing)} tensors, e.g. {missing[:3]}")
    model.load_state_dict({k: floats[k].float() for k in expected}, strict=True, assign=True)
    return model.eval().requires_grad_(False)
