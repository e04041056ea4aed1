"""Fake quantization on the grids the exported files use, for quantization-aware training.

Gemma 3 (report §2.3) fine-tunes its quantized releases with the quantization in the loop, in three
formats: int4 per block of 32, int4 per channel and "switched fp8" (SFP8). The student must train on
exactly the values its exported file will hold, so each format here is the export's own rounding:

    q4_0          ggml's Q4_0 (ggml-quants.c quantize_row_q4_0_ref, gguf-py Q4_0.quantize_blocks):
                  per block of 32, d = (the signed value of largest magnitude, first on ties) / -8 in
                  f32, q = min(15, trunc(x / d + 8.5)) computed with the f32 1/d, value (q - 8) * fp16(d).
                  Bitwise equal to gguf.quants' quantize-then-dequantize (tests/test_qat.py).
    int4_channel  the same rule with one block per output row: d = (signed row max) / -8, so the file
                  can store it losslessly as Q4_0 blocks that all carry the row's fp16 d (there is no
                  per-row int4 type in GGUF); llama.cpp and our Q4_0 kernels then run it unchanged.
    sfp8          gemma.cpp's SFP8 (gemmalab.quant.sfp): 1 byte per weight, per-tensor scale when
                  max|w| > 1.875; production encoder, or exact round-to-nearest-even.

`rounding="rne"` breaks the q4_0 / int4_channel ties to even instead of upwards: still a valid Q4_0
file, and the fair post-training baseline for weights that sit on Q4_0 ties (a Q5_0 block's odd codes
are exact Q4_0 ties, and ggml's rule shifts them all the same way).

Training uses a straight-through estimator (Bengio et al. 2013, "Estimating or propagating gradients
through stochastic neurons"): the forward pass sees fq(W), the backward pass hands dL/dfq(W) to W
unchanged. `attach` swaps the seven projections of every block for `FakeQuantLinear` modules that hold
the same `weight` parameter (state-dict names do not change, so checkpoints and exports read as usual)
and rounds the tied embedding / LM head once to its own format (Q8_0, F16 or F32; it stays frozen).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["FORMATS", "ROUNDINGS", "EMBEDDING_FORMATS", "PROJECTIONS", "q4_0_codes", "q4_0_values", "q4_0_bytes",
           "fake_quant", "fake_quant_embedding", "FakeQuantLinear", "attach", "materialize",
           "fake_quantized_modules", "q4_0_ties", "move_off_ties"]

FORMATS = ("q4_0", "int4_channel", "sfp8")
ROUNDINGS = ("ref", "rne")
EMBEDDING_FORMATS = ("q8_0", "f16", "f32")
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
QK4_0 = 32


def q4_0_codes(w: Tensor, *, per_channel: bool = False, rounding: str = "ref") -> tuple[Tensor, Tensor]:
    """Q4_0 codes of a (rows, cols) weight: (q uint8 (rows, cols) in 0..15, d float16 (rows, cols/32)).

    per_channel: one scale per row (every block of the row carries it). The arithmetic is ggml's, in
    f32 step by step: d = max / -8, id = 1 / d (0 when d == 0), q = trunc(x * id + 8.5) clipped to 15.
    """
    if rounding not in ROUNDINGS:
        raise ValueError(f"unknown Q4_0 rounding {rounding!r}; use one of {', '.join(ROUNDINGS)}")
    if w.ndim != 2 or w.shape[1] % QK4_0:
        raise ValueError(f"Q4_0 needs a matrix whose rows split into blocks of {QK4_0}, "
                         f"got shape {tuple(w.shape)}")
    rows, cols = w.shape
    y, d = _q4_0_scaled(w, per_channel)
    q = torch.trunc(y + 8.5) if rounding == "ref" else torch.round(y) + 8  # torch.round: half to even
    q = q.clamp_(0, 15).to(torch.uint8).reshape(rows, cols)
    d16 = d.to(torch.float16).reshape(rows, -1)
    if per_channel:
        d16 = d16.expand(rows, cols // QK4_0)
    return q, d16.contiguous()


def _q4_0_scaled(w: Tensor, per_channel: bool) -> tuple[Tensor, Tensor]:
    """(x / d per block (f32 1/d, ggml's order of operations), d = signed max / -8 per block)."""
    x = w.detach().float()
    blocks = x if per_channel else x.reshape(-1, QK4_0)
    imax = blocks.abs().argmax(dim=-1, keepdim=True)  # the first of equal magnitudes, as ggml
    d = blocks.gather(-1, imax) / -8
    inv = torch.where(d == 0, torch.zeros_like(d), 1.0 / d)
    return blocks * inv, d


def q4_0_values(q: Tensor, d16: Tensor) -> Tensor:
    """(q - 8) * fp16 d in f32: the dequantization of ggml (exact: a 4-bit integer times an fp16)."""
    rows, cols = q.shape
    v = (q.to(torch.float32) - 8).reshape(rows, -1, QK4_0) * d16.to(torch.float32).unsqueeze(-1)
    return v.reshape(rows, cols)


def q4_0_bytes(w: Tensor, *, per_channel: bool = False, rounding: str = "ref") -> Tensor:
    """GGUF Q4_0 rows (uint8 (rows, cols / 32 * 18)): per block the fp16 d (little-endian), then 16
    bytes whose low nibbles hold codes 0..15 and high nibbles codes 16..31 (ggml's block_q4_0)."""
    q, d16 = q4_0_codes(w, per_channel=per_channel, rounding=rounding)
    rows, cols = q.shape
    qb = q.reshape(rows, -1, 2, QK4_0 // 2)
    packed = qb[:, :, 0] | (qb[:, :, 1] << 4)
    d_bytes = d16.contiguous().view(torch.uint8).reshape(rows, -1, 2)  # x86 / ARM: little-endian
    return torch.cat([d_bytes, packed], dim=-1).reshape(rows, -1)


def _roundf(y: Tensor) -> Tensor:
    """Round half away from zero, ggml's roundf, written as gguf-py's np_roundf (exact in f32)."""
    a = y.abs()
    fl = torch.floor(a)
    return torch.sign(y) * (fl + torch.floor(2 * (a - fl)))


def _q8_0_values(w: Tensor) -> Tensor:
    """ggml's Q8_0 quantize-then-dequantize (d = amax / 127, q = roundf(x / d), value q * fp16(d))."""
    rows, cols = w.shape
    blocks = w.detach().float().reshape(-1, 32)
    d = blocks.abs().amax(dim=-1, keepdim=True) / 127
    inv = torch.where(d == 0, torch.zeros_like(d), 1.0 / d)
    q = _roundf(blocks * inv).to(torch.int8).to(torch.float32)  # as ggml's int8 codes: no -0
    return (q * d.to(torch.float16).to(torch.float32)).reshape(rows, cols)


@torch.no_grad()
def fake_quant(w: Tensor, fmt: str, *, rounding: str = "ref", exact_rne: bool = False) -> Tensor:
    """fq(w): the f32 values the exported file of format `fmt` will hold for the matrix `w`."""
    if fmt == "q4_0":
        return q4_0_values(*q4_0_codes(w, rounding=rounding)).to(w.dtype)
    if fmt == "int4_channel":
        return q4_0_values(*q4_0_codes(w, per_channel=True, rounding=rounding)).to(w.dtype)
    if fmt == "sfp8":
        from .sfp import fake_quant_sfp8
        return fake_quant_sfp8(w.detach().float(), exact_rne=exact_rne).to(w.dtype)
    raise ValueError(f"unknown fake-quantization format {fmt!r}; use one of {', '.join(FORMATS)}")


@torch.no_grad()
def fake_quant_embedding(w: Tensor, fmt: str) -> Tensor:
    """The embedding / tied LM head at its own storage format: Q8_0 (ggml's rule), F16 or F32."""
    if fmt == "q8_0":
        if w.shape[-1] % 32:
            raise ValueError(f"a Q8_0 embedding needs a width divisible by 32, got {w.shape[-1]}")
        return _q8_0_values(w).to(w.dtype)
    if fmt == "f16":
        return w.detach().to(torch.float16).to(w.dtype)
    if fmt == "f32":
        return w.detach().clone()
    raise ValueError(f"unknown embedding format {fmt!r}; use one of {', '.join(EMBEDDING_FORMATS)}")


class _StraightThrough(torch.autograd.Function):
    """Forward: the fake-quantized weight (exact values, no w + (fq - w) round-off). Backward: identity."""

    @staticmethod
    def forward(ctx, w: Tensor, fmt: str, rounding: str, exact_rne: bool) -> Tensor:
        return fake_quant(w, fmt, rounding=rounding, exact_rne=exact_rne)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad, None, None, None


class FakeQuantLinear(nn.Module):
    """y = x fq(W)^T with a straight-through gradient to W; holds the original `weight` parameter."""

    def __init__(self, linear: nn.Linear, fmt: str, *, rounding: str = "ref", exact_rne: bool = False):
        super().__init__()
        if fmt not in FORMATS:
            raise ValueError(f"unknown fake-quantization format {fmt!r}; use one of {', '.join(FORMATS)}")
        if linear.bias is not None:
            raise ValueError("FakeQuantLinear expects a bias-free projection (Gemma has none)")
        if fmt != "sfp8" and linear.in_features % QK4_0:
            raise ValueError(f"{fmt} needs in_features divisible by {QK4_0}, got {linear.in_features}")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.fmt, self.rounding, self.exact_rne = fmt, rounding, exact_rne

    def quantized_weight(self) -> Tensor:
        return _StraightThrough.apply(self.weight, self.fmt, self.rounding, self.exact_rne)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.quantized_weight())

    def extra_repr(self) -> str:
        extra = f", rounding={self.rounding}" if self.fmt != "sfp8" else (
            ", exact_rne=True" if self.exact_rne else "")
        return f"in_features={self.in_features}, out_features={self.out_features}, fmt={self.fmt}{extra}"


def _projections(model: nn.Module, modules: tuple[str, ...]):
    for name, parent in model.named_modules():
        for child_name, child in parent.named_children():
            if child_name in modules and isinstance(child, (nn.Linear, FakeQuantLinear)):
                yield f"{name}.{child_name}" if name else child_name, parent, child_name, child


def attach(model: nn.Module, fmt: str, *, modules: tuple[str, ...] | list[str] = PROJECTIONS,
           embedding: str = "q8_0", rounding: str = "ref", exact_rne: bool = False) -> list[str]:
    """Fake-quantize `model` in place for QAT; returns the names of the projections swapped.

    The projections named in `modules` (the seven of every block by default) become FakeQuantLinear;
    the embedding (= the tied LM head) is rounded once to `embedding` and frozen.
    """
    modules = tuple(modules)
    bad = sorted(set(modules) - set(PROJECTIONS))
    if bad:
        raise ValueError(f"unknown projection name(s) {bad}; valid: {', '.join(PROJECTIONS)}")
    if any(type(m).__name__ == "LoraLinear" for m in model.modules()):
        raise ValueError("quantization-aware training updates the matrices themselves; merge or drop "
                         "the LoRA adapters first (lora.rank = 0)")
    swapped = []
    for full, parent, child_name, child in list(_projections(model, modules)):
        if isinstance(child, FakeQuantLinear):
            raise ValueError(f"{full} is already fake-quantized ({child.fmt})")
        setattr(parent, child_name, FakeQuantLinear(child, fmt, rounding=rounding, exact_rne=exact_rne))
        swapped.append(full)
    if not swapped:
        raise ValueError(f"no projection named {', '.join(modules)} in this model")
    emb = getattr(model, "embed_tokens", None)
    if emb is not None:
        with torch.no_grad():
            emb.weight.copy_(fake_quant_embedding(emb.weight, embedding))
        emb.weight.requires_grad_(False)
    return swapped


@torch.no_grad()
def q4_0_ties(w: Tensor, *, per_channel: bool = False) -> tuple[Tensor, Tensor]:
    """(mask of the weights that sit exactly on a Q4_0 rounding tie, their f32 d (rows, cols))."""
    rows, cols = w.shape
    y, d = _q4_0_scaled(w, per_channel)
    y = y + 8.5
    tie = (y == torch.trunc(y)) & (d != 0) & (y < 15.5)
    return tie.reshape(rows, cols), d.expand_as(y).reshape(rows, cols)


@torch.no_grad()
def move_off_ties(model: nn.Module, *, max_margin: float = 0.25, seed: int = 0) -> int:
    """Move every fake-quantized Q4_0 / int4_channel weight that sits exactly on a rounding tie a
    random fraction u ~ U(0, max_margin) of a quantization step into the cell its rounding picks,
    so fq(W) is unchanged (the student still starts at the post-training-quantized point) while the
    latent weights no longer sit on the cell boundary. Returns the number of weights moved.

    Why: a checkpoint dequantized from Q5_0 blocks puts about half of those weights on exact Q4_0
    ties (an odd Q5_0 code is half-way between two Q4_0 levels). There any step, however small,
    flips the rounding, and Adam's first steps (about lr * sign(gradient) on every weight) flip all
    of them at once in the gradient's direction: a full quantization step on tens of millions of
    weights, which took the 270M's loss from 3.2 to 16 nats per token in one lr = 1e-6 step
    (docs/qat.md). Random margins spread the flips over training, as for weights that never sat on
    a tie.
    """
    gen = torch.Generator().manual_seed(seed)
    moved = 0
    for name, m in sorted(fake_quantized_modules(model).items()):
        if m.fmt not in ("q4_0", "int4_channel"):
            continue
        tie, d = q4_0_ties(m.weight, per_channel=m.fmt == "int4_channel")
        if not tie.any():
            continue
        per_channel = m.fmt == "int4_channel"
        # ggml's trunc(y + 8.5) takes the upper code of a tie; "rne" the even one
        up = (q4_0_codes(m.weight, per_channel=per_channel, rounding=m.rounding)[0]
              == q4_0_codes(m.weight, per_channel=per_channel)[0])
        u = torch.rand(m.weight.shape, generator=gen) * max_margin
        step = torch.where(up, u, -u) * d  # y = w / d moves by +-u
        before = fake_quant(m.weight, m.fmt, rounding=m.rounding)
        w = torch.where(tie, m.weight.float() + step, m.weight.float()).to(m.weight.dtype)
        if not torch.equal(fake_quant(w, m.fmt, rounding=m.rounding), before):
            raise RuntimeError(f"{name}: moving off the ties changed the quantized values")
        m.weight.copy_(w)
        moved += int(tie.sum())
    return moved


def fake_quantized_modules(model: nn.Module) -> dict[str, FakeQuantLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, FakeQuantLinear)}


@torch.no_grad()
def materialize(model: nn.Module, quantized: bool = True) -> nn.Module:
    """Undo `attach` in place: plain nn.Linear modules holding fq(W) (quantized=True, what the
    exported file computes with) or the raw trained W (quantized=False, an "unquantized" QAT
    checkpoint in Google's sense)."""
    for full, parent, child_name, child in list(_projections(model, PROJECTIONS)):
        if not isinstance(child, FakeQuantLinear):
            continue
        lin = nn.Linear(child.in_features, child.out_features, bias=False,
                        device=child.weight.device, dtype=child.weight.dtype)
        lin.weight = nn.Parameter(child.quantized_weight().detach() if quantized else child.weight.detach(),
                                  requires_grad=child.weight.requires_grad)
        setattr(parent, child_name, lin)
    return model
