"""GPU training check: the SFT engine on CUDA with bf16 autocast (and activation checkpointing).

    python bench/gpu_train_check.py TOKENIZER.gguf TRAIN.jsonl OUT_DIR

Trains the tiny preset for 60 steps three ways (CPU fp32; CUDA bf16 autocast; CUDA bf16 autocast +
activation checkpointing) and prints the loss curves side by side.
"""
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from gemmalab.train.config import build_config  # noqa: E402
from gemmalab.train.recipes.sft import train_sft  # noqa: E402


def run(tok, data, out, device, checkpointing=False):
    cfg = build_config({"model": {"preset": "tiny", "tokenizer": tok,
                                  "activation_checkpointing": checkpointing},
                        "data": {"train": [data], "seq_len": 64, "batch_size": 8},
                        "optim": {"lr": 3e-3, "warmup_steps": 5},
                        "run": {"out_dir": out, "steps": 60, "log_every": 1, "save_every": 60,
                                "device": device}})
    t = time.perf_counter()
    train_sft(cfg, progress=False)
    rows = [json.loads(x) for x in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows], time.perf_counter() - t


def main():
    tok, data, out = sys.argv[1:4]
    runs = {"cpu fp32": run(tok, data, f"{out}/cpu", "cpu"),
            "cuda bf16 autocast": run(tok, data, f"{out}/cuda", "cuda"),
            "cuda bf16 + checkpointing": run(tok, data, f"{out}/cuda_ckpt", "cuda", True)}
    print(f"GPU: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    print("| run | loss step 1 | step 10 | step 30 | step 60 | seconds |")
    print("|---|---|---|---|---|---|")
    for name, (losses, secs) in runs.items():
        print(f"| {name} | {losses[0]:.4f} | {losses[9]:.4f} | {losses[29]:.4f} | {losses[59]:.4f} "
              f"| {secs:.1f} |")
        assert all(torch.isfinite(torch.tensor(losses))), name
        assert losses[-1] < 0.7 * losses[0], name
    a, b = runs["cuda bf16 autocast"][0], runs["cuda bf16 + checkpointing"][0]
    print("max |loss difference| with vs without checkpointing:",
          max(abs(x - y) for x, y in zip(a, b)))


if __name__ == "__main__":
    main()
