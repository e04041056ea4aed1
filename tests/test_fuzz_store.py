"""Teacher-logit store under fuzzing: CI-sized runs of fuzz/fuzz_store_shard.py and
fuzz/fuzz_store_manifest.py, each finding's reproducer as a regression test (a damaged shard or
manifest is refused with a one-line StoreError naming the file), and the allocation guards."""
from __future__ import annotations

import hashlib
import json
import shutil
import struct
import tracemalloc
from pathlib import Path

import pytest
import torch

from gemmalab.train.logit_store import LogitStore, StoreDataset, StoreError, build_store, read_shard, write_shard

from .distill_helpers import text_data, tiny_teacher_gguf
from .fuzz_helpers import run_fuzz


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    """A small real store (as the harnesses' seeds): 4 shards of 2 rows of 16, K=4, with counts."""
    root = tmp_path_factory.mktemp("fuzzstore")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        build_store(root / "s", text_data(root / "d.jsonl", 4, words=(10, 30)),
                    teacher=tiny_teacher_gguf(root / "t.gguf"), k=4, seq_len=16, rows_per_shard=2,
                    progress=False, log=lambda *_: None)
    finally:
        torch.set_num_threads(before)
    return root / "s"


def one_line_error(fn, *match: str) -> str:
    """fn() raises StoreError with a one-line message containing every `match`."""
    with pytest.raises(StoreError) as e:
        fn()
    msg = str(e.value)
    assert msg.strip() and "\n" not in msg, msg
    for m in match:
        assert m in msg, msg
    return msg


def shard_file(path: Path, header: object, data: bytes = b"", n: int | None = None) -> Path:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw) if n is None else n) + raw + data)
    return path


# ---------------------------------------------------------------------------------------------------
# CI-sized fuzz runs

def test_fuzz_store_shard(tmp_path):
    stats = run_fuzz("store_shard", tmp_path, runs=2000, seconds=45)
    assert stats["outcomes"].get("ok", 0) > 0  # the seeds (valid shards) still read


def test_fuzz_store_manifest(tmp_path):
    stats = run_fuzz("store_manifest", tmp_path, runs=2000, seconds=45)
    assert stats["outcomes"].get("ok", 0) > 0


# ---------------------------------------------------------------------------------------------------
# Allocation guards

def test_header_length_of_2_60_is_refused_before_allocating(tmp_path):
    f = shard_file(tmp_path / "big.safetensors", {}, n=2**60)
    tracemalloc.start()
    try:
        one_line_error(lambda: read_shard(f), "big.safetensors", "header length 1152921504606846976")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20, peak


def test_header_length_past_the_file_is_refused(tmp_path):
    # under the 100 MiB cap but past the end: f.read(n) would have allocated n bytes first
    f = shard_file(tmp_path / "s.safetensors", {}, n=50 * 2**20)
    one_line_error(lambda: read_shard(f), "s.safetensors", "file of 10 bytes")


def test_tensor_ranges_are_checked_against_the_file(tmp_path):
    f = shard_file(tmp_path / "s.safetensors", {"a": {"dtype": "I32", "shape": [2**40], "data_offsets": [0, 2**42]}},
                   b"\0" * 16)
    one_line_error(lambda: read_shard(f), "truncated shard", "tensor 'a' needs")


def test_row_counts_are_checked_against_the_shard_size(store, tmp_path):
    """A manifest claiming 2^40 rows would make StoreDataset list 2^40 blocks (a hang)."""
    d = tmp_path / "s"
    shutil.copytree(store, d)
    m = json.loads((d / "manifest.json").read_text())
    m["shards"][0]["rows"] = 2**40
    (d / "manifest.json").write_text(json.dumps(m))
    one_line_error(lambda: LogitStore(d), "shard-000000.safetensors", "rows, which need")


# ---------------------------------------------------------------------------------------------------
# Findings: shards (each was another exception type, or a hang, before the reader checked it)

def _all_dtypes(path: Path) -> Path:
    """The harness's seed of every dtype (its header is edited below)."""
    tensors = {"a": torch.zeros(2, 3, dtype=torch.int32), "b": torch.zeros(3, dtype=torch.int16),
               "c": torch.zeros(2, 2, dtype=torch.float16), "d": torch.zeros(3, dtype=torch.bfloat16),
               "e": torch.zeros(2), "f": torch.zeros(3, dtype=torch.int64), "g": torch.zeros(4, dtype=torch.uint8),
               "empty": torch.zeros(0, 4, dtype=torch.int32)}
    write_shard(path, tensors, {"format": "x"})
    return path


def _edit_header(path: Path, edit) -> Path:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    edit(header)
    new = json.dumps(header, separators=(",", ":")).encode().ljust(n)
    assert len(new) == n
    path.write_bytes(raw[:8] + new + raw[8 + n:])
    return path


def test_shape_larger_than_its_bytes(tmp_path):
    """Fuzz finding (store_shard, crash-d5a61e1c): tensor g's shape [6] over 4 bytes at the end of the
    file; np.memmap raised ValueError('mmap length is greater than file size')."""
    f = _edit_header(_all_dtypes(tmp_path / "s.safetensors"), lambda h: h["g"].update(shape=[6]))
    one_line_error(lambda: read_shard(f), "s.safetensors", "tensor 'g'", "does not fit its 4 bytes")


@pytest.mark.parametrize("edit, match", [
    (lambda h: h["a"].update(dtype="Q4"), "unsupported dtype 'Q4'"),           # was KeyError
    (lambda h: h["a"].update(dtype=["I32"]), "unsupported dtype"),             # was TypeError (unhashable)
    (lambda h: h["a"].update(data_offsets=[24, 0]), "bad data_offsets"),       # was ValueError from numpy
    (lambda h: h["a"].update(data_offsets=[0]), "bad data_offsets"),           # was ValueError (unpack)
    (lambda h: h["a"].update(shape=[2, -3]), "bad shape"),                     # was ValueError from numpy
    (lambda h: h["a"].update(shape="23"), "bad shape"),
    (lambda h: h["empty"].update(shape=[0, 2**61, 2**61]), "does not fit"),    # was numpy "array is too big"
    (lambda h: h.update(a=7), "header entry is not an object"),                # was TypeError
    (lambda h: h.update(__metadata__=["x"]), "metadata is not a map of strings"),  # was AttributeError
])
def test_damaged_shard_headers(tmp_path, edit, match):
    f = tmp_path / "s.safetensors"
    _all_dtypes(f)
    raw = f.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    edit(header)
    shard_file(f, json.dumps(header).encode(), raw[8 + n:])
    one_line_error(lambda: read_shard(f), "s.safetensors", match)


@pytest.mark.parametrize("header, match", [
    (b"[1, 2]", "JSON list, not an object"),                # was AttributeError ('list'.pop)
    (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),  # was RecursionError from json
    (b'{"a": ' + b"9" * 5000 + b"}", "unreadable shard header"),  # was ValueError (int digit limit)
    (b"\xff\xfe{}", "unreadable shard header"),
], ids=["list", "deep", "huge-int", "not-utf8"])
def test_shard_header_not_an_object(tmp_path, header, match):
    f = shard_file(tmp_path / "s.safetensors", header)
    one_line_error(lambda: read_shard(f), "s.safetensors", match)


def _replace_shard(store: Path, tmp_path: Path, edit) -> Path:
    """A copy of the store whose shard 0 has its header edited (the manifest updated to match)."""
    d = tmp_path / "s"
    shutil.copytree(store, d)
    f = d / "shard-000000.safetensors"
    raw = f.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    edit(header)
    shard_file(f, json.dumps(header).encode(), raw[8 + n:])
    m = json.loads((d / "manifest.json").read_text())
    m["shards"][0].update(bytes=f.stat().st_size, sha256=hashlib.sha256(f.read_bytes()).hexdigest())
    (d / "manifest.json").write_text(json.dumps(m))
    return d


@pytest.mark.parametrize("edit, match", [
    (lambda h: h.pop("positions"), "tensor positions is missing"),        # was KeyError in rows()
    (lambda h: h["teacher_counts"].update(shape=[32, 4], data_offsets=[h["teacher_counts"]["data_offsets"][0],
                                                                       h["teacher_counts"]["data_offsets"][0] + 256]),
     "tensor teacher_counts"),                                           # rows() sliced another shape
    (lambda h: h["teacher_probs"].update(dtype="I16"), "tensor teacher_probs is missing or not float16"),
    (lambda h: h.pop("__metadata__"), "belongs to another store"),
])
def test_store_shards_with_missing_or_odd_tensors(store, tmp_path, edit, match):
    d = _replace_shard(store, tmp_path, edit)
    s = LogitStore(d)
    one_line_error(lambda: s.rows(0, 0, 2), "shard-000000.safetensors", match)
    one_line_error(lambda: list(StoreDataset(LogitStore(d), 2, epochs=1)), match)  # reaches shard 0


# ---------------------------------------------------------------------------------------------------
# Findings: manifests

def _manifest(store: Path, tmp_path: Path, edit) -> Path:
    d = tmp_path / "s"
    shutil.copytree(store, d)
    m = json.loads((d / "manifest.json").read_text())
    edit(m)
    (d / "manifest.json").write_text(json.dumps(m))
    return d


def test_shard_entry_without_sha256(store, tmp_path):
    """Fuzz finding (store_manifest, crash-e3e987fd): shards[2] without its sha256 opened, then
    LogitStore.shard raised KeyError('sha256')."""
    d = _manifest(store, tmp_path, lambda m: m["shards"][2].pop("sha256"))
    one_line_error(lambda: LogitStore(d), "manifest.json", "shards[2].sha256 is None")


@pytest.mark.parametrize("edit, match", [
    (lambda m: m.update(targets=[]), "targets is [], expected an object"),           # was TypeError
    (lambda m: m["targets"].pop("k"), "targets.k is None"),                          # was KeyError
    (lambda m: m["targets"].update(k="4"), "targets.k is '4'"),                      # was TypeError in shapes
    (lambda m: m["targets"].update(temperature=True), "targets.temperature"),
    (lambda m: m["data"].update(seq_len=0), "data.seq_len is 0"),
    (lambda m: m.update(shards={}), "shards is {}, expected a list"),
    (lambda m: m["shards"].append(3), "shards[4] is 3"),                            # was TypeError
    (lambda m: m["shards"][0].update(file="../../etc/passwd"), "a file name in the store"),  # path escape
    (lambda m: m["shards"][0].update(file="/etc/hostname"), "a file name in the store"),
    (lambda m: m["shards"][0].update(file="a\nb"), "a file name in the store"),     # was a two-line message
    (lambda m: m["shards"][0].update(rows=-1), "shards[0].rows is -1"),
    (lambda m: m["totals"].update(bytes=10**400), "totals.bytes is"),               # was OverflowError in describe
    (lambda m: m["tokenizer"].update(sha256=7), "tokenizer.sha256 is 7"),           # was TypeError (slicing)
    (lambda m: m["teacher"].update(name=None), "teacher.name is None"),
    (lambda m: m.update(version=[[1]]), "store version [[1]]"),
])
def test_damaged_manifests(store, tmp_path, edit, match):
    d = _manifest(store, tmp_path, edit)
    one_line_error(lambda: LogitStore(d), "manifest.json", match)


@pytest.mark.parametrize("text, match", [
    ("[" * 100_000 + "]" * 100_000, "nested too deeply"),     # was RecursionError from json
    ('{"format": 1' + "0" * 5000 + "}", "not valid JSON"),     # was ValueError (int digit limit)
    ("[]", "not a gemmalab teacher-logit manifest"),
], ids=["deep", "huge-int", "list"])
def test_manifest_not_json_or_not_an_object(tmp_path, text, match):
    (tmp_path / "manifest.json").write_text(text)
    one_line_error(lambda: LogitStore(tmp_path), "manifest.json", match)


def test_valid_store_reads_as_before(store):
    s = LogitStore(store)
    assert "4 shards, 8 rows of 16" in s.describe()
    b = s.rows(1, 0, 2)
    assert b["teacher_ids"].shape == (2, 16, 4) and b["teacher_counts"].dtype == torch.int64
    assert sum(1 for _ in StoreDataset(s, 2, epochs=1)) == 4
