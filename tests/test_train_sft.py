"""SFT engine on a tiny model: exact resume after SIGKILL, accumulation, LoRA merge, config errors."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from gemmalab.train.config import ConfigError, SFTConfig, build_config, load_config

from .test_tokenizer import _tiny_gguf


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("sft")
    tok = root / "tok.gguf"
    _tiny_gguf(tok)
    data = root / "train.jsonl"
    g = torch.Generator().manual_seed(0)
    words = ["hello", "world", "he", "or", "llo"]
    with open(data, "w") as f:
        for i in range(200):
            pick = lambda n: " ".join(words[int(j)] for j in torch.randint(0, 5, (n,), generator=g))
            f.write(json.dumps({"messages": [{"role": "user", "content": pick(3)},
                                             {"role": "assistant", "content": pick(4)}]}) + "\n")
    return root, tok, data


def raw_config(root, tok, data, out, steps=40, **extra):
    raw = {"model": {"preset": "tiny", "tokenizer": str(tok)},
           "data": {"train": [str(data)], "seq_len": 48, "batch_size": 2},
           "optim": {"lr": 3e-3, "warmup_steps": 3, "grad_accum": 2},
           "run": {"out_dir": str(out), "steps": steps, "save_every": 2, "log_every": 1,
                   "threads": 1}}
    for key, value in extra.items():
        section, name = key.split("__")
        raw.setdefault(section, {})[name] = value
    return raw


RUNNER = """
import json, sys
from gemmalab.train.config import build_config
from gemmalab.train.recipes.sft import train_sft
cfg = build_config(json.loads(sys.argv[1]))
train_sft(cfg, resume=sys.argv[2] == "1", progress=False)
"""


def run(raw, resume=False):
    return subprocess.Popen([sys.executable, "-c", RUNNER, json.dumps(raw), "1" if resume else "0"])


def weights(out):
    latest = (out / "checkpoints" / "latest").read_text().strip()
    return load_file(str(out / "checkpoints" / latest / "model.safetensors"))


def test_sigkill_then_resume_equals_uninterrupted(setup):
    root, tok, data = setup
    a, b = root / "a", root / "b"
    assert run(raw_config(root, tok, data, a)).wait(timeout=600) == 0
    proc = run(raw_config(root, tok, data, b))
    deadline = time.time() + 300
    while not (b / "checkpoints" / "step-000006").exists():
        assert proc.poll() is None and time.time() < deadline, "run ended before the kill"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)  # mid-training, possibly mid-checkpoint-write
    proc.wait()
    killed_at = int((b / "checkpoints" / "latest").read_text().strip().split("-")[1])
    assert 6 <= killed_at < 40
    assert run(raw_config(root, tok, data, b), resume=True).wait(timeout=600) == 0
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)  # bitwise on CPU
    la = [json.loads(x) for x in (a / "metrics.jsonl").read_text().splitlines()]
    lb = [json.loads(x) for x in (b / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lb] == list(range(1, 41))
    assert [r["loss"] for r in la] == [r["loss"] for r in lb]
    assert la[-1]["loss"] < la[0]["loss"]
    leftovers = [p.name for p in (b / "checkpoints").iterdir() if p.name.startswith(".tmp")]
    assert len(leftovers) <= 1  # at most the write the kill interrupted; never a 'latest' one


def test_accumulation_equals_one_big_batch(setup):
    """4 micro-batches of 2 sequences give the same update as 1 batch of 8."""
    from gemmalab.train.data import PackedDataset
    from gemmalab.train.build import build_model_and_tokenizer
    from gemmalab.train.recipes.sft import micro_batch_loss
    root, tok, data = setup
    cfg = build_config(raw_config(root, tok, data, root / "acc"))
    model, tokenizer = build_model_and_tokenizer(cfg, torch.device("cpu"))
    batch = next(iter(PackedDataset([str(data)], tokenizer, 48, 8, seed=1)))
    n = float((batch["targets"] != -100).sum())
    micro_batch_loss(model, batch, n).backward()
    big = {k: p.grad.clone() for k, p in model.named_parameters()}
    model.zero_grad()
    for i in range(4):
        part = {k: v[2 * i:2 * i + 2] for k, v in batch.items()}
        micro_batch_loss(model, part, n).backward()
    for k, p in model.named_parameters():
        torch.testing.assert_close(p.grad, big[k], rtol=1e-4, atol=1e-6)


def test_lora_trains_and_merges(setup):
    from gemmalab.train.lora import merge_lora
    from gemmalab.train.recipes.sft import train_sft
    root, tok, data = setup
    out = root / "lora"
    cfg = build_config(raw_config(root, tok, data, out, steps=12, lora__rank=4,
                                  optim__lr=1e-2))
    last = train_sft(cfg, progress=False)
    saved = weights(out)
    assert saved and all(".lora_" in k for k in saved)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["loss"] < rows[0]["loss"] and last["step"] == 12
    from gemmalab.train.build import build_model_and_tokenizer
    model, _ = build_model_and_tokenizer(cfg, torch.device("cpu"))
    model.load_state_dict(saved, strict=False)
    ids = torch.randint(0, 281, (1, 20))
    with torch.no_grad():
        before = model(ids)
        merged = merge_lora(model)
        after = merged(ids)
    assert not any("lora" in k for k in merged.state_dict())
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)


def test_config_errors_list_valid_names(tmp_path):
    with pytest.raises(ConfigError, match="valid: .*'optim'"):
        build_config({"optimiser": {}})
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['lrate'\] in \[optim\]; valid: .*'lr'"):
        build_config({"optim": {"lrate": 1.0}})
    with pytest.raises(ConfigError, match="run.steps must be a int"):
        build_config({"run": {"steps": "many"}})
    toml = tmp_path / "c.toml"
    toml.write_text('[data]\ntrain = ["x.jsonl"]\n[optim]\nlr = 1e-4\n')
    cfg = load_config(toml, ["optim.lr=0.5", "run.steps=7", "lora.targets=[\"q_proj\"]"])
    assert cfg.optim.lr == 0.5 and cfg.run.steps == 7 and cfg.lora.targets == ["q_proj"]
    assert isinstance(cfg, SFTConfig)
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config(toml, ["steps=3"])


def test_torchrun_two_processes_match_one(setup, tmp_path):
    """torchrun --nproc_per_node 2 (gloo, CPU) follows the loss trajectory of 1 process, same global batch."""
    root, tok, data = setup
    script = tmp_path / "runner.py"
    script.write_text(RUNNER)
    results = {}
    for n in (1, 2):
        out = tmp_path / f"w{n}"
        raw = raw_config(root, tok, data, out, steps=8, run__keep_checkpoints=10)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={n}", str(script), json.dumps(raw), "0"]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                              env=dict(os.environ, OMP_NUM_THREADS="1"))
        assert proc.returncode == 0, proc.stderr[-3000:]
        rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        results[n] = ([r["loss"] for r in rows], weights(out))
    (loss1, w1), (loss2, w2) = results[1], results[2]
    assert len(loss1) == len(loss2) == 8
    torch.testing.assert_close(torch.tensor(loss2), torch.tensor(loss1), rtol=1e-5, atol=1e-6)
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-4, atol=1e-5)

    # a checkpoint written by 2 processes resumes in 1 process onto the same trajectory
    import shutil
    resumed = tmp_path / "resumed"
    shutil.copytree(tmp_path / "w2", resumed)
    (resumed / "checkpoints" / "latest").write_text("step-000004")
    raw = raw_config(root, tok, data, resumed, steps=8, run__keep_checkpoints=10)
    assert run(raw, resume=True).wait(timeout=600) == 0
    w3 = weights(resumed)
    for k in w1:
        torch.testing.assert_close(w3[k], w2[k], rtol=1e-4, atol=1e-5)


def test_cli_train_resume_and_plot(setup, tmp_path):
    """`gemmalab train sft CONFIG overrides`, `--resume`, `gemmalab plot`, TensorBoard and CSV."""
    root, tok, data = setup
    out = tmp_path / "cli"
    cfg = tmp_path / "sft.toml"
    cfg.write_text(f"""
[model]
preset = "tiny"
tokenizer = "{tok}"
[data]
train = ["{data}"]
seq_len = 48
batch_size = 2
[optim]
lr = 3e-3
[run]
out_dir = "{out}"
steps = 6
save_every = 3
log_every = 1
threads = 1
""")
    cli = [sys.executable, "-m", "gemmalab"]
    proc = subprocess.run(cli + ["train", "sft", str(cfg), "run.steps=4", "--no-progress"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert (out / "checkpoints" / "latest").read_text().strip() == "step-000004"
    proc = subprocess.run(cli + ["train", "sft", str(cfg), "--resume"], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "step 6: loss" in proc.stdout
    assert "6/6" in proc.stderr  # the progress bar resumed at 4 and finished
    rows = (out / "metrics.csv").read_text().splitlines()
    assert rows[0].startswith("step,loss") and [r.split(",")[0] for r in rows[1:]] == \
        [str(i) for i in range(1, 7)]
    assert list((out / "tb").glob("events.out.tfevents.*"))
    proc = subprocess.run(cli + ["plot", str(out)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    png = out / "curves.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    bad = subprocess.run(cli + ["train", "sft", str(cfg), "optim.lrate=1"], capture_output=True,
                         text=True, timeout=120)
    assert bad.returncode == 1 and "unknown key(s) ['lrate'] in [optim]" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_activation_checkpointing_gives_the_same_gradients(setup):
    from gemmalab.config import get_config
    from gemmalab.model import Gemma3
    torch.manual_seed(0)
    model = Gemma3(get_config("tiny")).train()
    ids = torch.randint(0, 512, (2, 30))
    grads = []
    for flag in (False, True):
        model.zero_grad()
        model.activation_checkpointing = flag
        model(ids).logsumexp(-1).mean().backward()
        grads.append({k: p.grad.clone() for k, p in model.named_parameters()})
    for k in grads[0]:
        torch.testing.assert_close(grads[1][k], grads[0][k], rtol=1e-5, atol=1e-7)
