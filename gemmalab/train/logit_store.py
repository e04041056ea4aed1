"""Teacher-logit store: K sampled teacher ids + 16-bit probabilities per target position, on disk.

    gemmalab distill cache --teacher MODEL --data DATA --out DIR [--k 256] [--temperature T] ...

runs the teacher over packed rows of the data (`train.data`: the same tokenization and packing as
training) and keeps, for every target position, what `train.teacher.sample_targets` draws. Training
then reads (input ids, teacher ids, teacher probabilities) batches from the store with no teacher in
memory (`StoreDataset`), or the store can be extended later.

Layout of DIR:

    manifest.json            what the store is (teacher, tokenizer, K, temperature, sampling, data),
                             where the data stream stands, and the list of complete shards with their
                             size and sha256. Replaced atomically after each shard.
    shard-000000.safetensors rows_per_shard packed rows, arrays aligned by position (R, T, ...):
        input_ids, positions, segment_ids, targets    int32 (R, T)  the packed rows (train.data)
        teacher_ids       int32 (R, T, K)  distinct sampled ids, ascending, -1 padded / no target
        teacher_probs     float16 or bfloat16 (R, T, K)  teacher probability of each id at T
        teacher_counts    int16 (R, T, K)  draws per id (sampling with replacement only)
        teacher_logprobs  float16 (R, T, V)  optional full log-probabilities (--full-logprobs: a
                          reference for full-vocabulary KD and KL evaluation; 512 KiB per token)
      The safetensors header's metadata names the store's fingerprint (a hash of teacher, tokenizer
      and target settings) so that a shard copied from another store is refused.

Writes are atomic: a shard is written under a temporary name, fsynced and renamed, then the
manifest (which alone says what is complete) is replaced. A killed run leaves at most an orphan
shard that the next run overwrites. Rerunning the same command resumes from the manifest's data
position and appends shards; per-row random generators (seeded from --seed and the row index) make
the resumed store byte-identical to an uninterrupted one. `--max-tokens` stops early; rerun with a
larger value (or none) to append the rest.

Probabilities are float16 by default: sampled probabilities lie in (0, 1], where float16 keeps 11
significant bits against bfloat16's 8 (relative error 5e-4 instead of 4e-3); only probabilities
below 6e-8, whose renormalised weight is negligible, lose precision. --prob-dtype bfloat16 is there
for those who want the report's layout.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import random
import struct
import time
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np
import torch

from .checkpoint import _fsync_dir, write_atomic
from .teacher import SAMPLINGS, teacher_targets

__all__ = ["StoreError", "build_store", "LogitStore", "StoreDataset", "tokenizer_identity",
           "model_identity", "write_shard", "read_shard"]

FORMAT = "gemmalab-teacher-logits"
VERSION = 1
MANIFEST = "manifest.json"
_ST_DTYPES = {"int32": "I32", "int16": "I16", "int64": "I64", "float16": "F16", "bfloat16": "BF16",
              "float32": "F32", "uint8": "U8"}
_NP_DTYPES = {"I32": np.int32, "I16": np.int16, "I64": np.int64, "F16": np.float16, "BF16": np.uint16,
              "F32": np.float32, "U8": np.uint8}
_SIZES = {"I32": 4, "I16": 2, "I64": 8, "F16": 2, "BF16": 2, "F32": 4, "U8": 1}


class StoreError(ValueError):
    """A teacher-logit store that cannot be used as asked; the message says why and what to do."""


# ---------------------------------------------------------------------------------------------------------
# Identities

def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 23), b""):
            h.update(block)
    return h.hexdigest()


def model_identity(path: str | Path) -> dict:
    """{name, bytes, sha256} of a GGUF file or a Hugging Face directory (its weight and config files)."""
    p = Path(path).expanduser()
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.is_file() and f.suffix in (".safetensors", ".json", ".model"))
        h = hashlib.sha256()
        for f in files:
            h.update(f.name.encode() + b"\0" + _sha256_file(f).encode())
        return {"name": p.name, "bytes": sum(f.stat().st_size for f in files), "sha256": h.hexdigest()}
    return {"name": p.name, "bytes": p.stat().st_size, "sha256": _sha256_file(p)}


def tokenizer_identity(tokenizer) -> dict:
    """{vocab_size, sha256}: a hash of every piece and the special ids; equal iff the same vocabulary."""
    h = hashlib.sha256()
    for i in range(tokenizer.vocab_size):
        h.update(tokenizer.id_to_piece(i).encode("utf-8", "surrogatepass") + b"\0")
    for name in ("bos_id", "eos_id", "pad_id", "unk_id"):
        h.update(f"{name}={getattr(tokenizer, name)};".encode())
    return {"vocab_size": tokenizer.vocab_size, "sha256": h.hexdigest()}


def resolve_teacher(teacher: str | Path | None) -> Path:
    """The teacher's file: None or "default" is the embedded Gemma 3 270M."""
    if teacher in (None, "", "default"):
        from .._paths import default_model_path
        return default_model_path()
    p = Path(teacher).expanduser()
    if not p.exists():
        raise StoreError(f"teacher {p}: no such file or directory")
    return p


def _fingerprint(teacher: dict, tokenizer: dict, targets: dict) -> str:
    blob = json.dumps([teacher["sha256"], tokenizer["sha256"], targets], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


# ---------------------------------------------------------------------------------------------------------
# Shard files (safetensors layout, written through memory maps so a shard never sits whole in memory)

def _header(specs: Mapping[str, tuple[str, tuple[int, ...]]], metadata: Mapping[str, str]) -> tuple[bytes, dict]:
    entries, offset = {}, 0
    for name, (st, shape) in specs.items():
        n = int(np.prod(shape, dtype=np.int64)) * _SIZES[st]
        entries[name] = {"dtype": st, "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    header = dict(entries, __metadata__=dict(metadata))
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # 8-byte aligned data, as the safetensors writer does
    return struct.pack("<Q", len(raw)) + raw, entries


class ShardWriter:
    """Creates `path` atomically: `arrays[name]` are writable memory maps; `commit()` publishes it."""

    def __init__(self, path: Path, specs: Mapping[str, tuple[str, tuple[int, ...]]], metadata: Mapping[str, str]):
        self.path = Path(path)
        self.tmp = self.path.with_name(f".{self.path.name}.tmp{os.getpid()}")
        head, entries = _header(specs, metadata)
        total = len(head) + max([e["data_offsets"][1] for e in entries.values()] + [0])
        try:
            with open(self.tmp, "wb") as f:
                f.write(head)
                _allocate(f, total)
        except BaseException:
            self.tmp.unlink(missing_ok=True)
            raise
        self.arrays = {name: np.memmap(self.tmp, dtype=_NP_DTYPES[e["dtype"]], mode="r+",
                                       offset=len(head) + e["data_offsets"][0], shape=tuple(e["shape"]))
                       for name, e in entries.items() if e["data_offsets"][1] > e["data_offsets"][0]}

    def commit(self) -> tuple[int, str]:
        for a in self.arrays.values():
            a.flush()
        self.arrays = {}
        with open(self.tmp, "rb+") as f:
            os.fsync(f.fileno())
        digest = _sha256_file(self.tmp)
        os.replace(self.tmp, self.path)
        _fsync_dir(self.path.parent)
        return self.path.stat().st_size, digest

    def abort(self) -> None:
        self.arrays = {}
        self.tmp.unlink(missing_ok=True)


def _allocate(f, total: int) -> None:
    """Reserve the file's blocks before it is written through memory maps. A sparse file (truncate)
    on a full file system would fail only when a mapped page is first written, as SIGBUS, which
    kills the process; reserved blocks make a full disk an ENOSPC OSError here, before any work.
    posix_fallocate (glibc emulates it where the file system lacks fallocate); else write zeros."""
    f.flush()
    try:
        os.posix_fallocate(f.fileno(), 0, total)
        return
    except OSError as e:
        if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
            raise
    except AttributeError:  # no posix_fallocate on this platform
        pass
    f.seek(0, os.SEEK_END)
    left = total - f.tell()
    zeros = bytes(min(left, 1 << 20))
    while left > 0:
        left -= f.write(zeros[:left])
    f.flush()


def _write_json_atomic(path: Path, obj: dict) -> None:
    """The manifest, replaced atomically (temporary file, fsync, rename, fsync of the directory); the
    temporary file is removed if the write fails (a full disk), so the old manifest stays as it was."""
    write_atomic(path, json.dumps(obj, indent=1).encode())


def write_shard(path: str | Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] = {}) -> tuple[int, str]:
    """Write CPU tensors as one safetensors file, atomically; returns (bytes, sha256)."""
    specs = {k: (_ST_DTYPES[str(v.dtype).removeprefix("torch.")], tuple(v.shape)) for k, v in tensors.items()}
    w = ShardWriter(Path(path), specs, metadata)
    try:
        for k, v in tensors.items():
            if k in w.arrays:
                w.arrays[k][...] = _to_numpy(v)
        return w.commit()
    except BaseException:
        w.abort()
        raise


def _to_numpy(t: torch.Tensor) -> np.ndarray:
    t = t.detach().cpu().contiguous()
    return t.view(torch.int16).numpy().view(np.uint16) if t.dtype == torch.bfloat16 else t.numpy()


_MAX_HEADER = 100 * 2**20  # a shard's JSON header is a few KiB; more is not a shard
_MAX_NDIM = 16


def _short(value: Any, n: int = 60) -> str:
    """repr(value) cut to n characters: names and values from a damaged file, quoted on one line."""
    r = repr(value)
    return r if len(r) <= n else r[:n] + "..."


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _read_header(path: Path) -> tuple[dict, int]:
    """The shard's header (a dict) and where its data starts. The header length is checked against
    the file's size before anything is read (a bogus 8-byte length would otherwise ask for 2^64 bytes)."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            raw = f.read(8)
            if len(raw) < 8:
                raise StoreError(f"{path}: truncated shard (no header); delete it or rebuild the store")
            (n,) = struct.unpack("<Q", raw)
            if n > _MAX_HEADER or n > size - 8:
                raise StoreError(f"{path}: not a shard file (header length {n}, file of {size} bytes)")
            text = f.read(n)
        if len(text) != n:
            raise StoreError(f"{path}: truncated shard header ({len(text)} of {n} bytes)")
        header = json.loads(text)
    except (OSError, ValueError, UnicodeDecodeError) as e:  # ValueError: JSONDecodeError, huge ints
        if isinstance(e, StoreError):
            raise
        raise StoreError(f"{path}: unreadable shard header ({_one_line(e)}); the file is damaged") from e
    except RecursionError:
        raise StoreError(f"{path}: unreadable shard header (nested too deeply); the file is damaged") from None
    if not isinstance(header, dict):
        raise StoreError(f"{path}: shard header is a JSON {type(header).__name__}, not an object; "
                         "the file is damaged")
    meta = header.get("__metadata__")
    if meta is not None and not (isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())):
        # the safetensors format: __metadata__ is a map of strings to strings
        raise StoreError(f"{path}: shard metadata is not a map of strings; the file is damaged")
    return header, 8 + n


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def _tensor_entry(path: Path, name: str, e: Any, data_bytes: int) -> tuple[str, tuple[int, ...], int, int]:
    """(dtype, shape, begin, end) of one header entry, checked: a known dtype, a shape of non-negative
    ints, 0 <= begin <= end <= the data's size, end - begin = the bytes the shape needs."""
    bad = f"{path}: tensor {_short(name)}"
    if not isinstance(e, dict):
        raise StoreError(f"{bad}: header entry is not an object; the file is damaged")
    dtype, shape, offs = e.get("dtype"), e.get("shape"), e.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in _NP_DTYPES:
        raise StoreError(f"{bad}: unsupported dtype {_short(dtype)} (this reader knows {', '.join(_NP_DTYPES)})")
    if (not isinstance(shape, list) or len(shape) > _MAX_NDIM
            or not all(_is_int(d) and 0 <= d < 2**62 for d in shape)):
        raise StoreError(f"{bad}: bad shape {_short(shape)}; the file is damaged")
    if not (isinstance(offs, list) and len(offs) == 2 and all(_is_int(o) for o in offs)
            and 0 <= offs[0] <= offs[1]):
        raise StoreError(f"{bad}: bad data_offsets {_short(offs)}; the file is damaged")
    b0, b1 = offs
    if b1 > data_bytes:
        raise StoreError(f"{path}: truncated shard ({data_bytes} data bytes, tensor {_short(name)} "
                         f"needs {b1})")
    count, bound = 1, 1
    for d in shape:
        count, bound = count * d, bound * max(d, 1)
    if count * _SIZES[dtype] != b1 - b0 or bound * _SIZES[dtype] >= 2**62:
        raise StoreError(f"{bad}: shape {shape} of {dtype} does not fit its {b1 - b0} bytes; the file "
                         "is damaged")
    return dtype, tuple(shape), b0, b1


def read_shard(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors of a shard as torch tensors backed by a copy-on-write memory map (lazy reads).
    Every entry is checked against the file's size before it is mapped; a damaged shard raises
    StoreError."""
    path = Path(path)
    header, start = _read_header(path)
    meta = header.pop("__metadata__", None) or {}
    try:
        size = path.stat().st_size
    except OSError as e:
        raise StoreError(f"{path}: cannot read the shard ({_one_line(e)})") from e
    entries = {name: _tensor_entry(path, name, e, size - start) for name, e in header.items()}
    out = {}
    for name, (dtype, shape, b0, b1) in entries.items():
        if b1 == b0:
            arr = np.zeros(shape, dtype=_NP_DTYPES[dtype])
        else:
            try:
                arr = np.memmap(path, dtype=_NP_DTYPES[dtype], mode="c", offset=start + b0, shape=shape)
            except (OSError, ValueError) as e:
                raise StoreError(f"{path}: cannot map tensor {_short(name)} ({_one_line(e)})") from e
        t = torch.from_numpy(arr)
        out[name] = t.view(torch.bfloat16) if dtype == "BF16" else t
    return out, meta


# ---------------------------------------------------------------------------------------------------------
# Building (and extending) a store

def _data_identity(files: list[Path]) -> list[dict]:
    return [{"path": str(f), "bytes": f.stat().st_size} for f in files]


def build_store(out: str | Path, data, *, teacher: str | Path | None = None, k: int = 256,
                temperature: float = 1.0, sampling: str = "with_replacement", seq_len: int = 1024,
                train_on: str = "all", seed: int = 0, shuffle_buffer: int = 10_000,
                max_tokens: int | None = None, rows_per_shard: int | None = None,
                full_logprobs: bool = False, prob_dtype: str = "float16", progress: bool = True,
                log=print) -> dict:
    """Run the teacher over `data` and write (or extend) the store in `out`; return the manifest.

    teacher: GGUF file or HF directory (None: the embedded Gemma 3 270M). data: JSONL/Parquet files,
    directories or globs (`train.data`). The records are shuffled with `seed` (file order + a
    shuffle buffer, as training does) and packed into rows of `seq_len`. See the module docstring
    for the layout, resuming and appending.
    """
    from ..lm import load
    from .data import PackedDataset, resolve_files

    if sampling not in SAMPLINGS:
        raise StoreError(f"unknown sampling {sampling!r}; use one of {', '.join(SAMPLINGS)}")
    if k < 1:
        raise StoreError(f"--k must be >= 1, got {k}")
    if not temperature > 0:
        raise StoreError(f"--temperature must be > 0, got {temperature}")
    if prob_dtype not in ("float16", "bfloat16"):
        raise StoreError(f"--prob-dtype must be float16 or bfloat16, not {prob_dtype!r}")
    out = Path(out)
    if out.exists() and not (out / MANIFEST).exists() and any(
            not p.name.startswith(".") for p in out.iterdir()):  # our lock and temp files start with "."
        raise StoreError(f"{out} exists and is not a teacher-logit store (no {MANIFEST}); "
                         "choose a new --out")
    teacher_path = resolve_teacher(teacher)
    files = resolve_files(data)
    t_start = time.perf_counter()
    lm = load(teacher_path, mode="fp32", dtype=torch.float32)
    model, tokenizer = lm.model, lm.tokenizer
    V = model.config.vocab_size
    if rows_per_shard is None:
        row_bytes = seq_len * V * 2 if full_logprobs else seq_len * k * 8
        rows_per_shard = int(max(1, min(64, (1 << 30) // row_bytes)))
    targets_cfg = {"k": k, "temperature": float(temperature), "sampling": sampling,
                   "prob_dtype": prob_dtype, "full_logprobs": bool(full_logprobs), "vocab_size": V}
    teacher_id = dict(model_identity(teacher_path), path=str(teacher_path.resolve()),
                      config=_jsonable(model.config))
    tok_id = tokenizer_identity(tokenizer)
    data_cfg = {"files": _data_identity(files), "seq_len": seq_len, "train_on": train_on, "seed": seed,
                "shuffle_buffer": shuffle_buffer, "rows_per_shard": rows_per_shard}
    fingerprint = _fingerprint(teacher_id, tok_id, targets_cfg)
    dataset = PackedDataset(files, tokenizer, seq_len, 1, seed=seed, epochs=1,
                            shuffle_buffer=shuffle_buffer, train_on=train_on)

    try:
        out.mkdir(parents=True, exist_ok=True)
        with _writer_lock(out):
            return _build(out, dataset, model, teacher_id, tok_id, targets_cfg, data_cfg, fingerprint,
                          files, tokenizer, seq_len, seed, shuffle_buffer, train_on, max_tokens,
                          rows_per_shard, progress, log, t_start)
    except OSError as e:
        if e.errno not in _WRITE_ERRNOS:
            raise
        raise StoreError(_write_error(out, e)) from e


# A full or read-only output file system. Shards are reserved before they are written and the
# manifest is replaced atomically, so what the store lists stays complete and a rerun resumes.
_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG}


def _write_error(out: Path, e: OSError) -> str:
    what = Path(e.filename).name if e.filename else "the store"
    reason = f"{e.strerror or e} ({errno.errorcode.get(e.errno, e.errno)})"
    if e.errno == errno.EROFS:
        hint = "the directory is on a read-only file system; choose a writable --out"
    else:
        hint = ("the complete shards are kept: free space (or raise the quota) and rerun the same "
                "command to resume")
    return f"cannot write {what} in {out}: {reason}; {hint}"


@contextlib.contextmanager
def _writer_lock(out: Path):
    """One writer per store: an exclusive lock on DIR/.lock for the duration of the run. Temporary
    files left by a killed writer (named after its pid) are removed once the lock is ours."""
    import fcntl
    f = open(out / ".lock", "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.close()
        raise StoreError(f"another `gemmalab distill cache` is writing to {out}; wait for it to finish "
                         "(one writer per store)") from None
    try:
        for stale in out.glob(".*.tmp*"):
            stale.unlink(missing_ok=True)
        yield
    finally:
        fcntl.flock(f, fcntl.LOCK_UN)
        f.close()


def _build(out, dataset, model, teacher_id, tok_id, targets_cfg, data_cfg, fingerprint, files, tokenizer,
           seq_len, seed, shuffle_buffer, train_on, max_tokens, rows_per_shard, progress, log, t_start) -> dict:
    """The cache loop of `build_store`, under the writer lock."""
    manifest = _load_manifest(out) if (out / MANIFEST).exists() else None
    if manifest is not None:
        _check_same_build(out, manifest, teacher_id, tok_id, targets_cfg, data_cfg)
        dataset.load_state_dict(manifest["position"])
        log(f"resuming {out}: {len(manifest['shards'])} shards, {manifest['totals']['targets']:,} "
            f"target tokens already stored")
    else:
        manifest = {"format": FORMAT, "version": VERSION, "fingerprint": fingerprint,
                    "teacher": teacher_id, "tokenizer": tok_id, "targets": targets_cfg, "data": data_cfg,
                    "position": dataset.state_dict(), "complete": False, "shards": [],
                    "totals": {"rows": 0, "targets": 0, "bytes": 0, "teacher_seconds": 0.0}}
        _write_json_atomic(out / MANIFEST, manifest)

    done = manifest["totals"]["targets"]
    if manifest["complete"]:
        log(f"{out} already holds all of the data ({done:,} target tokens); nothing to do")
        return manifest
    if max_tokens is not None and done >= max_tokens:
        log(f"{out} already holds {done:,} >= --max-tokens {max_tokens:,} target tokens; nothing to do")
        return manifest
    total = _count_targets(files, tokenizer, seq_len, seed, shuffle_buffer, train_on)
    goal = total if max_tokens is None else min(total, max_tokens)
    bar = _progress(goal, done, progress)
    rows = iter(dataset)
    row_index = manifest["totals"]["rows"]
    with torch.inference_mode():
        while max_tokens is None or done < max_tokens:
            chunk, n_chunk, exhausted = [], 0, False
            for batch in rows:
                chunk.append({kk: v[0] for kk, v in batch.items()})
                n_chunk += int((batch["targets"] != -100).sum())
                if len(chunk) == rows_per_shard or (max_tokens is not None and done + n_chunk >= max_tokens):
                    break
            else:
                exhausted = True
            if chunk:
                t0 = time.perf_counter()
                entry = _write_shard_rows(out, len(manifest["shards"]), chunk, row_index, model,
                                          fingerprint, targets_cfg, seed, bar)
                row_index += len(chunk)
                done += entry["targets"]
                manifest["shards"].append(entry)
                tot = manifest["totals"]
                tot["rows"], tot["targets"] = row_index, done
                tot["bytes"] += entry["bytes"]
                tot["teacher_seconds"] = round(tot["teacher_seconds"] + time.perf_counter() - t0, 3)
            manifest["position"] = dataset.state_dict()
            manifest["complete"] = exhausted
            _write_json_atomic(out / MANIFEST, manifest)
            if exhausted:
                break
    if bar:
        bar.close()
    tot = manifest["totals"]
    per_tok = tot["bytes"] / max(1, tot["targets"])
    log(f"{out}: {len(manifest['shards'])} shards, {tot['targets']:,} target tokens, "
        f"{_human(tot['bytes'])} on disk = {per_tok:,.0f} bytes/token "
        f"({'complete' if manifest['complete'] else 'more data left: rerun to append'}); "
        f"{time.perf_counter() - t_start:.0f} s")
    return manifest


def _write_shard_rows(out: Path, index: int, chunk: list[dict], row_index: int, model, fingerprint: str,
                      targets_cfg: dict, seed: int, bar) -> dict:
    R, T = len(chunk), chunk[0]["input_ids"].shape[0]
    K, V = targets_cfg["k"], targets_cfg["vocab_size"]
    specs = {name: ("I32", (R, T)) for name in ("input_ids", "positions", "segment_ids", "targets")}
    specs["teacher_ids"] = ("I32", (R, T, K))
    specs["teacher_probs"] = (_ST_DTYPES[targets_cfg["prob_dtype"]], (R, T, K))
    if targets_cfg["sampling"] == "with_replacement":
        specs["teacher_counts"] = ("I16", (R, T, K))
    if targets_cfg["full_logprobs"]:
        specs["teacher_logprobs"] = ("F16", (R, T, V))
    name = f"shard-{index:06d}.safetensors"
    meta = {"format": FORMAT, "fingerprint": fingerprint, "shard": str(index), "first_row": str(row_index)}
    w = ShardWriter(out / name, specs, meta)
    n_targets = 0
    try:
        for r, row in enumerate(chunk):
            for key in ("input_ids", "positions", "segment_ids", "targets"):
                w.arrays[key][r] = row[key].numpy().astype(np.int32)
            batch = {key: v[None] for key, v in row.items()}
            hidden = model.hidden_states(batch["input_ids"], batch["positions"],
                                         segment_ids=batch["segment_ids"])
            on_logits = None
            if targets_cfg["full_logprobs"]:
                lp = w.arrays["teacher_logprobs"][r]  # (T, V) memory map

                def on_logits(rows, z, lp=lp):
                    lp[rows.numpy()] = torch.log_softmax(z / targets_cfg["temperature"], -1).numpy()
            gen = torch.Generator().manual_seed(_row_seed(seed, row_index + r))
            tt = teacher_targets(model, batch, k=K, sampling=targets_cfg["sampling"],
                                 temperature=targets_cfg["temperature"], generator=gen, hidden=hidden,
                                 on_logits=on_logits)
            w.arrays["teacher_ids"][r] = tt["teacher_ids"][0].numpy().astype(np.int32)
            w.arrays["teacher_probs"][r] = _to_numpy(tt["teacher_probs"][0].to(
                getattr(torch, targets_cfg["prob_dtype"])))
            if "teacher_counts" in w.arrays:
                w.arrays["teacher_counts"][r] = tt["teacher_counts"][0].numpy().astype(np.int16)
            n = int((row["targets"] != -100).sum())
            n_targets += n
            if bar:
                bar.update(n)
        size, digest = w.commit()
    except BaseException:
        w.abort()
        raise
    return {"file": name, "rows": R, "targets": n_targets, "bytes": size, "sha256": digest}


def _row_seed(seed: int, row: int) -> int:
    return (seed * 0x9E3779B1 + row * 0x85EBCA77 + 1) % (2**63)


def _count_targets(files, tokenizer, seq_len, seed, shuffle_buffer, train_on) -> int:
    """Target tokens of the whole data set, for the progress bar's ETA (tokenizing is cheap next to
    running the teacher)."""
    from .data import PackedDataset
    ds = PackedDataset(files, tokenizer, seq_len, 256, seed=seed, epochs=1, shuffle_buffer=shuffle_buffer,
                       train_on=train_on)
    return sum(int((b["targets"] != -100).sum()) for b in ds)


def _check_same_build(out, manifest, teacher_id, tok_id, targets_cfg, data_cfg) -> None:
    diffs = []
    if manifest["teacher"]["sha256"] != teacher_id["sha256"]:
        diffs.append(f"teacher {manifest['teacher']['name']} (sha256 {manifest['teacher']['sha256'][:12]}) "
                     f"vs {teacher_id['name']} ({teacher_id['sha256'][:12]})")
    if manifest["tokenizer"]["sha256"] != tok_id["sha256"]:
        diffs.append("tokenizer")
    for key, value in targets_cfg.items():
        if manifest["targets"].get(key) != value:
            diffs.append(f"{key} {manifest['targets'].get(key)!r} vs {value!r}")
    for key, value in data_cfg.items():
        if manifest["data"].get(key) != value:
            diffs.append(f"data {key} {manifest['data'].get(key)!r} vs {value!r}")
    if diffs:
        raise StoreError(f"{out} was built with other settings; to resume or append, use the same "
                         f"teacher, data and options (or a new --out): " + "; ".join(diffs))


def _jsonable(config) -> dict:
    import dataclasses
    return json.loads(json.dumps(dataclasses.asdict(config)))


def _progress(total: int, initial: int, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm
    return tqdm(total=total, initial=initial, unit="tok", unit_scale=True, dynamic_ncols=True,
                desc="teacher")


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


# ---------------------------------------------------------------------------------------------------------
# Reading

def _load_manifest(path: Path) -> dict:
    f = Path(path) / MANIFEST
    if not f.is_file():
        raise StoreError(f"{path} is not a teacher-logit store (no {MANIFEST}); build one with "
                         "`gemmalab distill cache`")
    try:
        m = json.loads(f.read_text(encoding="utf-8"))
    except OSError as e:
        raise StoreError(f"{f}: cannot read the manifest ({_one_line(e)})") from e
    except (ValueError, UnicodeDecodeError) as e:  # ValueError: JSONDecodeError, ints of > 4300 digits
        raise StoreError(f"{f} is not valid JSON ({_one_line(e)}); the store is damaged") from e
    except RecursionError:
        raise StoreError(f"{f} is not valid JSON (nested too deeply); the store is damaged") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise StoreError(f"{f} is not a gemmalab teacher-logit manifest")
    if m.get("version") != VERSION:
        raise StoreError(f"{f}: store version {_short(m.get('version'))}, this gemmalab reads version {VERSION}")
    _check_manifest(f, m)
    return m


_MAX_COUNT = 2**63  # sizes, rows, tokens: what a file system can hold


def _check_manifest(f: Path, m: dict) -> None:
    """Every field the readers and the resuming writer use, with its type and range: a damaged or
    hand-edited manifest is refused here with the field's name, not deep inside as a KeyError."""
    def field(obj: dict, where: str, key: str, ok, what: str):
        v = obj.get(key)
        if not ok(v):
            raise StoreError(f"{f}: {where}{key} is {_short(v)}, expected {what}; the store is damaged")
        return v

    def section(key: str) -> dict:
        return field(m, "", key, lambda v: isinstance(v, dict), "an object")

    count = (lambda v: _is_int(v) and 0 <= v < _MAX_COUNT), "an integer >= 0"
    positive = (lambda v: _is_int(v) and 1 <= v < _MAX_COUNT), "an integer >= 1"
    digest = (lambda v: isinstance(v, str) and len(v) >= 12), "a sha256 hex string"
    text = (lambda v: isinstance(v, str)), "a string"
    field(m, "", "fingerprint", *text)
    teacher, tok, targets, data = section("teacher"), section("tokenizer"), section("targets"), section("data")
    section("position")
    field(teacher, "teacher.", "name", *text)
    field(teacher, "teacher.", "sha256", *digest)
    field(teacher, "teacher.", "path", lambda v: v is None or isinstance(v, str), "a string")
    field(tok, "tokenizer.", "vocab_size", *positive)
    field(tok, "tokenizer.", "sha256", *digest)
    field(targets, "targets.", "k", *positive)
    field(targets, "targets.", "temperature",
          lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v < float("inf"),
          "a number > 0")
    field(targets, "targets.", "sampling", lambda v: v in SAMPLINGS, " or ".join(SAMPLINGS))
    field(targets, "targets.", "prob_dtype", lambda v: v in ("float16", "bfloat16"), "float16 or bfloat16")
    field(targets, "targets.", "full_logprobs", lambda v: isinstance(v, bool), "true or false")
    field(targets, "targets.", "vocab_size", *positive)
    field(data, "data.", "seq_len", *positive)
    field(m, "", "complete", lambda v: isinstance(v, bool), "true or false")
    shards = field(m, "", "shards", lambda v: isinstance(v, list), "a list")
    totals = section("totals")
    for key in ("rows", "targets", "bytes"):
        field(totals, "totals.", key, *count)
    field(totals, "totals.", "teacher_seconds",
          lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v < float("inf"),
          "a number >= 0")
    for i, e in enumerate(shards):
        where = f"shards[{i}]."
        if not isinstance(e, dict):
            raise StoreError(f"{f}: shards[{i}] is {_short(e)}, expected an object; the store is damaged")
        # a plain file name in the store's directory: no path of the manifest's choosing is opened
        field(e, where, "file", lambda v: isinstance(v, str) and v not in ("", ".", "..") and not any(
            c in v for c in "/\\") and v.isprintable(), "a file name in the store")
        for key in ("rows", "targets", "bytes"):
            field(e, where, key, *count)
        field(e, where, "sha256", *digest)


def _row_bytes(seq_len: int, k: int, vocab: int, counts: bool, logprobs: bool) -> int:
    """Bytes of one row in a shard: 4 int32 row arrays, teacher ids + probs (+ counts, + log-probs)."""
    return seq_len * (4 * 4 + k * (4 + 2 + (2 if counts else 0)) + (vocab * 2 if logprobs else 0))


class LogitStore:
    """A built store, opened for reading. Shards are checked against the manifest (size always,
    sha256 on first use unless verify=False) and against the store's fingerprint.

        store = LogitStore("cache/")
        store.check_tokenizer(student_tokenizer)   # refuses another vocabulary
        store.check_teacher("teacher.gguf")        # optional: refuses another teacher
        rows = store.rows(shard, r0, r1)           # dict of (r1 - r0, T, ...) tensors
    """

    def __init__(self, path: str | Path, verify: bool = True):
        self.path = Path(path)
        self.manifest = _load_manifest(self.path)
        self.verify = verify
        m = self.manifest
        self.k = m["targets"]["k"]
        self.temperature = m["targets"]["temperature"]
        self.sampling = m["targets"]["sampling"]
        self.seq_len = m["data"]["seq_len"]
        self.vocab_size = m["targets"]["vocab_size"]
        self.has_counts = self.sampling == "with_replacement"
        self.has_logprobs = bool(m["targets"]["full_logprobs"])
        self.shards = m["shards"]
        if not self.shards:
            raise StoreError(f"{self.path} holds no complete shard yet; run `gemmalab distill cache` "
                             "to fill it")
        for s in self.shards:
            f = self.path / s["file"]
            if not f.is_file():
                raise StoreError(f"{f} is missing; the store lists it as complete. Restore the file "
                                 "or rebuild the store")
            if f.stat().st_size != s["bytes"]:
                raise StoreError(f"{f} has {f.stat().st_size} bytes, the manifest says {s['bytes']}: "
                                 "the shard is truncated or was replaced. Rebuild the store")
            # row counts against the file's size, before anything (StoreDataset's block list) is
            # sized from them
            need = s["rows"] * _row_bytes(self.seq_len, self.k, self.vocab_size, self.has_counts,
                                          self.has_logprobs)
            if need > s["bytes"]:
                raise StoreError(f"{f}: the manifest says {s['rows']} rows, which need {need} bytes, but "
                                 f"the shard has {s['bytes']}; the store is damaged")
        self._open: dict[int, dict[str, torch.Tensor]] = {}

    @property
    def teacher_path(self) -> str | None:
        """Where the teacher was when the store was built (it may have moved since)."""
        return self.manifest["teacher"].get("path")

    @property
    def fingerprint(self) -> str:
        return self.manifest["fingerprint"]

    @property
    def num_rows(self) -> int:
        return sum(s["rows"] for s in self.shards)

    @property
    def num_targets(self) -> int:
        return sum(s["targets"] for s in self.shards)

    def describe(self) -> str:
        m, tot = self.manifest, self.manifest["totals"]
        t = m["targets"]
        return (f"{self.path}: teacher {m['teacher']['name']} (sha256 {m['teacher']['sha256'][:12]}), "
                f"vocab {m['tokenizer']['vocab_size']}, K={t['k']}, temperature {t['temperature']}, "
                f"{t['sampling']}, probs {t['prob_dtype']}{', full log-probs' if t['full_logprobs'] else ''}; "
                f"{len(self.shards)} shards, {self.num_rows:,} rows of {self.seq_len}, "
                f"{self.num_targets:,} target tokens, {_human(tot['bytes'])} "
                f"({tot['bytes'] / max(1, self.num_targets):,.0f} bytes/token)"
                f"{'' if m['complete'] else '; incomplete (rerun the cache command to append)'}")

    def check_tokenizer(self, tokenizer) -> None:
        mine, theirs = self.manifest["tokenizer"], tokenizer_identity(tokenizer)
        if mine["sha256"] != theirs["sha256"]:
            raise StoreError(f"{self.path} was built with another tokenizer (vocabulary of "
                             f"{mine['vocab_size']} pieces, sha256 {mine['sha256'][:12]}) than the "
                             f"student's ({theirs['vocab_size']} pieces, sha256 {theirs['sha256'][:12]}): "
                             "the stored token ids would mean other tokens. Use the teacher's tokenizer "
                             "for the student, or cache the teacher again")

    def check_teacher(self, teacher: str | Path | None) -> None:
        theirs = model_identity(resolve_teacher(teacher))
        mine = self.manifest["teacher"]
        if mine["sha256"] != theirs["sha256"]:
            raise StoreError(f"{self.path} holds the targets of teacher {mine['name']} (sha256 "
                             f"{mine['sha256'][:12]}), not of {theirs['name']} (sha256 "
                             f"{theirs['sha256'][:12]})")

    def shard(self, i: int) -> dict[str, torch.Tensor]:
        if i in self._open:
            return self._open[i]
        entry = self.shards[i]
        f = self.path / entry["file"]
        header, _ = _read_header(f)
        meta = header.get("__metadata__") or {}
        if meta.get("fingerprint") != self.fingerprint:
            raise StoreError(f"{f} belongs to another store (fingerprint {_short(meta.get('fingerprint'))}, this "
                             f"store {self.fingerprint!r}: another teacher, tokenizer or target settings). "
                             "Remove it and rerun the cache command")
        if self.verify and _sha256_file(f) != entry["sha256"]:
            raise StoreError(f"{f} is corrupted: its sha256 differs from the one recorded when it was "
                             "written. Delete the shard and its entry, or rebuild the store")
        tensors, _ = read_shard(f)
        R, T, K = entry["rows"], self.seq_len, self.k
        probs = torch.float16 if self.manifest["targets"]["prob_dtype"] == "float16" else torch.bfloat16
        expect = {name: ((R, T), torch.int32) for name in ("input_ids", "positions", "segment_ids", "targets")}
        expect |= {"teacher_ids": ((R, T, K), torch.int32), "teacher_probs": ((R, T, K), probs)}
        if self.has_counts:
            expect["teacher_counts"] = ((R, T, K), torch.int16)
        if self.has_logprobs:
            expect["teacher_logprobs"] = ((R, T, self.vocab_size), torch.float16)
        for name, (shape, dtype) in expect.items():
            if name not in tensors or tuple(tensors[name].shape) != shape or tensors[name].dtype != dtype:
                raise StoreError(f"{f}: tensor {name} is missing or not {str(dtype).removeprefix('torch.')} "
                                 f"of shape {shape}; the shard is damaged")
        self._open[i] = tensors
        return tensors

    def rows(self, shard: int, r0: int, r1: int) -> dict[str, torch.Tensor]:
        """Rows [r0, r1) of one shard as a training batch: int64 ids, fp32 probabilities, and the full
        fp16 log-probabilities as a zero-copy view of the memory-mapped file (read lazily)."""
        s = self.shard(shard)
        batch = {k: s[k][r0:r1].long() for k in ("input_ids", "positions", "segment_ids", "targets")}
        batch["teacher_ids"] = s["teacher_ids"][r0:r1].long()
        batch["teacher_probs"] = s["teacher_probs"][r0:r1].float()
        if self.has_counts:  # shard() checked these exist with their shapes
            batch["teacher_counts"] = s["teacher_counts"][r0:r1].long()
        if self.has_logprobs:
            batch["teacher_logprobs"] = s["teacher_logprobs"][r0:r1]
        return batch


class StoreDataset:
    """Training batches from a store, epoch after epoch, resumable exactly (the interface of
    `train.data.PackedDataset`: iterate, `state_dict()`, `load_state_dict()`).

    A batch is `batch_size` consecutive rows of one shard (so the optional full log-probabilities stay
    a zero-copy view); epoch e visits the shards' blocks in an order shuffled with seed + e. A shard's
    last rows that do not fill a batch are skipped: choose rows_per_shard a multiple of the batch size.
    """

    def __init__(self, store: LogitStore, batch_size: int, seed: int = 0, epochs: int | None = None):
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, not {batch_size}")
        self.store, self.batch_size, self.seed, self.epochs = store, batch_size, seed, epochs
        self.blocks = [(s, r0) for s, e in enumerate(store.shards)
                       for r0 in range(0, e["rows"] - batch_size + 1, batch_size)]
        if not self.blocks:
            raise StoreError(f"{store.path}: no shard holds {batch_size} rows; use a smaller batch size "
                             f"(shards hold {max(e['rows'] for e in store.shards)} rows at most)")
        self._epoch, self._index, self._batches = 0, 0, 0

    def _order(self, epoch: int) -> list[tuple[int, int]]:
        order = list(self.blocks)
        random.Random(self.seed + epoch).shuffle(order)
        return order

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        while self.epochs is None or self._epoch < self.epochs:
            order = self._order(self._epoch)
            while self._index < len(order):
                s, r0 = order[self._index]
                self._index += 1
                self._batches += 1
                yield self.store.rows(s, r0, r0 + self.batch_size)
            self._epoch, self._index = self._epoch + 1, 0

    @property
    def epoch(self) -> int:
        return self._epoch

    def state_dict(self) -> dict:
        return {"version": 1, "store": self.store.fingerprint, "blocks": len(self.blocks),
                "batch_size": self.batch_size, "seed": self.seed, "epoch": self._epoch,
                "index": self._index, "batches": self._batches}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        mine = {"store": self.store.fingerprint, "blocks": len(self.blocks), "batch_size": self.batch_size,
                "seed": self.seed}
        diff = [k for k in mine if state.get(k) != mine[k]]
        if diff:
            raise ValueError("the saved data state belongs to another store stream: "
                             + "; ".join(f"{k} was {state.get(k)!r}, now {mine[k]!r}" for k in diff)
                             + ". Resume with the same store, batch size and seed, or start afresh.")
        self._epoch, self._index, self._batches = state["epoch"], state["index"], state["batches"]
