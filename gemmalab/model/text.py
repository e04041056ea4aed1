"""The Gemma 3 (and Gemma 2) text decoder: modules only, no file I/O, tokenizer or sampling.

Spec ../shared/spec/gemma3.md 1.2-1.6. Parameter names are those of transformers' Gemma3TextModel
(without the `model.` prefix) so that checkpoints map one to one. Norm weights hold w with a gain of
(1 + w), as in transformers; the GGUF loader subtracts the +1 that llama.cpp's converter folded in.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from ..config import FULL, Gemma3Config
from .cache import RING_HEADROOM, KVCache


class RMSNorm(nn.Module):
    """x * rsqrt(mean(x^2) + eps) * (1 + w), computed in fp32 then cast back (transformers PR 29402)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return (h * (1.0 + self.weight.float())).type_as(x)


def rope_tables(positions: torch.Tensor, head_dim: int, theta: float, scale: float,
                dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape (B, 1, T, D) for NeoX-style (half-split) rotation; angles in fp32.

    Linear scaling (positional interpolation) divides the frequencies by `scale`; Gemma 3 applies it
    on global layers only (spec 1.4; vllm PR 29111 is the bug of applying it to local layers).
    """
    exponent = torch.arange(0, head_dim, 2, dtype=torch.int64, device=positions.device).float()
    inv_freq = 1.0 / (theta ** (exponent / head_dim)) / scale  # (D/2,)
    angles = positions.clamp(min=0).float()[..., None] * inv_freq  # (B, T, D/2); padding -> pos 0
    angles = torch.cat([angles, angles], dim=-1)[:, None]  # (B, 1, T, D)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


def visibility_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int | None,
                    segments: torch.Tensor | None = None,
                    image_groups: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Boolean (B, 1, T, S): True where query position q may see key position k.

    Causal: 0 <= k <= q. Sliding window: also k > q - W, so exactly W keys including the query itself.
    `segments` (B, T), for packed training sequences without a cache: a query sees only keys of its
    own document (positions restart at 0 in each document).
    `image_groups` (query groups (B, T), key groups (B, S)): the soft tokens of one image (same group
    id >= 0; -1 for text) also see each other's later tokens (spec 2.2). Like transformers
    (`create_masks_for_vision_model`), local layers AND this with the window k > q - W; JAX also
    requires k < q + W, which differs only for images longer than the window (never for real
    models: 256 soft tokens, W = 1024).
    A row that sees nothing (a padding query) is opened to all keys so softmax stays finite; its
    output is never read by real tokens because padding keys are invisible to them.
    """
    q, k = q_pos[:, :, None], k_pos[:, None, :]
    visible = (k >= 0) & (k <= q)
    if image_groups is not None:
        q_group, k_group = image_groups[0][:, :, None], image_groups[1][:, None, :]
        visible |= (q_group == k_group) & (q_group >= 0) & (k >= 0)
    if window is not None:
        visible &= k > q - window
    if segments is not None:
        visible &= segments[:, :, None] == segments[:, None, :]
    visible |= ~visible.any(-1, keepdim=True)
    return visible[:, None]


class Attention(nn.Module):
    def __init__(self, config: Gemma3Config, layer_type: str):
        super().__init__()
        c = config
        self.n_heads, self.n_kv, self.head_dim = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        self.is_global = layer_type == FULL
        self.scaling = c.query_pre_attn_scalar ** -0.5  # 27B: 168^-1/2, not head_dim^-1/2 (spec 1.1)
        self.softcap = c.attn_logit_softcapping
        self.q_proj = nn.Linear(c.hidden_size, c.q_dim, bias=False)
        self.k_proj = nn.Linear(c.hidden_size, c.kv_dim, bias=False)
        self.v_proj = nn.Linear(c.hidden_size, c.kv_dim, bias=False)
        self.o_proj = nn.Linear(c.q_dim, c.hidden_size, bias=False)
        if c.use_qk_norm:
            self.q_norm = RMSNorm(c.head_dim, c.rms_norm_eps)
            self.k_norm = RMSNorm(c.head_dim, c.rms_norm_eps)

    def forward(self, x, rope, mask, layer_cache=None, write=None):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = self.k_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)  # (B, Hkv, T, D)
        v = self.v_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        cos, sin = rope
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if layer_cache is not None:
            k, v = write(layer_cache, k, v)
        y = self._attend(q, k, v, mask)  # (B, H, T, D)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))

    # Quantized inference (quant/model.py): attention over more than `bulk_rows` queries (a prefill
    # chunk) runs in `bulk_dtype()`, the dtype of the many-row products (bf16 on CPUs that have it:
    # ~4.5x faster SDPA at 512 x 2048, measured), with the cache and the output in fp32.
    bulk_rows: int | None = None
    bulk_dtype = None

    def _attend(self, q, k, v, mask):
        if self.softcap is None:
            if self.bulk_rows is not None and q.shape[2] > self.bulk_rows:
                dtype = self.bulk_dtype()
                if dtype != q.dtype:
                    return F.scaled_dot_product_attention(
                        q.to(dtype), k.to(dtype), v.to(dtype), attn_mask=mask, scale=self.scaling,
                        enable_gqa=self.n_kv != self.n_heads).to(q.dtype)
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scaling,
                                                  enable_gqa=self.n_kv != self.n_heads)
        # Gemma 2 soft-caps the scores before the mask, which SDPA cannot do (transformers PR 32865).
        groups = self.n_heads // self.n_kv
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        s = (q @ k.transpose(-1, -2)) * self.scaling
        s = torch.tanh(s / self.softcap) * self.softcap
        s = s.masked_fill(~mask, float("-inf"))
        p = torch.softmax(s, dim=-1, dtype=torch.float32).to(q.dtype)
        return p @ v


class MLP(nn.Module):
    """GeGLU with tanh-approximated GELU on the gate branch; no biases."""

    def __init__(self, config: Gemma3Config):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.gelu(self.gate_proj(x), approximate="tanh") * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, config: Gemma3Config, layer_type: str):
        super().__init__()
        eps = config.rms_norm_eps
        self.layer_type = layer_type
        self.self_attn = Attention(config, layer_type)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps)
        self.pre_feedforward_layernorm = RMSNorm(config.hidden_size, eps)
        self.post_feedforward_layernorm = RMSNorm(config.hidden_size, eps)

    def forward(self, x, rope, mask, layer_cache=None, write=None):
        x = x + self.post_attention_layernorm(
            self.self_attn(self.input_layernorm(x), rope, mask, layer_cache, write))
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))


def embedding(num: int, dim: int) -> nn.Embedding:
    """nn.Embedding, initialised N(0, 1) as usual except on the meta device, where torch's
    normal_ imports torch._dynamo (2+ s of a 3 s load) to initialise nothing."""
    emb = nn.Embedding(num, dim, _weight=torch.empty(num, dim))
    if not emb.weight.is_meta:
        nn.init.normal_(emb.weight)
    return emb


class Gemma3(nn.Module):
    """Decoder-only Gemma 3 / Gemma 2 text model with tied embeddings."""

    def __init__(self, config: Gemma3Config):
        super().__init__()
        self.config = config
        self.embed_tokens = embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config, t) for t in config.layer_types)
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.activation_checkpointing = False  # training option: recompute blocks in backward

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype (that of the norms, which every mode keeps in floating point)."""
        return self.norm.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.norm.weight.device

    def make_cache(self, batch: int, max_len: int, dtype: torch.dtype | None = None,
                   ring_headroom: int = RING_HEADROOM) -> KVCache:
        return KVCache(self.config, batch, max_len, dtype or self.dtype, self.device, ring_headroom)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        # sqrt(d) rounded to the compute dtype first, like every reference (spec 1.5; HF PR 37109).
        return self.embed_tokens(input_ids) * torch.tensor(math.sqrt(self.config.hidden_size),
                                                           dtype=self.dtype, device=self.device)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None,
                cache: KVCache | None = None, last_only: bool = False,
                segment_ids: torch.Tensor | None = None, *,
                inputs_embeds: torch.Tensor | None = None,
                image_groups: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, T, V), or (B, 1, V) with last_only.

        positions: (B, T) absolute positions, -1 marks padding (left-padded batches). Defaults to
        consecutive positions continuing the cache. With a cache, the tokens are appended to it.
        segment_ids: (B, T) document ids of packed sequences (no cache): attention stays within a
        document; give positions restarting at 0 for each document.
        inputs_embeds, image_groups: for images (model/multimodal.py). inputs_embeds (B, T, d)
        replace the (scaled) token embeddings; image_groups (B, T) number each image's soft tokens
        (-1 for text) for bidirectional attention inside an image. All soft tokens of an image must
        be in the same call.
        """
        h = self.hidden_states(input_ids, positions, cache, segment_ids,
                               inputs_embeds=inputs_embeds, image_groups=image_groups)
        if last_only:
            h = h[:, -1:]
        return self.lm_head(h)

    def lm_head(self, h: torch.Tensor, bulk: bool = False) -> torch.Tensor:
        """Logits of final-norm hidden states. bulk: many rows to score (evaluation), which a
        quantized table may compute in its prefill way (QuantEmbedding.as_linear)."""
        as_linear = getattr(self.embed_tokens, "as_linear", None)  # a quantized table computes itself
        logits = as_linear(h, bulk) if as_linear else h @ self.embed_tokens.weight.t()  # tied, unscaled
        cap = self.config.final_logit_softcapping
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        return logits

    def decode_step(self, tokens: torch.Tensor, positions: torch.Tensor, cache: KVCache,
                    rows: torch.Tensor | None = None) -> torch.Tensor:
        """Append one token per entry at its position; next-token logits (M, V).

        rows (M,): the cache row of each token (default: token i -> row i, every row). This
        reference version runs `forward` (rows may differ in length); quantized models replace it
        with a fused kernel that also takes several tokens of one row (speculative verification).
        """
        if rows is None:
            return self(tokens[:, None], positions[:, None], cache)[:, -1]
        rows = rows.tolist()
        if len(set(rows)) != len(rows):
            raise ValueError("the reference decode_step takes one token per row; use forward with a "
                             "chunk of tokens to append several to one row")
        return torch.cat([self(tokens[i:i + 1, None], positions[i:i + 1, None], cache.rows(r, r + 1))[:, -1]
                          for i, r in enumerate(rows)])

    def hidden_states(self, input_ids, positions=None, cache=None, segment_ids=None, *,
                      inputs_embeds=None, image_groups=None) -> torch.Tensor:
        """Final-norm hidden states (B, T, d): what the LM head (or a chunked loss) consumes."""
        c = self.config
        B, T = input_ids.shape
        if positions is None:
            start = cache.step if cache is not None else 0
            positions = torch.arange(start, start + T, device=input_ids.device).expand(B, T)
        x = self.embed(input_ids) if inputs_embeds is None else inputs_embeds  # (B, T, d)
        rope_local = rope_tables(positions, c.head_dim, c.rope_local_base_freq,
                                 c.rope_local_scaling_factor, x.dtype)
        rope_global = rope_tables(positions, c.head_dim, c.rope_theta, c.rope_scaling_factor, x.dtype)
        write = None
        if cache is None:
            groups = None if image_groups is None else (image_groups, image_groups)
            mask_global = visibility_mask(positions, positions, None, segment_ids, groups)
            mask_local = visibility_mask(positions, positions, c.sliding_window, segment_ids, groups)
        else:
            if segment_ids is not None:
                raise ValueError("segment_ids (packed documents) are for cache-free forward passes")
            mask_global, mask_local, write = self._prepare_cache(cache, positions, image_groups)
        for i, layer in enumerate(self.layers):
            is_global = layer.layer_type == FULL
            args = (x, rope_global if is_global else rope_local,
                    mask_global if is_global else mask_local)
            if self.activation_checkpointing and self.training and cache is None:
                # keep only each block's input; recompute its activations in backward
                x = torch.utils.checkpoint.checkpoint(layer, *args, use_reentrant=False)
            else:
                x = layer(*args, cache.layers[i] if cache is not None else None, write)
        return self.norm(x)

    def _prepare_cache(self, cache: KVCache, positions: torch.Tensor,
                       image_groups: torch.Tensor | None = None):
        """Record the new positions, build both masks once, and return the per-layer write function.

        One token per row: each row writes its own next column (rows may differ in length: continuous
        batching), global layers attend over columns [0, longest], local layers write the ring slot
        first and attend over the ring, whose slots hold exactly the window (and stale or empty slots
        masked by position).
        A chunk of T > 1 tokens (rows of equal length): global layers write columns [s0, s1) and attend
        over [0, s1); local layers attend over [ring before the write, chunk] so that no key the chunk
        needs is overwritten, then its last min(T, R) keys go in.
        image_groups (B, T): images lie whole inside a chunk, so cached keys get group -1.
        """
        B, T = positions.shape
        W, R = self.config.sliding_window, cache.ring_slots
        if T == 1:
            full_slot, ring_slot = cache.append(None, positions[:, 0])  # each row's next column
            rows = torch.arange(B, device=full_slot.device)
            s1 = int(full_slot.max()) + 1
            mask_global = visibility_mask(positions, cache.full_pos[:, :s1], None)
            mask_local = visibility_mask(positions, cache.ring_pos, W)

            def write_one(layer_cache, k, v):  # k, v: (B, Hkv, 1, D)
                return layer_cache.update_one(rows, full_slot, ring_slot, k, v, s1)

            return mask_global, mask_local, write_one

        s0, s1, ring_slots, ring_keys = cache.append_block(positions)
        groups_global = groups_local = None
        if image_groups is not None and T > 1:
            groups_global = (image_groups, F.pad(image_groups, (s0, 0), value=-1))
            groups_local = (image_groups, F.pad(image_groups, (R, 0), value=-1))
        mask_global = visibility_mask(positions, cache.full_pos[:, :s1], None,
                                      image_groups=groups_global)
        mask_local = visibility_mask(positions, ring_keys, W, image_groups=groups_local)

        def write(layer_cache, k, v):
            return layer_cache.update_block(s0, s1, ring_slots, k, v)

        return mask_global, mask_local, write
