"""Teacher-logit store: exact round trip, what the cache command writes, SIGKILL + resume = uninterrupted,
appending, and refusal of corrupted or mismatched shards with a clear message."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import gemmalab
from gemmalab.train.data import PackedDataset
from gemmalab.train.logit_store import (LogitStore, StoreDataset, StoreError, build_store, read_shard,
                                        write_shard)

from .distill_helpers import text_data, tiny_teacher_gguf
from .test_export import tiny_tokenizer

CLI = [sys.executable, "-m", "gemmalab"]
# Subprocesses import this checkout's gemmalab whatever their working directory or script location
# (an editable install elsewhere, e.g. another worktree, would otherwise win for scripts in tmp dirs).
REPO = str(Path(gemmalab.__file__).resolve().parents[1])
ENV = dict(os.environ, OMP_NUM_THREADS="1",
           PYTHONPATH=os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")])))


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models: one thread. Two threads on two cores that other jobs share make every small op
    wait for a descheduled OpenMP worker (measured 2.5x slower here)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("store")
    teacher = tiny_teacher_gguf(root / "teacher.gguf")
    other = tiny_teacher_gguf(root / "other.gguf", seed=1)
    data = text_data(root / "train.jsonl", 60)
    return root, teacher, other, data


def cache_cmd(teacher, data, out, *extra):
    return CLI + ["distill", "cache", "--teacher", str(teacher), "--data", str(data), "--out", str(out),
                  "--k", "16", "--seq-len", "48", "--threads", "1", *extra]


def test_shard_round_trip_is_exact(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {"a": torch.randint(-2**31, 2**31 - 1, (3, 5, 7), dtype=torch.int32, generator=g),
               "b": torch.randint(-2**15, 2**15 - 1, (4, 9), generator=g).to(torch.int16),
               "c": torch.randn(6, 11, generator=g).to(torch.float16),
               "d": torch.randn(2, 3, 13, generator=g).to(torch.bfloat16),
               "e": torch.randn(17, generator=g),
               "empty": torch.zeros(0, 4, dtype=torch.int32)}
    tensors["c"][0, :3] = torch.tensor([float("inf"), -0.0, 6e-8])  # odd values survive bit for bit
    size, digest = write_shard(tmp_path / "s.safetensors", tensors, {"fingerprint": "x"})
    assert size == (tmp_path / "s.safetensors").stat().st_size and len(digest) == 64
    back, meta = read_shard(tmp_path / "s.safetensors")
    assert meta["fingerprint"] == "x" and back.keys() == tensors.keys()
    for k, v in tensors.items():
        assert back[k].dtype == v.dtype and back[k].shape == v.shape
        assert torch.equal(back[k].view(torch.uint8) if v.numel() else back[k],
                           v.view(torch.uint8) if v.numel() else v), k
    with safe_open(str(tmp_path / "s.safetensors"), "pt") as f:  # the official reader agrees
        assert f.metadata()["fingerprint"] == "x"
        for k, v in tensors.items():
            assert torch.equal(f.get_tensor(k).view(torch.uint8) if v.numel() else f.get_tensor(k),
                               v.view(torch.uint8) if v.numel() else v), k
    assert not list(tmp_path.glob(".*tmp*"))  # no temporary left behind


def test_cache_command_writes_what_the_teacher_samples(setup, tmp_path):
    root, teacher, _, data = setup
    out = tmp_path / "store"
    proc = subprocess.run(cache_cmd(teacher, data, out, "--full-logprobs"), capture_output=True,
                          text=True, timeout=300, env=ENV)
    assert proc.returncode == 0, proc.stderr
    assert "tok/s" in proc.stderr and "bytes/token" in proc.stdout and "(complete)" in proc.stdout
    store = LogitStore(out)
    m = store.manifest
    assert m["complete"] and m["targets"]["k"] == 16 and m["targets"]["sampling"] == "with_replacement"
    assert m["teacher"]["name"] == "teacher.gguf" and len(m["teacher"]["sha256"]) == 64
    # the rows are exactly the packed rows of the data (same tokenizer, seed and packing as training)
    lm = gemmalab.load(teacher, mode="fp32")
    rows = list(PackedDataset([data], lm.tokenizer, 48, 1, seed=0, epochs=1, train_on="all"))
    assert store.num_rows == len(rows) and store.num_targets == sum(int((r["targets"] != -100).sum())
                                                                    for r in rows)
    stored = torch.cat([store.rows(s, 0, e["rows"])["input_ids"] for s, e in enumerate(store.shards)])
    assert torch.equal(stored, torch.cat([r["input_ids"] for r in rows]))
    # targets of one row against the teacher itself
    b = store.rows(0, 1, 2)
    logp = torch.log_softmax(lm.model(b["input_ids"], b["positions"], segment_ids=b["segment_ids"]), -1)[0]
    t = b["targets"][0]
    valid = t != -100
    ids, probs, counts = b["teacher_ids"][0], b["teacher_probs"][0], b["teacher_counts"][0]
    assert (counts[valid].sum(1) == 16).all() and (ids[~valid] == -1).all()
    have = ids >= 0
    torch.testing.assert_close(probs[have], logp.gather(1, ids.clamp(min=0)).exp()[have].half().float())
    torch.testing.assert_close(b["teacher_logprobs"][0][valid].float(), logp[valid], rtol=0, atol=2e-2)
    # bytes per token as reported: ids + probs + counts (K x 8) + full fp16 log-probs (V x 2)
    per_token = m["totals"]["bytes"] / m["totals"]["targets"]
    assert 16 * 8 + 512 * 2 < per_token < 1.4 * (16 * 8 + 512 * 2) + 100
    # `distill inspect` verifies every shard
    proc = subprocess.run(CLI + ["distill", "inspect", str(out)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "verified" in proc.stdout and "K=16" in proc.stdout, proc.stderr


def _shard_bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("shard-*.safetensors"))}


def _manifest_sans_timing(out: Path) -> dict:
    m = json.loads((out / "manifest.json").read_text())
    m["totals"].pop("teacher_seconds")
    return m


def test_sigkill_then_resume_equals_uninterrupted(setup, tmp_path):
    root, teacher, _, _ = setup
    data = text_data(tmp_path / "big.jsonl", 100, seed=3)
    a, b = tmp_path / "a", tmp_path / "b"
    args = ("--rows-per-shard", "2")
    assert subprocess.run(cache_cmd(teacher, data, a, *args, "--no-progress"), capture_output=True,
                          timeout=600, env=ENV).returncode == 0
    proc = subprocess.Popen(cache_cmd(teacher, data, b, *args, "--no-progress"), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=ENV)
    deadline = time.time() + 300
    while True:
        try:
            shards = len(json.loads((b / "manifest.json").read_text())["shards"])
        except (OSError, ValueError):
            shards = 0
        if shards >= 3:
            break
        assert proc.poll() is None and time.time() < deadline, "the run ended before the kill"
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)  # mid-run: possibly mid-shard or mid-manifest write
    proc.wait()
    killed = json.loads((b / "manifest.json").read_text())
    total = json.loads((a / "manifest.json").read_text())["totals"]["targets"]
    assert not killed["complete"] and 0 < killed["totals"]["targets"] < total
    proc = subprocess.run(cache_cmd(teacher, data, b, *args, "--no-progress"), capture_output=True,
                          text=True, timeout=600, env=ENV)
    assert proc.returncode == 0, proc.stderr
    assert "resuming" in proc.stdout
    assert _shard_bytes(a) == _shard_bytes(b)  # byte-identical shards, none lost, none duplicated
    assert _manifest_sans_timing(a) | {"teacher": None} == _manifest_sans_timing(b) | {"teacher": None}
    assert not list(b.glob(".*.tmp*"))  # the killed writer's temp file was removed
    # a run on a complete store does nothing
    said = []
    build_store(b, data, teacher=teacher, k=16, seq_len=48, rows_per_shard=2, progress=False, log=said.append)
    assert "nothing to do" in said[-1] and _shard_bytes(a) == _shard_bytes(b)


def test_max_tokens_then_append(setup, tmp_path):
    root, teacher, _, data = setup
    out = tmp_path / "s"
    first = build_store(out, data, teacher=teacher, k=8, seq_len=48, max_tokens=500, progress=False,
                        log=lambda *_: None)
    assert 500 <= first["totals"]["targets"] < 500 + 48 and not first["complete"]
    full = build_store(out, data, teacher=teacher, k=8, seq_len=48, progress=False, log=lambda *_: None)
    ref = build_store(tmp_path / "ref", data, teacher=teacher, k=8, seq_len=48, progress=False,
                      log=lambda *_: None)
    assert full["complete"] and full["totals"]["targets"] == ref["totals"]["targets"]
    stores = LogitStore(out), LogitStore(tmp_path / "ref")
    for key in ("input_ids", "targets", "teacher_ids", "teacher_counts"):
        x, y = (torch.cat([s.rows(i, 0, e["rows"])[key] for i, e in enumerate(s.shards)]) for s in stores)
        assert torch.equal(x, y), key  # appending gives the rows and samples of a single run
    with pytest.raises(StoreError, match=r"other settings.*k 8 vs 16"):
        build_store(out, data, teacher=teacher, k=16, seq_len=48, progress=False, log=lambda *_: None)


def test_corrupted_and_mismatched_shards_are_refused(setup, tmp_path):
    root, teacher, other, data = setup
    good = tmp_path / "good"
    build_store(good, data, teacher=teacher, k=8, seq_len=48, rows_per_shard=4, progress=False,
                log=lambda *_: None)
    build_store(tmp_path / "foreign", data, teacher=other, k=8, seq_len=48, rows_per_shard=4,
                progress=False, log=lambda *_: None)
    LogitStore(good).shard(1)  # fine as written

    flipped = tmp_path / "flipped"
    shutil.copytree(good, flipped)
    f = flipped / "shard-000001.safetensors"
    raw = bytearray(f.read_bytes())
    raw[-5] ^= 0x40  # one bit in the data
    f.write_bytes(bytes(raw))
    with pytest.raises(StoreError, match="shard-000001.safetensors is corrupted"):
        LogitStore(flipped).shard(1)

    truncated = tmp_path / "truncated"
    shutil.copytree(good, truncated)
    f = truncated / "shard-000000.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(StoreError, match="truncated or was replaced"):
        LogitStore(truncated)

    swapped = tmp_path / "swapped"  # a shard of another teacher's store (same size) copied in
    shutil.copytree(good, swapped)
    shutil.copy(tmp_path / "foreign" / "shard-000000.safetensors", swapped / "shard-000000.safetensors")
    with pytest.raises(StoreError, match="belongs to another store"):
        LogitStore(swapped).shard(0)

    store = LogitStore(good)
    with pytest.raises(StoreError, match="another tokenizer"):
        store.check_tokenizer(tiny_tokenizer(400))
    store.check_tokenizer(tiny_tokenizer(512))
    with pytest.raises(StoreError, match="holds the targets of teacher teacher.gguf"):
        store.check_teacher(other)
    store.check_teacher(teacher)

    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "manifest.json").write_text("{not json")
    with pytest.raises(StoreError, match="not valid JSON"):
        LogitStore(tmp_path / "junk")
    with pytest.raises(StoreError, match="not valid JSON"):
        build_store(tmp_path / "junk", data, teacher=teacher, k=8, seq_len=48, progress=False)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("mine")
    with pytest.raises(StoreError, match="exists and is not a teacher-logit store"):
        build_store(tmp_path / "notes", data, teacher=teacher, k=8, seq_len=48, progress=False)
    with pytest.raises(StoreError, match="other settings.*teacher teacher.gguf"):
        build_store(good, data, teacher=other, k=8, seq_len=48, rows_per_shard=4, progress=False)
    import fcntl  # a second writer on the same store is refused while the first holds the lock
    with open(good / ".lock", "a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(StoreError, match="another `gemmalab distill cache` is writing"):
            build_store(good, data, teacher=teacher, k=8, seq_len=48, rows_per_shard=4, progress=False)
    # through the command line: one line, no traceback
    proc = subprocess.run(CLI + ["distill", "inspect", str(flipped)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 1 and "gemmalab: error:" in proc.stderr and "corrupted" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_store_dataset_resumes_exactly(setup, tmp_path):
    root, teacher, _, data = setup
    build_store(tmp_path / "s", data, teacher=teacher, k=8, seq_len=48, rows_per_shard=4, progress=False,
                log=lambda *_: None)
    store = LogitStore(tmp_path / "s")
    a = StoreDataset(store, 2, seed=1)
    it = iter(a)
    seen = [next(it)["input_ids"] for _ in range(len(a.blocks) + 3)]  # into the second epoch
    assert a.epoch == 1
    first_epoch = torch.cat(seen[:len(a.blocks)])
    assert first_epoch.shape[0] == len(a.blocks) * 2  # every block once per epoch
    b = StoreDataset(store, 2, seed=1)
    it_b = iter(b)
    for _ in range(5):
        next(it_b)
    state = json.loads(json.dumps(b.state_dict()))
    c = StoreDataset(store, 2, seed=1)
    c.load_state_dict(state)
    assert all(torch.equal(next(iter(c))["input_ids"], x) for x in seen[5:6])
    with pytest.raises(ValueError, match="batch_size was 2, now 4"):
        StoreDataset(store, 4, seed=1).load_state_dict(state)
