"""The CPU kernels of the quantized modes (csrc/*.cpp), compiled once and cached.

`torch.ops.gemmalab.*` are built on first use with `torch.utils.cpp_extension` (gcc, ninja; about a
minute on 2 cores) into the gemmalab cache directory, keyed by a hash of the sources, the torch
version and the flags, so later processes load the shared library in milliseconds. They need an
x86-64 CPU with AVX2, FMA and F16C; elsewhere `available()` is False and `gemmalab.load` falls back to
the fp32 mode with a warning.

Variants (`isa()`), chosen at run time from what the CPU reports (`gemmalab.cpu`):
- "avx2": the baseline (maddubs + madd for the int8 dot products);
- "avx512": AVX-512 F/BW/VL/DQ + VNNI (vpdpbusd on two weight blocks per 512-bit register, up to
  8 activation rows per weight pass), bit-identical outputs to "avx2" (tests/test_isa.py);
- "amx": AMX-INT8 tile products (16 weight rows x up to 16 activation rows x one block of 32 per
  tdpbssd / tdpbusd), one fp32 scaling per block instead of 8 lanes, for Q8_0, Q8_0_SYM and Q5_0_U8
  (the LM head and most of the embedded model's layers), at any number of rows; the other types run
  the avx512 kernel inside it. Needs AMX-TILE + AMX-INT8 with the avx512 flags and Linux's leave to
  use the tile state (arch_prctl, Linux 5.16+). NOT bit-identical to the others (one rounding per
  block: within ~1e-7 relative per product, see csrc/qgemm_amx.cpp and docs/cpu.md), but a row gets
  the same bits alone or in a batch and at any thread count.
All are always compiled (the AVX-512 and AMX files through target pragmas) and the last one the CPU
runs is used; `GEMMALAB_ISA=avx2|avx512|amx` or `set_isa(name)` overrides (an unsupported choice is
an error naming what is missing). `EXACT_ISAS`: the variants bit-identical to "avx2".

Threads: the kernels claim guided chunks dynamically on torch's OpenMP team, and run on the caller
alone while other processes hold the cores (csrc/pool.h); as many threads as
`torch.get_num_threads()`; `pool_stats()` shows what they did.
"""
from __future__ import annotations

import hashlib
import os
import platform
import threading
from pathlib import Path

import torch

_SRC = Path(__file__).with_name("csrc")
_SOURCES = ("qgemm.cpp", "qgemm_avx512.cpp", "qgemm_amx.cpp", "pool.cpp", "ops.cpp")
ISAS = ("avx2", "avx512", "amx")
# the variants whose outputs are bit-identical to avx2's (amx rounds differently, see the docstring)
EXACT_ISAS = ("avx2", "avx512")
# -fopenmp: at::parallel_for is an inline OpenMP region; without the flag it runs on one thread.
_FLAGS = ["-O3", "-mavx2", "-mfma", "-mf16c", "-std=c++17", "-fno-math-errno", "-fopenmp"]
_lock = threading.Lock()
_state: dict = {}


class KernelsUnavailable(RuntimeError):
    """The quantized CPU kernels cannot run here (no AVX2/FMA/F16C, or no C++ compiler)."""


def cpu_supported() -> tuple[bool, str]:
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False, f"the quantized kernels need x86-64 (this is {platform.machine()})"
    from .. import cpu
    flags = cpu.cpu_flags()
    if flags:
        missing = [f for f in ("avx2", "fma", "f16c") if f not in flags]
        if missing:
            return False, f"the quantized kernels need AVX2, FMA and F16C; this CPU lacks {', '.join(missing)}"
    return True, ""


def supported_isas() -> list[str]:
    """The kernel variants this CPU can run, baseline first."""
    from .. import cpu
    return (["avx2"] + (["avx512"] if cpu.avx512_supported() else [])
            + (["amx"] if cpu.amx_supported() else []))


def _check_isa(name: str) -> None:
    if name not in ISAS:
        raise ValueError(f"unknown kernel variant {name!r}; use one of {', '.join(ISAS)}")
    if name not in supported_isas():
        from .. import cpu
        needs = cpu.AMX_NEEDS if name == "amx" else cpu.AVX512_NEEDS
        missing = [f for f in needs if not cpu.has(f)]
        why = (f"it lacks {', '.join(missing)}" if missing else
               f"it lacks permission to use them: {cpu.amx_permission()}")
        raise ValueError(f"this CPU cannot run the {name} kernels ({why}); "
                         f"it supports {', '.join(supported_isas())}")


def set_isa(name: str) -> None:
    """Select the kernel variant for this process (the kernels are loaded first)."""
    _check_isa(name)
    load()
    torch.ops.gemmalab.set_isa(ISAS.index(name))


def isa() -> str:
    """The kernel variant in use."""
    load()
    return ISAS[int(torch.ops.gemmalab.get_isa())]


def pool_stats() -> dict:
    """What the kernels' thread pool did since the last reset (see csrc/pool.h)."""
    load()
    s = torch.ops.gemmalab.pool_stats()
    return dict(threads=s[0], jobs=s[1], parallel_jobs=s[2], solo_jobs=s[3], solo_switches=s[4],
                solo_now=bool(s[5]), straggle_ms=s[6] / 1e3, pool="static" if s[7] else "guided")


def reset_pool_stats() -> None:
    load()
    torch.ops.gemmalab.pool_reset_stats()


def why_unavailable() -> str:
    return _state.get("error", "")


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
        choice = os.environ.get("GEMMALAB_ISA", "").strip().lower() or supported_isas()[-1]
        try:
            _check_isa(choice)
        except ValueError as e:
            raise ValueError(f"GEMMALAB_ISA={choice}: {e}") from None
        torch.ops.gemmalab.set_isa(ISAS.index(choice))


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
