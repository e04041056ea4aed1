"""The seed stores both teacher-logit store harnesses start from (gemmalab imported lazily, so the
harness's instrumented() block stays the first import of gemmalab)."""
from __future__ import annotations

from pathlib import Path


def build_seed_stores(root: Path) -> list[Path]:
    """Two small real stores under root (built once per process; reused if there): one with sampled
    counts, one top-k with bf16 probabilities and full log-probabilities."""
    import torch

    from gemmalab.train.logit_store import build_store
    from tests.distill_helpers import text_data, tiny_teacher_gguf

    torch.set_num_threads(1)
    a, b = root / "seed-store-a", root / "seed-store-b"
    if not (a / "manifest.json").exists() or not (b / "manifest.json").exists():
        teacher = tiny_teacher_gguf(root / "teacher.gguf")
        data = text_data(root / "train.jsonl", 4, words=(10, 30))
        quiet = {"progress": False, "log": lambda *_: None}
        build_store(a, data, teacher=teacher, k=4, seq_len=16, rows_per_shard=2, **quiet)
        build_store(b, data, teacher=teacher, k=2, seq_len=8, rows_per_shard=1, sampling="topk",
                    prob_dtype="bfloat16", full_logprobs=True, max_tokens=12, **quiet)
    return [a, b]
