"""Fuzz the JSONL training-data reader: iter_records -> _check_record -> tokenize_record.

Byte 0 picks the container (bits 0-1: 0 and 3 a plain .jsonl of the rest, 1 the rest gzip-compressed
as .jsonl.gz, 2 the rest as raw .jsonl.gz bytes: the gzip reader itself is fuzzed), whether records
go through the seeded shuffle buffer (bit 2) and the loss mask (bit 3: train_on "all", else "model").
Every record read is tokenized with the tiny test tokenizer (built once). Documented error:
DataError with a one-line message naming the file and line.
"""
from __future__ import annotations

import gzip
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _harness import Target, instrumented, main, write  # noqa: E402

with instrumented():
    from gemmalab.train.data import DataError, iter_records, tokenize_record

TOK: list = []


def setup(scratch: Path) -> None:
    """The tiny BPE tokenizer of tests/test_export.py: added tokens ("\\n", "\\n\\n", spaces) and
    merges, so the turn-by-turn encoding check of tokenize_record has something to get wrong."""
    from tests.test_export import tiny_tokenizer
    TOK.append(tiny_tokenizer())


def one(data: bytes, scratch: Path) -> None:
    if not TOK:
        setup(scratch)
    sel, body = (data[0], data[1:]) if data else (0, b"")
    kind = sel & 3
    if kind == 1:
        path = write(scratch, "d.jsonl.gz", gzip.compress(body, compresslevel=1, mtime=0))
    elif kind == 2:
        path = write(scratch, "d.jsonl.gz", body)
    else:
        path = write(scratch, "d.jsonl", body)
    seed = 0 if sel & 4 else None
    train_on = "all" if sel & 8 else "model"
    for rec in iter_records(path, seed=seed, shuffle_buffer=3):
        tokenize_record(rec, TOK[0], train_on=train_on)


CHATS = [
    [{"role": "user", "content": "What is the capital of France?"},
     {"role": "assistant", "content": "The capital of France is Paris."}],
    [{"role": "system", "content": "You are terse."},
     {"role": "user", "content": "  Two plus two?\n"},
     {"role": "model", "content": "4"},
     {"role": "user", "content": [{"type": "text", "text": "And times three?"}]},
     {"role": "assistant", "content": "12, of course.\n\nAnything else?  "}],
    [{"role": "user", "content": "Say nothing."}, {"role": "assistant", "content": ""}],
    [{"role": "user", "content": "H\u00e9llo \U0001f30d <b>tags</b>\t\tand tabs"},
     {"role": "assistant", "content": "Bonjour \U0001f30d \u2014 `code`\n```py\nx = 1\n```"}],
]
TEXTS = ["Once upon a time there was a tiny model.", "", "Numbers 12345 and unicode \u00fcn\u00efc\u00f6d\u00e9 \u2713.\n\nEnd."]


def lines(records: list) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in records).encode()


def seeds(d: Path) -> list[bytes]:
    """Records as tests/test_data.py and tests/synthetic.py write them, in each container."""
    chats = [{"messages": m} for m in CHATS]
    texts = [{"text": t} for t in TEXTS]
    addition = [{"messages": [{"role": "user", "content": "37+45"}, {"role": "assistant", "content": "82"}]}]
    out = []
    for sel, recs in [(0, chats[:2]), (0 | 8, chats[2:]), (0 | 4, texts + [{"text": "document number 7", "id": 7}]),
                      (1, chats[:1] + texts[:1]), (1 | 4 | 8, addition * 3)]:
        out.append(bytes([sel]) + lines(recs))
    out.append(bytes([0]) + b'\xef\xbb\xbf{"text": "bom"}\n\n  \n{"messages": null, "text": "x"}\r\n')
    out.append(bytes([2]) + gzip.compress(lines(chats[:1] + texts), mtime=0))
    return out


if __name__ == "__main__":
    main(Target("data_jsonl", one, (DataError,), seeds, max_len=4096, setup=setup,
                notes="iter_records on .jsonl / .jsonl.gz (gzip of the input and raw gzip bytes), with and "
                      "without the shuffle buffer; every record through _check_record and tokenize_record "
                      "(tiny BPE test tokenizer, train_on model / all)"))
