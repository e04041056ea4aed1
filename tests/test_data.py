"""The training data pipeline: reading (JSONL, gz, Parquet), loss masks, packing, batching and resume."""
from __future__ import annotations

import gzip
import json
import random

import pytest
import torch

from gemmalab.train.data import (IGNORE_INDEX, DataError, PackedDataset, collate, iter_records, pack,
                                 tokenize_record)

CHATS = [
    [{"role": "user", "content": "What is the capital of France?"},
     {"role": "assistant", "content": "The capital of France is Paris."}],
    [{"role": "system", "content": "You are terse."},
     {"role": "user", "content": "  Two plus two?\n"},
     {"role": "model", "content": "4"},
     {"role": "user", "content": [{"type": "text", "text": "And times three?"}]},
     {"role": "assistant", "content": "12, of course.\n\nAnything else?  "}],
    [{"role": "user", "content": "Say nothing."}, {"role": "assistant", "content": ""}],
    [{"role": "user", "content": "Héllo 🌍 <b>tags</b>\t\tand tabs"},
     {"role": "assistant", "content": "Bonjour 🌍 — `code`\n```py\nx = 1\n```"}],
]
TEXTS = ["Once upon a time there was a tiny model.", "", "Numbers 12345 and unicode ünïcödé ✓.\n\nEnd."]


@pytest.fixture(scope="module")
def tok():
    from gemmalab._paths import default_model_path
    from gemmalab.tokenizer import Tokenizer
    return Tokenizer.from_gguf(default_model_path())


def write_jsonl(path, records, gz=False):
    data = "".join(json.dumps(r) + "\n" for r in records).encode()
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


def write_parquet(path, records, row_group_size=None):
    import pyarrow as pa
    import pyarrow.parquet as pq
    keys = list(dict.fromkeys(k for r in records for k in r))  # from_pylist takes its columns from row 0
    rows = [{k: r.get(k) for k in keys} for r in records]
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=row_group_size)
    return path


def numbered(n, start=0):
    return [{"text": f"document number {i}"} for i in range(start, start + n)]


# --------------------------------------------------------------------------------------------------------
# Reading


def test_reads_jsonl_gz_and_parquet_in_file_order(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", numbered(3))
    b = write_jsonl(tmp_path / "b.jsonl.gz", numbered(2, 3), gz=True)
    c = write_parquet(tmp_path / "c.parquet", numbered(4, 5), row_group_size=3)
    d = write_parquet(tmp_path / "d.parquet", [{"messages": CHATS[0]}])
    got = list(iter_records([a, b, c, d]))
    assert got[:9] == numbered(9)
    assert got[9] == {"messages": CHATS[0]}
    assert list(iter_records(tmp_path)) == got  # a directory: its files, sorted


def test_shuffle_is_deterministic_by_seed(tmp_path):
    files = [write_jsonl(tmp_path / f"s{k}.jsonl", numbered(50, 50 * k)) for k in range(4)]
    order = lambda seed: [r["text"] for r in iter_records(files, seed=seed, shuffle_buffer=32)]
    base = [r["text"] for r in numbered(200)]
    assert order(None) == base
    assert order(1) == order(1)
    assert order(1) != order(2)
    assert order(1) != base and sorted(order(1)) == sorted(base)  # a permutation: nothing lost or doubled


@pytest.mark.parametrize("line, message", [
    ('{"text": "ok"', "invalid JSON"),
    ('{"foo": 1}', "neither 'text' nor 'messages'"),
    ('{"text": 3}', "'text' must be a string"),
    ('[1, 2]', "must be a JSON object"),
    ('{"messages": "hi"}', "'messages' must be a non-empty list"),
    ('{"messages": [{"role": "user", "content": 5}]}', "'content' must be a string"),
    ('{"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}', "alternate"),
    ('{"text": "a", "messages": [{"role": "user", "content": "a"}]}', "both"),
])
def test_malformed_jsonl_names_file_and_line(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine"}\n\n' + line + "\n")
    with pytest.raises(DataError, match=message) as e:
        list(iter_records(path))
    assert f"{path}:3:" in str(e.value)


def test_malformed_parquet_names_file_and_row(tmp_path):
    path = write_parquet(tmp_path / "bad.parquet", [{"text": "a"}, {"text": None}, {"text": "c"}])
    with pytest.raises(DataError, match=r"bad.parquet: row 1 \(0-based\): the record has neither"):
        list(iter_records(path))
    other = write_parquet(tmp_path / "other.parquet", [{"body": "x"}])
    with pytest.raises(DataError, match="neither a 'text' nor a 'messages' column"):
        list(iter_records(other))
    with pytest.raises(DataError, match="no such file"):
        list(iter_records(tmp_path / "missing.jsonl"))


def test_reading_is_lazy(tmp_path):
    # A broken record deep in the file is only met when reached: getting the first records does not read
    # (or parse) the whole file, with or without the shuffle buffer, for JSONL and Parquet alike.
    records = numbered(10_000)
    lines = [json.dumps(r) for r in records]
    lines[9_000] = "{not json"
    path = tmp_path / "big.jsonl"
    path.write_text("\n".join(lines) + "\n")
    it = iter_records(path)
    assert next(it) == records[0]
    assert next(iter_records(path, seed=0, shuffle_buffer=100))["text"].startswith("document number")
    with pytest.raises(DataError, match="big.jsonl:9001: invalid JSON"):
        list(it)
    pq_path = write_parquet(tmp_path / "big.parquet", records[:5_000] + [{"text": None}], row_group_size=1_000)
    it = iter_records(pq_path)
    assert next(it) == records[0]
    with pytest.raises(DataError, match="row 5000"):
        list(it)


# --------------------------------------------------------------------------------------------------------
# Tokenization and loss masks


def expected_trained_text(messages):
    # What the model should learn to say: each model turn's trimmed content and its <end_of_turn>.
    out = []
    for m in messages:
        if m["role"] in ("assistant", "model"):
            c = m["content"]
            c = c if isinstance(c, str) else "".join(i["text"].strip() for i in c)
            out.append(c.strip() + "<end_of_turn>")
    return out


def trained_spans(ids, mask):
    spans, cur = [], []
    for i, m in zip(ids, mask):
        if m:
            cur.append(i)
        elif cur:
            spans.append(cur)
            cur = []
    return spans + ([cur] if cur else [])


@pytest.mark.parametrize("k", range(len(CHATS)))
def test_chat_mask_covers_exactly_the_model_turns(tok, k):
    messages = CHATS[k]
    ids, mask = tokenize_record({"messages": messages}, tok)
    assert ids == tok.encode_chat(messages, add_generation_prompt=False)
    assert len(mask) == len(ids) and not mask[0]
    assert [tok.decode(s) for s in trained_spans(ids, mask)] == expected_trained_text(messages)
    # The masked rest is the prompt side: everything up to "model\n", and the "\n" after <end_of_turn>.
    for i, m in enumerate(mask):
        if m and not mask[i - 1]:
            assert tok.decode(ids[i - 3:i]) == "<start_of_turn>model\n"
        if ids[i] == tok.end_of_turn_id:
            assert m == (mask[i - 1] or tok.decode(ids[i - 3:i]) == "<start_of_turn>model\n")
    all_ids, all_mask = tokenize_record({"messages": messages}, tok, train_on="all")
    assert all_ids == ids and all_mask == [False] + [True] * (len(ids) - 1)


def test_plain_text_is_bos_text_eos(tok):
    for text in TEXTS:
        ids, mask = tokenize_record({"text": text}, tok)
        assert ids == tok.encode(text) + [tok.eos_id]
        assert mask == [False] + [True] * (len(ids) - 1)


def test_turn_by_turn_encoding_matches_whole_conversation_on_random_chats(tok):
    # The mask is built from separately encoded stretches; BPE must never merge across their borders.
    rng = random.Random(0)
    alphabet = list("ab \n\t.,!?<>/_-é🌍") + ["<end_of_turn>", "<start_of_turn>", "\n\n", "model", "user"]
    for _ in range(30):
        turns = rng.randrange(1, 4)
        messages = [{"role": "system", "content": "".join(rng.choices(alphabet, k=8))}] if rng.random() < .3 else []
        for _ in range(turns):
            for role in ("user", "assistant"):
                messages.append({"role": role, "content": "".join(rng.choices(alphabet, k=rng.randrange(0, 20)))})
        ids, mask = tokenize_record({"messages": messages}, tok)  # raises on a mismatch
        assert ids == tok.encode_chat(messages, add_generation_prompt=False)


# --------------------------------------------------------------------------------------------------------
# Packing


def check_row(row, docs_by_first_ids=None):
    """Invariants of a packed row; returns its documents as (ids, targets) lists."""
    ids, pos, seg, tgt = (row[k].tolist() for k in ("input_ids", "positions", "segment_ids", "targets"))
    T = len(ids)
    pad = [i for i in range(T) if seg[i] == -1]
    n = T - len(pad)
    assert pad == list(range(n, T))  # padding only at the end
    assert all(ids[i] == 0 and pos[i] == -1 and tgt[i] == IGNORE_INDEX for i in pad)
    docs = []
    for s in sorted(set(seg[:n])):
        idx = [i for i in range(n) if seg[i] == s]
        assert idx == list(range(idx[0], idx[-1] + 1))  # contiguous
        assert [pos[i] for i in idx] == list(range(len(idx)))  # positions restart at 0
        for a, b in zip(idx, idx[1:]):  # a target inside the document is the next token, or ignored
            assert tgt[a] in (ids[b], IGNORE_INDEX)
        docs.append(([ids[i] for i in idx], [tgt[i] for i in idx]))
    assert sorted(set(seg[:n])) == list(range(len(docs)))
    return docs


def test_pack_rows_positions_segments_targets_padding():
    rng = random.Random(0)
    examples = []
    for _ in range(40):
        n = rng.randrange(2, 30)
        ids = [rng.randrange(3, 500) for _ in range(n)]
        mask = [False] + [rng.random() < 0.7 for _ in range(n - 1)]
        examples.append((ids, mask))
    rows = list(pack(examples, 32, pad_id=0))
    got = [d for row in rows for d in check_row(row)]
    assert all(r["input_ids"].shape == (32,) and r["input_ids"].dtype == torch.int64 for r in rows)
    # Every document with something to learn appears exactly once, whole, with next-token targets.
    want = []
    for ids, mask in examples:
        tgt = [ids[i + 1] if mask[i + 1] else IGNORE_INDEX for i in range(len(ids) - 1)] + [IGNORE_INDEX]
        if any(t != IGNORE_INDEX for t in tgt):
            want.append((ids, tgt))
    assert sorted(got) == sorted(want)
    assert len(rows) < len(want) / 2  # several documents per row
    batch = collate(rows[:3])
    assert set(batch) == {"input_ids", "positions", "segment_ids", "targets"}
    assert all(v.shape == (3, 32) for v in batch.values())


def test_long_documents_are_cut_into_pieces_starting_at_zero():
    ids = list(range(3, 3 + 25))
    rows = list(pack([(ids, [False] + [True] * 24)], 10, bos_id=2))
    assert len(rows) == 3
    pieces = [check_row(r)[0] for r in rows]
    assert pieces[0][0] == ids[:10]
    assert pieces[1][0] == [2] + ids[10:19] and pieces[2][0] == [2] + ids[19:]
    # The last token of a piece still predicts the next piece's first token; a fresh BOS predicts nothing.
    assert pieces[0][1] == ids[1:11] and pieces[1][1] == [IGNORE_INDEX] + ids[11:20]
    assert pieces[2][1] == [IGNORE_INDEX] + ids[20:] + [IGNORE_INDEX]
    labelled = [t for p in pieces for t in p[1] if t != IGNORE_INDEX]
    assert labelled == ids[1:]  # no label lost or doubled
    assert rows[2]["positions"].tolist()[:7] == list(range(7)) and rows[2]["positions"][7] == -1


def test_packed_row_matches_documents_run_alone():
    from gemmalab.config import get_config
    from gemmalab.model.text import Gemma3

    torch.manual_seed(0)
    model = Gemma3(get_config("tiny")).eval()  # vocab 512: random ids, not the real tokenizer's
    rng = random.Random(1)
    docs = [[rng.randrange(1, 512) for _ in range(n)] for n in (5, 13, 9)]  # 13 > sliding window 8
    (row,) = pack([(d, [False] + [True] * (len(d) - 1)) for d in docs], 32)
    assert row["segment_ids"].tolist().count(-1) == 32 - 27
    with torch.no_grad():
        packed = model(row["input_ids"][None], row["positions"][None], segment_ids=row["segment_ids"][None])[0]
        for s, d in enumerate(docs):
            alone = model(torch.tensor([d]))[0]
            torch.testing.assert_close(packed[row["segment_ids"] == s], alone, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------------------------------------
# The batch stream


@pytest.fixture
def mixed_files(tmp_path):
    rng = random.Random(0)
    chats = [c for c in CHATS if all(isinstance(m["content"], str) for m in c)]  # Parquet: one content type
    recs = [{"messages": chats[i % len(chats)]} if i % 3 == 0 else
            {"text": " ".join(rng.choice(["alpha", "beta", "gamma", "delta"]) for _ in range(rng.randrange(1, 60)))}
            for i in range(60)]
    return [write_jsonl(tmp_path / "a.jsonl", recs[:25]), write_parquet(tmp_path / "b.parquet", recs[25:45]),
            write_jsonl(tmp_path / "c.jsonl.gz", recs[45:], gz=True)]


def take(it, n):
    return [next(it) for _ in range(n)]


def same_batches(a, b):
    return len(a) == len(b) and all(x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
                                    for x, y in zip(a, b))


def test_dataset_batches_and_seed_order(tok, mixed_files):
    ds = PackedDataset(mixed_files, tok, seq_len=64, batch_size=3, seed=0, shuffle_buffer=8)
    batches = take(iter(ds), 12)  # runs past the first epoch (about 8 batches)
    assert ds.epoch >= 1 and ds.batches_yielded == 12
    for b in batches:
        assert all(v.shape == (3, 64) for v in b.values())
        for row in range(3):
            check_row({k: v[row] for k, v in b.items()})
    again = take(iter(PackedDataset(mixed_files, tok, seq_len=64, batch_size=3, seed=0, shuffle_buffer=8)), 12)
    other = take(iter(PackedDataset(mixed_files, tok, seq_len=64, batch_size=3, seed=1, shuffle_buffer=8)), 12)
    assert same_batches(batches, again) and not same_batches(batches, other)
    # Finite epochs end with a smaller last batch, or none with drop_last.
    one = list(PackedDataset(mixed_files, tok, seq_len=64, batch_size=3, seed=0, epochs=1))
    assert all(b["input_ids"].shape[0] == 3 for b in one[:-1]) and 1 <= one[-1]["input_ids"].shape[0] <= 3
    kept = list(PackedDataset(mixed_files, tok, seq_len=64, batch_size=3, seed=0, epochs=1, drop_last=True))
    assert all(b["input_ids"].shape[0] == 3 for b in kept)


# Epoch 0 is 18 batches here; the 19th starts with flushed rows of epoch 0; after 28 one packed row waits
# for the next batch (state["pending"]); 44 of 45 is the last full batch of the second, final epoch.
@pytest.mark.parametrize("stop", [1, 18, 19, 28, 44])
def test_resume_from_state_dict_gives_the_same_batches(tok, mixed_files, stop):
    make = lambda: PackedDataset(mixed_files, tok, seq_len=48, batch_size=2, seed=3, shuffle_buffer=8,
                                 epochs=2)
    full = list(make())
    first = make()
    it = iter(first)
    head = take(it, stop)
    assert len(full) == 45
    state = json.loads(json.dumps(first.state_dict()))  # plain data: survives JSON (and torch.save)
    resumed = make()
    resumed.load_state_dict(state)
    assert same_batches(head + list(resumed), full)
    assert same_batches(list(it), full[stop:])  # the original iterator is unaffected
    wrong = PackedDataset(mixed_files, tok, seq_len=64, batch_size=2, seed=3)
    with pytest.raises(ValueError, match="seq_len was 48, now 64"):
        wrong.load_state_dict(state)
