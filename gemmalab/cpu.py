"""What this CPU can do, read at run time: model name, ISA flags, machine load.

gemmalab runs on machines of different kinds (e.g. AMD Zen 1: AVX2 + FMA only, slow integer
multiplies, no fast bf16; AMD Zen 4: AVX-512 F/BW/VL, VNNI and BF16). Code paths are chosen from
these facts, never assumed:

- the quantized kernels' ISA variant (`gemmalab.quant.kernels.isa()`): "amx" where the CPU has
  AMX-TILE + AMX-INT8 (and the avx512 flags) and Linux grants the process the tile data state,
  "avx512" where it has AVX-512 F/BW/VL/DQ + VNNI, else "avx2"; `GEMMALAB_ISA=avx2|avx512|amx`
  overrides (tests use it);
- bf16 compute on CPU (`cpu_bf16()`): training autocast and the float weights' prefill choose bf16
  where the CPU has AVX512_BF16 or AMX-BF16 (native bf16 dot products), fp32 elsewhere;
  `GEMMALAB_CPU_BF16=0|1` overrides.

Every benchmark records `describe()` (model, the flags that matter, the variant chosen, the load).
"""
from __future__ import annotations

import functools
import os
import platform

# The flags that decide a code path, in the order they are reported.
REPORTED_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni",
                  "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8", "amx_tile")
AVX512_NEEDS = ("avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni")
AMX_NEEDS = AVX512_NEEDS + ("amx_tile", "amx_int8")


@functools.lru_cache(maxsize=1)
def _torch_has_bf16() -> bool:
    try:
        import torch
        return torch.backends.cpu.get_cpu_capability() in ("AVX512", "AVX512_BF16", "AMX")
    except Exception:  # pragma: no cover - very old torch
        return False


@functools.lru_cache(maxsize=1)
def _cpuinfo() -> tuple[str, str, frozenset[str]]:
    """(model name, 'family F model M', flags) of the first processor in /proc/cpuinfo."""
    fields: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if not line.strip():
                    break  # the first processor's block is enough
                key, _, value = line.partition(":")
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    model = fields.get("model name") or platform.processor() or platform.machine()
    ident = f"family {fields.get('cpu family', '?')} model {fields.get('model', '?')}"
    return model, ident, frozenset(fields.get("flags", "").split())


def cpu_model() -> str:
    return _cpuinfo()[0]


def cpu_family() -> str:
    """'family F model M' from /proc/cpuinfo (Zen 1 is family 23, Zen 4 family 25 model 17)."""
    return _cpuinfo()[1]


def cpu_flags() -> frozenset[str]:
    return _cpuinfo()[2]


def has(*flags: str) -> bool:
    fl = cpu_flags()
    return all(f in fl for f in flags)


def avx512_supported() -> bool:
    """AVX-512 F/BW/VL/DQ with VNNI: what the "avx512" kernel variant is compiled for."""
    return platform.machine().lower() in ("x86_64", "amd64") and has(*AVX512_NEEDS)


@functools.lru_cache(maxsize=1)
def amx_permission() -> str:
    """'' once Linux lets this process use the AMX tile data state (asked once: arch_prctl
    ARCH_REQ_XCOMP_PERM for XFEATURE_XTILEDATA, Linux 5.16+), else why not."""
    if platform.system() != "Linux" or platform.machine().lower() not in ("x86_64", "amd64"):
        return "AMX tile data needs Linux on x86-64"
    import ctypes
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        rc = libc.syscall(158, 0x1023, 18)  # SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA
    except (OSError, AttributeError) as e:
        return f"could not ask the kernel for the AMX tile data state ({e})"
    if rc != 0:
        return (f"the Linux kernel refused the AMX tile data state ({os.strerror(ctypes.get_errno())}; "
                "Linux 5.16 or later is needed)")
    return ""


def amx_supported() -> bool:
    """AMX-TILE + AMX-INT8 with the avx512 flags, and the tile state granted: the "amx" variant."""
    return avx512_supported() and has(*AMX_NEEDS) and amx_permission() == ""


def native_bf16() -> bool:
    """Whether the CPU has bf16 dot-product instructions (AVX512_BF16 or AMX-BF16)."""
    return has("avx512_bf16") or has("amx_bf16")


def _env_bool(name: str) -> bool | None:
    v = os.environ.get(name)
    if v is None or v.strip() == "":
        return None
    if v.strip().lower() in ("1", "true", "yes", "on"):
        return True
    if v.strip().lower() in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{name}={v!r}: use 1 or 0")


def cpu_bf16() -> bool:
    """Whether CPU code should compute in bf16 where it may (training autocast, float prefill):
    GEMMALAB_CPU_BF16 if set, else whether the CPU has native bf16 dot products and torch uses
    them (torch's CPU capability is AVX512 or better)."""
    forced = _env_bool("GEMMALAB_CPU_BF16")
    if forced is not None:
        return forced
    return native_bf16() and _torch_has_bf16()


def machine_load() -> dict:
    """Load averages and the number of runnable tasks right now (from /proc)."""
    out: dict = {"cores": os.cpu_count()}
    try:
        out["loadavg_1m"] = float(open("/proc/loadavg").read().split()[0])
        for line in open("/proc/stat"):
            if line.startswith("procs_running"):
                out["procs_running"] = int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return out


def describe() -> dict:
    """The facts every benchmark records."""
    fl = cpu_flags()
    out = {"cpu": cpu_model(), "id": cpu_family(), "flags": [f for f in REPORTED_FLAGS if f in fl],
           "bf16": cpu_bf16(), "load": machine_load()}
    try:
        from .quant import kernels
        out["kernels"] = kernels.isa() if kernels.available() else f"unavailable ({kernels.why_unavailable()})"
    except Exception as e:  # noqa: BLE001 - a description never fails
        out["kernels"] = f"unavailable ({e})"
    return out


def summary() -> str:
    d = describe()
    return (f"{d['cpu']} ({d['id']}; {', '.join(d['flags']) or 'no SIMD flags'}); kernels {d['kernels']}; "
            f"bf16 {'on' if d['bf16'] else 'off'}")
