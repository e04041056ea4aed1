"""Training checkpoints: written atomically, resumed exactly.

A checkpoint is a directory `checkpoints/step-000123/` holding the trainable weights
(model.safetensors), the optimizer and scheduler state, the data position, the RNG states and a
recipe's extra state (extra_state.pt: an EMA anchor, a reward cache). It is
written under a temporary name and renamed into place, and `checkpoints/latest` (a one-line file,
replaced atomically) names the newest complete one, so a kill at any moment leaves the last good
checkpoint intact. Old checkpoints are renamed out of the way before they are deleted, so no
half-deleted `step-*` directory is ever visible; temporary files and directories a killed writer
left (named after its pid) are removed by the next save.

A write that fails (a full disk, a read-only file system) removes its temporary files and raises
OSError with the errno and file name, whatever library wrote the file.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
from typing import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

# what save() and write_atomic() leave behind when killed: .tmp-step-000012-PID, .trash-step-000012-PID
# (a checkpoint being written or deleted), .NAME.tmpPID (a file being replaced)
_TEMP = re.compile(r"\.(?:(?:tmp|trash)-step-\d+-(\d+)|.+\.tmp(\d+))")


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes) -> None:
    """Replace `path` by `data` (temporary file, fsync, rename); a failed write removes its temporary
    file and leaves `path` as it was."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # ours, and no write of ours is in flight when we clean
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: someone else's live process
        return True
    return True


def remove_stale_temps(directory: Path) -> list[str]:
    """Remove the temporary files and directories that writers which no longer run (killed, or
    stopped by a full disk) left in `directory`; returns their names. A live writer's are kept."""
    removed = []
    try:
        entries = list(Path(directory).iterdir())
    except OSError:
        return removed
    for p in entries:
        m = _TEMP.fullmatch(p.name)
        if m is None or _alive(int(m.group(1) or m.group(2))):
            continue
        try:
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()
            removed.append(p.name)
        except OSError:
            pass  # a read-only or vanished entry: the next save tries again
    return removed


def _remove_dir(path: Path) -> None:
    """Delete a checkpoint directory without ever showing a half-deleted one: rename it to a
    temporary name first (atomic), then delete that."""
    trash = path.with_name(f".trash-{path.name}-{os.getpid()}")
    shutil.rmtree(trash, ignore_errors=True)
    os.replace(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def write_dir_atomic(directory: Path, files: dict[str, bytes | Callable[[Path], None]]) -> Path:
    """Write a directory of files atomically: each file into a temporary sibling (bytes, or a
    function writing the path it is given), fsynced, then renamed into place (an existing directory
    is moved aside first), so a reader never sees half of it. Reward models and merges use this."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = directory.with_name(f".{directory.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        for name, content in files.items():
            if callable(content):
                content(tmp / name)
            else:
                (tmp / name).write_bytes(content)
            with open(tmp / name, "rb") as f:
                os.fsync(f.fileno())
        if directory.exists():
            _remove_dir(directory)
        os.replace(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(directory.parent)
    return directory


class _Sink:
    """A binary file for torch.save that keeps the OSError of a failed write: torch's zip writer
    reports one as RuntimeError ("unexpected pos ...") without the errno."""

    def __init__(self, path: Path):
        self.path, self.error = path, None
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)

    def write(self, data) -> int:
        view, done = memoryview(data).cast("B"), 0
        while done < len(view):
            try:
                done += os.write(self.fd, view[done:])
            except OSError as e:  # a full disk: a short write, then ENOSPC
                self.error = OSError(e.errno, e.strerror, str(self.path))
                raise self.error from None
        return done

    def flush(self) -> None:
        pass


def _torch_save(obj, path: Path) -> None:
    sink = _Sink(path)
    try:
        torch.save(obj, sink)
        os.fsync(sink.fd)
    except Exception as e:
        if sink.error is not None and sink.error is not e:
            raise sink.error from None
        raise
    finally:
        os.close(sink.fd)


def _save_safetensors(tensors: dict, path: Path) -> None:
    try:
        save_file(tensors, str(path))
    except OSError:
        raise
    except Exception as e:  # safetensors' Rust writer: "I/O error: No space left on device (os error 28)"
        m = re.search(r"os error (\d+)", str(e))
        if m is None:
            raise
        code = int(m.group(1))
        raise OSError(code, os.strerror(code), str(path)) from None
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def save(out: Path, step: int, model, optimizer, scheduler, data, extra: dict, keep: int = 2,
         extra_state: dict | None = None) -> Path:
    """Write checkpoint `step` (atomically) and keep the newest `keep`; extra_state: {name: object
    with state_dict()} saved with it (an EMA anchor, a reward cache), restored by `load`."""
    root = Path(out) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(root)
    final = root / f"step-{step:06d}"
    tmp = root / f".tmp-step-{step:06d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        _save_safetensors(trainable_state(model), tmp / "model.safetensors")
        _torch_save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()},
                    tmp / "optimizer.pt")
        rng = {"torch": torch.get_rng_state(), "python": random.getstate()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        _torch_save(rng, tmp / "rng.pt")
        if extra_state:
            _torch_save({name: obj.state_dict() for name, obj in extra_state.items()},
                        tmp / "extra_state.pt")
        with open(tmp / "state.json", "w") as f:
            f.write(json.dumps(dict(extra, step=step, data=data.state_dict())))
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # a full disk: give the space back
        raise
    if final.exists():  # written by a run killed before it could update `latest`
        _remove_dir(final)
    os.replace(tmp, final)
    _fsync_dir(root)
    write_atomic(root / "latest", final.name.encode())
    complete = sorted(p for p in root.glob("step-*") if p.is_dir() and p != final)
    for old in complete[:-(keep - 1)] if keep > 1 else complete if keep == 1 else []:
        try:
            _remove_dir(old)
        except OSError:
            pass
    return final


def latest(out: Path) -> Path | None:
    pointer = Path(out) / "checkpoints" / "latest"
    if not pointer.is_file():
        return None
    path = pointer.parent / pointer.read_text().strip()
    return path if path.is_dir() else None


def load(path: Path, model, optimizer, scheduler, data, extra_state: dict | None = None) -> dict:
    weights = load_file(str(path / "model.safetensors"))
    expected = trainable_state(model)
    missing = sorted(set(expected) - set(weights))
    if missing:
        raise ValueError(f"{path} lacks trainable tensors {missing[:3]} (a different model or "
                         "LoRA setting than the run being resumed?)")
    model.load_state_dict(weights, strict=False)
    opt = torch.load(path / "optimizer.pt", weights_only=False)
    optimizer.load_state_dict(opt["optimizer"])
    scheduler.load_state_dict(opt["scheduler"])
    rng = torch.load(path / "rng.pt", weights_only=False)
    torch.set_rng_state(rng["torch"])
    random.setstate(rng["python"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    if extra_state:
        if not (path / "extra_state.pt").is_file():
            raise ValueError(f"{path} holds no {', '.join(sorted(extra_state))} state (a checkpoint of "
                             "another recipe or setting than the run being resumed?)")
        saved = torch.load(path / "extra_state.pt", weights_only=False)
        missing = sorted(set(extra_state) - set(saved))
        if missing:
            raise ValueError(f"{path} lacks the state of {missing} (a different recipe setting than "
                             "the run being resumed?)")
        for name, obj in extra_state.items():
            obj.load_state_dict(saved[name])
    state = json.loads((path / "state.json").read_text())
    data.load_state_dict(state["data"])
    return state


def _read_rows(path: Path) -> list[dict]:
    """The rows of metrics.jsonl; an unterminated last line is an append a full disk cut short."""
    text = path.read_text()
    lines = text.splitlines()
    rows = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except ValueError:
            if i == len(lines) - 1 and not text.endswith("\n"):
                break
            raise ValueError(f"{path}, line {i + 1}: not a JSON row ({line[:40]!r}); the file was edited "
                             "or damaged") from None
    return rows


class MetricsLog:
    """metrics.jsonl and metrics.csv (one row per logged step) plus TensorBoard events in tb/.

    A resumed run first drops rows past its step, so the files always describe one trajectory, and a
    last row that an append cut short (a full disk) is dropped with them. TensorBoard is written when the `tensorboard` package is installed (pip install gemmalab[train]).
    """

    FIELDS = ("step", "loss", "lr", "grad_norm", "tokens", "tokens_per_s")

    def __init__(self, path: Path, truncate_after: int | None = None, fields: tuple[str, ...] = FIELDS):
        self.path = Path(path)
        self.fields = tuple(fields)
        self.csv = self.path.with_suffix(".csv")
        rows = []
        remove_stale_temps(self.path.parent)
        if self.path.exists():
            rows = _read_rows(self.path)
            if truncate_after is not None:
                rows = [r for r in rows if r["step"] <= truncate_after]
        write_atomic(self.path, "".join(json.dumps(r) + "\n" for r in rows).encode())
        write_atomic(self.csv, "".join(self._csv_line(r) for r in [None] + rows).encode())
        try:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(str(self.path.parent / "tb"), purge_step=(truncate_after or 0) + 1)
        except ImportError:
            self.tb = None

    def _csv_line(self, row: dict | None) -> str:
        if row is None:
            return ",".join(self.fields) + "\n"
        return ",".join(repr(row.get(k, "")) for k in self.fields) + "\n"

    def write(self, row: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        with open(self.csv, "a") as f:
            f.write(self._csv_line(row))
        if self.tb is not None:
            for key in self.fields[1:]:
                if key in row:
                    self.tb.add_scalar(f"train/{key}", row[key], row["step"])
            self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
