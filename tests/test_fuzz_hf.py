"""Hugging Face directories under fuzzing: the CI-sized runs of fuzz/fuzz_hf_config.py and
fuzz/fuzz_safetensors.py, and each reproducer they (or their review) found, as a regression test:
documented CheckpointError, one line, naming the file."""
import json
import struct
import tracemalloc

import pytest
import torch
from safetensors.torch import save

from gemmalab.checkpoints import CheckpointError
from gemmalab.checkpoints.hf import (config_from_hf, config_to_hf, has_vision, read_hf_config,
                                     read_hf_dir, read_safetensors_header, tensor_dtypes)
from gemmalab.config import get_config

from .fuzz_helpers import run_fuzz


def test_fuzz_hf_config(tmp_path):
    stats = run_fuzz("hf_config", tmp_path, runs=2000, seconds=45)
    assert set(stats["outcomes"]) <= {"ok", "CheckpointError"}


def test_fuzz_safetensors(tmp_path):
    stats = run_fuzz("safetensors", tmp_path, runs=2000, seconds=45)
    assert set(stats["outcomes"]) <= {"ok", "CheckpointError"}


def refused(fn, *args, match: str = "") -> str:
    """The CheckpointError message of fn(*args), checked to be one non-empty line."""
    with pytest.raises(CheckpointError, match=match) as e:
        fn(*args)
    msg = str(e.value)
    assert msg.strip() and "\n" not in msg, msg
    return msg


# ---- config.json ---------------------------------------------------------------------------------

TEXT = {"model_type": "gemma3_text"}
VISION = {"model_type": "gemma3", "text_config": {}, "vision_config": {"model_type": "siglip_vision_model"}}


@pytest.mark.parametrize("raw,match", [
    (b'{"model_type": "gemma3_text\xff"}', "not UTF-8"),  # was UnicodeDecodeError
    (b"[" * 100_000, "nests too deeply"),  # was RecursionError
    (b'{"vocab_size": ' + b"9" * 5000 + b"}", "not a valid JSON file"),  # was ValueError (int digits)
    (b"[1]", "JSON array, not an object"),  # was AttributeError
    (json.dumps(dict(TEXT, num_key_value_heads=0)).encode(), "num_key_value_heads"),  # ZeroDivisionError
    (json.dumps(dict(TEXT, sliding_window_pattern=0)).encode(), "sliding_window_pattern"),  # ditto
    (json.dumps(dict(TEXT, num_hidden_layers=10**9)).encode(), "num_hidden_layers"),  # 8 GB tuple
    (json.dumps(dict(TEXT, num_hidden_layers=1, layer_types=[{}])).encode(), "layer_types"),
    (json.dumps(dict(TEXT, num_hidden_layers=2, layer_types=["full_attention"])).encode(), "layer_types"),
    (json.dumps(dict(TEXT, eos_token_id=[])).encode(), "eos_token_id"),  # was IndexError
    (json.dumps(dict(TEXT, hidden_size="64")).encode(), "hidden_size"),
    (json.dumps(dict(TEXT, rope_theta="x")).encode(), "rope_theta"),  # was ValueError
    (json.dumps(dict(TEXT, rope_theta=10**400)).encode(), "rope_theta"),  # OverflowError in float()
    (b'{"model_type": "gemma3_text", "rms_norm_eps": NaN}', "rms_norm_eps"),
    (json.dumps(dict(TEXT, rope_parameters=[1])).encode(), "rope_parameters"),  # AttributeError
    (json.dumps(dict(TEXT, rope_scaling={"rope_type": "yarn"})).encode(), "RoPE type"),
    (json.dumps({"model_type": "gemma3", "text_config": [1]}).encode(), "text_config"),
    (json.dumps(dict(VISION, vision_config=[1])).encode(), "vision_config"),  # AttributeError
    (json.dumps(dict(VISION, vision_config={"patch_size": 0})).encode(), "patch_size"),  # ZeroDivision
    (json.dumps(dict(VISION, mm_tokens_per_image=2.5)).encode(), "mm_tokens_per_image"),
    (json.dumps(dict(VISION, mm_tokens_per_image=15)).encode(), "mm_tokens_per_image"),
    (json.dumps(dict(VISION, boi_token_index=-1)).encode(), "boi_token_index"),
], ids=lambda x: x if isinstance(x, str) else "")
def test_bad_config_json(tmp_path, raw, match):
    (tmp_path / "config.json").write_bytes(raw)
    msg = refused(read_hf_config, tmp_path, True, match=match)
    assert "config.json" in msg
    assert has_vision(tmp_path) in (True, False)  # never raises


def test_valid_configs_read_as_before():
    for name in ("tiny", "tiny-27b-style", "tiny-gemma2"):
        assert config_from_hf(config_to_hf(get_config(name)), name) == get_config(name)
    floats = dict(config_to_hf(get_config("tiny")), hidden_size=64.0, eos_token_id=[1, 106])
    assert config_from_hf(floats, "tiny") == get_config("tiny")


# ---- safetensors ---------------------------------------------------------------------------------

def hf_dir(tmp_path, weights: bytes | None = None):
    (tmp_path / "config.json").write_text(json.dumps(config_to_hf(get_config("tiny"))))
    if weights is not None:
        (tmp_path / "model.safetensors").write_bytes(weights)
    return tmp_path


def raw_header(raw: bytes, data: bytes = b"") -> bytes:
    """A safetensors file: 8-byte little-endian header length, header, data (safetensors docs)."""
    return struct.pack("<Q", len(raw)) + raw + data


def with_header(header: dict, data: bytes = b"") -> bytes:
    return raw_header(json.dumps(header).encode(), data)


def test_header_length_beyond_the_file_is_refused_before_allocating(tmp_path):
    path = hf_dir(tmp_path, struct.pack("<Q", 2**60) + b'{"a": 1}')
    tracemalloc.start()
    msg = refused(read_hf_dir, path, match="header length 1,152,921,504,606,846,976 exceeds the file")
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 2**20 and "model.safetensors" in msg
    refused(tensor_dtypes, path, match="exceeds the file")


F32 = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}


@pytest.mark.parametrize("weights,match", [
    (b"\x01\x02", "shorter than the 8-byte header length"),
    (struct.pack("<Q", 4) + b"[1] ", "not a JSON object"),
    (struct.pack("<Q", 4) + b"{\xff\xfe}", "not UTF-8"),
    (struct.pack("<Q", 5) + b"{1:2}", "not valid JSON"),
    (raw_header(b'{"a":' * 100_000 + b"1" + b"}" * 100_000), "nests too deeply"),
    (with_header({"a": dict(F32, dtype="F4")}, bytes(8)), "dtype 'F4'"),
    (with_header({"a": dict(F32, shape=[-2])}, bytes(8)), "shape"),
    (with_header({"a": dict(F32, shape=[True, 2])}, bytes(8)), "shape"),
    (with_header({"a": dict(F32, shape=[2**62, 2**62, 0])}, bytes(8)), "larger than"),
    (with_header({"a": dict(F32, shape=[3])}, bytes(8)), "takes 12 bytes"),
    (with_header({"a": dict(F32, data_offsets=[0, 2**64])}, bytes(8)), "data_offsets"),
    (with_header({"a": dict(F32, data_offsets=[8, 0])}, bytes(8)), "data_offsets"),
    (with_header({"a": F32}, bytes(12)), "cover 8 of the 12"),
    (with_header({"a": F32, "b": F32}, bytes(8)), "without holes or overlaps"),  # overlap
    (with_header({"a": dict(F32, data_offsets=[4, 12])}, bytes(12)), "without holes"),  # hole
    (with_header({"a": F32, "__metadata__": {"k": 1}}, bytes(8)), "__metadata__"),
    (with_header({"a": [1]}, bytes(8)), "not an object"),
    (raw_header(b'{"a": %s, "a": %s}' % ((json.dumps(F32).encode(),) * 2), bytes(8)),
     "repeats the key 'a'"),
], ids=lambda x: x if isinstance(x, str) else "")
def test_bad_safetensors(tmp_path, weights, match):
    path = hf_dir(tmp_path, weights)
    assert "model.safetensors" in refused(read_hf_dir, path, match=match)
    refused(tensor_dtypes, path, match=match)  # was an uncaught safetensors error (gemmalab info)


def test_valid_safetensors_read_as_before(tmp_path):
    tensors = {"model.norm.weight": torch.arange(4.0), "model.x": torch.zeros(0, 3),
               "model.y": torch.tensor(2, dtype=torch.int64), "model.z": torch.ones(2, dtype=torch.bfloat16)}
    path = hf_dir(tmp_path, save(tensors, metadata={"format": "pt"}))
    _, got = read_hf_dir(path)
    assert set(got) == {"norm.weight", "x", "y", "z"} and torch.equal(got["norm.weight"], torch.arange(4.0))
    assert tensor_dtypes(path) == {"model.norm.weight": "F32", "model.x": "F32", "model.y": "I64",
                                   "model.z": "BF16"}
    assert set(read_safetensors_header(path / "model.safetensors")) == set(tensors)


# ---- sharded indexes -----------------------------------------------------------------------------

def with_index(tmp_path, index) -> object:
    path = hf_dir(tmp_path)
    raw = index if isinstance(index, bytes) else json.dumps(index).encode()
    (path / "model.safetensors.index.json").write_bytes(raw)
    return path


@pytest.mark.parametrize("index,match", [
    # the fuzzer's first finding: weight_map values that are header entries (objects), not file
    # names: `set(weight_map.values())` raised TypeError: unhashable type: 'dict'
    ({"weight_map": {"model.norm.weight": {"dtype": "F32", "shape": [8]}}}, "not file names"),
    ({"weight_map": {"model.norm.weight": "../outside.safetensors"}}, "not file names"),
    ({"weight_map": {"model.norm.weight": "/etc/passwd"}}, "not file names"),
    ({"weight_map": {"model.norm.weight": "a\x00b"}}, "not file names"),
    ({"weight_map": {"model.norm.weight": 3}}, "not file names"),
    ({"weight_map": {"model.norm.weight": "model-00001-of-00002.safetensors"}}, "missing"),
    ({"weight_map": []}, "no weight_map"),
    ({"metadata": {}}, "no weight_map"),
    ([1], "not an object"),
    (b"\xff", "not UTF-8"),
], ids=lambda x: x if isinstance(x, str) else "")
def test_bad_index(tmp_path, index, match):
    sub = tmp_path / "m"
    sub.mkdir()
    (tmp_path / "outside.safetensors").write_bytes(save({"model.norm.weight": torch.ones(64)}))
    path = with_index(sub, index)
    assert "index.json" in refused(read_hf_dir, path, match=match) or match == "missing"
    refused(tensor_dtypes, path, match=match)


@pytest.mark.parametrize("body", [b"[" * 100_000, b"\xff\xfe{}", b'{"a": 1'])
def test_load_and_info_of_a_bad_config_json_are_checkpoint_errors(tmp_path, body):
    """gemmalab.load (which asks is_sfp8_dir first) and `gemmalab info` read config.json through
    hf.read_json: a deeply nested, non-UTF-8 or broken file is one CheckpointError, never a
    RecursionError / UnicodeDecodeError / JSONDecodeError."""
    import gemmalab
    from gemmalab.checkpoints.sfp8 import is_sfp8_dir
    from gemmalab.cli import model_info

    (tmp_path / "config.json").write_bytes(body)
    (tmp_path / "model.safetensors").write_bytes(save({"x": torch.zeros(1)}))
    assert is_sfp8_dir(tmp_path) is False
    for fn in (lambda: gemmalab.load(tmp_path), lambda: model_info(str(tmp_path))):
        with pytest.raises(CheckpointError) as e:
            fn()
        assert "\n" not in str(e.value) and "config.json" in str(e.value)
