"""The torch GGUF dequantizer must be bit-identical to gguf-py's NumPy reference, `gguf.quants.dequantize`."""
from __future__ import annotations

import collections

import numpy as np
import pytest
import torch

import gguf  # noqa: E402
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as GGMLType  # noqa: E402
from gguf.quants import dequantize as reference_dequantize  # noqa: E402

from gemmalab.quant.gguf_blocks import (  # noqa: E402
    SUPPORTED_TYPES, UnsupportedTensorType, block_size_bytes, dequantize)

# Byte offsets of the fp16 fields (d, dmin/m) inside one block: random bytes there could be NaN/inf,
# whose payloads NumPy and torch need not propagate identically.
FP16_FIELDS = {
    GGMLType.Q4_0: (0,), GGMLType.Q4_1: (0, 2), GGMLType.Q5_0: (0,), GGMLType.Q5_1: (0, 2),
    GGMLType.Q8_0: (0,), GGMLType.Q4_K: (0, 2), GGMLType.Q5_K: (0, 2), GGMLType.Q6_K: (208,),
}


def finite_bits(rng, n: int, bits: int, exponent_mask: int) -> np.ndarray:
    """Random IEEE bit patterns (any sign, subnormals included) with the all-ones exponent avoided."""
    dtype = np.uint16 if bits == 16 else np.uint32
    x = rng.integers(0, 1 << bits, n, dtype=dtype)
    top_exponent_bit = dtype(1 << (bits - 2))
    return np.where((x & exponent_mask) == exponent_mask, x & ~top_exponent_bit, x).astype(dtype)


def random_tensor_bytes(qtype: GGMLType, rows: int, cols: int, seed: int = 0) -> np.ndarray:
    """(rows, bytes per row) uint8 of random but finite blocks of `qtype`."""
    rng = np.random.default_rng(seed)
    weights_per_block, bytes_per_block = GGML_QUANT_SIZES[qtype]
    n_blocks = rows * cols // weights_per_block
    if qtype == GGMLType.F32:
        blocks = finite_bits(rng, n_blocks, 32, 0x7F800000).view(np.uint8)
    elif qtype == GGMLType.F16:
        blocks = finite_bits(rng, n_blocks, 16, 0x7C00).view(np.uint8)
    elif qtype == GGMLType.BF16:
        blocks = finite_bits(rng, n_blocks, 16, 0x7F80).view(np.uint8)
    else:
        blocks = rng.integers(0, 256, (n_blocks, bytes_per_block), dtype=np.uint8)
        for offset in FP16_FIELDS[qtype]:
            scales = finite_bits(rng, n_blocks, 16, 0x7C00)
            blocks[:, offset:offset + 2] = scales.view(np.uint8).reshape(-1, 2)
    return blocks.reshape(rows, -1)


def assert_bit_identical(ours: torch.Tensor, reference: np.ndarray) -> None:
    assert ours.dtype == torch.float32 and ours.is_contiguous()
    assert tuple(ours.shape) == reference.shape
    # compare bit patterns so that -0.0 vs 0.0 would count as a difference too
    assert np.array_equal(ours.numpy().view(np.uint32), reference.astype(np.float32).view(np.uint32))


def test_supported_types_and_block_sizes_match_gguf():
    names = {GGMLType(t).name for t in SUPPORTED_TYPES}
    assert names == {"F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K"}
    for qtype in SUPPORTED_TYPES:
        assert block_size_bytes(qtype) == GGML_QUANT_SIZES[GGMLType(qtype)]


@pytest.mark.parametrize("qtype", sorted(SUPPORTED_TYPES), ids=lambda t: GGMLType(t).name)
def test_random_blocks_bit_exact(qtype):
    qtype = GGMLType(qtype)
    weights_per_block, _ = GGML_QUANT_SIZES[qtype]
    rows, cols = 6, 64 * weights_per_block  # 384 blocks
    raw = random_tensor_bytes(qtype, rows, cols, seed=int(qtype))
    reference = reference_dequantize(raw, qtype)
    assert_bit_identical(dequantize(raw, qtype, (rows, cols)), reference)
    # other input forms: a torch uint8 tensor, an int type id, and 1-D / 3-D shapes over the same bytes
    assert_bit_identical(dequantize(torch.from_numpy(raw), int(qtype), (rows, cols)), reference)
    as_3d = (rows // 2, 2, cols)
    assert_bit_identical(dequantize(raw.reshape(-1), qtype, as_3d), reference.reshape(as_3d))


def test_typed_numpy_input_is_read_as_bytes():
    values = np.random.default_rng(1).standard_normal((4, 8)).astype(np.float32)
    assert torch.equal(dequantize(values, GGMLType.F32, (4, 8)), torch.from_numpy(values))
    halves = values.astype(np.float16)
    assert torch.equal(dequantize(halves, GGMLType.F16, (4, 8)), torch.from_numpy(halves.astype(np.float32)))


def test_chunked_decoding_matches_reference(monkeypatch):
    # Force many small chunks, including a ragged last one, to check that chunk boundaries are seamless.
    import gemmalab.quant.gguf_blocks as blocks_module
    monkeypatch.setattr(blocks_module, "_CHUNK_WEIGHTS", 3 * 256)
    raw = random_tensor_bytes(GGMLType.Q4_K, 10, 1024, seed=7)
    assert_bit_identical(dequantize(raw, GGMLType.Q4_K, (10, 1024)), reference_dequantize(raw, GGMLType.Q4_K))


def test_unsupported_type_is_named():
    with pytest.raises(UnsupportedTensorType, match="IQ2_XXS") as info:
        dequantize(np.zeros(66, np.uint8), GGMLType.IQ2_XXS, (256,))
    assert "Q4_K" in str(info.value)  # the message lists what is supported
    assert isinstance(info.value, ValueError)
    with pytest.raises(UnsupportedTensorType):
        block_size_bytes(GGMLType.Q2_K)


def test_mismatched_byte_count_raises():
    raw = random_tensor_bytes(GGMLType.Q8_0, 4, 64)
    with pytest.raises(ValueError, match="bytes"):
        dequantize(raw.reshape(-1)[:-1], GGMLType.Q8_0, (4, 64))  # truncated
    with pytest.raises(ValueError, match="bytes"):
        dequantize(raw, GGMLType.Q8_0, (5, 64))  # shape wants more blocks
    with pytest.raises(ValueError, match="multiple of 32"):
        dequantize(raw, GGMLType.Q8_0, (8, 34))  # rows cannot hold whole blocks


# --- the real Gemma 3 270M Q4_K_M file -------------------------------------------------------------------

@pytest.fixture(scope="module")
def reader():
    from gemmalab._paths import default_model_path
    return gguf.GGUFReader(default_model_path())


def torch_shape(tensor) -> tuple[int, ...]:
    # GGUFReader's `shape` is GGUF's `ne` (contiguous axis first); PyTorch lists it last.
    return tuple(reversed([int(n) for n in tensor.shape]))


@pytest.mark.slow
def test_real_file_tensors_bit_exact(reader):
    types_seen = collections.Counter()
    for tensor in reader.tensors:
        types_seen[tensor.tensor_type.name] += 1
        shape = torch_shape(tensor)
        raw = np.asarray(tensor.data)
        if tensor.name == "token_embd.weight":
            # 262144 x 640: compare whole-row slices of the bytes (start, middle, end) instead of all of it
            rows = raw.view(np.uint8).reshape(shape[0], -1)
            for start in (0, shape[0] // 2, shape[0] - 2048):
                part = rows[start:start + 2048]
                assert_bit_identical(dequantize(part, tensor.tensor_type, (2048, shape[1])),
                                     reference_dequantize(part, tensor.tensor_type))
            continue
        reference = reference_dequantize(raw, tensor.tensor_type)
        assert_bit_identical(dequantize(raw.view(np.uint8), tensor.tensor_type, shape), reference)
    # Q4_K_M mixes block types; make sure the ones this model ships were all exercised.
    assert {"F32", "Q4_K", "Q6_K", "Q8_0"} <= set(types_seen)
