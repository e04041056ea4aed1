"""Tiny teachers, students and text for the distillation tests (fast on 2 CPU cores)."""
from __future__ import annotations

import json
import random
from pathlib import Path

import torch

from gemmalab.config import get_config
from gemmalab.model import Gemma3

from .test_export import CORPUS, tiny_tokenizer

WORDS = CORPUS.split()


def tiny_teacher_gguf(path: Path, seed: int = 0, std: float = 0.2, **changes) -> Path:
    """A random tiny Gemma 3 with the 512-piece tiny tokenizer, written as a f32 GGUF.

    std 0.2 (not the 0.02 of training init) gives a teacher with peaked, non-trivial distributions
    (entropy about 4.8 nats of ln 512 = 6.2; top probability about 0.12).
    """
    from gemmalab.checkpoints.export import save_gguf
    from gemmalab.train.sft import init_weights

    torch.manual_seed(seed)
    model = Gemma3(get_config("tiny").replace(**{"query_pre_attn_scalar": 16, **changes}))
    init_weights(model, std=std)
    save_gguf(model, tiny_tokenizer(), path, dtype="f32", overwrite=True)
    return path


def text_data(path: Path, n_records: int = 40, seed: int = 0, words: tuple[int, int] = (20, 120)) -> Path:
    """JSONL of {"text": ...} records made of the tiny tokenizer's corpus words."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n_records):
            f.write(json.dumps({"text": " ".join(rng.choice(WORDS) for _ in range(rng.randint(*words)))}) + "\n")
    return path
