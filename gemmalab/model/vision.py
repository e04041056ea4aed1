"""The SigLIP vision encoder of Gemma 3, the 4x4 pooling and the projector to the text width.

Modules only (preprocessing lives in gemmalab/images.py). Spec ../shared/spec/gemma3.md 3.1-3.2.
Parameter names are transformers' (`SiglipVisionModel` without `vision_model.embeddings.` /
`vision_model.encoder.`, and `Gemma3MultiModalProjector`); checkpoints/hf.py maps them.

    pixels (N, 3, 896, 896) in [-1, 1]
      -> 14x14 conv with bias + learned position table -> (N, 4096, 1152)
      -> 27 pre-LN blocks (biased q/k/v/out, 16 heads; tanh-GELU MLP 4304) -> LayerNorm, no head
      -> 4x4 average pooling on the 64x64 grid -> (N, 256, 1152)
      -> Gemma RMSNorm (1 + w) -> @ (1152, d_model), no bias -> soft tokens (N, 256, d_model)
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import Gemma3MultimodalConfig, SiglipVisionConfig
from .text import RMSNorm, embedding


class SiglipAttention(nn.Module):
    def __init__(self, config: SiglipVisionConfig):
        super().__init__()
        d = config.hidden_size
        self.n_heads, self.head_dim = config.num_attention_heads, config.head_dim
        self.q_proj = nn.Linear(d, d)
        self.k_proj = nn.Linear(d, d)
        self.v_proj = nn.Linear(d, d)
        self.out_proj = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        N, P, _ = x.shape
        q, k, v = (proj(x).view(N, P, self.n_heads, self.head_dim).transpose(1, 2)
                   for proj in (self.q_proj, self.k_proj, self.v_proj))  # (N, H, P, D)
        y = F.scaled_dot_product_attention(q, k, v)  # every patch sees every patch; scale D^-1/2
        return self.out_proj(y.transpose(1, 2).reshape(N, P, -1))


class SiglipMLP(nn.Module):
    def __init__(self, config: SiglipVisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))  # gelu_pytorch_tanh


class SiglipBlock(nn.Module):
    """Pre-LN transformer block (standard LayerNorm with bias, eps 1e-6)."""

    def __init__(self, config: SiglipVisionConfig):
        super().__init__()
        eps = config.layer_norm_eps
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=eps)
        self.self_attn = SiglipAttention(config)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=eps)
        self.mlp = SiglipMLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class SiglipVisionEncoder(nn.Module):
    """Pixels (N, C, S, S) -> patch embeddings (N, P, d), P = (S / patch)^2 in row-major order."""

    def __init__(self, config: SiglipVisionConfig):
        super().__init__()
        self.config = config
        d = config.hidden_size
        self.patch_embedding = nn.Conv2d(config.num_channels, d, kernel_size=config.patch_size,
                                         stride=config.patch_size)  # VALID, with bias
        self.position_embedding = embedding(config.num_patches, d)
        self.layers = nn.ModuleList(SiglipBlock(config) for _ in range(config.num_hidden_layers))
        self.post_layernorm = nn.LayerNorm(d, eps=config.layer_norm_eps)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        c = self.config
        if pixel_values.shape[1:] != (c.num_channels, c.image_size, c.image_size):
            raise ValueError(f"the vision encoder takes ({c.num_channels}, {c.image_size}, "
                             f"{c.image_size}) images, got {tuple(pixel_values.shape[1:])}")
        w = self.patch_embedding.weight
        x = self.patch_embedding(pixel_values.to(w.dtype))  # (N, d, S/p, S/p)
        x = x.flatten(2).transpose(1, 2) + self.position_embedding.weight  # (N, P, d)
        for layer in self.layers:
            x = layer(x)
        return self.post_layernorm(x)


class MultiModalProjector(nn.Module):
    """Patch embeddings (N, P, d_vision) -> soft tokens (N, mm_tokens_per_image, d_text)."""

    def __init__(self, config: Gemma3MultimodalConfig):
        super().__init__()
        self.patches_per_side = config.vision.patches_per_side
        self.kernel = config.pooling_kernel
        self.mm_soft_emb_norm = RMSNorm(config.vision.hidden_size, config.vision.layer_norm_eps)
        self.mm_input_projection_weight = nn.Parameter(
            torch.zeros(config.vision.hidden_size, config.text.hidden_size))

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        N, P, d = patches.shape
        side = self.patches_per_side
        grid = patches.transpose(1, 2).reshape(N, d, side, side)  # patch index = row * side + col
        pooled = F.avg_pool2d(grid, self.kernel, self.kernel).flatten(2).transpose(1, 2)  # (N, M, d)
        return self.mm_soft_emb_norm(pooled) @ self.mm_input_projection_weight.to(pooled.dtype)
