"""The recipe-free trainer: hooks, extra state resumed bitwise after SIGKILL, prepare(model, ...),
metrics and weights from the loss, and the recipe registry behind `gemmalab train --help`."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from .test_train_sft import raw_config, setup  # noqa: F401 - the tiny tokenizer + chat data fixture

# A run whose loss_fn returns metrics, whose prepare sees the model (and checks it runs without
# gradients in eval mode), with an EMA of the weights updated by a hook after every optimizer step
# and checkpointed as extra state.
RUNNER = """
import json, sys, torch
from safetensors.torch import save_file
from gemmalab.train.averaging import EMA
from gemmalab.train.build import build_model_and_tokenizer
from gemmalab.train.config import build_config
from gemmalab.train.data import PackedDataset
from gemmalab.train.recipes.sft import micro_batch_loss
from gemmalab.train.trainer import setup_run, train_loop

cfg = build_config(json.loads(sys.argv[1]))
rank, world, device = setup_run(cfg)
model, tok = build_model_and_tokenizer(cfg, device)
data = PackedDataset(cfg.data.train, tok, cfg.data.seq_len, cfg.data.batch_size, seed=cfg.run.seed)
ema = EMA(model, eta=0.25)
steps_seen = []

def prepare(m, batch, step, micro):
    assert m is model and not m.training and not torch.is_grad_enabled()
    return dict(batch, micro=torch.full((batch["input_ids"].shape[0],), micro))

def loss_fn(m, batch, normalizer):
    loss = micro_batch_loss(m, batch, normalizer)
    return loss, {"loss_copy": loss.detach(), "micro_sum": float(batch["micro"][0]) / 2}

last = train_loop(cfg, model, data, loss_fn, rank=rank, world=world, device=device,
                  resume=sys.argv[2] == "1", progress=False, prepare=prepare,
                  hooks=(ema, lambda m, s: steps_seen.append(s)), extra_state={"ema": ema},
                  extra_fields=("loss_copy", "micro_sum"))
save_file(ema.tensors, sys.argv[3])
json.dump(steps_seen, open(sys.argv[3] + ".steps.json", "w"))
"""


def _run(raw, out_file, resume=False):
    return subprocess.Popen([sys.executable, "-c", RUNNER, json.dumps(raw), "1" if resume else "0",
                             str(out_file)])


def test_hooks_metrics_and_ema_resume_bitwise_after_sigkill(setup):  # noqa: F811
    from safetensors.torch import load_file

    root, tok, data = setup
    a, b = root / "trainer-a", root / "trainer-b"
    steps = 14
    assert _run(raw_config(root, tok, data, a, steps=steps), root / "ema-a.st").wait(timeout=600) == 0
    proc = _run(raw_config(root, tok, data, b, steps=steps), root / "ema-b.st")
    deadline = time.time() + 300
    while not (b / "checkpoints" / "step-000004").exists():
        assert proc.poll() is None and time.time() < deadline, "run ended before the kill"
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = int((b / "checkpoints" / "latest").read_text().strip().split("-")[1])
    assert 4 <= killed_at < steps
    assert _run(raw_config(root, tok, data, b, steps=steps), root / "ema-b.st",
                resume=True).wait(timeout=600) == 0

    ea, eb = load_file(str(root / "ema-a.st")), load_file(str(root / "ema-b.st"))
    assert ea.keys() == eb.keys() and all(torch.equal(ea[k], eb[k]) for k in ea)
    latest = (a / "checkpoints" / "latest").read_text().strip()
    final = load_file(str(a / "checkpoints" / latest / "model.safetensors"))
    # the EMA really moved, and lags the weights (eta = 0.25 over 14 steps)
    init_gap = max((ea[k] - final[k]).abs().max().item() for k in ea)
    assert init_gap > 0
    # the hook ran once after every optimizer step, counting completed steps
    assert json.loads((root / "ema-a.st.steps.json").read_text()) == list(range(1, steps + 1))
    assert json.loads((root / "ema-b.st.steps.json").read_text()) == list(range(killed_at + 1, steps + 1))
    rows = [json.loads(x) for x in (a / "metrics.jsonl").read_text().splitlines()]
    rows_b = [json.loads(x) for x in (b / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in rows] == [r["loss"] for r in rows_b]
    # metrics returned by loss_fn sum over the step's micro-batches like the loss itself
    assert all(r["loss_copy"] == pytest.approx(r["loss"], rel=1e-6) for r in rows)
    assert all(r["micro_sum"] == pytest.approx((0 + 1) / 2) for r in rows)  # grad_accum = 2
    header = (a / "metrics.csv").read_text().splitlines()[0].split(",")
    assert header[-2:] == ["loss_copy", "micro_sum"]


def test_resume_refuses_a_checkpoint_without_the_extra_state(setup, tmp_path):  # noqa: F811
    """A run resumed with an extra state its checkpoint lacks (another recipe setting) stops with a
    clear error instead of silently starting the anchor over."""
    from gemmalab.train.averaging import EMA
    from gemmalab.train.build import build_model_and_tokenizer
    from gemmalab.train.config import build_config
    from gemmalab.train.data import PackedDataset
    from gemmalab.train.recipes.sft import micro_batch_loss
    from gemmalab.train.trainer import train_loop

    root, tok, data = setup
    cfg = build_config(raw_config(root, tok, data, tmp_path / "run", steps=2))
    cpu = torch.device("cpu")

    def go(extra):
        model, tk = build_model_and_tokenizer(cfg, cpu)
        ds = PackedDataset(cfg.data.train, tk, cfg.data.seq_len, cfg.data.batch_size, seed=0)
        state = {"ema": EMA(model, 0.5)} if extra else None
        return train_loop(cfg, model, ds, micro_batch_loss, rank=0, world=1, device=cpu,
                          resume=True, progress=False, extra_state=state)

    go(extra=False)
    cfg.run.steps = 3
    with pytest.raises(ValueError, match="holds no ema state"):
        go(extra=True)


def test_ema_rates():
    from gemmalab.train.averaging import EMA, ema_

    model = torch.nn.Linear(3, 2)
    ema = EMA(model, eta=1.0)
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model)
    assert torch.equal(ema.tensors["weight"], model.weight.detach())  # eta = 1 copies
    keep = {"w": torch.ones(2)}
    ema_(keep, {"w": torch.zeros(2)}, 0.0)
    assert torch.equal(keep["w"], torch.ones(2))  # eta = 0 keeps
    half = {"w": torch.ones(2)}
    ema_(half, {"w": torch.full((2,), 3.0)}, 0.25)
    assert torch.allclose(half["w"], torch.full((2,), 1.5))
    with pytest.raises(ValueError, match="in \\[0, 1\\]"):
        EMA(model, eta=1.5)


def test_train_help_lists_the_registered_recipes():
    from gemmalab.train.recipes import RECIPES

    out = subprocess.run([sys.executable, "-m", "gemmalab", "train", "--help"], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    listed = [line.split()[0] for line in out.stdout.splitlines()
              if line.startswith("    ") and line.split() and line.split()[0] in RECIPES]
    assert listed == list(RECIPES) and {"sft", "distill", "qat"} <= set(listed)
    for name, recipe in RECIPES.items():  # every recipe's help, config class and runner resolve
        assert recipe.resolve("run") and recipe.resolve("config")
    bad = subprocess.run([sys.executable, "-m", "gemmalab", "train", "nosuch", "x.toml"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "invalid choice" in bad.stderr


def test_unknown_recipe_is_a_clear_error():
    from gemmalab.train.recipes import get_recipe

    with pytest.raises(ValueError, match="unknown recipe .rlhf.; valid: sft, distill, qat"):
        get_recipe("rlhf")
