"""Multimodal Gemma 3: vision encoder + projector + the text decoder (spec 2.2, 3).

Modules only. The prompt holds, for every image, `\\n\\n <start_of_image> [mm_tokens x
<image_soft_token>] <end_of_image> \\n\\n` (gemmalab/images.py builds it). The soft-token placeholders
are embedded like any token (id 262144 is row 262144 of the 262,208-row table; an id past the table,
as in 262,144-row vocabularies, is looked up as 0 like transformers does, spec 10.12) and then
overwritten by the image's projected features, which are NOT multiplied by sqrt(d) (spec 1.5).
Positions count every token. The soft tokens of one image attend to each other in both directions
on every layer (`image_groups`; text/model/text.py `visibility_mask`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import Gemma3MultimodalConfig
from .cache import KVCache
from .text import Gemma3
from .vision import MultiModalProjector, SiglipVisionEncoder


def image_groups(input_ids: torch.Tensor, image_token_id: int) -> torch.Tensor:
    """(B, T) group id of each token: 0, 1, 2, ... for the soft tokens of each run of placeholders
    (one image) in a row, -1 for everything else (transformers' get_block_sequence_ids_for_mask)."""
    is_image = input_ids == image_token_id
    starts = is_image & ~F.pad(is_image, (1, 0), value=False)[:, :-1]
    return torch.where(is_image, starts.long().cumsum(1) - 1, -1)


class Gemma3Multimodal(nn.Module):
    def __init__(self, config: Gemma3MultimodalConfig):
        super().__init__()
        self.config = config
        self.vision_tower = SiglipVisionEncoder(config.vision)
        self.multi_modal_projector = MultiModalProjector(config)
        self.language_model = Gemma3(config.text)

    def make_cache(self, batch: int, max_len: int, dtype: torch.dtype | None = None) -> KVCache:
        return self.language_model.make_cache(batch, max_len, dtype)

    def image_features(self, pixel_values: torch.Tensor, batch_size: int = 8) -> torch.Tensor:
        """Soft tokens (N, mm_tokens_per_image, d_text) of preprocessed images (N, 3, S, S)."""
        out = [self.multi_modal_projector(self.vision_tower(pixel_values[i:i + batch_size]))
               for i in range(0, len(pixel_values), batch_size)]
        if not out:
            return pixel_values.new_zeros(0, self.config.mm_tokens_per_image,
                                          self.config.text.hidden_size)
        return torch.cat(out)

    def embed(self, input_ids: torch.Tensor, image_features: torch.Tensor | None = None
              ) -> torch.Tensor:
        """Input embeddings (B, T, d): scaled token embeddings with the image placeholders (in row
        order, then left to right) overwritten by `image_features` (N, mm_tokens, d), unscaled."""
        c = self.config
        is_image = input_ids == c.image_token_id
        lookup = input_ids
        if c.image_token_id >= c.text.vocab_size:  # the placeholder has no row: look up 0 instead
            lookup = input_ids.masked_fill(is_image, 0)
        x = self.language_model.embed(lookup)
        n_slots = int(is_image.sum())
        n_features = 0 if image_features is None else image_features.shape[0] * image_features.shape[1]
        if n_slots != n_features:
            raise ValueError(f"the prompt has {n_slots} image placeholder tokens but the images give "
                             f"{n_features} soft tokens ({c.mm_tokens_per_image} per image)")
        if n_slots:
            x = x.masked_scatter(is_image[..., None], image_features.to(x.dtype))
        return x

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None,
                cache: KVCache | None = None, last_only: bool = False, *,
                pixel_values: torch.Tensor | None = None,
                image_features: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, T, V) (or (B, 1, V) with last_only) of a sequence with image placeholders.

        Give `pixel_values` (N, 3, S, S) or precomputed `image_features`, one image per run of
        placeholders in the call. With a cache, each call must hold whole images (see
        generate.prefill, which aligns its chunks to them).
        """
        if pixel_values is not None:
            if image_features is not None:
                raise ValueError("give pixel_values or image_features, not both")
            image_features = self.image_features(pixel_values)
        groups = image_groups(input_ids, self.config.image_token_id)
        self._check_whole_images(groups)
        return self.language_model(input_ids, positions, cache, last_only,
                                   inputs_embeds=self.embed(input_ids, image_features),
                                   image_groups=groups)

    def _check_whole_images(self, groups: torch.Tensor) -> None:
        m = self.config.mm_tokens_per_image
        for row in groups:
            counts = torch.bincount(row[row >= 0])
            if (counts != m).any():
                raise ValueError(f"every image needs its {m} soft tokens in one call; found runs of "
                                 f"{sorted(set(counts.tolist()) - {m})} placeholder tokens")
