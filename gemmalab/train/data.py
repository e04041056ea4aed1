"""Training data: records from JSONL/Parquet -> token ids with a loss mask -> packed rows -> batches.

    records   iter_records(paths, seed=...)          {"text": str} or {"messages": [{"role", "content"}, ...]}
    examples  tokenize_record(record, tokenizer)     (ids, labels_mask)
    rows      pack(examples, seq_len)                {input_ids, positions, segment_ids, targets}, each (T,)
    batches   collate(rows), or PackedDataset(...)   the same keys, (B, T); resumable via state_dict()

A row feeds the model as `model(input_ids, positions, segment_ids=segment_ids)`, and its `targets` go
straight to the loss (`train.losses`, ignore_index -100): `targets[t]` is the token that follows
`input_ids[t]` in the same document, or -100 where that token is not trained.

Decisions, in one place:

* Files. `.jsonl`, `.jsonl.gz` and `.parquet` (pyarrow, read one batch of rows at a time: memory stays
  bounded by the batch and the shuffle buffer, never by the file). A directory means every such file
  under it, sorted; a string with `*` is a glob. Blank JSONL lines are skipped. Errors name the file and
  the 1-based line (JSONL) or 0-based row (Parquet); every problem with a file, pyarrow's included, is a
  one-line `DataError`. A JSONL line longer than `MAX_LINE_BYTES` is refused before it is read whole.
* Shuffling (only with a seed). The file order is shuffled with `random.Random(seed)`, then records
  pass through a bounded shuffle buffer (the tf.data / webdataset scheme): the buffer is filled with
  `shuffle_buffer` records, and each new record swaps with a random slot whose record is emitted. A
  record therefore moves at most about `shuffle_buffer` places earlier, and anywhere later: for a
  well-mixed stream, write the data as many shards or pre-shuffle it. No seed: file order, unchanged.
* Loss mask of a chat (`train_on="model"`): the content of each model turn plus its closing
  `<end_of_turn>` is trained, since the model must learn to stop; everything else is masked: BOS, the
  system text, user turns, the `<start_of_turn>model\\n` header, and the "\\n" after `<end_of_turn>`
  (the sampler stops at `<end_of_turn>`, so the model never generates that "\\n"). This is TRL's
  `assistant_only_loss` (the `{% generation %}` block holds content + end-of-turn token) and axolotl's
  `train_on_eos: turn`. `train_on="all"` trains every token but BOS. Plain text is
  `<bos> text <eos>`, all trained but BOS (the pre-training format: documents end with <eos>).
* Ids. A chat tokenizes to exactly `tokenizer.encode_chat(messages, add_generation_prompt=False)`: the
  text is rendered turn by turn with `render_chat` and each masked/trained stretch is encoded alone. That
  is consistent because the tokenizer cuts added tokens (`<start_of_turn>`, `<end_of_turn>`, "\\n") out
  of the text before BPE, so BPE never merges across the stretch boundaries, which all sit at such
  tokens; the result is compared with the one-shot encoding anyway and a mismatch raises.
* Packing. Greedy first-fit into up to `open_rows` partially filled rows, in stream order; a row is
  emitted when full, or (the oldest) when a document fits no open row and all are in use. Each document
  restarts its positions at 0 and has its own segment id (0, 1, ... within the row). Padding sits at
  the end of a row: pad id, position -1, segment -1, target -100. Documents with no trained target are
  dropped (they would cost compute and teach nothing).
* Long documents (more than `seq_len` tokens) are cut into independent pieces, each starting at
  position 0; every piece after the first starts with a fresh `<bos>` (Gemma always sees BOS at
  position 0; that BOS has target -100). Targets are computed on the whole document before cutting, so
  the last token of a piece still predicts the first token of the next piece: no label is lost.
* Resuming. `PackedDataset.state_dict()` holds the epoch, the number of records consumed in it, the
  packer's open rows and the rows already packed but not yet batched. `load_state_dict` then replays
  the epoch's record stream (reading and parsing, but not tokenizing, the consumed records, which also
  rebuilds the shuffle buffer exactly) and continues: the next batches are exactly those of an
  uninterrupted run. The cost of a resume is one read of the data consumed so far in the current epoch.
  Epoch e shuffles with seed + e.
"""
from __future__ import annotations

import copy
import glob
import gzip
import itertools
import json
import random
import zlib
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

import torch

from ..tokenizer import ChatTemplateError, render_chat

__all__ = ["DataError", "iter_records", "tokenize_record", "Packer", "pack", "collate", "PackedDataset",
           "PromptDataset", "split_prompt", "completion_row",
           "IGNORE_INDEX"]

IGNORE_INDEX = -100
SUFFIXES = (".jsonl", ".jsonl.gz", ".parquet")
_MODEL_ROLES = ("assistant", "model")
_PARQUET_BATCH_ROWS = 1024
# The longest JSONL line read: a record is one line, and a line is read whole before it is parsed, so
# without a bound a file (or a .gz that inflates) with no newline would be read into memory entirely.
# 64 MiB is a thousand times a long document.
MAX_LINE_BYTES = 64 << 20


class DataError(ValueError):
    """A data file or record cannot be used; the message names the file and line/row."""


# ---------------------------------------------------------------------------------------------------------
# Reading

def resolve_files(paths: str | Path | Iterable[str | Path]) -> list[Path]:
    """The data files named by `paths`: files, directories (searched recursively, sorted) or globs."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    files: list[Path] = []
    for p in paths:
        if isinstance(p, str) and any(c in p for c in "*?["):
            matched = sorted(glob.glob(p, recursive=True))
            if not matched:
                raise DataError(f"{p}: the pattern matches no file")
            files += [Path(m) for m in matched if _supported(Path(m))]
            continue
        p = Path(p)
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and _supported(f))
            if not found:
                raise DataError(f"{p}: the directory holds no {', '.join(SUFFIXES)} file")
            files += found
        elif p.is_file():
            if not _supported(p):
                raise DataError(f"{p}: unsupported file type; expected one of {', '.join(SUFFIXES)}")
            files.append(p)
        else:
            raise DataError(f"{p}: no such file or directory")
    if not files:
        raise DataError("no data files given")
    return files


def _supported(path: Path) -> bool:
    return path.name.endswith(SUFFIXES)


def iter_records(paths: str | Path | Iterable[str | Path], *, seed: int | None = None,
                 shuffle_buffer: int = 10_000) -> Iterator[dict]:
    """Records `{"text": str}` or `{"messages": [...]}` from JSONL / JSONL.gz / Parquet files, lazily.

    With `seed`, the file order is shuffled and records pass through a shuffle buffer of
    `shuffle_buffer` records (see the module docstring); the same seed gives the same order. Without a
    seed, records come in file order. Other fields of a record are dropped. A malformed record raises
    `DataError` naming the file and line (JSONL, 1-based) or row (Parquet, 0-based) when it is read.
    """
    files = resolve_files(paths)
    if seed is None:
        for f in files:
            yield from _read_file(f)
        return
    rng = random.Random(seed)
    files = list(files)
    rng.shuffle(files)
    stream = (rec for f in files for rec in _read_file(f))
    if shuffle_buffer <= 1:
        yield from stream
        return
    buf: list[dict] = []
    for rec in stream:
        if len(buf) < shuffle_buffer:
            buf.append(rec)
            continue
        j = rng.randrange(shuffle_buffer)
        out, buf[j] = buf[j], rec
        yield out
    rng.shuffle(buf)
    yield from buf


def _read_file(path: Path) -> Iterator[dict]:
    if path.name.endswith(".parquet"):
        yield from _read_parquet(path)
    else:
        yield from _read_jsonl(path)


def _read_jsonl(path: Path) -> Iterator[dict]:
    opener = gzip.open if path.name.endswith(".gz") else open
    try:
        f = opener(path, "rb")
    except OSError as e:
        raise DataError(f"{path}: cannot open: {e}") from e
    with f:
        lineno = 0
        while True:
            where = f"{path}:{lineno + 1}"
            try:
                raw = f.readline(MAX_LINE_BYTES + 1)  # one line at a time: the file is never read whole
            except (OSError, EOFError, zlib.error) as e:  # a truncated or corrupt .gz
                raise DataError(f"{where}: cannot read the file: {_one_line(e)}") from None
            if not raw:
                return
            lineno += 1
            if len(raw) > MAX_LINE_BYTES:
                raise DataError(f"{where}: the line is longer than {MAX_LINE_BYTES} bytes; a record is one "
                                "JSON object per line")
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{where}: not valid UTF-8 ({e})") from e
            if lineno == 1:
                line = line.lstrip("\ufeff")
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except ValueError as e:
                raise DataError(f"{where}: invalid JSON: {_one_line(e)}") from None
            except RecursionError:  # the C scanner's nesting limit
                raise DataError(f"{where}: invalid JSON: nested too deeply") from None
            try:
                yield _check_record(obj)
            except DataError as e:
                raise DataError(f"{where}: {e}") from None


def _check_parquet_footer(path: Path) -> None:
    """Refuse what is not a plain Parquet file before pyarrow parses it: "PAR1" at both ends and a
    footer (Thrift FileMetaData) length that fits in the file (Parquet format spec, "File Format")."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(4)
            f.seek(max(size - 8, 0))
            tail = f.read(8)
    except OSError as e:
        raise DataError(f"{path}: cannot read: {_one_line(e)}") from None
    if size >= 12 and tail[4:] == b"PARE":
        raise DataError(f"{path}: an encrypted Parquet file (PARE footer); decrypt it first")
    if size < 12 or head != b"PAR1":
        raise DataError(f"{path}: not a Parquet file (it does not start with PAR1)")
    if tail[4:] != b"PAR1":
        raise DataError(f"{path}: not a Parquet file, or truncated (it does not end with PAR1)")
    footer = int.from_bytes(tail[:4], "little")
    if not 0 < footer <= size - 12:
        raise DataError(f"{path}: the footer claims {footer} bytes but the file has {size}; truncated or corrupt")


def _check_parquet_sizes(path: Path, meta) -> None:
    """Refuse row groups whose metadata is impossible (negative counts) before their pages are read.

    Only row-group fields are looked at: in pyarrow 26 `RowGroupMetaData.column(i)` aborts the process
    (an uncaught C++ ParquetException, e.g. "Definition level histogram size mismatch") on a corrupt
    column chunk, while reading the same chunk raises OSError, so per-column sizes are left to the
    reader.
    """
    for g in range(meta.num_row_groups):
        rg = meta.row_group(g)
        if rg.num_rows < 0 or rg.total_byte_size < 0:
            raise DataError(f"{path}: row group {g} claims {rg.num_rows} rows of {rg.total_byte_size} bytes")


def _read_parquet(path: Path) -> Iterator[dict]:
    """Records of a Parquet file, one batch of rows at a time. pyarrow's own errors (corrupt pages,
    bad Thrift, unsupported codecs) become one-line DataErrors naming the file; MemoryError is not
    caught: an allocation the file can ask for is a bug to guard against, not a data error."""
    try:
        import pyarrow.parquet as pq
    except ImportError as e:  # pragma: no cover
        raise ImportError(f"reading {path} needs pyarrow: pip install pyarrow") from e
    _check_parquet_footer(path)
    try:
        pf = pq.ParquetFile(path)
        names = pf.schema_arrow.names
        columns = [c for c in ("text", "messages") if c in names]
        if columns:
            _check_parquet_sizes(path, pf.metadata)
    except (DataError, MemoryError):
        raise
    except Exception as e:  # noqa: BLE001 - pyarrow raises ArrowInvalid/OSError/... with its own text
        raise DataError(f"{path}: not a readable Parquet file: {_one_line(e)}") from None
    if not columns:
        shown = ", ".join(n[:40] for n in names[:20]) + (", ..." if len(names) > 20 else "")
        raise DataError(f"{path}: the Parquet file has neither a 'text' nor a 'messages' column "
                        f"(columns: {shown})")
    row = 0
    batches = pf.iter_batches(batch_size=_PARQUET_BATCH_ROWS, columns=columns)
    while True:
        try:
            batch = next(batches, None)
            objs = None if batch is None else batch.to_pylist()
        except MemoryError:
            raise
        except Exception as e:  # noqa: BLE001 - a corrupt page, a value Python cannot hold (a bad date)
            raise DataError(f"{path}: cannot read the rows from row {row} (0-based): {_one_line(e)}") from None
        if objs is None:
            return
        for obj in objs:
            try:
                yield _check_record(obj)
            except DataError as e:
                raise DataError(f"{path}: row {row} (0-based): {e}") from None
            row += 1


def _one_line(e: object) -> str:
    """A library's error text as one line (pyarrow's messages span several)."""
    return " ".join(str(e).split()) or type(e).__name__


def _check_text(s: str, what: str) -> None:
    """Refuse a string the tokenizer cannot encode: JSON's "\\ud800" escapes give lone surrogates,
    which are not Unicode text (UTF-8 has no encoding for them)."""
    if not s.isascii():
        try:
            s.encode("utf-8")
        except UnicodeEncodeError as e:
            raise DataError(f"{what} holds a lone surrogate (U+{ord(s[e.start]):04X} at character {e.start}), "
                            "which is not text") from None


def _check_record(obj: Any) -> dict:
    """The record in canonical form, or DataError saying what is wrong (without the location)."""
    if not isinstance(obj, Mapping):
        raise DataError(f"a record must be a JSON object with 'text' or 'messages', not {type(obj).__name__}")
    text, messages = obj.get("text"), obj.get("messages")
    if text is not None and messages is not None:
        raise DataError("the record has both 'text' and 'messages'; give one")
    if text is not None:
        if not isinstance(text, str):
            raise DataError(f"'text' must be a string, not {type(text).__name__}")
        _check_text(text, "'text'")
        return {"text": text}
    if messages is None:
        keys = [k for k, v in obj.items() if v is not None]
        shown = ", ".join(repr(k)[:40] for k in keys[:10]) + (", ..." if len(keys) > 10 else "")
        raise DataError(f"the record has neither 'text' nor 'messages' (non-null keys: {shown or 'none'})")
    if not isinstance(messages, list) or not messages:
        raise DataError("'messages' must be a non-empty list of {'role': ..., 'content': ...} objects")
    for k, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise DataError(f"message {k} must be an object with 'role' and 'content', not {type(m).__name__}")
        if not isinstance(m.get("role"), str):
            raise DataError(f"message {k} needs a string 'role'")
        content = m.get("content")
        if isinstance(content, list):
            for j, item in enumerate(content):
                if isinstance(item, Mapping) and item.get("type") == "image":
                    raise DataError(f"message {k}, item {j}: image content is not supported by the text data "
                                    "pipeline")
                if isinstance(item, Mapping) and isinstance(item.get("text"), str):
                    _check_text(item["text"], f"message {k}, item {j}")
        elif not isinstance(content, str):
            raise DataError(f"message {k}: 'content' must be a string or a list of text items, "
                            f"not {type(content).__name__}")
        else:
            _check_text(content, f"message {k}")
    try:
        render_chat(messages, add_generation_prompt=False)  # roles, alternation, content items
    except ChatTemplateError as e:
        raise DataError(str(e)) from None
    return {"messages": messages}


# ---------------------------------------------------------------------------------------------------------
# Tokenization with loss masks

def tokenize_record(record: Mapping[str, Any], tokenizer, *, train_on: str = "model") -> tuple[list[int], list[bool]]:
    """(ids, labels_mask): `labels_mask[i]` says whether token i is a prediction target.

    Plain text: `<bos> text <eos>`, all trained but BOS. Chat: exactly
    `tokenizer.encode_chat(messages, add_generation_prompt=False)`; with `train_on="model"` only the model
    turns' content and their `<end_of_turn>` are trained, with `"all"` every token but BOS.
    """
    if train_on not in ("model", "all"):
        raise ValueError(f"train_on must be 'model' or 'all', not {train_on!r}")
    if "text" in record:
        ids = [tokenizer.bos_id] + tokenizer.encode(record["text"], add_bos=False) + [tokenizer.eos_id]
        return ids, [False] + [True] * (len(ids) - 1)
    messages = record["messages"]
    ids, mask = [tokenizer.bos_id], [False]
    for text, trained in _chat_stretches(messages):
        piece = tokenizer.encode(text, add_bos=False)
        ids += piece
        mask += [trained or train_on == "all"] * len(piece)
    full = tokenizer.encode_chat(messages, add_generation_prompt=False)
    if ids != full:  # cannot happen while stretch boundaries sit at added tokens; guard the invariant
        raise DataError("encoding the conversation turn by turn does not give the ids of the whole "
                        f"conversation (first message: {str(messages[0].get('content'))[:60]!r}); "
                        "the loss mask would be misaligned")
    return ids, mask


def _chat_stretches(messages: Sequence[Mapping[str, Any]]) -> list[tuple[str, bool]]:
    """(text, trained) stretches whose concatenation is `render_chat(messages, False)`.

    Each turn is the difference between the renderings of successive prefixes of the conversation, so
    the template logic (system text folded into the first user turn, trimming, content items) lives in
    `render_chat` only.
    """
    start = 1 if messages[0].get("role") == "system" else 0
    head, tail = "<start_of_turn>model\n", "<end_of_turn>\n"
    out: list[tuple[str, bool]] = []
    done = ""
    for k in range(start, len(messages)):
        rendered = render_chat(messages[:k + 1], add_generation_prompt=False)
        turn, done = rendered[len(done):], rendered
        if messages[k]["role"] in _MODEL_ROLES:
            assert turn.startswith(head) and turn.endswith(tail), turn
            out += [(head, False), (turn[len(head):-1], True), ("\n", False)]  # content + <end_of_turn>
        else:
            out.append((turn, False))
    merged: list[tuple[str, bool]] = []  # fewer encode calls: join neighbours with the same flag
    for text, trained in out:
        if merged and merged[-1][1] == trained:
            merged[-1] = (merged[-1][0] + text, trained)
        elif text:
            merged.append((text, trained))
    return merged


# ---------------------------------------------------------------------------------------------------------
# Packing

def _targets(ids: Sequence[int], mask: Sequence[bool]) -> list[int]:
    """targets[i] = ids[i + 1] where that token is trained, else -100; the last token predicts nothing."""
    n = len(ids)
    return [ids[i + 1] if mask[i + 1] else IGNORE_INDEX for i in range(n - 1)] + [IGNORE_INDEX] * min(n, 1)


class Packer:
    """Greedy first-fit packing of documents into rows of `seq_len` tokens (see the module docstring).

    `add(ids, labels_mask)` returns the rows completed by this document (often none), `flush()` the
    rest. `bos_id`, when given, starts every continuation piece of a cut document.
    """

    def __init__(self, seq_len: int, *, pad_id: int = 0, bos_id: int | None = None, open_rows: int = 8):
        if seq_len < 2:
            raise ValueError(f"seq_len must be at least 2, not {seq_len}")
        if open_rows < 1:
            raise ValueError(f"open_rows must be at least 1, not {open_rows}")
        self.seq_len, self.pad_id, self.bos_id, self.open_rows = seq_len, pad_id, bos_id, open_rows
        self._rows: list[list[tuple[list[int], list[int]]]] = []  # open rows: pieces (ids, targets)
        self._used: list[int] = []

    def add(self, ids: Sequence[int], labels_mask: Sequence[bool]) -> list[dict[str, torch.Tensor]]:
        if len(ids) != len(labels_mask):
            raise ValueError(f"{len(ids)} ids but {len(labels_mask)} mask entries")
        ids = list(ids)
        targets = _targets(ids, labels_mask)
        out = []
        for piece in self._cut(ids, targets):
            if all(t == IGNORE_INDEX for t in piece[1]):
                continue  # nothing to learn from it
            out += self._place(piece)
        return out

    def flush(self) -> list[dict[str, torch.Tensor]]:
        rows = [self._build(r) for r in self._rows]
        self._rows, self._used = [], []
        return rows

    def _cut(self, ids: list[int], targets: list[int]) -> Iterator[tuple[list[int], list[int]]]:
        T = self.seq_len
        if len(ids) <= T:
            yield ids, targets
            return
        yield ids[:T], targets[:T]
        step = T - (self.bos_id is not None)
        for s in range(T, len(ids), step):
            if self.bos_id is None:
                yield ids[s:s + step], targets[s:s + step]
            else:  # fresh <bos> at position 0; it predicts nothing (the previous piece's end already does)
                yield [self.bos_id] + ids[s:s + step], [IGNORE_INDEX] + targets[s:s + step]

    def _place(self, piece: tuple[list[int], list[int]]) -> list[dict[str, torch.Tensor]]:
        n = len(piece[0])
        if n == self.seq_len:
            return [self._build([piece])]
        for i, used in enumerate(self._used):
            if used + n <= self.seq_len:
                self._rows[i].append(piece)
                self._used[i] += n
                if self._used[i] == self.seq_len:
                    self._used.pop(i)
                    return [self._build(self._rows.pop(i))]
                return []
        out = []
        if len(self._rows) == self.open_rows:  # no room anywhere: the oldest row goes out padded
            self._used.pop(0)
            out.append(self._build(self._rows.pop(0)))
        self._rows.append([piece])
        self._used.append(n)
        return out

    def _build(self, pieces: list[tuple[list[int], list[int]]]) -> dict[str, torch.Tensor]:
        ids, pos, seg, tgt = [], [], [], []
        for k, (p_ids, p_tgt) in enumerate(pieces):
            ids += p_ids
            tgt += p_tgt
            pos += range(len(p_ids))
            seg += [k] * len(p_ids)
        pad = self.seq_len - len(ids)
        return {"input_ids": torch.tensor(ids + [self.pad_id] * pad),
                "positions": torch.tensor(pos + [-1] * pad),
                "segment_ids": torch.tensor(seg + [-1] * pad),
                "targets": torch.tensor(tgt + [IGNORE_INDEX] * pad)}

    def state_dict(self) -> dict:
        return {"rows": copy.deepcopy(self._rows), "used": list(self._used)}

    def load_state_dict(self, state: Mapping) -> None:
        self._rows = [[(list(i), list(t)) for i, t in row] for row in state["rows"]]
        self._used = list(state["used"])


def pack(examples: Iterable[tuple[Sequence[int], Sequence[bool]]], seq_len: int, *, pad_id: int = 0,
         bos_id: int | None = None, open_rows: int = 8) -> Iterator[dict[str, torch.Tensor]]:
    """Rows {input_ids, positions, segment_ids, targets}, each a (seq_len,) int64 tensor, from
    (ids, labels_mask) examples: several documents per row (see `Packer`)."""
    packer = Packer(seq_len, pad_id=pad_id, bos_id=bos_id, open_rows=open_rows)
    for ids, mask in examples:
        yield from packer.add(ids, mask)
    yield from packer.flush()


def collate(rows: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack rows into a batch: each key (B, T)."""
    if not rows:
        raise ValueError("collate() needs at least one row")
    return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}


# ---------------------------------------------------------------------------------------------------------
# The resumable batch stream

class PackedDataset:
    """Batches of packed rows from data files, epoch after epoch, resumable exactly.

        data = PackedDataset("data/", tokenizer, seq_len=2048, batch_size=8, seed=0)
        for step, batch in zip(range(steps), data):
            loss = ...  # model(batch["input_ids"], batch["positions"], segment_ids=batch["segment_ids"])
            if step % 1000 == 0:
                torch.save({"data": data.state_dict(), ...}, path)
        # later: data.load_state_dict(torch.load(path)["data"]) and iterate on

    Epoch e reads the records with seed `seed + e` (no seed: file order every epoch). Rows flow on across
    epochs, so a batch may hold the end of one epoch and the start of the next. `epochs=None` repeats
    forever; otherwise the stream ends after `epochs` epochs, with a last smaller batch unless `drop_last`.
    One iteration at a time: `state_dict()` describes the position of the iterator in use, after the
    last batch it yielded.
    """

    def __init__(self, paths, tokenizer, seq_len: int, batch_size: int, seed: int | None = 0, *,
                 epochs: int | None = None, shuffle_buffer: int = 10_000, train_on: str = "model",
                 open_rows: int = 8, drop_last: bool = False):
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, not {batch_size}")
        if train_on not in ("model", "all"):
            raise ValueError(f"train_on must be 'model' or 'all', not {train_on!r}")
        self.files = resolve_files(paths)
        self.tokenizer = tokenizer
        self.seq_len, self.batch_size, self.seed, self.epochs = seq_len, batch_size, seed, epochs
        self.shuffle_buffer, self.train_on, self.drop_last = shuffle_buffer, train_on, drop_last
        self._packer = Packer(seq_len, pad_id=tokenizer.pad_id, bos_id=tokenizer.bos_id, open_rows=open_rows)
        self._epoch = 0
        self._records_done = 0  # records of the current epoch already handed to the packer
        self._pending: list[dict[str, torch.Tensor]] = []  # packed rows not yet batched
        self._batches = 0

    def _records(self, epoch: int) -> Iterator[dict]:
        seed = None if self.seed is None else self.seed + epoch
        return iter_records(self.files, seed=seed, shuffle_buffer=self.shuffle_buffer)

    def _pop_batch(self, n: int) -> dict[str, torch.Tensor]:
        rows, self._pending = self._pending[:n], self._pending[n:]
        self._batches += 1
        return collate(rows)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        B = self.batch_size
        if self.epochs is not None and self._epoch >= self.epochs:
            yield from self._drain()  # resumed after the last epoch's rows were packed
            return
        # Resume: replay the epoch's record stream up to where we were (read and parsed, not tokenized).
        records = itertools.islice(self._records(self._epoch), self._records_done, None)
        seen = self._records_done > 0
        while True:
            while len(self._pending) >= B:
                yield self._pop_batch(B)
            rec = next(records, None)
            if rec is not None:
                seen = True
                ids, mask = tokenize_record(rec, self.tokenizer, train_on=self.train_on)
                self._records_done += 1
                self._pending += self._packer.add(ids, mask)
                continue
            # End of the epoch.
            if not seen:
                raise DataError(f"the data files hold no record: {', '.join(map(str, self.files))}")
            self._pending += self._packer.flush()
            self._epoch += 1
            self._records_done = 0
            if self.epochs is not None and self._epoch >= self.epochs:
                yield from self._drain()
                return
            records = self._records(self._epoch)
            seen = False

    def _drain(self) -> Iterator[dict[str, torch.Tensor]]:
        while len(self._pending) >= self.batch_size:
            yield self._pop_batch(self.batch_size)
        if self._pending and not self.drop_last:
            yield self._pop_batch(len(self._pending))
        self._pending = []

    @property
    def epoch(self) -> int:
        return self._epoch

    @property
    def batches_yielded(self) -> int:
        return self._batches

    def state_dict(self) -> dict:
        """The stream position: plain ints, strings and lists (fits torch.save or JSON)."""
        return {"version": 1, "seed": self.seed, "seq_len": self.seq_len, "batch_size": self.batch_size,
                "files": [f.name for f in self.files], "epoch": self._epoch,
                "records_done": self._records_done, "batches": self._batches,
                "packer": self._packer.state_dict(),
                "pending": [{k: v.tolist() for k, v in r.items()} for r in self._pending]}

    def load_state_dict(self, state: Mapping) -> None:
        if state.get("version") != 1:
            raise ValueError(f"unknown data state version {state.get('version')!r}")
        mine = {"seed": self.seed, "seq_len": self.seq_len, "batch_size": self.batch_size,
                "files": [f.name for f in self.files]}
        diff = [k for k in mine if state[k] != mine[k]]
        if diff:
            raise ValueError("the saved data state belongs to another data stream: "
                             + "; ".join(f"{k} was {state[k]!r}, now {mine[k]!r}" for k in diff)
                             + ". Resume with the same files, seed, seq_len and batch_size, or start afresh.")
        self._epoch, self._records_done, self._batches = state["epoch"], state["records_done"], state["batches"]
        self._packer.load_state_dict(state["packer"])
        self._pending = [{k: torch.tensor(v) for k, v in r.items()} for r in state["pending"]]


# ---------------------------------------------------------------------------------------------------------
# Prompts with optional reference completions (on-policy recipes: GKD, RL)

def split_prompt(record: Mapping[str, Any], tokenizer) -> tuple[list[int], list[int]]:
    """(prompt ids, completion ids) of a chat record for recipes that generate.

    The prompt is the conversation before its last model turn, ending with the generation prompt
    `<start_of_turn>model\\n`, exactly `encode_chat(messages[:-1], add_generation_prompt=True)`; the
    completion is that turn's content plus `<end_of_turn>` (what the sampler produces, see
    `tokenize_record`). A conversation that does not end with a model turn is a prompt alone.
    """
    if "messages" not in record:
        raise DataError("on-policy recipes read chat records {\"messages\": [...]} (a prompt, and "
                        "optionally the reference answer as the last model turn), not plain text")
    messages = record["messages"]
    if messages[-1].get("role") not in _MODEL_ROLES:
        return tokenizer.encode_chat(messages, add_generation_prompt=True), []
    ids, mask = tokenize_record(record, tokenizer, train_on="model")
    end = len(mask)
    while end and not mask[end - 1]:
        end -= 1
    start = end
    while start and mask[start - 1]:
        start -= 1
    return ids[:start], ids[start:end]


def completion_row(prompt: Sequence[int], completion: Sequence[int], seq_len: int, pad_id: int
                   ) -> dict[str, torch.Tensor]:
    """One unpacked row `prompt + completion` (cut to seq_len) whose targets are the completion's
    tokens only: {input_ids, positions, segment_ids, targets} (seq_len,), padding at the end."""
    ids = (list(prompt) + list(completion))[:seq_len]
    p = len(prompt)
    targets = [ids[i + 1] if i + 1 >= p else IGNORE_INDEX for i in range(len(ids) - 1)] + [IGNORE_INDEX]
    pad = seq_len - len(ids)
    return {"input_ids": torch.tensor(ids + [pad_id] * pad),
            "positions": torch.tensor(list(range(len(ids))) + [-1] * pad),
            "segment_ids": torch.tensor([0] * len(ids) + [-1] * pad),
            "targets": torch.tensor(targets + [IGNORE_INDEX] * pad),
            "prompt_len": torch.tensor(p)}


class PromptDataset:
    """Batches of unpacked rows `prompt + reference completion` for recipes that generate, epoch
    after epoch, resumable exactly (the record stream is replayed up to the saved position).

    Each batch is {input_ids, positions, segment_ids, targets} (B, seq_len) as `completion_row` builds
    them, plus prompt_len (B,): a recipe may keep the reference completion (supervised) or replace it
    by a sample (on-policy). Prompts longer than `max_prompt_len` are skipped and counted in `skipped`.
    """

    def __init__(self, paths, tokenizer, seq_len: int, batch_size: int, seed: int | None = 0, *,
                 max_prompt_len: int | None = None, shuffle_buffer: int = 10_000):
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, not {batch_size}")
        self.files = resolve_files(paths)
        self.tokenizer, self.seq_len, self.batch_size, self.seed = tokenizer, seq_len, batch_size, seed
        self.max_prompt_len = min(max_prompt_len or seq_len - 1, seq_len - 1)
        self.shuffle_buffer = shuffle_buffer
        self._epoch, self._records_done, self._batches, self.skipped = 0, 0, 0, 0

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        while True:
            seed = None if self.seed is None else self.seed + self._epoch
            records = itertools.islice(iter_records(self.files, seed=seed, shuffle_buffer=self.shuffle_buffer),
                                       self._records_done, None)
            rows, usable = [], self._records_done > 0
            for rec in records:
                self._records_done += 1
                prompt, completion = split_prompt(rec, self.tokenizer)
                if len(prompt) > self.max_prompt_len:
                    self.skipped += 1
                    continue
                usable = True
                rows.append(completion_row(prompt, completion, self.seq_len, self.tokenizer.pad_id))
                if len(rows) == self.batch_size:
                    self._batches += 1
                    yield collate(rows)
                    rows = []
            if not usable:
                raise DataError(f"no record of {', '.join(map(str, self.files))} has a prompt of at most "
                                f"{self.max_prompt_len} tokens")
            self._epoch, self._records_done = self._epoch + 1, 0  # a last partial batch is dropped

    def state_dict(self) -> dict:
        return {"version": 1, "kind": "prompts", "seed": self.seed, "seq_len": self.seq_len,
                "batch_size": self.batch_size, "files": [f.name for f in self.files],
                "epoch": self._epoch, "records_done": self._records_done, "batches": self._batches}

    def load_state_dict(self, state: Mapping) -> None:
        mine = {"kind": "prompts", "seed": self.seed, "seq_len": self.seq_len,
                "batch_size": self.batch_size, "files": [f.name for f in self.files]}
        diff = [k for k in mine if state.get(k) != mine[k]]
        if state.get("version") != 1 or diff:
            raise ValueError("the saved data state belongs to another data stream ("
                             + ", ".join(diff or ["version"]) + " differ); resume with the same files, "
                             "seed, seq_len and batch_size, or start afresh")
        self._epoch, self._records_done, self._batches = state["epoch"], state["records_done"], state["batches"]
