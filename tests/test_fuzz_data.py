"""Fuzzing the training-data readers (JSONL, JSONL.gz, Parquet) and the regressions it found.

Each regression carries the fuzzer's (minimized) input and asserts the documented outcome: a DataError
with a one-line message naming the file (and the line or row).
"""
from __future__ import annotations

import base64
import gzip
import json

import pytest

from gemmalab.train import data as data_mod
from gemmalab.train.data import DataError, iter_records, tokenize_record
from tests.fuzz_helpers import run_fuzz


@pytest.fixture(scope="module")
def tok():
    from tests.test_export import tiny_tokenizer
    return tiny_tokenizer()


def read_all(path, tok=None) -> list:
    out = []
    for rec in iter_records(path):
        out.append(rec)
        if tok is not None:
            tokenize_record(rec, tok)
    return out


def one_line_error(path, tok=None, match: str | None = None) -> str:
    with pytest.raises(DataError, match=match) as e:
        read_all(path, tok)
    msg = str(e.value)
    assert msg.strip() and "\n" not in msg, msg
    assert str(path) in msg, msg
    return msg


# --------------------------------------------------------------------------------------------------------
# CI-sized fuzz runs


def test_fuzz_data_jsonl(tmp_path):
    stats = run_fuzz("data_jsonl", tmp_path, runs=2000, seconds=45)
    assert stats["outcomes"].get("ok", 0) > 0  # the seeds (valid files) still read and tokenize


def test_fuzz_data_parquet(tmp_path):
    stats = run_fuzz("data_parquet", tmp_path, runs=2000, seconds=45)
    assert stats["outcomes"].get("ok", 0) > 0


# --------------------------------------------------------------------------------------------------------
# JSONL findings

# The fuzzer's input (selector byte 2: raw .jsonl.gz bytes): a deflate stream whose back-reference
# points before the start of the window; gzip raised zlib.error, not an OSError.
GZ_BAD_DISTANCE = base64.b64decode(
    "Ah+LCAAAAAAiAAIDbY0xb8JADIX3/grLc4RIgFbt0qkdWwYkBtLBvTjlpMSHzncCFOW/c5cFInWy33v+ngfsWZX+WPENDgN613Ha"
    "MCp7LACNk8ASsrU/UgCrEI4Mhk42UAeuhU9PYvgdxwLuOKlaDZTAecfuPzaXbslbXeD4Mz4NGPgyXX/nMJ6cAEGwPefXnuFMOhly"
    "hd413CXsAZqJr9j/slcoq9V6AyQNRLEmQVDH5bI1kge3ZlLPzaReU1a9lKtFLbV8SJPrb2YbGNEnAQAA")


def test_corrupt_gzip_deflate_stream_is_a_data_error(tmp_path):
    path = tmp_path / "d.jsonl.gz"
    path.write_bytes(GZ_BAD_DISTANCE[1:])
    one_line_error(path, match=r"d.jsonl.gz:\d+: cannot read the file: .*invalid distance too far back")


def test_deeply_nested_json_line_is_a_data_error(tmp_path):
    # json.loads raised RecursionError past ~1000 levels
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"text": "ok"}\n' + b"[" * 100_000 + b"\n")
    one_line_error(path, match=r"d.jsonl:2: invalid JSON: nested too deeply")


@pytest.mark.parametrize("line, where", [
    (b'{"text": "\\ud800"}', "'text'"),
    (b'{"messages": [{"role": "user", "content": "a\\udfffb"}, {"role": "assistant", "content": "x"}]}', "message 0"),
    (b'{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", '
     b'"content": [{"type": "text", "text": "\\udc80"}]}]}', "message 1, item 0"),
])
def test_lone_surrogate_escape_is_a_data_error(tmp_path, tok, line, where):
    # JSON's \\udXXX escapes decode to lone surrogates; the tokenizer then failed with its own error
    path = tmp_path / "d.jsonl"
    path.write_bytes(line + b"\n")
    msg = one_line_error(path, tok, match="lone surrogate")
    assert f"d.jsonl:1: {where}" in msg


def test_key_with_newline_keeps_the_message_on_one_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"a\\nb": 1}\n')
    assert "non-null keys: 'a\\nb')" in one_line_error(path)


def test_overlong_line_is_refused_before_it_is_read_whole(tmp_path, monkeypatch):
    monkeypatch.setattr(data_mod, "MAX_LINE_BYTES", 64)
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"text": "short"}\n' + b'{"text": "' + b"x" * 200 + b'"}\n')
    one_line_error(path, match=r"d.jsonl:2: the line is longer than 64 bytes")
    gz = tmp_path / "d.jsonl.gz"  # the same for a line that only exists once inflated
    gz.write_bytes(gzip.compress(b"x" * 10_000))
    one_line_error(gz, match=r"d.jsonl.gz:1: the line is longer than 64 bytes")
    ok = tmp_path / "ok.jsonl"  # a line of exactly the limit still reads
    rec = json.dumps({"text": "y" * 40}).encode()
    ok.write_bytes(rec.ljust(63) + b"\n")
    assert read_all(ok) == [{"text": "y" * 40}]


# --------------------------------------------------------------------------------------------------------
# Parquet findings

# The gzip / data-page-v2 seed with one byte changed (offset 359, in the footer's size statistics):
# pyarrow 26 raised OSError ("Definition level histogram size mismatch") from iter_batches, and
# RowGroupMetaData.column(0) on it terminates the process (an uncaught C++ ParquetException), which
# is why the reader reads no per-column metadata.
PARQUET_HISTOGRAM = base64.b64decode(
    "UEFSMRUEFSoVTkwVBBUAEgAAH4sIAAAAAAACA2NhYGAoLU4t4gTSicXFmcUliXklADMK9OwVAAAAFQYVDhUOXBUEFQAVAhUQ"
    "FQQVBBIcNgAoBHVzZXIYCWFzc2lzdGFudBERAAAAAwIEBAEDAhUEFYoBFYgBTBUEFQASAAAfiwgAAAAAAAIDk2NgYAjPSCxR"
    "yCxWKMlIVUhOLMgsScxRyE9TcCtKzEtOtZcHqgjBJgPSEpBYlFmsBwAtF1hORQAAABUGFQ4VDlwVBBUAFQIVEBUEFQQSHDYA"
    "KB5XaGF0IGlzIHRoZSBjYXBpdGFsIG9mIEZyYW5jZT8YH1RoZSBjYXBpdGFsIG9mIEZyYW5jZSBpcyBQYXJpcy4REQAAAAMC"
    "BAQBAwIVBBlsNQAYBnNjaGVtYRUCADUCGAhtZXNzYWdlcxUCFQZMPAAAADUEGARsaXN0FQIANQIYB2VsZW1lbnQVBAAVDCUG"
    "GARyb2xlJQBMHAAAABUMJQIYB2NvbnRlbnQlAEwcAAAAFgIZHBksJgAcFQwZNQAGEBlICG1lc3NhZ2VzBGxpc3QHZWxlbWVu"
    "dARyb2xlFQQWBBauARbSASZyJggcNgAoBHVzZXIYCWFzc2lzdGFudBERABksFQQVABUCABUAFRAVAgA8FhoZJgICGVYAAAAA"
    "BAAAACYAHBUMGTUABhAZSAhtZXNzYWdlcwRsaXN0B2VsZW1lbnQHY29udGVudBUEFgQW8gIW8AImggMm2gEcNgAoHldoYXQg"
    "aXMgdGhlIGNhcGl0YWwgb2YgRnJhbmNlPxgfVGhlIGNhcGl0YWwgb2YgRnJhbmNlIGlzIFBhcmlzLhERABksFQQVABUCABUA"
    "FRAVAgA8FnoZJgICGVYAAAAABAAAABagBBYCJggWwgQAGRwYDEFSUk9XOnNjaGVtYRjYAi8vLy8vL2dBQUFBUUFBQUFBQUFL"
    "QUF3QUJnQUZBQWdBQ2dBQUFBQUJCQUFNQUFBQUNBQUlBQUFBQkFBSUFBQUFCQUFBQUFFQUFBQUVBQUFBZVAvLy93QUFBUXdV"
    "QUFBQUlBQUFBQVFBQUFBQkFBQUFHQUFBQUFnQUFBQnRaWE56WVdkbGN3QUFBQUJ3Ly8vL3FQLy8vd0FBQVEwWUFBQUFJQUFB"
    "QUFRQUFBQUNBQUFBVUFBQUFCUUFBQUFFQUFBQWFYUmxiUUFBQUFDZy8vLy8yUC8vL3dBQUFRVVFBQUFBR0FBQUFBUUFBQUFB"
    "QUFBQUJ3QUFBR052Ym5SbGJuUUF5UC8vL3hBQUZBQUlBQVlBQndBTUFBQUFFQUFRQUFBQUFBQUJCUkFBQUFBY0FBQUFCQUFB"
    "QUFBQUFBQUVBQUFBY205c1pRQUFBQUFFQUFRQUJBQUFBQT09ABggcGFycXVldC1jcHAtYXJyb3cgdmVyc2lvbiAyNi4wLjEZ"
    "LBwAABwAAAAbAwAAUEFSMQ==")


def test_corrupt_size_statistics_are_a_data_error(tmp_path, tok):
    path = tmp_path / "d.parquet"
    path.write_bytes(PARQUET_HISTOGRAM)
    one_line_error(path, tok, match=r"d.parquet: cannot read the rows from row 0 \(0-based\): Definition level")


@pytest.mark.parametrize("data, match", [
    (b"", "does not start with PAR1"),
    (b"PAR1", "does not start with PAR1"),
    (b"PAR1" + b"\0" * 20 + b"PAR1", "the footer claims 0 bytes but the file has 28"),
    (b"PAR1" + b"\0" * 16 + b"\xff\xff\xff\x7fPAR1", "the footer claims 2147483647 bytes"),
    (b"PAR1" + b"\0" * 16 + b"\x04\0\0\0PARE", "encrypted Parquet file"),
    (b"PAR1" + b"\0" * 16 + b"\x04\0\0\0PAR2", "does not end with PAR1"),
    (b"PAR1" + b"\x01" * 16 + b"\x08\0\0\0PAR1", "not a readable Parquet file: "),  # garbage Thrift
])
def test_not_parquet_is_refused_before_pyarrow_parses_it(tmp_path, data, match):
    path = tmp_path / "d.parquet"
    path.write_bytes(data)
    one_line_error(path, match=match)


def test_value_python_cannot_hold_is_a_data_error(tmp_path):
    # a 'text' column of timestamps past datetime's range: to_pylist raised OverflowError
    import pyarrow as pa
    import pyarrow.parquet as pq
    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"text": pa.array([2**62], pa.timestamp("us"))}), path)
    one_line_error(path, match=r"d.parquet: cannot read the rows from row 0 \(0-based\): date value out of range")


def test_valid_parquet_still_reads(tmp_path, tok):
    import pyarrow as pa
    import pyarrow.parquet as pq
    path = tmp_path / "d.parquet"
    recs = [{"text": "a"}, {"text": "b"}, {"text": "c"}]
    pq.write_table(pa.Table.from_pylist(recs), path, row_group_size=2)
    assert read_all(path, tok) == recs
