"""Long fuzz runs of every reader of untrusted input, and their section of docs/reliability.md.

Runs each harness fuzz/fuzz_<name>.py (atheris / libFuzzer, coverage-guided, seeded from files the
tests make) for --runs inputs, `nice`d, one after the other; each writes its counts to
docs/reliability/fuzz_<name>.json; then the table in docs/reliability.md is rebuilt from every JSON
there (so one harness can be rerun alone with --only). A finding stops that harness; its
reproducer is kept under bench/.cache/fuzz/<name>/ and reported.

    python bench/fuzz_all.py --runs 100000            # every harness
    python bench/fuzz_all.py --only gguf tokenizer    # some
    python bench/fuzz_all.py --report                 # only rebuild the docs table
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from docs_section import replace_section  # noqa: E402

DOCS = ROOT / "docs" / "reliability"
MD = ROOT / "docs" / "reliability.md"
BEGIN, END = "<!-- BEGIN fuzz_all -->", "<!-- END fuzz_all -->"


def harnesses() -> list[str]:
    return sorted(p.stem.removeprefix("fuzz_") for p in (ROOT / "fuzz").glob("fuzz_*.py"))


def run_one(name: str, runs: int, seconds: float) -> bool:
    art = ROOT / "bench" / ".cache" / "fuzz" / name
    art.mkdir(parents=True, exist_ok=True)
    for old in art.glob("crash-*"):
        old.unlink()
    out = DOCS / f"fuzz_{name}.json"
    cmd = ["nice", "-n", "10", sys.executable, str(ROOT / "fuzz" / f"fuzz_{name}.py"), "--runs", str(runs),
           "--seconds", str(seconds), "--out", str(out), "--artifacts", str(art)]
    t = time.time()
    r = subprocess.run(cmd, cwd=art, env={**os.environ, "PYTHONPATH": str(ROOT)},
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    found = sorted(art.glob("crash-*")) + sorted(art.glob("timeout-*")) + sorted(art.glob("oom-*"))
    if r.returncode or found:
        print(f"{name}: FINDING (rc {r.returncode}) after {time.time() - t:.0f} s; reproducers: "
              f"{[str(p) for p in found]}\n{r.stdout[-2000:]}")
        return False
    print(r.stdout.strip().splitlines()[-1])
    return True


def report() -> None:
    rows = [json.loads(p.read_text()) for p in sorted(DOCS.glob("fuzz_*.json"))]
    if not rows:
        return
    lines = [BEGIN, "", "| reader | inputs | time (s) | outcomes | findings | slowest input (s) |",
             "|---|---:|---:|---|---:|---:|"]
    for s in rows:
        outcomes = ", ".join(f"{k} {v}" for k, v in s["outcomes"].items())
        lines.append(f"| {s['target']} | {s['inputs']:,} | {s['seconds']:.0f} | {outcomes} | {s['findings']} | "
                     f"{s['slowest_input_s']} |")
    cpus = sorted({s["cpu"] for s in rows})
    engines = sorted({s["engine"] for s in rows})
    lines += ["", f"Engine: {', '.join(engines)}; CPU: {', '.join(cpus)}; written by `bench/fuzz_all.py` "
              f"(each reader's documented error types and notes: docs/reliability/fuzz_*.json).", "", END]
    replace_section(MD, BEGIN, END, "\n".join(lines), "Reliability")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=100_000)
    ap.add_argument("--seconds", type=float, default=3600.0, help="per harness")
    ap.add_argument("--only", nargs="+", choices=harnesses())
    ap.add_argument("--report", action="store_true", help="only rebuild the docs table from the JSONs")
    a = ap.parse_args()
    DOCS.mkdir(parents=True, exist_ok=True)
    ok = True
    if not a.report:
        for name in a.only or harnesses():
            ok &= run_one(name, a.runs, a.seconds)
    report()
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
