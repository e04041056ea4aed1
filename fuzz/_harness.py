"""The common driver of gemmalab's fuzz harnesses (coverage-guided, with atheris / libFuzzer).

A harness is a script `fuzz/fuzz_<name>.py` that defines a `Target` and calls `main(target)`.
The oracle, the same for every reader of untrusted input:

- the reader returns (any value), or
- it raises one of its *documented* error types (CheckpointError, ImageError, DataError, ...) with
  a non-empty one-line message;
- anything else is a finding: another exception type, a multi-line or empty message, a hang
  (libFuzzer's per-input `-timeout`), a crash, or an allocation the input's length fields asked
  for (the address space is capped, so a bogus 2^60-byte length surfaces as MemoryError, which
  no reader documents).

On a finding libFuzzer writes the input as `crash-<sha1>` into the artifact directory (the
reproducer for a regression test) and the script exits non-zero. Otherwise it stops after
`--runs` inputs or `--seconds` and, with `--out`, writes its counts as JSON (docs/reliability.md
is built from those by bench/fuzz_all.py).

Usage: python fuzz/fuzz_gguf.py [--runs N] [--seconds S] [--out stats.json] [--artifacts DIR]
       python fuzz/fuzz_gguf.py --replay FILE...   (run inputs once, without atheris)
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import hashlib
import json
import os
import resource
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # the harnesses import gemmalab and the tests' file makers
    sys.path.insert(0, str(ROOT))


class Finding(AssertionError):
    """The oracle's verdict on an outcome that is not the reader's documented behaviour."""


@dataclass
class Target:
    """One reader of untrusted input, as the fuzzer drives it.

    one:      takes the fuzzer's bytes (and a scratch directory for readers that want paths),
              runs the reader; its return value is ignored.
    expected: the documented error types; any of them with a one-line message is a pass.
    seeds:    real inputs (files the tests make), the starting corpus; called with a scratch dir.
    max_len:  the largest input libFuzzer makes (default: twice the largest seed, >= 4 KiB).
    """
    name: str
    one: Callable[[bytes, Path], object]
    expected: tuple[type[BaseException], ...]
    seeds: Callable[[Path], Iterable[bytes]]
    max_len: int | None = None
    timeout_s: int = 10
    notes: str = ""
    setup: Callable[[Path], None] | None = None  # once per process, after instrumentation
    extra: dict = field(default_factory=dict)


def instrumented():
    """Coverage instrumentation for gemmalab's own modules imported inside this block (not torch,
    numpy or the standard library). A harness imports gemmalab only inside it:

        with instrumented():
            from gemmalab.checkpoints.gguf import open_gguf
    """
    if "gemmalab" in sys.modules:
        raise RuntimeError("import gemmalab inside instrumented(), not before it")
    try:
        import atheris
    except ImportError:  # replay mode still works
        return contextlib.nullcontext()
    return atheris.instrument_imports(include=["gemmalab"])


def write(scratch: Path, name: str, data: bytes) -> Path:
    """Write `data` as scratch/name (replacing it) and return the path: for readers that open files."""
    p = scratch / name
    p.write_bytes(data)
    return p


def check_outcome(target: Target, exc: BaseException | None) -> str:
    """The oracle: the outcome's name ("ok" or the error type), or raise Finding."""
    if exc is None:
        return "ok"
    if not isinstance(exc, target.expected) or isinstance(exc, (MemoryError, RecursionError)):
        raise Finding(f"{target.name}: undocumented {type(exc).__name__}: {exc!r}") from exc
    msg = str(exc)
    if not msg.strip() or "\n" in msg.strip():
        raise Finding(f"{target.name}: {type(exc).__name__} without a one-line message: {msg!r}") from exc
    return type(exc).__name__


class _Runner:
    def __init__(self, target: Target, scratch: Path, runs: int, seconds: float, out: Path | None):
        self.t, self.scratch, self.runs, self.seconds, self.out = target, scratch, runs, seconds, out
        self.counts: collections.Counter[str] = collections.Counter()
        self.n = 0
        self.t0 = time.monotonic()
        self.slowest = 0.0

    def __call__(self, data: bytes) -> None:
        t = time.monotonic()
        try:
            self.t.one(data, self.scratch)
            exc = None
        except Finding:
            raise
        except BaseException as e:  # noqa: BLE001 - the oracle decides
            if isinstance(e, KeyboardInterrupt):
                raise
            exc = e
        name = check_outcome(self.t, exc)
        self.counts[name] += 1
        self.n += 1
        self.slowest = max(self.slowest, time.monotonic() - t)
        if self.n >= self.runs or time.monotonic() - self.t0 >= self.seconds:
            self.finish()

    def stats(self) -> dict:
        return {"target": self.t.name, "inputs": self.n, "seconds": round(time.monotonic() - self.t0, 1),
                "outcomes": dict(self.counts.most_common()), "findings": 0,
                "slowest_input_s": round(self.slowest, 3),
                "documented_errors": [e.__name__ for e in self.t.expected], "notes": self.t.notes,
                "cpu": _cpu(), "engine": _engine()}

    def finish(self) -> None:
        s = self.stats()
        if self.out:
            self.out.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.out.with_suffix(".tmp")
            tmp.write_text(json.dumps(s, indent=1) + "\n")
            os.replace(tmp, self.out)
        print(f"fuzz {self.t.name}: {s['inputs']} inputs in {s['seconds']} s, 0 findings, "
              f"outcomes {s['outcomes']}", flush=True)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)  # libFuzzer's loop does not return; stop here, counts written


def _cpu() -> str:
    """"AMD EPYC (family 25 model 1)": the machine the counts were taken on (gemmalab is
    imported by then)."""
    from gemmalab.cpu import cpu_family, cpu_model
    return f"{cpu_model()} ({cpu_family()})"


def _engine() -> str:
    try:
        import atheris  # noqa: F401
        from importlib.metadata import version
        return f"atheris {version('atheris')} (libFuzzer)"
    except Exception:  # noqa: BLE001
        return "replay"


def cap_memory(gib: float) -> None:
    """Cap the address space so an allocation sized from a bogus length field fails (MemoryError,
    a finding) instead of taking the machine."""
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    want = int(gib * 2**30)
    if hard != resource.RLIM_INFINITY:
        want = min(want, hard)
    resource.setrlimit(resource.RLIMIT_AS, (want, hard))


def main(target: Target, argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=f"Fuzz {target.name} (gemmalab reliability harness).")
    ap.add_argument("--runs", type=int, default=10_000, help="stop after this many inputs")
    ap.add_argument("--seconds", type=float, default=3600.0, help="stop after this long")
    ap.add_argument("--out", type=Path, help="write the counts here as JSON")
    ap.add_argument("--artifacts", type=Path, default=Path("."), help="where libFuzzer writes crash-* inputs")
    ap.add_argument("--corpus", type=Path, help="a corpus directory kept between runs (seeds are added)")
    ap.add_argument("--memory-gib", type=float, default=8.0, help="address-space cap (0: none)")
    ap.add_argument("--seed", type=int, default=1, help="libFuzzer's random seed")
    ap.add_argument("--replay", type=Path, nargs="+", help="run these inputs once (no atheris) and report")
    a = ap.parse_args(argv)

    scratch = Path(tempfile.mkdtemp(prefix=f"fuzz-{target.name}-", dir="/dev/shm" if Path("/dev/shm").is_dir() else None))
    if a.replay:
        if target.setup:
            target.setup(scratch)
        bad = 0
        for p in a.replay:
            try:
                target.one(p.read_bytes(), scratch)
                print(f"{p}: ok")
            except BaseException as e:  # noqa: BLE001
                try:
                    print(f"{p}: {check_outcome(target, e)}: {e}")
                except Finding as f:
                    bad += 1
                    print(f"{p}: FINDING {f}")
        sys.exit(1 if bad else 0)

    import atheris

    corpus = a.corpus or scratch / "corpus"
    corpus.mkdir(parents=True, exist_ok=True)
    seed_dir = scratch / "seed-files"
    seed_dir.mkdir()
    seeds = list(target.seeds(seed_dir))
    if not seeds:
        raise SystemExit(f"{target.name}: no seed inputs")
    for s in seeds:
        (corpus / hashlib.sha1(s).hexdigest()).write_bytes(s)
    max_len = target.max_len or max(4096, 2 * max(len(s) for s in seeds))

    if target.setup:
        target.setup(scratch)
    if a.memory_gib:
        cap_memory(a.memory_gib)
    runner = _Runner(target, scratch, a.runs, a.seconds, a.out)
    a.artifacts.mkdir(parents=True, exist_ok=True)
    # -rss_limit_mb=0: libFuzzer's RSS check reads getrusage's peak RSS, which Linux carries across
    # exec from the parent (a harness started by a pytest process that grew to 6 GB reported "OOM"
    # on its first input); the address-space cap above is the memory oracle instead.
    args = [sys.argv[0], str(corpus), f"-max_len={max_len}", f"-timeout={target.timeout_s}", "-rss_limit_mb=0",
            f"-seed={a.seed}", f"-artifact_prefix={a.artifacts}/", "-print_final_stats=0",
            f"-max_total_time={int(a.seconds) + 60}"]
    atheris.Setup(args, runner)
    atheris.Fuzz()
