"""The CPU kernels of the quantized modes (csrc/*.cpp), compiled once and cached.

`torch.ops.gemmalab.*` are built on first use with `torch.utils.cpp_extension` (gcc, ninja; about a
minute on 2 cores) into the gemmalab cache directory, keyed by a hash of the sources, the torch
version and the flags, so later processes load the shared library in milliseconds. They need an
x86-64 CPU with AVX2, FMA and F16C; elsewhere `available()` is False and `gemmalab.load` falls back to
the fp32 mode with a warning.
"""
from __future__ import annotations

import hashlib
import os
import platform
import threading
from pathlib import Path

import torch

_SRC = Path(__file__).with_name("csrc")
_SOURCES = ("qgemm.cpp", "ops.cpp")
# -fopenmp: at::parallel_for is an inline OpenMP region; without the flag it runs on one thread.
_FLAGS = ["-O3", "-mavx2", "-mfma", "-mf16c", "-std=c++17", "-fno-math-errno", "-fopenmp"]
_lock = threading.Lock()
_state: dict = {}


class KernelsUnavailable(RuntimeError):
    """The quantized CPU kernels cannot run here (no AVX2/FMA/F16C, or no C++ compiler)."""


def cpu_supported() -> tuple[bool, str]:
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False, f"the quantized kernels need x86-64 (this is {platform.machine()})"
    try:
        flags = next((line for line in open("/proc/cpuinfo") if line.startswith("flags")), "")
    except OSError:
        flags = ""
    if flags:
        missing = [f for f in ("avx2", "fma", "f16c") if f not in flags.split()]
        if missing:
            return False, f"the quantized kernels need AVX2, FMA and F16C; this CPU lacks {', '.join(missing)}"
    return True, ""


def _build_dir() -> Path:
    from .._paths import cache_dir
    h = hashlib.sha256()
    for name in sorted(p.name for p in _SRC.iterdir()):
        h.update(name.encode())
        h.update((_SRC / name).read_bytes())
    h.update(torch.__version__.encode())
    h.update(" ".join(_FLAGS).encode())
    return cache_dir() / "kernels" / h.hexdigest()[:16]


def load() -> None:
    """Compile (first time) and load the kernels; raise KernelsUnavailable with the reason."""
    with _lock:
        if _state.get("loaded"):
            return
        if "error" in _state:
            raise KernelsUnavailable(_state["error"])
        ok, why = cpu_supported()
        if not ok:
            _state["error"] = why
            raise KernelsUnavailable(why)
        build = _build_dir()
        lib = build / "gemmalab_kernels.so"
        try:
            if lib.exists():
                torch.ops.load_library(str(lib))
            else:
                _compile(build)
        except Exception as e:  # compiler missing, headers missing, ...
            _state["error"] = f"could not build the quantized CPU kernels: {str(e).strip().splitlines()[-1]}"
            raise KernelsUnavailable(_state["error"]) from e
        _state["loaded"] = True


def _compile(build: Path) -> None:
    from torch.utils import cpp_extension
    build.mkdir(parents=True, exist_ok=True)
    if os.environ.get("GEMMALAB_QUIET_BUILD") is None:
        import sys
        print("gemmalab: compiling the quantized CPU kernels (once, about a minute) ...",
              file=sys.stderr, flush=True)
    # is_python_module=False: the library registers torch.ops.gemmalab.* and is loaded by path.
    cpp_extension.load(name="gemmalab_kernels", sources=[str(_SRC / s) for s in _SOURCES],
                       extra_cflags=_FLAGS, extra_ldflags=["-fopenmp"], extra_include_paths=[str(_SRC)], build_directory=str(build),
                       is_python_module=False, verbose=False)


def available() -> bool:
    try:
        load()
        return True
    except KernelsUnavailable:
        return False


def ops():
    load()
    return torch.ops.gemmalab
