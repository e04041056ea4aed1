"""Fault injection, CI-sized: kill -9 at random moments of SFT and of the teacher-logit store build,
kill -9 at chosen moments of a checkpoint write and delete, and a real full disk (a tiny tmpfs) and
read-only output directory (a read-only bind mount) under SFT, distillation and QAT, through
bubblewrap. The machinery is bench/fault_injection.py's (the full run: 20 kills per job)."""
import importlib.util
import json
import random
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _load_bench():
    spec = importlib.util.spec_from_file_location("fault_injection", REPO / "bench" / "fault_injection.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("fault_injection", module)
    spec.loader.exec_module(module)
    return module


fi = _load_bench()

# CI-sized training jobs (checkpoints every 3 steps for SFT and distillation, every 2 for QAT)
CI = {"sft": {"run.steps": 12}, "distill": {"run.steps": 12, "eval.every": 6}, "qat": {"run.steps": 8}}


@pytest.fixture(scope="module")
def fx(tmp_path_factory):
    return fi.make_fixtures(tmp_path_factory.mktemp("faults") / "fixtures")


@pytest.fixture(scope="module")
def sft_ref(fx):
    job = fi.make_job("sft", fx, fx["root"].parent / "sft-ref", **CI["sft"])
    return fi.reference_run(job)


@pytest.fixture(scope="module")
def bwrap_ok(fx):
    why = fi.bwrap_problem(fx["root"].parent)
    if why is not None:
        pytest.skip(why)


@pytest.mark.parametrize("name", ["sft", "store"])
def test_random_kills_then_resume_equal_an_uninterrupted_run(fx, sft_ref, tmp_path, name):
    """3 SIGKILLs at random moments (seeded), each followed by a resume: every checkpoint / shard on
    disk complete after each kill, no temporary file left at the end, the result bitwise equal."""
    if name == "sft":
        ref = sft_ref
        job = fi.make_job("sft", fx, tmp_path / "run", **CI["sft"])
    else:
        ref = fi.reference_run(fi.make_job("store", fx, tmp_path / "ref"))
        job = fi.make_job("store", fx, tmp_path / "run")
    r = fi.kill_campaigns(job, ref, 3, random.Random(1), log=lambda *_: None)
    assert r.kills == 3 and not r.failures, r.failures
    assert r.corrupt == 0, r.problems
    assert r.bitwise_equal and not r.temps_left_at_end, r.temps_left_at_end
    assert r.metrics_equal_total and r.metrics_equal_after_last_resume


# kill -9 at chosen moments (a random kill lands there once in hundreds: a checkpoint write or delete
# takes milliseconds of a run)
DIE_IN_RMTREE = """
import os, shutil, signal
_rmtree = shutil.rmtree
def _dying_rmtree(path, *a, **k):
    p = __import__("pathlib").Path(path)
    if (p / "optimizer.pt").is_file():  # a checkpoint directory being deleted: die half-way
        (p / "optimizer.pt").unlink()
        os.kill(os.getpid(), signal.SIGKILL)
    return _rmtree(path, *a, **k)
shutil.rmtree = _dying_rmtree
"""

DIE_IN_SAVE = """
import os, signal, torch
_save, _calls = torch.save, []
def _dying_save(obj, f, *a, **k):
    if "rng.pt" in str(getattr(f, "path", f)):
        _calls.append(1)
        if len(_calls) == 2:  # the second checkpoint: its other files written, rng.pt not yet
            os.kill(os.getpid(), signal.SIGKILL)
    return _save(obj, f, *a, **k)
torch.save = _dying_save
"""


@pytest.mark.parametrize("moment, prelude", [("deleting an old checkpoint", DIE_IN_RMTREE),
                                             ("writing a checkpoint", DIE_IN_SAVE)])
def test_kill_at_a_chosen_moment_leaves_no_partial_checkpoint(fx, sft_ref, tmp_path, moment, prelude):
    """Finding: pruning deleted `step-*` directories in place, so a kill mid-delete left a
    half-deleted checkpoint that looked like one (now renamed aside first); the temporary directory
    of a killed write was never removed (now the next save removes those of dead writers)."""
    job = fi.make_job("sft", fx, tmp_path / "run", **CI["sft"])
    o = fi.run_job(job, resume=False, prelude=prelude)
    assert o.rc == -9, (o.rc, o.stderr[-2000:])  # SIGKILL
    state = fi.check_train_dir(job.out)
    assert state["problems"] == [], state
    assert state["temps"], "the kill should have interrupted a write or delete"
    o = fi.run_job(job, resume=True)
    assert o.rc == 0, o.stderr[-2000:]
    end = fi.check_train_dir(job.out)
    assert end["problems"] == [] and end["temps"] == [], end
    assert fi.final_state(job) == sft_ref.state
    assert fi.metrics_rows(job) == sft_ref.metrics


@pytest.mark.parametrize("name", ["sft", "distill", "qat"])
def test_full_disk_then_read_only_then_resume(fx, bwrap_ok, tmp_path, name):
    """Finding: a checkpoint write on a full disk raised safetensors' SafetensorError or torch's
    RuntimeError ("unexpected pos ...", no errno): a traceback, and the temporary directory left
    holding the space. Now: one `gemmalab: error:` line naming ENOSPC / EROFS, the previous checkpoint
    and `latest` intact, the temporary files removed, and a resume with space bitwise equal."""
    rec = fi.disk_scenario(name, fx, tmp_path, **CI[name])
    assert rec["full"]["clear"], rec["full"]
    assert rec["full"]["latest"] is not None and not rec["full"]["problems"] and not rec["full"]["temps"], rec
    assert rec["read_only"]["clear"] and rec["read_only"]["unchanged"], rec["read_only"]
    assert rec["resumed"]["bitwise_equal"] and rec["resumed"]["metrics_equal"], rec["resumed"]
    assert rec["ok"]


def test_metrics_log_drops_a_row_a_full_disk_cut_short(tmp_path):
    """Finding: an append cut short by ENOSPC left an unterminated JSON line in metrics.jsonl, and every
    resume then failed on it (JSONDecodeError). The partial last row is dropped; a damaged line
    elsewhere is still refused, with the line number."""
    from gemmalab.train.checkpoint import MetricsLog

    path = tmp_path / "metrics.jsonl"
    log = MetricsLog(path, fields=("step", "loss"))
    for step in (1, 2):
        log.write({"step": step, "loss": 1.0 / step})
    log.close()
    with open(path, "a") as f:
        f.write('{"step": 3, "lo')
    MetricsLog(path, truncate_after=2, fields=("step", "loss")).close()
    assert [json.loads(x)["step"] for x in path.read_text().splitlines()] == [1, 2]
    assert (tmp_path / "metrics.csv").read_text().splitlines()[1:] == ["1,1.0", "2,0.5"]
    path.write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    with pytest.raises(ValueError, match="line 2"):
        MetricsLog(path, truncate_after=2)


def test_stale_temps_of_live_writers_are_kept(tmp_path):
    """Only what a dead writer left is removed: a live process's temporary files stay."""
    import os
    import subprocess

    from gemmalab.train.checkpoint import remove_stale_temps

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    names = [f".tmp-step-000004-{dead.pid}", f".trash-step-000002-{dead.pid}", f".latest.tmp{dead.pid}",
             f".tmp-step-000006-{os.getppid()}", "step-000002", ".hidden"]
    for n in names:
        (tmp_path / n).mkdir() if "step" in n else (tmp_path / n).write_text("x")
    removed = remove_stale_temps(tmp_path)
    assert sorted(removed) == sorted(names[:3])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names[3:])
