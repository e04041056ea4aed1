"""KV caches: a full-length buffer for global layers, a ring buffer of exactly W slots for local layers.

Every slot remembers the absolute position of the token it holds (-1 = empty or padding). Masks are
built from those positions, so the same rule serves the ring buffer, left-padded batches and chunked
prefill: a key at position k is visible to a query at position q iff 0 <= k <= q, and on local
layers also k > q - W (exactly W keys, the query's own included; spec 2.1).

Slots are indexed by *step* (the column of the batch), shared by all rows: global slot = step, local
slot = step % W. Rows of different prompt lengths are left-padded, so their positions differ while
their steps agree. Buffers are preallocated and written in place (static shapes for torch.compile).
"""
from __future__ import annotations

import torch

from ..config import FULL, Gemma3Config


class LayerCache:
    """K and V of one layer: (B, Hkv, S, D) with S = max_len (global) or min(W, max_len) (local)."""

    def __init__(self, batch: int, kv_heads: int, slots: int, head_dim: int, ring: bool,
                 dtype: torch.dtype, device: torch.device | str | None):
        shape = (batch, kv_heads, slots, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.ring = ring

    @property
    def slots(self) -> int:
        return self.k.shape[2]

    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() + self.v.numel() * self.v.element_size()


class KVCache:
    """The cache of a whole model; build it with `Gemma3.make_cache(batch, max_len)`."""

    def __init__(self, config: Gemma3Config, batch: int, max_len: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None):
        if max_len > config.max_position_embeddings:
            raise ValueError(f"cache length {max_len} exceeds the model context "
                             f"{config.max_position_embeddings}")
        self.config, self.batch, self.max_len = config, batch, max_len
        ring_slots = min(config.sliding_window, max_len)
        self.layers = [
            LayerCache(batch, config.num_key_value_heads, max_len if t == FULL else ring_slots,
                       config.head_dim, ring=t != FULL, dtype=dtype, device=device)
            for t in config.layer_types]
        # positions held by each slot; shared by all layers of one kind
        self.full_pos = torch.full((batch, max_len), -1, dtype=torch.long, device=device)
        self.ring_pos = torch.full((batch, ring_slots), -1, dtype=torch.long, device=device)
        self.step = 0  # number of columns written so far

    def nbytes(self) -> int:
        """Bytes of the K/V buffers (what spec 7.2's formula counts)."""
        return sum(layer.nbytes() for layer in self.layers)

    def reset(self) -> None:
        self.full_pos.fill_(-1)
        self.ring_pos.fill_(-1)
        self.step = 0

    def reorder(self, index: torch.Tensor) -> None:
        """Keep/reorder batch rows (e.g. to drop finished sequences)."""
        for layer in self.layers:
            layer.k, layer.v = layer.k[index], layer.v[index]
        self.full_pos, self.ring_pos = self.full_pos[index], self.ring_pos[index]
        self.batch = len(index)
