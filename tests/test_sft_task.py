"""Acceptance: SFT teaches a tiny random-init Gemma 3 a synthetic chat task, measured by generation.

Task: two-digit addition as a chat (user "37+45" -> model "82"); 200 of the 8100 ordered pairs are
held out and never trained on. A "tiny" preset model (8 layers, d 64) trained with `train_sft` goes
from 0% to >= 90% exact-match accuracy (greedy decoding, the answer must end with <end_of_turn>) on
the held-out prompts, evaluated on a fresh model loaded from the latest checkpoint.

Tuning notes (this CPU): the accuracy jumps late in training (grokking-like); 1800 steps of 32
records at lr 3e-3 reached 99.5-100% on every seed tried (1500 steps: 94.5-100%). One thread: the
tensors are tiny, so a second thread gains nothing on an idle machine and loses several-fold when
the other core is busy.
"""
import json
import time

import pytest
import torch

from gemmalab.tokenizer import Tokenizer
from gemmalab.train.config import build_config
from gemmalab.train.build import build_model_and_tokenizer
from gemmalab.train.recipes.sft import train_sft

from .synthetic import addition_split, exact_match, load_trained, write_jsonl, write_tokenizer

PRESET = "tiny"
STEPS = 1800


def sft_config(tok, data, out, seed=0):
    return build_config({
        "model": {"preset": PRESET, "tokenizer": str(tok), "dtype": "float32", "autocast": "none"},
        # one record per row: a record is 18-19 tokens, so no row holds two and little is padding
        "data": {"train": [str(data)], "seq_len": 19, "batch_size": 32},
        "optim": {"lr": 3e-3, "warmup_steps": 20, "betas": [0.9, 0.98], "weight_decay": 0.0,
                  "min_lr_ratio": 0.1, "grad_clip": 1.0},
        "run": {"out_dir": str(out), "steps": STEPS, "seed": seed, "log_every": 100,
                "save_every": STEPS, "keep_checkpoints": 1, "device": "cpu", "threads": 1},
    })


@pytest.mark.slow  # about 1.5-2 minutes of training on one CPU thread
def test_sft_learns_two_digit_addition(tmp_path):
    tok = write_tokenizer(tmp_path / "tok.gguf")
    train, heldout = addition_split(n_heldout=200, seed=0)
    assert not {p for p, _ in train} & {p for p, _ in heldout}
    data = write_jsonl(tmp_path / "train.jsonl", train, seed=0)
    cfg = sft_config(tok, data, tmp_path / "run")
    tokenizer = Tokenizer.from_gguf(tok)

    threads = torch.get_num_threads()  # train_sft sets the process-wide count; restore it after
    try:
        torch.set_num_threads(1)
        # The same initial weights train_sft starts from (same preset, same seed).
        model, _ = build_model_and_tokenizer(cfg, torch.device("cpu"))
        before, _ = exact_match(model, tokenizer, heldout)
        del model

        t0 = time.perf_counter()
        last = train_sft(cfg, progress=False)
        train_s = time.perf_counter() - t0

        trained = load_trained(cfg.run.out_dir, PRESET)
        after, misses = exact_match(trained, tokenizer, heldout)
    finally:
        torch.set_num_threads(threads)

    losses = [json.loads(line)["loss"] for line in
              (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    print(f"\n[sft task] 2-digit addition, {len(train)} train / {len(heldout)} held-out prompts; "
          f"exact match before {before:.1%}, after {after:.1%}; {STEPS} steps in {train_s:.1f} s "
          f"(loss {losses[0]:.3f} -> {last['loss']:.4f}); misses {misses[:5]}")
    assert last["step"] == STEPS
    assert before <= 0.10
    assert after >= 0.90, f"held-out exact match {after:.1%}; misses {misses[:10]}"
