"""Quantized modules (a module swap: `nn.Linear` -> `QuantLinear`, `nn.Embedding` -> `QuantEmbedding`)
and the fused one-token decode step of a quantized Gemma 3.

Weights are rows of GGUF blocks in a uint8 tensor (out_features, bytes_per_row), computed by the C++
kernels of `gemmalab.quant.kernels`:
- a few rows of activations (decode, batched decode, speculative verification): the activations are
  quantized to 8 bits per block of 32 and multiplied against the blocks directly (integer dot products,
  like llama.cpp's CPU backend), one pass over the weights for all rows;
- many rows (prefill): the weight is dequantized once per call and multiplied by BLAS: in fp32, or in
  bf16 (fp32 accumulation) on CPUs with native bf16 dot products (AVX512_BF16 / AMX), where torch's
  bf16 matmul runs ~2.5x its fp32 one (`prefill_dtype()`; GEMMALAB_CPU_BF16=0|1 overrides).
"""
from __future__ import annotations

import contextlib
import contextvars

import torch
from torch import nn

from . import kernels

# ggml types the kernels compute on directly; Q5_0 is repacked to one byte per code (Q5_0_U8).
# Q8_0 rows without a -128 code run as Q8_0_SYM (one sign op per block instead of two).
Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q6_K, Q5_0_U8, Q8_0_SYM = 2, 3, 6, 7, 8, 12, 14, 201, 202
KERNEL_TYPES = frozenset({Q4_0, Q4_1, Q5_1, Q8_0, Q4_K, Q6_K, Q5_0_U8, Q8_0_SYM})
TYPE_NAMES = {Q4_0: "Q4_0", Q4_1: "Q4_1", Q5_0: "Q5_0", Q5_1: "Q5_1", Q8_0: "Q8_0", Q4_K: "Q4_K",
              Q6_K: "Q6_K", Q5_0_U8: "Q5_0", Q8_0_SYM: "Q8_0"}
_BLOCK = {Q4_0: (32, 18), Q4_1: (32, 20), Q5_0: (32, 22), Q5_1: (32, 24), Q8_0: (32, 34),
          Q4_K: (256, 144), Q6_K: (256, 210), Q5_0_U8: (32, 34), Q8_0_SYM: (32, 34)}
# Up to this many rows the integer kernels beat dequantize + BLAS (measured on 2-core Zen 1).
GEMV_MAX_ROWS = 32
# LM head logits recomputed in fp32 per row (the largest of the integer GEMV): see ops.refine_top.
REFINE_TOP = 8


def prefill_dtype() -> torch.dtype:
    """The dtype of the many-row (prefill) products: bf16 where gemmalab.cpu.cpu_bf16() says the
    CPU computes it natively, else fp32. Read at each call (cheap) so that tests can switch it."""
    from ..cpu import cpu_bf16
    return torch.bfloat16 if cpu_bf16() else torch.float32


_BULK: contextvars.ContextVar[dict | None] = contextvars.ContextVar("gemmalab_bulk_weights", default=None)
BULK_CACHE_BYTES = 512 << 20  # at most this much of dequantized weights kept through one long prefill


@contextlib.contextmanager
def bulk_weights(budget: int | None = None):
    """Keep the dequantized weights of the many-row products for the block's duration.

    A long prompt is prefilled in chunks (512 columns: the local layers' window), and each chunk
    dequantized every weight again (~15% of a 2048-token prefill on the 270M, measured); inside the
    block each QuantLinear dequantizes once, in the product dtype, up to `budget` bytes in all (the
    rest dequantize per chunk as before; None: BULK_CACHE_BYTES). Freed when the block ends."""
    token = _BULK.set({"budget": BULK_CACHE_BYTES if budget is None else budget})
    try:
        yield
    finally:
        _BULK.reset(token)


def row_bytes(qtype: int, in_features: int) -> int:
    per, nbytes = _BLOCK[qtype]
    return in_features // per * nbytes


def prepare_blocks(raw: torch.Tensor, qtype: int, in_features: int) -> tuple[torch.Tensor, int]:
    """GGUF rows (uint8 (out, bytes)) -> rows the kernels compute on, as an owned contiguous copy."""
    ops = kernels.ops()
    if qtype == Q5_0:
        return ops.repack_q5_0(raw.contiguous(), in_features), Q5_0_U8
    if qtype not in KERNEL_TYPES:
        raise ValueError(f"no kernel for ggml type {qtype}")
    raw = raw.contiguous()
    if qtype == Q8_0 and not ops.q8_0_has_min_code(raw):
        qtype = Q8_0_SYM
    return raw, qtype


def quantize_q8_0(weight: torch.Tensor) -> tuple[torch.Tensor, int]:
    """fp32/bf16 (out, in) -> (Q8_0 rows, bit-identical to gguf.quants.quantize(..., Q8_0), and the
    kernel type: Q8_0_SYM, since codes stay in [-127, 127])."""
    return kernels.ops().quantize_q8_0(weight.float().contiguous()), Q8_0_SYM


class QuantLinear(nn.Module):
    """y = x W^T, W as rows of quantized blocks; no bias (Gemma has none)."""

    def __init__(self, in_features: int, out_features: int, qtype: int, blocks: torch.Tensor):
        super().__init__()
        if blocks.shape != (out_features, row_bytes(qtype, in_features)) or blocks.dtype != torch.uint8:
            raise ValueError(f"blocks {tuple(blocks.shape)} {blocks.dtype} do not hold a "
                             f"{out_features} x {in_features} {TYPE_NAMES.get(qtype, qtype)} weight")
        self.in_features, self.out_features, self.qtype = in_features, out_features, qtype
        self.register_buffer("blocks", blocks, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features).float()
        ops = kernels.ops()
        if x2.shape[0] <= GEMV_MAX_ROWS:
            y = ops.qlinear(x2, self.blocks, self.qtype)
        else:
            dtype = prefill_dtype()
            y = x2.to(dtype) @ self._bulk_weight(dtype).t()
            y = y.float()
        return y.view(*shape[:-1], self.out_features)

    def _bulk_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """The dequantized weight in `dtype`, kept by an enclosing `bulk_weights()` while it fits."""
        cache = _BULK.get()
        if cache is not None and (hit := cache.get(self)) is not None and hit.dtype == dtype:
            return hit
        w = self.dequantized().to(dtype)
        if cache is not None and cache["budget"] >= w.numel() * w.element_size():
            cache["budget"] -= w.numel() * w.element_size()
            cache[self] = w
        return w

    def dequantized(self) -> torch.Tensor:
        return kernels.ops().dequantize(self.blocks, self.qtype, self.in_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"qtype={TYPE_NAMES.get(self.qtype, self.qtype)}")


class QuantEmbedding(nn.Module):
    """The tied embedding table in quantized blocks: rows are dequantized on lookup, and
    `as_linear(h)` computes the LM head logits h E^T with the same blocks."""

    def __init__(self, num_embeddings: int, embedding_dim: int, qtype: int, blocks: torch.Tensor):
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.head = QuantLinear(embedding_dim, num_embeddings, qtype, blocks)

    @property
    def qtype(self) -> int:
        return self.head.qtype

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = kernels.ops().dequantize(self.head.blocks, self.head.qtype, self.embedding_dim,
                                        ids.reshape(-1))
        return rows.view(*ids.shape, self.embedding_dim)

    def as_linear(self, h: torch.Tensor, bulk: bool = False) -> torch.Tensor:
        # Only a few rows ever reach the LM head (the last position, decode steps, verification);
        # a long prompt's logits (lm.logits) go through in slices to bound the temporaries.
        # bulk=True (scoring many positions, gemmalab.eval): beyond GEMV_MAX_ROWS rows, the table
        # is dequantized once and multiplied like a prefill matrix, without the top-k refinement
        # that only greedy decisions need.
        shape = h.shape
        h2 = h.reshape(-1, self.embedding_dim).float()
        if bulk and h2.shape[0] > GEMV_MAX_ROWS:
            w = self.__dict__.get("_bulk")
            y = self.head(h2) if w is None else (h2.to(w.dtype) @ w.t()).float()
            return y.view(*shape[:-1], self.num_embeddings)
        ops = kernels.ops()
        out = []
        for i in range(0, h2.shape[0], GEMV_MAX_ROWS):
            z = ops.qlinear(h2[i:i + GEMV_MAX_ROWS], self.head.blocks, self.head.qtype)
            # the top candidates exactly (fp32 activations): 8-bit activations flip near-ties
            ops.refine_top(z, h2[i:i + GEMV_MAX_ROWS], self.head.blocks, self.head.qtype,
                           min(REFINE_TOP, self.num_embeddings))
            out.append(z)
        return torch.cat(out, 0).view(*shape[:-1], self.num_embeddings)

    @contextlib.contextmanager
    def bulk_weights(self):
        """Keep the table dequantized (in the prefill dtype) while many blocks of rows are scored,
        instead of dequantizing it for every block: +V x d x 2-4 bytes for the duration."""
        self.__dict__["_bulk"] = self.head.dequantized().to(prefill_dtype())
        try:
            yield
        finally:
            self.__dict__.pop("_bulk", None)

    def extra_repr(self) -> str:
        return (f"{self.num_embeddings}, {self.embedding_dim}, "
                f"qtype={TYPE_NAMES.get(self.qtype, self.qtype)}")


def _rope_inv_freq(head_dim: int, theta: float, scale: float) -> torch.Tensor:
    exponent = torch.arange(0, head_dim, 2, dtype=torch.int64).float()
    return 1.0 / (theta ** (exponent / head_dim)) / scale  # as in model.text.rope_tables


class FusedDecoder:
    """The one-token-per-row decode step of a quantized model as one C++ call per block.

    Bit-for-bit the same arithmetic as the modules (QuantLinear's integer path, RMSNorm with 1 + w,
    QK-norm, RoPE, attention over slots masked by position, GeGLU), without per-op dispatch.
    With `adapters`, LoRA side paths scale * B (A x) in fp32 are added after the projections inside
    the same call (ops.decode_layer's lora_a / lora_b / lora_scale).
    """

    def __init__(self, model):
        c = model.config
        self.model, self.config = model, c
        self.inv_freq = {True: _rope_inv_freq(c.head_dim, c.rope_theta, c.rope_scaling_factor),
                         False: _rope_inv_freq(c.head_dim, c.rope_local_base_freq,
                                                c.rope_local_scaling_factor)}
        self.layers = []
        for layer in model.layers:
            a, m = layer.self_attn, layer.mlp
            linears = [a.q_proj, a.k_proj, a.v_proj, a.o_proj, m.gate_proj, m.up_proj, m.down_proj]
            norms = [layer.input_layernorm, layer.post_attention_layernorm,
                     layer.pre_feedforward_layernorm, layer.post_feedforward_layernorm]
            if c.use_qk_norm:
                norms += [a.q_norm, a.k_norm]
            self.layers.append((
                [n.weight.float().contiguous() for n in norms], [lin.blocks for lin in linears],
                [lin.qtype for lin in linears], a.is_global,
                [c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.hidden_size,
                 c.intermediate_size, 0 if a.is_global else c.sliding_window],
                [c.rms_norm_eps, a.scaling, a.softcap or 0.0]))
        self.final_norm = model.norm.weight.float().contiguous()

    @staticmethod
    def supports(model) -> bool:
        return all(isinstance(lin, QuantLinear) for layer in model.layers
                   for lin in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj,
                               layer.self_attn.o_proj, layer.mlp.gate_proj, layer.mlp.up_proj,
                               layer.mlp.down_proj)) and isinstance(model.embed_tokens, QuantEmbedding)

    @torch.inference_mode()
    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor, cache,
                 rows: torch.Tensor | None = None, adapters: list | None = None) -> torch.Tensor:
        """tokens, positions (M,): one token per entry; rows (M,): the cache row of each (default
        0..M-1). Tokens of the same row are consecutive columns of that row, in order. adapters:
        None, or per layer None or (As, Bs, scales), seven of each in the order q, k, v, o, gate,
        up, down, an empty tensor where a projection adds nothing (the current tensors: read at
        this call). Returns the next-token logits (M, V)."""
        ops = kernels.ops()
        c = self.config
        M = tokens.shape[0]
        rows = torch.arange(M) if rows is None else rows.long().cpu()
        positions = positions.long()
        # the cache records the positions and says where each token's K/V go (consecutive
        # columns for several tokens of one row)
        full_slot, ring_slot = cache.append(rows, positions)
        R = cache.ring_slots
        n_full = int(full_slot.max()) + 1
        x = self.model.embed(tokens)  # (M, d)
        adapters = adapters or [None] * len(self.layers)
        for (norms, weights, qtypes, is_global, dims, fparams), lc, lora in zip(
                self.layers, cache.layers, adapters):
            la, lb, ls = lora or ([], [], [])
            if is_global:
                x = ops.decode_layer(x, norms, weights, qtypes, lc.k, lc.v, cache.full_pos, rows,
                                     full_slot, positions, self.inv_freq[True], n_full, dims, fparams,
                                     la, lb, ls)
            else:
                x = ops.decode_layer(x, norms, weights, qtypes, lc.k, lc.v, cache.ring_pos, rows,
                                     ring_slot, positions, self.inv_freq[False], R, dims, fparams,
                                     la, lb, ls)
        h = ops.rmsnorm(x, self.final_norm, c.rms_norm_eps)
        return self.model.lm_head(h)
