"""The CLI as a user types it: real subprocesses, the real embedded model."""
import os
import subprocess
import sys

import pytest


def gemmalab(*args, stdin=None, timeout=300):
    env = dict(os.environ, PYTHONIOENCODING="utf-8")
    return subprocess.run([sys.executable, "-m", "gemmalab", *args], input=stdin, text=True,
                          capture_output=True, timeout=timeout, env=env)


def one_clear_line(proc, pattern):
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert pattern in lines[-1], proc.stderr
    assert lines[-1].startswith("gemmalab: error:") or "usage:" in proc.stderr


@pytest.mark.slow
def test_generate_streams_the_greedy_continuation(lm):
    # the exact reference path, against the API's
    proc = gemmalab("generate", "The capital of France is", "-n", "16", "-t", "0", "--stats",
                    "--mode", "fp32")
    assert proc.returncode == 0, proc.stderr
    expected = lm.generate("The capital of France is", max_new_tokens=16, temperature=0).text
    assert proc.stdout == expected + "\n"
    assert "fp32 mode" in proc.stderr and "tok/s" in proc.stderr


@pytest.mark.slow
def test_generate_default_mode_and_prompt_lookup():
    import gemmalab as api
    native = api.load()
    prompt = "one two three four five six seven eight nine ten " * 3
    expected = native.generate(prompt, max_new_tokens=20, temperature=0).text
    plain = gemmalab("generate", prompt, "-n", "20", "-t", "0", "--stats")
    spec = gemmalab("generate", prompt, "-n", "20", "-t", "0", "--stats", "--lookup", "6")
    assert plain.returncode == 0 and spec.returncode == 0, (plain.stderr, spec.stderr)
    assert plain.stdout == spec.stdout == expected + "\n"
    assert "native mode" in plain.stderr and "lookup accepted" in spec.stderr


@pytest.mark.slow
def test_chat_multi_turn_with_reset_and_eof():
    proc = gemmalab("chat", "-n", "8", "-t", "0", "--system", "Be brief.",
                    stdin="Hello!\nWhat is 2+2?\n/reset\nHi again\n")
    assert proc.returncode == 0, proc.stderr
    assert "(conversation cleared)" in proc.stdout
    assert len([line for line in proc.stdout.splitlines() if line.strip()]) >= 4


def test_info_reports_config_params_and_kv_bytes():
    proc = gemmalab("info")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "18 layers (15 local / 3 global)" in out and "window 512" in out
    assert "Q8_0" in out and "Q4_K" in out
    assert "32K" in out and "128K" in out and "beyond the model context" in out
    # hybrid 32K for the 270M: 3 x 32768 + 15 x 512 tokens x 1 KiB = 103.5 MiB (spec 1.0)
    assert "103.5 MiB" in out and "576.0 MiB" in out


def test_info_json(tmp_path):
    import json
    proc = gemmalab("info", "--json")
    data = json.loads(proc.stdout)
    assert data["config"]["num_hidden_layers"] == 18
    assert data["kv_cache_bf16"]["32768"]["hybrid"] == 108_527_616


def test_bad_inputs_get_one_clear_line(tmp_path, model_path):
    one_clear_line(gemmalab("generate", "hi", "--model", str(tmp_path / "nope.gguf")), "no such file")
    text = tmp_path / "notes.txt"
    text.write_text("not a model")
    one_clear_line(gemmalab("info", "--model", str(text)), "neither a GGUF file")
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"PK\x03\x04" + b"\0" * 64)
    one_clear_line(gemmalab("generate", "hi", "--model", str(fake)), "not a GGUF file")
    cut = tmp_path / "cut.gguf"
    with open(model_path, "rb") as src:
        cut.write_bytes(src.read(20_000_000))
    one_clear_line(gemmalab("generate", "hi", "--model", str(cut)), "truncated")
    from .test_checkpoints import write_gguf
    import numpy as np
    llama = tmp_path / "llama.gguf"
    write_gguf(llama, "llama", {"token_embd.weight": (np.zeros((4, 8), np.float32), None)})
    one_clear_line(gemmalab("info", "--model", str(llama)), "'llama' model")


@pytest.mark.parametrize("flags,message", [
    (["-n", "-3"], "must be >= 0"),
    (["--temperature", "hot"], "not a number"),
    (["--top-p", "0"], "must be in (0.0, 1.0]"),
    (["--top-k", "1.5"], "not an integer"),
    (["--bogus"], "unrecognized arguments"),
    (["--mode", "int2"], "invalid choice"),
    (["--lookup", "99"], "lookup must be in [1, 32]"),
])
def test_bad_flag_values(flags, message):
    proc = gemmalab("generate", "hi", *flags)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert message in proc.stderr.strip().splitlines()[-1]


@pytest.mark.slow
def test_prompt_longer_than_context():
    proc = gemmalab("generate", "-", "-n", "4", stdin="hello " * 40000)
    one_clear_line(proc, "the model context is 32768 tokens")
