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
from ..model.text import Attention
from .linear import (GEMV_MAX_ROWS, KERNEL_TYPES, Q5_0, Q8_0, FusedDecoder, QuantEmbedding, QuantLinear,
                     prefill_dtype, prepare_blocks, quantize_q8_0)

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
        """One token per entry (several consecutive ones may share a row: speculative
        verification); next-token logits (M, V). Three paths, one contract:
        - plain quantized projections (or adapters switched off): the fused C++ block;
        - LoRA factors over the quantized projections (train.lora: the policy's own adapter, or a
          factor anchor): the fused C++ block with the fp32 side paths inside it;
        - a dense delta (the exact EMA anchor of train.roles): `_adapter_decode`, the same kernels
          op by op with the side paths added from Python after each projection;
        - anything else in place of a projection: the module path (`_module_decode`).
        """
        layers = _adapter_plan(self)
        if layers is None:
            return self._fused_decoder()(tokens, positions, cache, rows)
        if layers == "modules":
            return _module_decode(self, tokens, positions, cache, rows)
        factors = _fused_factors(layers)
        if factors is not None:
            return self._fused_decoder()(tokens, positions, cache, rows, factors)
        with torch.inference_mode():
            return _adapter_decode(self, layers, tokens, positions, cache, rows)

    def _fused_decoder(self) -> FusedDecoder:
        fused = self.__dict__.get("_fused")
        if fused is None:
            # FusedDecoder keeps each projection's blocks; adapters wrap the same QuantLinear
            with _bases_only(self):
                fused = self.__dict__["_fused"] = FusedDecoder(self)
        return fused


# ---- decoding with adapters ---------------------------------------------------------------------
# A wrapper (train.lora.LoRALinear) is recognised by duck typing, so that quant/ does not import
# train/: it holds the QuantLinear as `.base` and says what this call adds with `.delta_terms()`:
# None (nothing: the base alone), ("factors", A, B, scale) or ("dense", D).
# The plan is made at every step (an optimizer step or a role switch changes it between any two):
# child modules are read from `_modules` directly, nn.Module.__getattr__ costs ~0.5 us a lookup and
# a step makes ~250 of them.
_NAMES = (("self_attn", ("q_proj", "k_proj", "v_proj", "o_proj")),
          ("mlp", ("gate_proj", "up_proj", "down_proj")))


def _projections(layer) -> list[nn.Module]:
    out = []
    for parent, names in _NAMES:
        children = layer._modules[parent]._modules
        out += [children[n] for n in names]
    return out


def _adapter_plan(model):
    """None: the fused block applies (no projection adds anything); "modules": some projection is
    neither a QuantLinear nor an adapter over one; else per layer [(QuantLinear, terms)] * 7."""
    if not isinstance(model.embed_tokens, QuantEmbedding):
        return "modules"
    plan, any_delta = [], False
    for layer in model.layers:
        row = []
        for lin in _projections(layer):
            if isinstance(lin, QuantLinear):
                row.append((lin, None))
                continue
            base = lin._modules.get("base")
            if not isinstance(base, QuantLinear) or not hasattr(lin, "delta_terms"):
                return "modules"
            terms = lin.delta_terms()
            any_delta |= terms is not None
            row.append((base, terms))
        plan.append(row)
    return plan if any_delta else None


_NO_SIDE = torch.empty(0)


def _fused_factors(plan) -> list | None:
    """The plan as FusedDecoder's adapters (per layer None or (As, Bs, scales): the adapters' own
    tensors, read by the C++ block in place, fp32 or converted there), or None when some
    projection adds a dense delta."""
    out = []
    for row in plan:
        if all(terms is None for _, terms in row):
            out.append(None)
            continue
        As, Bs, scales = [], [], []
        for _, terms in row:
            if terms is None:
                As.append(_NO_SIDE)
                Bs.append(_NO_SIDE)
                scales.append(0.0)
            elif terms[0] == "factors":
                _, a, b, scale = terms
                As.append(a)
                Bs.append(b)
                scales.append(float(scale))
            else:
                return None
        out.append((As, Bs, scales))
    return out


class _bases_only:
    """Within the block, every adapter in a projection's place is replaced by its base."""

    def __init__(self, model):
        self.swaps = []
        for layer in model.layers:
            for parent in (layer.self_attn, layer.mlp):
                for name, child in parent.named_children():
                    if isinstance(getattr(child, "base", None), QuantLinear):
                        self.swaps.append((parent, name, child))

    def __enter__(self):
        for parent, name, child in self.swaps:
            parent._modules[name] = child.base

    def __exit__(self, *exc):
        for parent, name, child in self.swaps:
            parent._modules[name] = child


# Dense side paths run on blocks of this many rows (zero-padded), whatever the batch: BLAS picks its
# kernel by shape, so a row then gets the same bits alone or in a batch (measured; tests/test_roles).
_SIDE_ROWS = 8


def _side(y: torch.Tensor, x: torch.Tensor, terms) -> torch.Tensor:
    """y + the side path of `terms` for the inputs x.

    Factors: ops.lora_add, the C++ side path of ops.decode_layer (so this step computes the fused
    step's bits). A dense delta: torch, on zero-padded blocks of _SIDE_ROWS rows, on one thread:
    these products are far too small to gain from a second one, and torch's OpenMP team waits at
    every barrier for a thread the OS has descheduled while other processes hold the cores
    (measured at load 3.5 on 2 cores: a (32, 640) x (640, 16) x (16, 2048) product took 15 ms on 2
    threads, 33 us on one). The C++ kernels avoid that with their own pool (csrc/pool.h). Only the
    side path: switching the team's size around every kernel call costs far more (the team is
    rebuilt)."""
    if terms is None:
        return y
    if terms[0] == "factors":
        from .kernels import ops
        _, a, b, scale = terms
        return ops().lora_add(y, x, a, b, float(scale))
    M = x.shape[0]
    n = -(-M // _SIDE_ROWS) * _SIDE_ROWS
    xp = x if n == M else torch.cat([x, x.new_zeros(n - M, x.shape[1])])
    out = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for i in range(0, n, _SIDE_ROWS):
            out.append(xp[i:i + _SIDE_ROWS] @ terms[1].t())
    finally:
        torch.set_num_threads(threads)
    return y + torch.cat(out)[:M]


def _adapter_decode(model, plan, tokens, positions, cache, rows):
    """FusedDecoder's step op by op (the same integer projections, norms, RoPE, attention over the
    cache and GeGLU as ops.decode_layer), each projection followed by its side path: with factors
    only, the fused step's bits exactly (tests/test_lora_fused.py). Rows are independent: every op
    is row-wise, dense side paths run on fixed-size row blocks."""
    from .kernels import ops as _ops
    ops = _ops()
    c = model.config
    eps, H, Hkv, D = c.rms_norm_eps, c.num_attention_heads, c.num_key_value_heads, c.head_dim
    M = tokens.shape[0]
    positions = positions.long()
    rows_cpu = torch.arange(M) if rows is None else rows.long().cpu()
    full_slot, ring_slot = cache.append(rows, positions)
    n_full, R = int(full_slot.max()) + 1, cache.ring_slots
    index = rows_cpu.to(cache.full_pos.device)
    inv_freq = model._fused_decoder().inv_freq  # {is_global: (D/2,)}
    x = model.embed(tokens).float()  # (M, d)
    for layer, lc, lins in zip(model.layers, cache.layers, plan):
        a = layer.self_attn
        (q_lin, dq), (k_lin, dk), (v_lin, dv), (o_lin, do), (g_lin, dg), (u_lin, du), (d_lin, dd) = lins
        h = ops.rmsnorm(x, layer.input_layernorm.weight, eps)
        q, k, v = ops.qlinear_multi(h, [q_lin.blocks, k_lin.blocks, v_lin.blocks],
                                    [q_lin.qtype, k_lin.qtype, v_lin.qtype])
        q = _side(q, h, dq).view(M, H, D)
        k = _side(k, h, dk).view(M, Hkv, D)
        v = _side(v, h, dv).view(M, Hkv, D)
        if hasattr(a, "q_norm"):
            q = ops.rmsnorm(q.reshape(M * H, D), a.q_norm.weight, eps).view(M, H, D)
            k = ops.rmsnorm(k.reshape(M * Hkv, D), a.k_norm.weight, eps).view(M, Hkv, D)
        q = ops.rope(q, positions, inv_freq[a.is_global])
        k = ops.rope(k, positions, inv_freq[a.is_global])
        slot = full_slot if a.is_global else ring_slot
        lc.k[index, :, slot] = k.to(lc.k.dtype)
        lc.v[index, :, slot] = v.to(lc.v.dtype)
        att = ops.decode_attention(q, lc.k, lc.v, cache.full_pos if a.is_global else cache.ring_pos,
                                   rows_cpu, positions, n_full if a.is_global else R,
                                   0 if a.is_global else c.sliding_window, a.scaling, a.softcap or 0.0)
        att = att.reshape(M, H * D)
        o = _side(ops.qlinear(att, o_lin.blocks, o_lin.qtype), att, do)
        x = x + ops.rmsnorm(o, layer.post_attention_layernorm.weight, eps)
        h = ops.rmsnorm(x, layer.pre_feedforward_layernorm.weight, eps)
        g, u = ops.qlinear_multi(h, [g_lin.blocks, u_lin.blocks], [g_lin.qtype, u_lin.qtype])
        m = ops.gelu_mul(_side(g, h, dg), _side(u, h, du))
        y = _side(ops.qlinear(m, d_lin.blocks, d_lin.qtype), m, dd)
        x = x + ops.rmsnorm(y, layer.post_feedforward_layernorm.weight, eps)
    return model.lm_head(ops.rmsnorm(x, model.norm.weight, eps))


def _module_decode(model, tokens, positions, cache, rows):
    """The module path (forward with the cache, as prefill runs): all rows at once when each row
    gets one token, else row by row, a row's consecutive tokens as one chunk."""
    with torch.inference_mode():
        if rows is None:
            return model(tokens[:, None], positions[:, None], cache)[:, -1]
        order = rows.long().cpu().tolist()
        out, i = [], 0
        while i < len(order):
            j = i
            while j < len(order) and order[j] == order[i]:
                j += 1
            r = order[i]
            out.append(model(tokens[None, i:j], positions[None, i:j], cache.rows(r, r + 1))[0])
            i = j
        return torch.cat(out)


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
    for module in model.modules():  # prefill attention in the many-row products' dtype
        if isinstance(module, Attention):
            module.bulk_rows, module.bulk_dtype = GEMV_MAX_ROWS, prefill_dtype
    # what is left are the norms (fp32 parameters)
    expected = {k for k, _ in model.named_parameters()}
    missing = sorted(expected - set(floats))
    if missing:
        raise ValueError(f"missing {len(missing)} tensors, e.g. {missing[:3]}")
    model.load_state_dict({k: floats[k].float() for k in expected}, strict=True, assign=True)
    return model.eval().requires_grad_(False)
