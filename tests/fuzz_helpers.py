"""Run a fuzz harness (fuzz/fuzz_<name>.py) for a CI-sized number of inputs and check its verdict."""
from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_fuzz(name: str, tmp_path: Path, runs: int = 2000, seconds: float = 45.0) -> dict:
    """Fuzz `name` for `runs` inputs (or `seconds`), in a subprocess; fail with the reproducer (base64)
    and the harness's last output on any finding. Returns the harness's counts."""
    pytest.importorskip("atheris", reason="atheris has wheels for CPython <= 3.11 on x86-64 Linux only")
    out, art = tmp_path / f"fuzz_{name}.json", tmp_path / f"fuzz_{name}_artifacts"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, str(ROOT / "fuzz" / f"fuzz_{name}.py"), "--runs", str(runs),
                        "--seconds", str(seconds), "--out", str(out), "--artifacts", str(art)],
                       capture_output=True, text=True, timeout=seconds + 240, env=env, cwd=tmp_path)
    found = sorted(art.glob("*")) if art.exists() else []
    repro = "; ".join(f"{p.name}: {base64.b64encode(p.read_bytes()[:2000]).decode()}" for p in found[:3])
    tail = (r.stdout + r.stderr)[-3000:]
    assert r.returncode == 0 and not found, f"fuzz {name}: rc {r.returncode}, reproducers {repro}\n{tail}"
    stats = json.loads(out.read_text())
    assert stats["findings"] == 0 and stats["inputs"] > 0, stats
    assert stats["inputs"] >= runs or stats["seconds"] >= seconds, stats
    return stats
