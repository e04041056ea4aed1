"""Training checkpoints: written atomically, resumed exactly.

A checkpoint is a directory `checkpoints/step-000123/` holding the trainable weights
(model.safetensors), the optimizer and scheduler state, the data position and the RNG states. It is
written under a temporary name and renamed into place, and `checkpoints/latest` (a one-line file,
replaced atomically) names the newest complete one, so a kill at any moment leaves the last good
checkpoint intact.
"""
from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


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
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def save(out: Path, step: int, model, optimizer, scheduler, data, extra: dict, keep: int = 2) -> Path:
    root = Path(out) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:06d}"
    tmp = root / f".tmp-step-{step:06d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file(trainable_state(model), str(tmp / "model.safetensors"))
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()},
               tmp / "optimizer.pt")
    rng = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    torch.save(rng, tmp / "rng.pt")
    (tmp / "state.json").write_text(json.dumps(dict(extra, step=step, data=data.state_dict())))
    for f in tmp.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(root)
    write_atomic(root / "latest", final.name.encode())
    complete = sorted(p for p in root.glob("step-*") if p.is_dir())
    for old in complete[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest(out: Path) -> Path | None:
    pointer = Path(out) / "checkpoints" / "latest"
    if not pointer.is_file():
        return None
    path = pointer.parent / pointer.read_text().strip()
    return path if path.is_dir() else None


def load(path: Path, model, optimizer, scheduler, data) -> dict:
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
    state = json.loads((path / "state.json").read_text())
    data.load_state_dict(state["data"])
    return state


class MetricsLog:
    """metrics.jsonl and metrics.csv (one row per logged step) plus TensorBoard events in tb/.

    A resumed run first drops rows past its step, so the files always describe one trajectory.
    TensorBoard is written when the `tensorboard` package is installed (pip install gemmalab[train]).
    """

    FIELDS = ("step", "loss", "lr", "grad_norm", "tokens", "tokens_per_s")

    def __init__(self, path: Path, truncate_after: int | None = None, fields: tuple[str, ...] = FIELDS):
        self.path = Path(path)
        self.fields = tuple(fields)
        self.csv = self.path.with_suffix(".csv")
        rows = []
        if self.path.exists():
            rows = [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]
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
