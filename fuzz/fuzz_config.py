"""Fuzz the training-config loader: TOML / YAML / JSON files plus `section.key=value` overrides.

One input drives one load. Byte 0 picks the file suffix (bits 0-1: .toml, .yaml, .yml, .json), the
loader (bits 2-3: load_config, load_distill_config, load_qat_config, read_config_file +
apply_overrides + build_config) and whether a file is given at all (bit 4 clear; set: overrides
only, as `gemmalab train sft --set ...` without --config). The rest is the file's bytes, then, after
the first NUL, the overrides, NUL-separated, decoded as the command line is (UTF-8 with
surrogateescape). Documented error: ConfigError with a one-line message.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _harness import Target, instrumented, main, write  # noqa: E402

with instrumented():
    from gemmalab.train.config import (ConfigError, apply_overrides, build_config, load_config,
                                       load_distill_config, load_qat_config, read_config_file)

SUFFIXES = (".toml", ".yaml", ".yml", ".json")


def _direct(path: Path | None, overrides: list[str]):
    raw = read_config_file(path) if path else {}
    return build_config(apply_overrides(raw, overrides))


LOADERS = (load_config, load_distill_config, load_qat_config, _direct)


def split(data: bytes) -> tuple[int, bytes, list[str]]:
    """(selector byte, file bytes, overrides) of one fuzzer input."""
    if not data:
        return 0, b"", []
    sel, rest = data[0], data[1:]
    body, _, tail = rest.partition(b"\0")
    overrides = [o.decode("utf-8", "surrogateescape") for o in tail.split(b"\0") if o] if tail else []
    return sel, body, overrides


def one(data: bytes, scratch: Path) -> None:
    sel, body, overrides = split(data)
    suffix = SUFFIXES[sel & 3]
    loader = LOADERS[(sel >> 2) & 3]
    path = None if sel & 16 else write(scratch, "c" + suffix, body)
    cfg = loader(path, overrides)
    cfg.to_dict()  # what the trainers write next to the checkpoints


def encode(sel: int, body: str | bytes, overrides: list[str] = ()) -> bytes:
    body = body.encode() if isinstance(body, str) else body
    tail = b"\0" + b"\0".join(o.encode() for o in overrides) if overrides else b""
    return bytes([sel]) + body + tail


SFT_TOML = '[data]\ntrain = ["x.jsonl"]\n[optim]\nlr = 1e-4\n'
SFT_FULL = {"model": {"preset": "tiny", "tokenizer": "tok.gguf", "arch": {"hidden_size": 64}},
            "data": {"train": ["data.jsonl"], "seq_len": 48, "batch_size": 2},
            "optim": {"lr": 3e-3, "warmup_steps": 3, "grad_accum": 2, "betas": [0.9, 0.95]},
            "lora": {"rank": 4, "alpha": 8.0, "targets": ["q_proj", "v_proj"]},
            "run": {"out_dir": "out", "steps": 40, "save_every": 2, "log_every": 1, "threads": 1}}
QAT_TOML = """# qat.toml
[model]
path = "model.gguf"
[data]
train = ["corpus/"]
[qat]
format = "q4_0"
rounding = "ref"
sfp8_encoder = "production"
embedding = "q8_0"
tie_margin = 0.25
train_norms = true
[distill]
mode = "online"
loss = "full"
hard_weight = 0.0
[optim]
lr = 2e-5
"""
DISTILL_YAML = """model:
  preset: tiny
distill:
  mode: offline
  store: store/
  loss: sampled
  k: 16
  temperature: 1.0
eval:
  store: heldout/
  every: 10
optim: {lr: 0.001, betas: [0.9, 0.95]}
"""


def seeds(d: Path) -> list[bytes]:
    """Configs as docs/training.md, docs/qat.md and the tests write them, for each loader and suffix."""
    out = [
        encode(0 | 0 << 2, SFT_TOML, ["optim.lr=0.5", "run.steps=7", 'lora.targets=["q_proj"]']),
        encode(0 | 2 << 2, QAT_TOML),
        encode(0 | 2 << 2, QAT_TOML, ["qat.format=sfp8", "--distill.hard_weight=0.5"]),
        encode(1 | 1 << 2, DISTILL_YAML),
        encode(2 | 1 << 2, DISTILL_YAML, ["distill.mode=online", "data.train=[\"a.jsonl\"]",
                                          "distill.store=null"]),
        encode(3 | 0 << 2, json.dumps(SFT_FULL)),
        encode(3 | 3 << 2, json.dumps(SFT_FULL), ["model.dtype=bfloat16", "run.device=cpu"]),
        encode(1 | 0 << 2, "data:\n  train: [a.jsonl, b.parquet]\n  train_on: all\nrun:\n  seed: 3\n"),
        encode(16 | 0 << 2, "", ["data.train=[\"x.jsonl\"]", "model.activation_checkpointing=true"]),
        encode(16 | 1 << 2, "", ["distill.store=s", "distill.weighting=importance"]),
        encode(0 | 3 << 2, '[run]\nout_dir = "runs/x"\nsteps = 1_000\n[lora]\nrank = 0\n[model]\narch = { sliding_window = 16 }\n'),
    ]
    return out


if __name__ == "__main__":
    main(Target("config", one, (ConfigError,), seeds, max_len=4096,
                notes="read_config_file (.toml/.yaml/.yml/.json) + apply_overrides + build_config and "
                      "load_config / load_distill_config / load_qat_config with their check_* functions"))
