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
    from gemmalab.train.build import init_weights

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


def chat_data(path: Path, n: int = 40, seed: int = 0, answers: bool = True) -> Path:
    """JSONL of chat records {"messages": [user, model]} (prompts for on-policy recipes; the model
    turn is the reference answer) made of the tiny tokenizer's corpus words."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            msgs = [{"role": "user", "content": " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 6)))}]
            if answers:
                msgs.append({"role": "model",
                             "content": " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 8)))})
            f.write(json.dumps({"messages": msgs}) + "\n")
    return path


def kill_and_resume(runner: str, raw_a: dict, raw_b: dict, env: dict, *, kill_after: int = 6) -> None:
    """Run `runner` (a `python -c` script taking the raw config as JSON and "1" to resume) on raw_a
    to the end, and on raw_b with a SIGKILL once its latest checkpoint reaches step `kill_after`,
    then resume raw_b; assert the final weights (bitwise) and the logged losses are equal."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from safetensors.torch import load_file

    a, b = Path(raw_a["run"]["out_dir"]), Path(raw_b["run"]["out_dir"])
    steps = raw_b["run"]["steps"]
    run = lambda raw, resume: subprocess.Popen([sys.executable, "-c", runner, json.dumps(raw),
                                                "1" if resume else "0"], env=env)
    assert run(raw_a, False).wait(timeout=600) == 0
    proc = run(raw_b, False)
    deadline = time.time() + 300
    latest = b / "checkpoints" / "latest"
    while not (latest.exists() and latest.read_text().strip() >= f"step-{kill_after:06d}"):
        assert proc.poll() is None and time.time() < deadline, "run ended before the kill"
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = int(latest.read_text().strip().split("-")[1])
    assert kill_after <= killed_at < steps
    assert run(raw_b, True).wait(timeout=600) == 0

    def weights(out):
        return load_file(str(out / "checkpoints" / (out / "checkpoints" / "latest").read_text().strip()
                             / "model.safetensors"))
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)  # bitwise on CPU
    la = [json.loads(x)["loss"] for x in (a / "metrics.jsonl").read_text().splitlines()]
    lb = [json.loads(x)["loss"] for x in (b / "metrics.jsonl").read_text().splitlines()]
    assert la == lb
