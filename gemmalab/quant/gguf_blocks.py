"""Dequantize GGUF tensor data with vectorised PyTorch ops.

A GGUF tensor is a flat run of fixed-size blocks laid along the contiguous (last PyTorch) axis. Each block
holds `weights_per_block` weights in `bytes_per_block` bytes; all fields are little-endian and `d`/`dmin`
are IEEE fp16. Layouts, in file order (structs in ggml-common.h, reference decoders in ggml-quants.c):

    Q4_0  32 w / 18 B: d, qs[16]            w = d*(nibble - 8); low nibbles are w[0:16], high w[16:32]
    Q4_1  32 w / 20 B: d, m, qs[16]         w = d*nibble + m
    Q5_0  32 w / 22 B: d, qh[4], qs[16]     5th bit of w[j] is bit j of the u32 qh; w = d*(q - 16)
    Q5_1  32 w / 24 B: d, m, qh[4], qs[16]  w = d*q + m
    Q8_0  32 w / 34 B: d, qs:int8[32]       w = d*qs
    Q4_K 256 w /144 B: d, dmin, scales[12] (8 six-bit scales + 8 six-bit mins), qs[128];
                       each 32-byte run of qs holds two sub-blocks (low nibbles, then high nibbles);
                       w = (d*sc)*q - (dmin*m)
    Q5_K 256 w /176 B: as Q4_K plus qh[32] before qs; bit i of qh[l] is the 5th bit of sub-block i
    Q6_K 256 w /210 B: ql[128] (low 4 bits), qh[64] (high 2 bits), scales:int8[16], d (d is last);
                       w = (d*scale)*(q - 32) over 16 sub-blocks of 16

The arithmetic mirrors the NumPy port in gguf-py (`gguf/quants.py`, `dequantize_blocks`) operation for
operation in float32, so the results are bit-identical to `gguf.quants.dequantize`.
"""
from __future__ import annotations

import math
import warnings

import numpy as np
import torch
from gguf import GGMLQuantizationType as GGMLType

from ..checkpoints.errors import CheckpointError

__all__ = ["UnsupportedTensorType", "SUPPORTED_TYPES", "block_size_bytes", "dequantize"]


class UnsupportedTensorType(CheckpointError):
    """Raised for a ggml tensor type this module cannot dequantize: a model file gemmalab cannot read,
    so a CheckpointError (and, as before, a ValueError) that the CLI prints as one line."""


# (weights per block, bytes per block); plain float types count as one-weight blocks.
_LAYOUTS: dict[int, tuple[int, int]] = {
    GGMLType.F32: (1, 4),
    GGMLType.F16: (1, 2),
    GGMLType.BF16: (1, 2),
    GGMLType.Q4_0: (32, 18),
    GGMLType.Q4_1: (32, 20),
    GGMLType.Q5_0: (32, 22),
    GGMLType.Q5_1: (32, 24),
    GGMLType.Q8_0: (32, 34),
    GGMLType.Q4_K: (256, 144),
    GGMLType.Q5_K: (256, 176),
    GGMLType.Q6_K: (256, 210),
}
SUPPORTED_TYPES: frozenset[int] = frozenset(int(t) for t in _LAYOUTS)

# Blocks are decoded a chunk at a time so that the integer/float temporaries stay a few MiB instead of
# several times the size of the output; much smaller chunks pay per-op overhead (measured on 2 cores).
_CHUNK_WEIGHTS = 1 << 20


def _type_name(qtype: int) -> str:
    try:
        return GGMLType(qtype).name
    except ValueError:
        return f"ggml type {qtype}"


def _check_type(qtype) -> int:
    qtype = int(qtype)
    if qtype not in SUPPORTED_TYPES:
        supported = ", ".join(_type_name(t) for t in sorted(SUPPORTED_TYPES))
        raise UnsupportedTensorType(
            f"cannot dequantize GGUF tensor type {_type_name(qtype)} (id {qtype}); supported: {supported}")
    return qtype


def block_size_bytes(qtype) -> tuple[int, int]:
    """(weights per block, bytes per block) of a supported ggml type."""
    return _LAYOUTS[_check_type(qtype)]


# --- field helpers -------------------------------------------------------------------------------------

def _fp16_field(blocks: torch.Tensor, offset: int) -> torch.Tensor:
    """The fp16 at byte `offset` of every block, as float32 of shape (n, 1)."""
    return blocks[:, offset:offset + 2].contiguous().view(torch.float16).float()


def _shifts(*amounts: int, device) -> torch.Tensor:
    return torch.tensor(amounts, dtype=torch.uint8, device=device)


def _nibbles(packed: torch.Tensor) -> torch.Tensor:
    """(..., k) bytes -> (..., 2, k): low nibbles first, then high nibbles (ggml's order)."""
    return torch.stack((packed & 0x0F, packed >> 4), dim=-2)


def _bits_of_u32(qh: torch.Tensor) -> torch.Tensor:
    """(n, 4) little-endian u32 -> (n, 32) of its bits, bit j at index j."""
    bits = (qh.unsqueeze(-1) >> _shifts(*range(8), device=qh.device)) & 1
    return bits.reshape(qh.shape[0], 32)


def _k_scales_mins(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Unpack Q4_K/Q5_K's 12 bytes into 8 six-bit scales and 8 six-bit mins (get_scale_min_k4)."""
    lo_sc, lo_m, hi = scales.reshape(-1, 3, 4).unbind(1)
    sc = torch.cat((lo_sc & 0x3F, (hi & 0x0F) | ((lo_sc >> 2) & 0x30)), dim=-1)
    mins = torch.cat((lo_m & 0x3F, (hi >> 4) | ((lo_m >> 2) & 0x30)), dim=-1)
    return sc, mins


# --- block decoders: (n, bytes_per_block) uint8 -> write (n, weights_per_block) float32 into `out` ------
# Integer codes convert to float32 exactly, so only the float ops' order matters for bit-exactness.

def _f32(b, out):
    out.copy_(b.view(torch.float32))


def _f16(b, out):
    out.copy_(b.view(torch.float16))


def _bf16(b, out):
    out.copy_(b.view(torch.bfloat16))


def _q4_0(b, out):
    q = _nibbles(b[:, 2:]).reshape(-1, 32).to(torch.int8) - 8
    torch.mul(_fp16_field(b, 0), q, out=out)


def _q4_1(b, out):
    q = _nibbles(b[:, 4:]).reshape(-1, 32)
    torch.add(_fp16_field(b, 0) * q, _fp16_field(b, 2), out=out)


def _q5(b, qh_offset):
    return _nibbles(b[:, qh_offset + 4:]).reshape(-1, 32) | (_bits_of_u32(b[:, qh_offset:qh_offset + 4]) << 4)


def _q5_0(b, out):
    torch.mul(_fp16_field(b, 0), _q5(b, 2).to(torch.int8) - 16, out=out)


def _q5_1(b, out):
    torch.add(_fp16_field(b, 0) * _q5(b, 4), _fp16_field(b, 2), out=out)


def _q8_0(b, out):
    torch.mul(b[:, 2:].view(torch.int8), _fp16_field(b, 0), out=out)


def _k_quant(b, out, q):
    """Shared tail of Q4_K/Q5_K: w = (d*sc)*q - (dmin*m) over 8 sub-blocks of 32."""
    sc, mins = _k_scales_mins(b[:, 4:16])
    scale = (_fp16_field(b, 0) * sc).unsqueeze(-1)
    offset = (_fp16_field(b, 2) * mins).unsqueeze(-1)
    torch.sub(scale * q, offset, out=out.view(-1, 8, 32))


def _q4_k(b, out):
    _k_quant(b, out, _nibbles(b[:, 16:].reshape(-1, 4, 32)).reshape(-1, 8, 32))


def _q5_k(b, out):
    low = _nibbles(b[:, 48:].reshape(-1, 4, 32)).reshape(-1, 8, 32)
    high = (b[:, 16:48].unsqueeze(1) >> _shifts(*range(8), device=b.device).view(1, 8, 1)) & 1
    _k_quant(b, out, low | (high << 4))


def _q6_k(b, out):
    scale = (_fp16_field(b, 208) * b[:, 192:208].view(torch.int8)).unsqueeze(-1)
    low = _nibbles(b[:, :128].reshape(-1, 2, 64)).reshape(-1, 8, 32)
    high = (b[:, 128:192].reshape(-1, 2, 1, 32) >> _shifts(0, 2, 4, 6, device=b.device).view(1, 1, 4, 1)) & 3
    q = (low | (high.reshape(-1, 8, 32) << 4)).to(torch.int8) - 32
    torch.mul(scale, q.view(-1, 16, 16), out=out.view(-1, 16, 16))


_DECODERS = {
    GGMLType.F32: _f32, GGMLType.F16: _f16, GGMLType.BF16: _bf16,
    GGMLType.Q4_0: _q4_0, GGMLType.Q4_1: _q4_1, GGMLType.Q5_0: _q5_0, GGMLType.Q5_1: _q5_1,
    GGMLType.Q8_0: _q8_0, GGMLType.Q4_K: _q4_k, GGMLType.Q5_K: _q5_k, GGMLType.Q6_K: _q6_k,
}


# --- public entry point --------------------------------------------------------------------------------

def _as_flat_bytes(raw) -> torch.Tensor:
    """View any tensor/array/buffer as flat uint8 without copying (unless it is non-contiguous)."""
    if isinstance(raw, torch.Tensor):
        return raw.contiguous().reshape(-1).view(torch.uint8)
    if isinstance(raw, (bytes, bytearray, memoryview)):
        raw = np.frombuffer(raw, dtype=np.uint8)
    array = np.ascontiguousarray(raw).reshape(-1).view(np.uint8)
    with warnings.catch_warnings():
        # GGUFReader hands out read-only memmaps; we only ever read from them.
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(array)


def dequantize(raw, qtype, shape) -> torch.Tensor:
    """Decode one GGUF tensor's bytes into a new contiguous float32 tensor of PyTorch `shape`.

    `raw` is the tensor data (torch tensor, NumPy array or buffer of any dtype, read as flat bytes);
    `qtype` a ggml type id or `gguf.GGMLQuantizationType`; `shape` the PyTorch shape, i.e. GGUF's `ne`
    reversed, with blocks running along the last axis. Bit-identical to `gguf.quants.dequantize`.
    """
    qtype = _check_type(qtype)
    shape = tuple(int(s) for s in shape)
    weights_per_block, bytes_per_block = _LAYOUTS[qtype]
    name = _type_name(qtype)
    row = shape[-1] if shape else 1
    if any(s < 0 for s in shape) or row % weights_per_block:
        raise ValueError(f"{name} tensor shape {shape}: the last dimension must be a multiple of "
                         f"{weights_per_block}")
    data = _as_flat_bytes(raw)
    n_blocks = math.prod(shape) // weights_per_block
    if data.numel() != n_blocks * bytes_per_block:
        raise ValueError(f"{name} tensor of shape {shape} needs {n_blocks * bytes_per_block} bytes "
                         f"but got {data.numel()} (truncated or mismatched data)")
    blocks = data.view(n_blocks, bytes_per_block)
    out = torch.empty((n_blocks, weights_per_block), dtype=torch.float32, device=data.device)
    decode = _DECODERS[qtype]
    step = max(1, _CHUNK_WEIGHTS // weights_per_block)
    for start in range(0, n_blocks, step):
        decode(blocks[start:start + step], out[start:start + step])
    return out.view(shape)
