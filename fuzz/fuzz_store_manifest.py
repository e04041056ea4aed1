"""Fuzz the teacher-logit store's manifest reader: fuzzed manifest.json -> LogitStore open, describe,
check_tokenizer / check_teacher, every listed shard's rows and a StoreDataset batch, on a directory
holding a real store's shards.

Seeds: the manifests of two real tiny stores (built once, like tests/test_distill_store.py builds one:
one with sampled counts, one top-k with bf16 probabilities and full log-probabilities), and a variant
whose teacher is the small file the harness checks against.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _harness import Target, instrumented, main  # noqa: E402

with instrumented():  # import gemmalab ONLY inside this block (coverage instrumentation)
    from gemmalab.train.logit_store import LogitStore, StoreDataset, StoreError
from _store_seeds import build_seed_stores  # noqa: E402

TEACHER = b"a small stand-in teacher file"
_ctx: dict = {}  # fingerprint bytes -> store directory; "tokenizer"; "teacher"


def setup(scratch: Path) -> None:
    """A copy of each seed store's shards (the fuzzed manifest is written next to them)."""
    from tests.test_export import tiny_tokenizer

    _ctx["dirs"] = []
    for src in build_seed_stores(scratch):
        d = scratch / f"fuzz-{src.name}"
        shutil.copytree(src, d, dirs_exist_ok=True)
        fp = json.loads((src / "manifest.json").read_text())["fingerprint"]
        _ctx["dirs"].append((fp.encode(), d))
    _ctx["tokenizer"] = tiny_tokenizer(512)
    _ctx["teacher"] = scratch / "teacher.bin"
    _ctx["teacher"].write_bytes(TEACHER)


def one(data: bytes, scratch: Path) -> None:
    d = next((d for fp, d in _ctx["dirs"] if fp in data), _ctx["dirs"][0][1])
    (d / "manifest.json").write_bytes(data)
    store = LogitStore(d)
    store.describe()
    for check in (lambda: store.check_tokenizer(_ctx["tokenizer"]), lambda: store.check_teacher(_ctx["teacher"])):
        try:
            check()
        except StoreError as e:  # a refusal is the documented answer; carry on reading
            assert str(e).strip() and "\n" not in str(e).strip(), e
    for i, e in enumerate(store.shards[:4]):
        store.rows(i, 0, min(e["rows"], 2))
    try:
        next(iter(StoreDataset(store, 1)))
    except StopIteration:
        pass


def seeds(d: Path) -> list[bytes]:
    out = []
    for src in build_seed_stores(d.parent):
        out.append((src / "manifest.json").read_bytes())
    m = json.loads(out[0])
    m["teacher"]["sha256"] = hashlib.sha256(TEACHER).hexdigest()
    out.append(json.dumps(m, indent=1).encode())
    return out


if __name__ == "__main__":
    main(Target("store_manifest", one, (StoreError,), seeds, setup=setup,
                notes="teacher-logit store manifest.json: LogitStore open, describe, check_tokenizer, "
                      "check_teacher, rows, StoreDataset"))
