"""SFP8, gemma.cpp's "switching floating point": one byte per weight, one f32 scale per tensor.

The Gemma 3 report (section 2.3) lists SFP8 as one of its three QAT formats; the format is gemma.cpp's
(google/gemma.cpp compression/sfp-inl.h, compression/sfp_test.cc, compression/compress.cc
`ScaleWeights`, read at 3ed403e). A byte b holds:

    b7            sign
    v = b & 0x7F  0: zero (only +0, 0x00, is written; 0x80 is reserved and never emitted)
    1 <= v < 64   "small": e = v >> 2, m = v & 3 (2 mantissa bits), |x| = (1 + m/4) * 2^(e - 23)
    64 <= v < 128 "large": e = v >> 3, m = v & 7 (3 mantissa bits), |x| = (1 + m/8) * 2^(e - 15)

so 255 values: binades 2^-23 .. 2^0 without subnormals, largest 1.875 (gemma.cpp's
`SfpStream::kMax`), and the code is monotone in the value within each sign. Every value is exact
in bf16.

Two encoders, which agree on all 255 values and on gemma.cpp's golden table:
- "production" (default): what `SfpCodec::Enc` does, hence what every `.sbs` weight file holds. It
  chops f32 to bf16 (no rounding), drops the last bf16 mantissa bit, and only then rounds to nearest
  even on the 6 remaining mantissa bits. That equals exact RNE applied to the input with its low 17
  bits cleared, which is how it is computed here.
- exact RNE (`exact_rne=True`): sfp_test.cc's scalar reference `SFP8FromF32`, round to nearest even
  on the full 23-bit mantissa.
They differ by one code on about 6% of N(0, 0.05^2) weights (the production one rounds down).

Inputs must satisfy |x| <= 1.875: larger ones could round up into the sign bit. `scale_weights`
(gemma.cpp's `ScaleWeights`) brings a tensor into range with one per-tensor scale.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["KMAX", "DECODE_TABLE", "decode", "encode", "scale_weights", "quantize", "dequantize",
           "fake_quant_sfp8", "SFP8Linear"]

KMAX = 1.875  # largest magnitude SFP8 holds (gemma.cpp SfpStream::kMax)

_KMAX_BITS = 0x3FF00000      # f32 bits of 1.875
# f32 bits of 1.1111b * 2^-8 = 0.007568359375: from here on, round with 3 mantissa bits ("large").
# Everything at or above 1.111b * 2^-8 = 0.00732421875 rounds up to 2^-7 and is then large too.
_LARGE_BITS = 0x3BF80000
# Production encoder: chop f32 -> bf16 (16 bits) and drop the last bf16 mantissa bit (1 more).
_PRODUCTION_MASK = -(1 << 17)  # 0xFFFE0000 as an int32
_CHUNK = 1 << 22  # elements encoded at a time


def _decode_table() -> torch.Tensor:
    v = torch.arange(128)
    small = (1 + (v & 3) / 4) * torch.pow(2.0, (v >> 2).double() - 23)
    large = (1 + (v & 7) / 8) * torch.pow(2.0, (v >> 3).double() - 15)
    mag = torch.where(v < 64, small, large)
    mag[0] = 0.0
    neg = -mag
    neg[0] = 0.0  # 0x80 is reserved (gemma.cpp asserts on it); it decodes as +0 here
    return torch.cat([mag, neg]).float()


# code -> f32 value; index with the codes as integers. Treat it as read-only.
DECODE_TABLE = _decode_table()


def decode(codes: torch.Tensor) -> torch.Tensor:
    """uint8 SFP8 codes -> float32 values of the same shape (0x80, invalid, decodes as 0)."""
    if codes.dtype != torch.uint8:
        raise ValueError(f"SFP8 codes are uint8, got {codes.dtype}")
    return DECODE_TABLE.to(codes.device)[codes.int()]


def encode(x: torch.Tensor, exact_rne: bool = False) -> torch.Tensor:
    """float values with |x| <= 1.875 -> uint8 SFP8 codes of the same shape.

    Production rounding by default (gemma.cpp `SfpCodec::Enc`), exact round-to-nearest-even with
    `exact_rne=True` (sfp_test.cc `SFP8FromF32`). Magnitudes below 1.25 * 2^-24 (and -0) give 0x00;
    0x80 is never produced. Other float dtypes are converted to float32 first.
    """
    if not x.is_floating_point():
        raise ValueError(f"SFP8 encodes floating-point tensors, got {x.dtype}")
    bits = x.detach().to(torch.float32).contiguous().reshape(-1).view(torch.int32)
    if bits.numel() and int((bits & 0x7FFFFFFF).max()) > _KMAX_BITS:  # NaN's bits are above inf's
        worst = x.detach().abs().max().item()
        raise ValueError(f"SFP8 holds |x| <= {KMAX}, got max |x| = {worst:g}; scale the tensor "
                         "first (sfp.scale_weights / sfp.quantize)")
    codes = torch.empty(bits.shape, dtype=torch.uint8, device=bits.device)
    for i in range(0, bits.numel(), _CHUNK):  # bounds the int32 temporaries for big matrices
        codes[i:i + _CHUNK] = _encode_bits(bits[i:i + _CHUNK], exact_rne)
    return codes.reshape(x.shape)


def _encode_bits(bits: torch.Tensor, exact_rne: bool) -> torch.Tensor:
    a = bits & 0x7FFFFFFF  # |x| as bits: the integer order is the float order
    if not exact_rne:
        a = a & _PRODUCTION_MASK
    # Round to nearest even, keeping 3 mantissa bits (large) or 2 (small): add half - 1 + lsb of the
    # kept bits, then read the kept bits; a carry moves into the exponent field by itself.
    large = a >= _LARGE_BITS
    lsb = torch.where(large, a >> 20, a >> 21) & 1
    r = a + torch.where(large, (1 << 19) - 1, (1 << 20) - 1) + lsb
    e = (r >> 23) - 127  # unbiased exponent after rounding
    large = e >= -7      # recomputed: [1.111b, 1.1111b) * 2^-8 rounded up to 2^-7, a large value
    m = torch.where(large, (r >> 20) & 7, (r >> 21) & 3)
    m = torch.where((e == -23) & (m == 0), 1, m)  # 1.0 * 2^-23 would be v = 0: take 1.25 * 2^-23
    code = torch.where(large, ((e + 15) << 3) | m, ((e + 23) << 2) | m)
    code = code | ((bits >> 24) & 0x80)
    code = torch.where(e < -23, 0, code)  # underflow is +0, never the reserved -0
    return code.to(torch.uint8)


def scale_weights(w: torch.Tensor) -> tuple[torch.Tensor, float]:
    """(w / scale clamped into [-1.875, 1.875], scale) as gemma.cpp's `ScaleWeights` computes them.

    max|w| <= 1.875: the weights unchanged (as a float32 copy) and scale 1. Otherwise scale =
    max|w| / 1.875 in f32, inv = (float)(1.0 / (double)scale), w' = copysign(min(1.875, |w * inv|), w):
    the clamp catches the max element rounding just above 1.875. Decoded values are multiplied by
    `scale` again. (By Figueroa's double-rounding theorem, 1/scale through double equals the f32
    division; we follow the reference literally anyway.)
    """
    w = w.detach().to(torch.float32)
    if w.numel() == 0:
        return w.clone(), 1.0
    maxabs = w.abs().max()
    if not torch.isfinite(maxabs):
        raise ValueError("cannot encode a tensor with inf or NaN weights as SFP8")
    if maxabs.item() <= KMAX:
        return w.clone(), 1.0
    scale = maxabs / KMAX  # f32 division, as in C++ (1.875 is exact)
    inv = torch.tensor(np.float32(1.0 / float(scale)), dtype=torch.float32, device=w.device)
    scaled = (w * inv).abs_().clamp_(max=KMAX).copysign_(w)
    return scaled, float(scale)


def quantize(w: torch.Tensor, exact_rne: bool = False) -> tuple[torch.Tensor, float]:
    """A weight tensor -> (uint8 SFP8 codes of its shape, per-tensor f32 scale)."""
    scaled, scale = scale_weights(w)
    return encode(scaled, exact_rne), scale


def dequantize(codes: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """(codes, scale) -> float32 weights: decode(codes) * scale (in f32)."""
    values = decode(codes)
    return values if scale == 1.0 else values * _f32(scale)


def fake_quant_sfp8(w: torch.Tensor, exact_rne: bool = False) -> torch.Tensor:
    """dequantize(quantize(w)): the float32 weights an SFP8 export of `w` computes with.

    No gradient here: QAT wraps it in a straight-through estimator."""
    return dequantize(*quantize(w, exact_rne)).reshape(w.shape)


def _f32(x: float) -> float:
    return float(np.float32(x))


class SFP8Linear(nn.Module):
    """y = x W^T with W held as SFP8 codes (1 byte per weight at rest) and one scale; no bias.

    Each call decodes W to the activation dtype (a 256-entry table lookup, then the scale) and runs
    F.linear: the same numbers as `F.linear(x, dequantize(codes, scale))` in float32.
    """

    def __init__(self, codes: torch.Tensor, scale: float = 1.0):
        super().__init__()
        if codes.dtype != torch.uint8 or codes.ndim != 2:
            raise ValueError(f"SFP8Linear takes 2-D uint8 codes (out, in), got {codes.dtype} "
                             f"{tuple(codes.shape)}")
        if not (math.isfinite(scale) and scale > 0):
            raise ValueError(f"the SFP8 scale must be a positive finite number, got {scale!r}")
        self.out_features, self.in_features = codes.shape
        self.scale = _f32(scale)
        self.register_buffer("codes", codes)
        self.register_buffer("table", DECODE_TABLE.to(codes.device), persistent=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear, exact_rne: bool = False) -> "SFP8Linear":
        if linear.bias is not None:
            raise ValueError("SFP8Linear has no bias (Gemma's linears have none)")
        codes, scale = quantize(linear.weight, exact_rne)
        return cls(codes, scale)

    def dequantized(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dequantized weight (out, in) in `dtype`."""
        idx = self.codes.int()
        if self.scale == 1.0:
            return self.table.to(dtype)[idx]  # every SFP8 value is exact in bf16
        return (self.table[idx] * self.scale).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantized(x.dtype))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, scale={self.scale:g}"
