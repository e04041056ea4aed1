"""KV caches: a full-length buffer for global layers, a ring buffer of W (+ headroom) slots for local layers.

Every slot remembers the absolute position of the token it holds (-1 = empty or padding). Masks are
built from those positions, so the same rule serves the ring buffer, left-padded batches, chunked
prefill and rows of different lengths: a key at position k is visible to a query at position q iff
0 <= k <= q, and on local layers also k > q - W (exactly W keys, the query's own included; spec 2.1).

Each row counts the columns it has written (`lengths`): global slot = column, local slot =
column % R. A left-padded batch prefill writes the same columns in every row (padding columns hold
position -1); rows then advance together, or each on its own (continuous batching, where a row is
freed and refilled while the others decode). The ring holds R = W + headroom slots: with headroom >= k,
k tokens written speculatively and rolled back (`truncate`) never overwrote a key that a later
query still needs. Buffers are preallocated and written in place (static shapes).
"""
from __future__ import annotations

import torch

from ..config import FULL, Gemma3Config

# Ring slots beyond the window in every cache. Speculative verification of up to this many tokens
# needs them, and giving every cache the same geometry keeps plain and speculative decoding on
# bit-identical arithmetic (Gemma's large activations amplify even last-bit differences).
RING_HEADROOM = 32


class LayerCache:
    """K and V of one layer: (B, Hkv, S, D) with S = max_len (global) or R (local)."""

    def __init__(self, batch: int, kv_heads: int, slots: int, head_dim: int, ring: bool,
                 dtype: torch.dtype, device: torch.device | str | None, k=None, v=None):
        shape = (batch, kv_heads, slots, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device) if k is None else k
        self.v = torch.zeros(shape, dtype=dtype, device=device) if v is None else v
        self.ring = ring

    @property
    def slots(self) -> int:
        return self.k.shape[2]

    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() + self.v.numel() * self.v.element_size()


class KVCache:
    """The cache of a whole model; build it with `Gemma3.make_cache(batch, max_len)`."""

    def __init__(self, config: Gemma3Config, batch: int, max_len: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None,
                 ring_headroom: int = RING_HEADROOM, _views: dict | None = None):
        self.config, self.batch, self.max_len = config, batch, max_len
        if _views is not None:  # a view of some rows of another cache (see `rows`)
            self.__dict__.update(_views)
            return
        if max_len > config.max_position_embeddings:
            raise ValueError(f"cache length {max_len} exceeds the model context "
                             f"{config.max_position_embeddings}")
        # Not clamped to max_len (unless there is no headroom): every cache, short or long, then has
        # the same ring geometry and computes bit-identically (see RING_HEADROOM).
        ring_slots = config.sliding_window + ring_headroom if ring_headroom else min(config.sliding_window, max_len)
        self.layers = [
            LayerCache(batch, config.num_key_value_heads, max_len if t == FULL else ring_slots,
                       config.head_dim, ring=t != FULL, dtype=dtype, device=device)
            for t in config.layer_types]
        # positions held by each slot; shared by all layers of one kind
        self.full_pos = torch.full((batch, max_len), -1, dtype=torch.long, device=device)
        self.ring_pos = torch.full((batch, ring_slots), -1, dtype=torch.long, device=device)
        self.lengths = torch.zeros(batch, dtype=torch.long)  # columns written per row (on CPU)

    @property
    def ring_slots(self) -> int:
        return self.ring_pos.shape[1]

    @property
    def step(self) -> int:
        """The number of columns written, which every row shares in a joint forward pass."""
        s = int(self.lengths[0]) if self.batch else 0
        if self.batch > 1 and not bool((self.lengths == s).all()):
            raise ValueError("the rows of this cache have different lengths; run them separately "
                             "(cache.rows(i, j)) or one token per row (Gemma3.decode_step)")
        return s

    def nbytes(self) -> int:
        """Bytes of the K/V buffers (what spec 7.2's formula counts)."""
        return sum(layer.nbytes() for layer in self.layers)

    def rows(self, start: int, stop: int) -> "KVCache":
        """A cache over rows [start, stop) sharing this cache's memory (writes go through)."""
        views = dict(
            layers=[LayerCache(0, 0, 0, 0, layer.ring, None, None, k=layer.k[start:stop],
                               v=layer.v[start:stop]) for layer in self.layers],
            full_pos=self.full_pos[start:stop], ring_pos=self.ring_pos[start:stop],
            lengths=self.lengths[start:stop])
        return KVCache(self.config, stop - start, self.max_len, _views=views)

    def reset(self, rows: slice | None = None) -> None:
        """Empty all rows, or the rows of a slice (a finished sequence's slot, reused)."""
        rows = slice(None) if rows is None else rows
        self.full_pos[rows] = -1
        self.ring_pos[rows] = -1
        self.lengths[rows] = 0

    def truncate(self, row: int, length: int) -> None:
        """Forget the columns of `row` from `length` on (speculative tokens that were rejected)."""
        old = int(self.lengths[row])
        if not 0 <= length <= old:
            raise ValueError(f"cannot truncate row {row} of length {old} to {length}")
        if length == old:
            return
        dropped = self.full_pos[row, length:old]
        self.full_pos[row, length:old] = -1
        ring = self.ring_pos[row]
        stale = torch.isin(ring, dropped[dropped >= 0])
        ring[stale] = -1
        self.lengths[row] = length

    def reorder(self, index: torch.Tensor) -> None:
        """Keep/reorder batch rows (e.g. to drop finished sequences)."""
        for layer in self.layers:
            layer.k, layer.v = layer.k[index], layer.v[index]
        self.full_pos, self.ring_pos = self.full_pos[index], self.ring_pos[index]
        self.lengths = self.lengths[index.cpu()]
        self.batch = len(index)
