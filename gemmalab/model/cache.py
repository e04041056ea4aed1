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

The cache owns its writes, as gpt-fast's `KVCache.update` and mlx-lm's `update_and_fetch` / `trim`
do: `append` (one token per entry, rows at their own columns) and `append_block` (a chunk of columns
in every row) record positions and lengths and say which slots the keys go to; `LayerCache.update_one`
/ `update_block` write one layer's K/V and return what attention reads; `truncate`, `reset` and
`copy_row` are the rest of the bookkeeping (speculative rollback, a freed row, n samples of one
prompt). Both the module path (`Gemma3._prepare_cache`) and the fused quantized decoder call them.
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

    def update_one(self, rows: torch.Tensor, full_slot: torch.Tensor, ring_slot: torch.Tensor,
                   k: torch.Tensor, v: torch.Tensor, n_full: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Write one token per entry (k, v: (M, Hkv, 1, D)) at the slots `KVCache.append` gave;
        return the keys and values to attend over: the whole ring, or global columns [0, n_full)."""
        slot = ring_slot if self.ring else full_slot
        self.k[rows, :, slot] = k[:, :, 0]
        self.v[rows, :, slot] = v[:, :, 0]
        if self.ring:
            return self.k, self.v
        return self.k[:, :, :n_full], self.v[:, :, :n_full]

    def update_block(self, s0: int, s1: int, ring_slots: torch.Tensor, k: torch.Tensor,
                     v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write columns [s0, s1) of every row (k, v: (B, Hkv, T, D)) at the slots
        `KVCache.append_block` gave. Global layers attend over [0, s1); local layers over the ring
        as it was before the write, then the block (so no key the block needs is overwritten),
        after which the block's last len(ring_slots) keys go into the ring."""
        if not self.ring:
            self.k[:, :, s0:s1] = k
            self.v[:, :, s0:s1] = v
            return self.k[:, :, :s1], self.v[:, :, :s1]
        T, keep = k.shape[2], ring_slots.shape[0]
        k_all = torch.cat([self.k, k], dim=2)
        v_all = torch.cat([self.v, v], dim=2)
        self.k.index_copy_(2, ring_slots, k[:, :, T - keep:])
        self.v.index_copy_(2, ring_slots, v[:, :, T - keep:])
        return k_all, v_all


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

    def append(self, rows: torch.Tensor | None, positions: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Record one token per entry: entry i goes to the next column of row rows[i] (rows None:
        entry i -> row i, every row). Entries of the same row take consecutive columns, in order
        (speculative verification). Returns (full_slot, ring_slot) (M,): where each entry's K/V goes
        in global and in local layers (`LayerCache.update_one`). Advances `lengths`."""
        M = positions.shape[0]
        if rows is None:
            rows_cpu = torch.arange(M)
            offset = None
        else:
            rows_cpu = rows.long().cpu()
            offset = self._offsets(rows_cpu)
        cols = self.lengths[rows_cpu] if offset is None else self.lengths[rows_cpu] + offset
        if bool((cols >= self.max_len).any()):
            raise ValueError(f"the cache holds {self.max_len} positions; a row is full")
        device = self.full_pos.device
        index = rows_cpu.to(device)
        full_slot = cols.to(device)
        ring_slot = full_slot % self.ring_slots
        self.full_pos[index, full_slot] = positions
        self.ring_pos[index, ring_slot] = positions
        if rows is None:
            self.lengths += 1
        else:
            self.lengths.index_add_(0, rows_cpu, torch.ones(M, dtype=torch.long))
        return full_slot, ring_slot

    def _offsets(self, rows: torch.Tensor) -> torch.Tensor | None:
        """For each entry, the number of earlier entries of the same row (None when rows are
        distinct); several tokens of one row need ring headroom (see RING_HEADROOM)."""
        M = rows.shape[0]
        if M < 2 or len(set(rows.tolist())) == M:
            return None
        offset = torch.zeros(M, dtype=torch.long)
        seen: dict[int, int] = {}
        for i, r in enumerate(rows.tolist()):
            offset[i] = seen.get(r, 0)
            seen[r] = offset[i].item() + 1
        need = self.config.sliding_window + int(offset.max())
        if self.ring_slots < min(need, self.max_len):
            raise ValueError("several tokens of one row need ring headroom: build the cache with "
                             "model.make_cache(..., ring_headroom=tokens_per_row - 1)")
        return offset

    def append_block(self, positions: torch.Tensor
                     ) -> tuple[int, int, torch.Tensor, torch.Tensor]:
        """Record a block of T columns in every row (positions (B, T); the rows have equal lengths).

        Returns (s0, s1, ring_slots, ring_keys): the block is global columns [s0, s1); its last
        min(T, R) tokens go to ring slots `ring_slots`; ring_keys (B, R + T) are the positions local
        layers attend over (the ring before this write, then the block). Advances `lengths`."""
        T = positions.shape[1]
        s0 = self.step
        s1 = s0 + T
        if s1 > self.max_len:
            raise ValueError(f"the cache holds {self.max_len} positions; cannot append {T} tokens "
                             f"after {s0}")
        self.full_pos[:, s0:s1] = positions
        R = self.ring_slots
        keep = min(T, R)
        ring_slots = torch.arange(s1 - keep, s1, device=positions.device) % R
        ring_keys = torch.cat([self.ring_pos, positions], 1)
        self.ring_pos[:, ring_slots] = positions[:, T - keep:]
        self.lengths += T
        return s0, s1, ring_slots, ring_keys

    def reset(self, rows: slice | int | list[int] | None = None) -> None:
        """Empty all rows, or some (a slice, a row, a list of rows: a finished sequence's slot, reused)."""
        rows = slice(None) if rows is None else rows
        if isinstance(rows, (list, tuple)):
            rows = torch.tensor(rows, dtype=torch.long)
        self.full_pos[rows.to(self.full_pos.device) if torch.is_tensor(rows) else rows] = -1
        self.ring_pos[rows.to(self.ring_pos.device) if torch.is_tensor(rows) else rows] = -1
        self.lengths[rows.cpu() if torch.is_tensor(rows) else rows] = 0

    def copy_row(self, src: int, dst: int) -> None:
        """Make row `dst` a copy of row `src`: K/V of every layer, positions and length (n samples
        of one prompt share its prefill)."""
        if src == dst:
            return
        for layer in self.layers:
            layer.k[dst].copy_(layer.k[src])
            layer.v[dst].copy_(layer.v[src])
        self.full_pos[dst].copy_(self.full_pos[src])
        self.ring_pos[dst].copy_(self.ring_pos[src])
        self.lengths[dst] = self.lengths[src]

    def truncate(self, row: int, length: int) -> None:
        """Forget the columns of `row` from `length` on (speculative tokens that were rejected)."""
        old = int(self.lengths[row])
        if not 0 <= length <= old:
            raise ValueError(f"cannot truncate row {row} of length {old} to {length}")
        if length == old:
            return
        dropped = self.full_pos[row, length:old].clone()  # a copy: the next line clears the view
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
