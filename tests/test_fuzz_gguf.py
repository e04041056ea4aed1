"""The GGUF reader under fuzzing: the CI-sized run of fuzz/fuzz_gguf.py, the allocation guards and one
regression test per finding (each reproducer built by the small GGUF writer below), all ending in a
one-line CheckpointError that names the file."""
from __future__ import annotations

import struct
import tracemalloc
from pathlib import Path

import pytest
import torch

import gemmalab
from gemmalab.checkpoints.errors import CheckpointError
from gemmalab.checkpoints.gguf import (config_from_gguf, expected_shapes, open_gguf, read_blocks,
                                       read_tensors)
from gemmalab.checkpoints.gguf_file import GGUFFile
from gemmalab.config import get_config
from gemmalab.model import Gemma3
from gemmalab.quant.gguf_blocks import UnsupportedTensorType
from gemmalab.quant.model import BLOCK_TYPES
from gemmalab.tokenizer import Tokenizer

from .fuzz_helpers import run_fuzz

# ---- a byte-level GGUF writer (ggml docs/gguf.md), for inputs no well-behaved writer makes ---------

U8, I8, U16, I16, U32, I32, F32, BOOL, STR, ARR, U64, I64, F64 = range(13)
_FMT = {U8: "<B", I8: "<b", U16: "<H", I16: "<h", U32: "<I", I32: "<i", F32: "<f", BOOL: "<?",
        U64: "<Q", I64: "<q", F64: "<d"}
Q8_0, F32_T = 8, 0


def s(text: str | bytes) -> bytes:
    raw = text.encode() if isinstance(text, str) else text
    return struct.pack("<Q", len(raw)) + raw


def val(vtype: int, value) -> bytes:
    """A value's encoding; arrays as (element type, [values])."""
    if vtype == STR:
        return s(value)
    if vtype == ARR:
        itype, items = value
        return struct.pack("<IQ", itype, len(items)) + b"".join(val(itype, v) for v in items)
    return struct.pack(_FMT[vtype], value)


def kv(key: str | bytes, vtype: int, value) -> bytes:
    return s(key) + struct.pack("<I", vtype) + val(vtype, value)


def tinfo(name: str, ne: list[int], ggml_type: int = F32_T, offset: int = 0) -> bytes:
    return s(name) + struct.pack(f"<I{len(ne)}QIQ", len(ne), *ne, ggml_type, offset)


def gguf(kvs: list[bytes] = (), tensors: list[bytes] = (), data: bytes = b"", *, n_kv: int | None = None,
         n_tensors: int | None = None, align: int = 32) -> bytes:
    head = b"GGUF" + struct.pack("<IQQ", 3, len(tensors) if n_tensors is None else n_tensors,
                                 len(kvs) if n_kv is None else n_kv)
    body = head + b"".join(kvs) + b"".join(tensors)
    return body + b"\0" * (-len(body) % align) + data if data else body


ARCH = kv("general.architecture", STR, "gemma3")


def write(tmp_path: Path, data: bytes, name: str = "bad.gguf") -> Path:
    p = tmp_path / name
    p.write_bytes(data)
    return p


def refused(path: Path, fn=GGUFFile, match: str | None = None) -> CheckpointError:
    """`fn(path)` raises a one-line CheckpointError naming the file (and matching `match`)."""
    with pytest.raises(CheckpointError, match=match) as info:
        fn(path)
    msg = str(info.value)
    assert msg.strip() and "\n" not in msg and str(path) in msg, msg
    return info.value


# ---- the CI-sized fuzz run -----------------------------------------------------------------------

def test_fuzz_gguf_ci_run(tmp_path):
    stats = run_fuzz("gguf", tmp_path, runs=2000, seconds=45)
    assert stats["outcomes"].get("ok", 0) > 0  # the seeds' mutants still load, not only refusals


# ---- allocation guards: every length and count is checked against the bytes left, first -----------

HUGE = 2**60


@pytest.mark.parametrize("data, match", [
    (b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", HUGE) + b"\0" * 16,
     "needs 1152921504606846976 bytes"),
    (gguf([ARCH, s("k") + struct.pack("<I", STR) + struct.pack("<Q", HUGE)]), "needs 1152921504606846976"),
    (gguf([ARCH, s("k") + struct.pack("<IIQ", ARR, U8, HUGE)]), "array of 1152921504606846976 uint8"),
    (gguf([ARCH, s("k") + struct.pack("<IIQ", ARR, F64, HUGE)]), "array of 1152921504606846976 float64"),
    (gguf([ARCH, s("k") + struct.pack("<IIQ", ARR, STR, HUGE)]), "array of 1152921504606846976 strings"),
    (gguf([ARCH, s("k") + struct.pack("<IIQ", ARR, ARR, HUGE)]), "array of 1152921504606846976 arrays"),
    (gguf([ARCH], n_tensors=HUGE), "implausible counts"),
    (gguf([ARCH], n_kv=HUGE), "implausible counts"),
    (gguf([ARCH], n_kv=900_000), "900000 keys"),  # plausible, but more than the file can hold
    (gguf([ARCH], n_tensors=900_000), "900000 tensor infos"),
    (gguf([ARCH], [tinfo("token_embd.weight", [2**30, 2**30])]), "truncated: tensor 'token_embd.weight'"),
    (gguf([ARCH], [tinfo("w", [2**62, 2**62])]), "more than 2\\^63 elements"),
    (gguf([ARCH], [tinfo("w", [2**63, 0])]), "more than 2\\^63"),
    (gguf([ARCH], [tinfo("w", [32, 2**50], Q8_0)]), "truncated"),
    (gguf([ARCH], [struct.pack("<Q", HUGE) + b"\0" * 24]), "needs 1152921504606846976"),
    (gguf([ARCH], [s("w") + struct.pack("<I", 2**31) + b"\0" * 24]), "2147483648 dimensions"),
])
def test_length_fields_are_checked_before_allocating(tmp_path, data, match):
    path = write(tmp_path, data)
    tracemalloc.start()
    try:
        refused(path, match=match)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20, f"{peak} bytes allocated while refusing a {len(data)}-byte file"


def test_a_huge_length_field_also_fails_cleanly_through_load(tmp_path):
    path = write(tmp_path, gguf([ARCH, s("k") + struct.pack("<IIQ", ARR, STR, HUGE)]), "m.gguf")
    refused(path, gemmalab.load, "array of")
    refused(path, Tokenizer.from_gguf, "array of")


# ---- findings: malformed headers ----------------------------------------------------------------
# Before the fixes each raised the exception named in the test's comment (found by reading the
# parser against the fuzz oracle, then by the fuzzer), or was caught only by a blanket except.

@pytest.mark.parametrize("data, match", [
    # the last string of an array cut inside its 8-byte length: int.from_bytes read the short slice
    (gguf([ARCH, s("tokenizer.ggml.tokens") + struct.pack("<IIQ", ARR, STR, 2) + s("a" * 11) + b"\x05\0\0"]),
     "the length of a string in an array at byte 134 needs 8 bytes, 3 are left"),
    # a nested array 10k deep: RecursionError
    (gguf([ARCH, s("k") + struct.pack("<IIQ", ARR, ARR, 1) + struct.pack("<IQ", ARR, 1) * 10_000]),
     "nested more than"),
    (gguf([ARCH, s("k") + struct.pack("<I", 13) + b"\0" * 16]), "unknown metadata value type 13"),
    (gguf([ARCH, s("k") + struct.pack("<IIQ", ARR, 42, 1) + b"\0" * 16]), "unknown array element type 42"),
    (gguf([ARCH, kv(b"\xff\xfe", U8, 1)]), "not UTF-8"),  # UnicodeDecodeError
    (gguf([ARCH, ARCH]), "duplicate metadata key 'general.architecture'"),
    (gguf([ARCH], [tinfo("w", [4]), tinfo("w", [4])]), "duplicate tensor name 'w'"),
    # general.alignment 0 / a string / not a power of two: ZeroDivisionError, ValueError
    (gguf([ARCH, kv("general.alignment", U32, 0)]), "general.alignment is 0"),
    (gguf([ARCH, kv("general.alignment", STR, "32")]), "general.alignment is '32'"),
    (gguf([ARCH, kv("general.alignment", U32, 48)]), "not a power of two"),
    (gguf([ARCH], [tinfo("w", [4], offset=4)], b"\0" * 64), "offset 4, not a multiple of the alignment 32"),
    # rows that do not hold whole blocks: the byte count rounded down, then dequantize's ValueError
    (gguf([ARCH], [tinfo("token_embd.weight", [33, 1], Q8_0)], b"\0" * 64), "rows of 33 weights"),
    (gguf([ARCH], [tinfo("w", [1, 1, 1, 1, 1])]), "5 dimensions"),
])
def test_malformed_header_is_a_checkpoint_error(tmp_path, data, match):
    refused(write(tmp_path, data), match=match)


def test_a_scalar_tensor_reads(tmp_path):
    """n_dims 0 (a one-element tensor, as llama.cpp reads it) used to index ne[0] of ()."""
    gf = GGUFFile(write(tmp_path, gguf([ARCH], [tinfo("output_norm.weight", [])], struct.pack("<f", 2.0))))
    assert gf.tensors[0].n_bytes == 4
    assert read_tensors(gf)["norm.weight"].item() == 1.0


# ---- findings: metadata of the wrong type or out of range ---------------------------------------

def model_kvs(**over) -> list[bytes]:
    """Metadata of a 1-layer, 32-wide Gemma 3 (each value replaceable by (type, value) or None)."""
    base = {"general.architecture": (STR, "gemma3"), "gemma3.block_count": (U32, 1),
            "gemma3.embedding_length": (U32, 32), "gemma3.attention.head_count": (U32, 2),
            "gemma3.attention.head_count_kv": (U32, 1), "gemma3.attention.key_length": (U32, 16),
            "gemma3.feed_forward_length": (U32, 32), "gemma3.context_length": (U32, 64),
            "gemma3.attention.sliding_window": (U32, 8)}
    base.update({k.replace("__", "."): v for k, v in over.items()})
    return [kv(k, *v) for k, v in base.items() if v is not None]


EMBD = tinfo("token_embd.weight", [32, 4])


@pytest.mark.parametrize("over, match", [
    ({"gemma3__attention__head_count": (U32, 0)}, "head_count is 0"),  # ZeroDivisionError
    ({"gemma3__block_count": (STR, "1")}, "block_count is '1'"),  # TypeError
    ({"gemma3__block_count": (U64, 2**40)}, "block_count is 1099511627776"),  # a 2^40-entry layer list
    ({"gemma3__embedding_length": (U64, 2**40)}, "embedding_length"),  # RuntimeError on the meta device
    ({"gemma3__embedding_length": (F32, 32.0)}, "expected an integer"),
    ({"gemma3__attention__head_count": (U32, 3), "gemma3__attention__head_count_kv": (U32, 2)},
     "3 attention heads are not a multiple of 2"),  # ValueError (Gemma3Config)
    ({"gemma3__attention__head_count_kv": (ARR, (U32, []))}, "empty array"),  # IndexError
    ({"gemma3__attention__head_count_kv": (ARR, (STR, ["x"]))}, "head_count_kv is 'x'"),
    ({"gemma3__attention__layer_norm_rms_epsilon": (F32, float("nan"))}, "expected a number"),
    ({"gemma3__rope__scaling__type": (ARR, (U8, [1, 2]))}, "RoPE scaling"),  # ambiguous truth value
    ({"gemma3__rope__scaling__type": (STR, "linear"), "gemma3__rope__scaling__factor": (STR, "8")},
     "rope.scaling.factor"),  # ValueError from float()
    ({"tokenizer__ggml__bos_token_id": (STR, "2")}, "bos_token_id"),
    ({"general__architecture": (ARR, (U8, [1, 2]))}, "general.architecture"),  # ambiguous truth value
])
def test_bad_metadata_values_are_checkpoint_errors(tmp_path, over, match):
    path = write(tmp_path, gguf(model_kvs(**over), [EMBD], b"\0" * 512))
    refused(path, lambda p: config_from_gguf(GGUFFile(p)), match)


def test_open_gguf_names_a_non_string_architecture(tmp_path):
    path = write(tmp_path, gguf(model_kvs(general__architecture=(ARR, (U8, [1, 2])))))
    refused(path, open_gguf, "holds a \\[1, 2\\] model")


def test_metadata_must_match_the_tensors(tmp_path):
    """A config the tensors do not back (here 2^20 layers, or a width the embedding does not have) is
    refused from arithmetic, before a model is built on the meta device (RuntimeError: storage size
    overflow, or minutes of module construction)."""
    path = write(tmp_path, gguf(model_kvs(gemma3__block_count=(U32, 4096)), [EMBD], b"\0" * 512))
    refused(path, lambda p: config_from_gguf(GGUFFile(p)), "missing 53249 tensors the metadata implies")
    path = write(tmp_path, gguf(model_kvs(), [tinfo("token_embd.weight", [16, 4])], b"\0" * 256))
    refused(path, lambda p: config_from_gguf(GGUFFile(p)), "has shape \\(4, 16\\), the metadata implies \\(4, 32\\)")
    path = write(tmp_path, gguf(model_kvs(), [tinfo("token_embd.weight", [32])], b"\0" * 256))
    refused(path, lambda p: config_from_gguf(GGUFFile(p)), "expected \\[hidden size, vocabulary size\\]")


@pytest.mark.parametrize("preset", ["tiny", "tiny-gemma2", "tiny-27b-style"])
def test_expected_shapes_match_the_model(preset):
    config = get_config(preset)
    with torch.device("meta"):
        model = Gemma3(config)
    assert expected_shapes(config) == {k: tuple(v.shape) for k, v in model.state_dict().items()}


# ---- findings: the tokenizer arrays -------------------------------------------------------------

TOK = [kv("tokenizer.ggml.model", STR, "llama")]


@pytest.mark.parametrize("kvs, match", [
    (TOK + [kv("tokenizer.ggml.tokens", ARR, (U32, [1, 2]))], "tokens is not an array of strings"),
    (TOK + [kv("tokenizer.ggml.tokens", STR, "abc")], "tokens is not an array of strings"),
    (TOK + [kv("tokenizer.ggml.tokens", ARR, (ARR, [(STR, ["a"])]))], "tokens is not an array of strings"),
    (TOK + [kv("tokenizer.ggml.tokens", ARR, (STR, ["a"])), kv("tokenizer.ggml.token_type", ARR, (F32, [1.0]))],
     "token_type is not an array of integers"),  # TypeError in bytearray()
    (TOK + [kv("tokenizer.ggml.tokens", ARR, (STR, ["a"])), kv("tokenizer.ggml.token_type", U32, 1)],
     "token_type is not an array of integers"),  # AttributeError
    (TOK + [kv("tokenizer.ggml.tokens", ARR, (STR, ["a"])), kv("tokenizer.ggml.bos_token_id", STR, "0")],
     "bos_token_id is '0'"),  # TypeError comparing str and int
    ([kv("tokenizer.ggml.model", ARR, (U8, [1])), kv("tokenizer.ggml.tokens", ARR, (STR, ["a"]))],
     "tokenizer.ggml.model="),  # unhashable / ambiguous
    ([kv("tokenizer.ggml.tokens", ARR, (STR, ["a"]))], "has no tokenizer"),  # was a bare ValueError
    (TOK + [kv("tokenizer.ggml.tokens", ARR, (STR, ["a", "b"])), kv("tokenizer.ggml.token_type", ARR, (I32, [1]))],
     "2 tokens but 1 token types"),  # was a bare ValueError
])
def test_bad_tokenizer_metadata_is_a_checkpoint_error(tmp_path, kvs, match):
    refused(write(tmp_path, gguf([ARCH] + kvs)), Tokenizer.from_gguf, match)


# ---- findings: tensor data ----------------------------------------------------------------------

def test_unsupported_tensor_type_is_a_checkpoint_error(tmp_path):
    assert issubclass(UnsupportedTensorType, CheckpointError) and issubclass(UnsupportedTensorType, ValueError)
    path = write(tmp_path, gguf([ARCH], [tinfo("blk.0.attn_q.weight", [256, 1], 16)], b"\0" * 66))  # IQ2_XXS
    refused(path, lambda p: read_tensors(GGUFFile(p), p), "IQ2_XXS")


@pytest.mark.parametrize("ne, rows", [([32, 0], (0, 34)), ([0, 4], (4, 0))])
def test_read_blocks_of_an_empty_matrix(tmp_path, ne, rows):
    """A 2-D kernel-type matrix with a 0 dimension (legal in GGUF): 0 rows divided its byte count by 0
    (ZeroDivisionError); 0 columns (fuzzer, crash-683d79d0) reached read_into, whose memoryview cast
    refuses a 0 in the shape (TypeError). Both read as empty; gemmalab.load then reports the shape."""
    path = write(tmp_path, gguf([ARCH], [tinfo("blk.0.attn_q.weight", ne, Q8_0)], b"\0" * 32))
    blocks, _ = read_blocks(GGUFFile(path), path, BLOCK_TYPES)
    assert tuple(blocks["layers.0.self_attn.q_proj.weight"][0].shape) == rows


def test_load_of_bad_files_ends_in_checkpoint_error(tmp_path):
    """gemmalab.load, the user's entry point, on damaged files: one line, CheckpointError."""
    cases = [gguf([ARCH, kv("general.alignment", U32, 0)]),
             gguf(model_kvs(gemma3__attention__head_count=(U32, 0)), [EMBD], b"\0" * 512),
             gguf(model_kvs(gemma3__block_count=(U32, 4096)), [EMBD], b"\0" * 512),
             gguf(model_kvs() + TOK + [kv("tokenizer.ggml.tokens", ARR, (U32, [1]))], [EMBD], b"\0" * 512),
             gguf(model_kvs(), [EMBD], b"\0" * 512)]  # consistent metadata, no tokenizer
    for i, data in enumerate(cases):
        refused(write(tmp_path, data, f"m{i}.gguf"), gemmalab.load)
