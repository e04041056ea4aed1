"""Fuzz the GGUF reader: container, metadata, tensor directory, tokenizer, config and tensor data.

Every stage a user's `.gguf` goes through runs on the fuzzed bytes, each one even when an earlier one
refused the file (so a broken tokenizer does not hide the tensor reader):
  GGUFFile (header, metadata values of every type, nested arrays, tensor infos, alignment, bounds)
  -> config_from_gguf -> Tokenizer.from_gguf -> every tensor's bytes through gguf_blocks.dequantize
  -> read_tensors / read_blocks -> gemmalab.load (fp32 and native) when all of those accepted it.
The documented error is CheckpointError (UnsupportedTensorType is one) with a one-line message.
"""
from __future__ import annotations

import sys
import zlib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _harness import Finding, Target, instrumented, main, write  # noqa: E402

with instrumented():
    import gemmalab
    from gemmalab.checkpoints.errors import CheckpointError
    from gemmalab.checkpoints.gguf import config_from_gguf, gguf_to_ours, read_blocks, read_tensors
    from gemmalab.checkpoints.gguf_file import GGUFFile
    from gemmalab.quant.gguf_blocks import SUPPORTED_TYPES, dequantize
    from gemmalab.quant.model import BLOCK_TYPES
    from gemmalab.tokenizer import Tokenizer

EXPECTED = (CheckpointError,)
_LOAD_MODES = ("fp32", "native")
# gemmalab.load builds a model (~8 ms, 4x the readers' time); it runs on one accepted input in
# _LOAD_EVERY (chosen by the input's CRC, so a reproducer replays the same way).
_LOAD_EVERY = 6


def _stage(errors: list[BaseException], fn, *args):
    """Run one stage; a documented error is kept (the first one is re-raised at the end), a message
    that is empty or spans lines is a finding at once, anything else propagates (a finding)."""
    try:
        return fn(*args)
    except EXPECTED as e:
        msg = str(e).strip()
        if not msg or "\n" in msg:
            raise Finding(f"gguf: {type(e).__name__} without a one-line message: {str(e)!r}") from e
        errors.append(e)
        return None


def _dequantize_others(gf: GGUFFile) -> None:
    """The tensors read_tensors skips (names we do not use) of a type we decode: the directory's
    bounds must hold for every entry, whatever its name."""
    for t in gf.tensors:
        if t.ggml_type in SUPPORTED_TYPES and gguf_to_ours(t.name) is None:
            dequantize(gf.data(t), t.ggml_type, t.shape)


def one(data: bytes, scratch: Path) -> None:
    path = write(scratch, "m.gguf", data)
    errors: list[BaseException] = []
    gf = _stage(errors, GGUFFile, path)
    if gf is not None:
        _stage(errors, config_from_gguf, gf)
        _stage(errors, Tokenizer.from_gguf, gf)
        _stage(errors, _dequantize_others, gf)
        _stage(errors, read_tensors, gf, path)
        if any(t.ggml_type in BLOCK_TYPES for t in gf.tensors):  # else the same work as read_tensors
            _stage(errors, read_blocks, gf, path, BLOCK_TYPES)
        pick = zlib.crc32(data) % (_LOAD_EVERY * len(_LOAD_MODES))
        if not errors and pick < len(_LOAD_MODES):  # the whole of gemmalab.load, on a share of the
            _stage(errors, lambda: gemmalab.load(path, mode=_LOAD_MODES[pick]))  # files all accepted
        del gf
    if errors:
        raise errors[0]


# ---- seeds: small real files ---------------------------------------------------------------------

def _tiny_model_files(d: Path) -> list[Path]:
    """A 1-layer Gemma 3 (and a 2-layer Gemma 2) on the synthetic 290-piece vocabulary, saved by our
    exporter in f32, q8_0 and q4_0: every stage of load runs on them."""
    import torch

    from gemmalab.checkpoints.export import save_gguf
    from gemmalab.config import get_config
    from gemmalab.model import Gemma3
    from tests.synthetic import write_tokenizer

    tok = Tokenizer.from_gguf(write_tokenizer(d / "vocab.gguf"))
    out = [d / "vocab.gguf"]
    small = dict(vocab_size=tok.vocab_size, hidden_size=32, num_attention_heads=2, num_key_value_heads=1,
                 head_dim=16, query_pre_attn_scalar=16, intermediate_size=32, sliding_window=8)
    for preset, layers, dtypes in (("tiny", 1, ("f32", "q8_0", "q4_0")), ("tiny-gemma2", 2, ("f16",))):
        torch.manual_seed(0)
        model = Gemma3(get_config(preset).replace(num_hidden_layers=layers, **small))
        for p in model.parameters():
            torch.nn.init.normal_(p, std=0.2)
        for dtype in dtypes:
            out.append(save_gguf(model, tok, d / f"{preset}-{dtype}.gguf", dtype=dtype, overwrite=True))
    return out


def _metadata_file(d: Path) -> Path:
    """Every metadata value type (scalars, strings, arrays of each, nested arrays), an alignment of
    64 and one small tensor of every ggml type gguf_blocks decodes (plus one it does not)."""
    import gguf
    import numpy as np

    w = gguf.GGUFWriter(str(d / "meta.gguf"), "gemma3")
    w.add_custom_alignment(64)
    w.add_uint8("t.u8", 7)
    w.add_int8("t.i8", -7)
    w.add_uint16("t.u16", 700)
    w.add_int16("t.i16", -700)
    w.add_int32("t.i32", -70000)
    w.add_float32("t.f32", 1.5)
    w.add_bool("t.bool", True)
    w.add_uint64("t.u64", 2**40)
    w.add_int64("t.i64", -(2**40))
    w.add_float64("t.f64", 2.5)
    w.add_string("t.str", "héllo")
    w.add_array("t.arr_i32", [1, 2, 3])
    w.add_array("t.arr_f32", [1.0, 2.0])
    w.add_array("t.arr_str", ["a", "bc", ""])
    w.add_array("t.arr_nested", [[1, 2], [3]])
    w.add_array("t.arr_empty", [])
    rng = np.random.default_rng(0)
    q = gguf.GGMLQuantizationType
    names = ["blk.0.attn_q.weight", "blk.0.attn_k.weight", "blk.0.attn_v.weight", "blk.0.attn_output.weight",
             "blk.0.ffn_gate.weight", "blk.0.ffn_up.weight", "blk.0.ffn_down.weight", "token_embd.weight",
             "output_norm.weight", "blk.0.attn_norm.weight", "blk.0.ffn_norm.weight", "blk.1.attn_q.weight"]
    kinds = [q.Q4_0, q.Q4_1, q.Q5_0, q.Q5_1, q.Q8_0, q.Q4_K, q.Q5_K, q.Q6_K, q.F32, q.F16, q.BF16, q.IQ2_XXS]
    for name, kind in zip(names, kinds):
        block, size = gguf.GGML_QUANT_SIZES[kind]
        cols = 256 if block > 1 else 8
        if kind in (q.F32, q.F16, q.BF16):
            arr = rng.standard_normal((2, cols)).astype(np.float32 if kind == q.F32 else np.float16)
            raw = arr if kind != q.BF16 else arr.view(np.uint8).reshape(2, -1)
            w.add_tensor(name, raw, raw_dtype=None if kind != q.BF16 else q.BF16)
            continue
        raw = rng.integers(0, 256, (2, cols // block * size), dtype=np.uint8)
        raw[:, :2] = np.frombuffer(np.float16(0.01).tobytes(), np.uint8)  # a sane d
        w.add_tensor(name, raw, raw_dtype=kind)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return d / "meta.gguf"


def seeds(d: Path) -> list[bytes]:
    files = _tiny_model_files(d) + [_metadata_file(d)]
    return [p.read_bytes() for p in files]


TARGET = Target("gguf", one, EXPECTED, seeds, notes=(
    "GGUFFile header/metadata/tensor directory, config_from_gguf, Tokenizer.from_gguf, dequantize of "
    "every tensor, read_tensors, read_blocks, and gemmalab.load (fp32, native) on files all of those "
    "accept; seeds: tiny Gemma 3 f32/q8_0/q4_0 and Gemma 2 f16 exports, a vocabulary-only file, a file "
    "with every metadata type and one tensor of each ggml type"))

if __name__ == "__main__":
    main(TARGET)
