"""Fuzz the teacher-logit store's shard reader: fuzzed shard bytes -> read_shard (every tensor touched),
and the same bytes as the one shard of a real store -> LogitStore.shard / rows / StoreDataset.

Seeds: shards of two real tiny stores (built once, like tests/test_distill_store.py builds one: the
tiny teacher, a few text records; one with sampled counts, one top-k with bf16 probabilities and full
log-probabilities) and a write_shard file of every dtype with an empty tensor.
"""
from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _harness import Target, instrumented, main  # noqa: E402

with instrumented():  # import gemmalab ONLY inside this block (coverage instrumentation)
    import torch

    from gemmalab.train.logit_store import LogitStore, StoreDataset, StoreError, read_shard, write_shard
from _store_seeds import build_seed_stores  # noqa: E402

SHARD = "shard-000000.safetensors"
_stores: dict[str, tuple[bytes, dict, Path]] = {}  # fingerprint -> (its bytes, manifest, fuzz store dir)


def setup(scratch: Path) -> None:
    """One store directory per seed store, whose manifest lists a single shard: the fuzzed file."""
    for src in build_seed_stores(scratch):
        m = json.loads((src / "manifest.json").read_text())
        m["shards"] = m["shards"][:1]
        d = scratch / f"fuzz-{src.name}"
        d.mkdir(exist_ok=True)
        _stores[m["fingerprint"]] = (m["fingerprint"].encode(), m, d)


def _touch(tensors: dict[str, torch.Tensor]) -> None:
    """Read every mapped byte (a mapping past the end of the file would fault here)."""
    for t in tensors.values():
        if t.numel():
            t.view(-1)[-1].item()
            t.float().sum()


def one(data: bytes, scratch: Path) -> None:
    p = scratch / "shard.safetensors"
    p.unlink(missing_ok=True)  # a new file: never truncate one that a mapping may still hold
    p.write_bytes(data)
    tensors, _ = read_shard(p)
    _touch(tensors)
    del tensors
    # through a store: the store whose fingerprint the bytes name (default: the first)
    fp, m, d = next((v for v in _stores.values() if v[0] in data), next(iter(_stores.values())))
    f = d / SHARD
    f.unlink(missing_ok=True)
    f.write_bytes(data)
    entry = dict(m["shards"][0], bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
    (d / "manifest.json").write_text(json.dumps(dict(m, shards=[entry])))
    store = LogitStore(d)
    _touch(store.rows(0, 0, entry["rows"]))
    _touch(next(iter(StoreDataset(store, 1))))


def seeds(d: Path) -> list[bytes]:
    out = [(src / SHARD).read_bytes() for src in build_seed_stores(d.parent)]
    g = torch.Generator().manual_seed(0)
    tensors = {"a": torch.randint(-9, 9, (2, 3), dtype=torch.int32, generator=g),
               "b": torch.randint(-9, 9, (3,), generator=g).to(torch.int16),
               "c": torch.randn(2, 2, generator=g).to(torch.float16),
               "d": torch.randn(3, generator=g).to(torch.bfloat16),
               "e": torch.randn(2, generator=g), "f": torch.arange(3, dtype=torch.int64),
               "g": torch.arange(4, dtype=torch.uint8), "empty": torch.zeros(0, 4, dtype=torch.int32)}
    write_shard(d / "all.safetensors", tensors, {"format": "x"})
    out.append((d / "all.safetensors").read_bytes())
    return out


if __name__ == "__main__":
    main(Target("store_shard", one, (StoreError,), seeds, setup=setup,
                notes="teacher-logit store shards (safetensors layout): read_shard, LogitStore.shard/rows, "
                      "StoreDataset"))
