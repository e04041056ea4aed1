"""Reports every eval writes: one JSON object, one Markdown table, PNGs where a picture helps.

Files are written atomically (a temporary name, then `os.replace`), so an interrupted eval never
leaves a half-written report that a later comparison would read as a result.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

__all__ = ["write_json", "write_text", "markdown_table", "fmt", "common_cli", "load_model",
           "finish"]


def _atomic(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    return path


def write_json(path: str | Path, obj) -> Path:
    return _atomic(Path(path), (json.dumps(obj, indent=2, default=_plain) + "\n").encode())


def write_text(path: str | Path, text: str) -> Path:
    return _atomic(Path(path), text.encode())


def _plain(x):
    if hasattr(x, "tolist"):
        return x.tolist()
    if isinstance(x, Path):
        return str(x)
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")


def fmt(x, digits: int = 4) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        if math.isnan(x) or math.isinf(x):
            return str(x)
        return f"{x:.{digits}f}" if abs(x) < 1e5 else f"{x:.4g}"
    return str(x)


def markdown_table(headers: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def savefig(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}.png")
    fig.savefig(tmp, dpi=120, bbox_inches="tight")
    os.replace(tmp, path)
    return path


# ---- CLI plumbing shared by the eval commands ----------------------------------------------------

def common_cli(p, out_default: str | None = None) -> None:
    """--model, --mode, --threads, --out, --json and --no-progress, as every eval command has."""
    p.add_argument("--model", default=None,
                   help="GGUF file or Hugging Face directory (default: the embedded Gemma 3 270M)")
    p.add_argument("--mode", default="auto", choices=["auto", "fp32", "native", "q8"],
                   help="compute mode (see `gemmalab.load`; default auto)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    p.add_argument("--out", default=out_default,
                   help="directory for the JSON / Markdown / PNG report" +
                        (f" (default {out_default})" if out_default else " (default: none)"))
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def load_model(args, **overrides):
    import torch

    import gemmalab
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError("--threads must be >= 1")
        torch.set_num_threads(args.threads)
    if args.model is not None and not Path(args.model).expanduser().exists():
        raise FileNotFoundError(f"model not found: {args.model}")
    return gemmalab.load(args.model, mode=args.mode, **overrides)


def finish(args, result: dict, markdown: str, name: str, summary: str) -> int:
    """Write the report files (when --out), then print JSON (--json) or the summary."""
    if args.out:
        out = Path(args.out).expanduser()
        write_json(out / f"{name}.json", result)
        write_text(out / f"{name}.md", markdown)
        result.setdefault("report", str(out / f"{name}.md"))
    print(json.dumps(result, default=_plain) if args.json else summary)
    return 0
