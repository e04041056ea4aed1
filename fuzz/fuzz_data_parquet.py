"""Fuzz the Parquet training-data reader: iter_records -> _check_record -> tokenize_record.

The input is the .parquet file itself (parsed by pyarrow's C++ reader: footer, Thrift metadata,
pages, codecs). Every record read is tokenized with the tiny test tokenizer (built once). Documented
error: DataError with a one-line message naming the file (and the row, where one is at fault).
"""
from __future__ import annotations

import io
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _harness import Target, instrumented, main, write  # noqa: E402

with instrumented():
    from gemmalab.train.data import DataError, iter_records, tokenize_record

TOK: list = []


def setup(scratch: Path) -> None:
    from tests.test_export import tiny_tokenizer
    TOK.append(tiny_tokenizer())


def one(data: bytes, scratch: Path) -> None:
    if not TOK:
        setup(scratch)
    path = write(scratch, "d.parquet", data)
    for rec in iter_records(path):
        tokenize_record(rec, TOK[0])


def _parquet(records: list[dict], **kw) -> bytes:
    """A Parquet file of `records` as tests/test_data.py writes them (columns from every record)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    keys = list(dict.fromkeys(k for r in records for k in r))
    table = pa.Table.from_pylist([{k: r.get(k) for k in keys} for r in records])
    buf = io.BytesIO()
    pq.write_table(table, buf, **kw)
    return buf.getvalue()


def seeds(d: Path) -> list[bytes]:
    """Small files: text and chat columns, several row groups, codecs, plain and dictionary pages."""
    texts = [{"text": t} for t in ("Once upon a time there was a tiny model.", "",
                                   "Numbers 12345 and unicode \u00fcn\u00efc\u00f6d\u00e9 \u2713.\n\nEnd.")]
    chats = [{"messages": [{"role": "user", "content": "What is the capital of France?"},
                           {"role": "assistant", "content": "The capital of France is Paris."}]},
             {"messages": [{"role": "user", "content": "Say nothing."}, {"role": "assistant", "content": ""}]}]
    return [
        _parquet(texts, row_group_size=2),
        _parquet(texts + [{"text": None}], compression="none", use_dictionary=False),
        _parquet([{"text": f"document number {i}"} for i in range(5)], compression="zstd", row_group_size=3),
        _parquet(chats, compression="snappy"),
        _parquet(chats[:1], compression="gzip", data_page_version="2.0"),
        _parquet([{"text": "a", "id": 1}, {"body": "x", "id": 2}], compression="lz4"),
        _parquet([{"text": "only column"}], compression="brotli", write_statistics=False),
    ]


if __name__ == "__main__":
    main(Target("data_parquet", one, (DataError,), seeds, setup=setup,
                notes="iter_records on .parquet (pyarrow: footer, Thrift metadata, pages, codecs "
                      "none/snappy/gzip/zstd/lz4/brotli, dictionary and v2 pages); every record through "
                      "_check_record and tokenize_record (tiny BPE test tokenizer)"))
