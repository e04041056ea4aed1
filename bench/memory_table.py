"""The memory table of the Gemma 3 report (Table 3) for every gemmalab preset, from configs alone.

    python bench/memory_table.py                  # print it and write it into docs/qat.md
    python bench/memory_table.py --no-write       # print only
    python bench/memory_table.py --context 131072 --presets gemma3-4b gemma3-27b
    python bench/memory_table.py --measure        # also export the embedded 270M and measure it

It loads no weights: the byte counts come from the config fields (gemmalab.quant.memory), and it
cross-checks those counts against a model built on the meta device for the 270M. The result goes
into docs/qat.md between `<!-- memory-table:start -->` and `<!-- memory-table:end -->`. The page and
its "## Memory" section are created when they are missing. Text outside the markers is kept.

--measure (minutes, a few GB of temporary disk) loads the embedded 270M once in fp32 and exports it
into a temporary directory: save_hf bf16, save_gguf q4_0 (Q8_0 and F16 embedding), save_gguf
q4_0_channel (Q8_0 embedding) and save_sfp8. For each weights file it reports the size on disk, the
bytes of its tensors alone (from the GGUF tensor infos / the safetensors header) and memory.py's
prediction in the file's own convention (the matrices in the exported format, the embedding and the
vectors in the types the file holds). The rows are kept in docs/qat_memory_measured.json, so a later
run without --measure still renders them.
"""
from __future__ import annotations

import argparse
import json
import math
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's gemmalab, whatever is installed
sys.path.insert(0, str(ROOT / "bench"))

from docs_section import replace_section  # noqa: E402  (bench/, the script's directory)

from gemmalab.quant import memory  # noqa: E402

BEGIN, END = "<!-- memory-table:start -->", "<!-- memory-table:end -->"
DOC = ROOT / "docs" / "qat.md"
MEASURED = ROOT / "docs" / "qat_memory_measured.json"
MiB = 2 ** 20
TITLE = "Quantization-aware training"


def meta_cross_check(name: str = "gemma3-270m") -> str:
    """Parameter counts of `name` from its config vs. a model built on the meta device."""
    import torch

    from gemmalab.model import Gemma3
    cfg = memory.get_config(name)
    with torch.device("meta"):
        model = Gemma3(cfg)
    got = {"embedding": model.embed_tokens.weight.numel(),
           "matrices": sum(p.numel() for n, p in model.named_parameters()
                           if p.dim() >= 2 and n != "embed_tokens.weight"),
           "vectors": sum(p.numel() for p in model.parameters() if p.dim() == 1)}
    want = memory.parameter_counts(cfg)
    bad = {k: (want[k], v) for k, v in got.items() if want[k] != v}
    if bad:
        raise SystemExit(f"config counts disagree with the meta-device model for {name}: {bad}")
    return (f"{name}: config counts = meta-device model: embedding {got['embedding']:,}, "
            f"matrices {got['matrices']:,}, norms {got['vectors']:,}")


def reading(rows: list[dict]) -> str:
    """What the comparison with Table 3 shows, with the numbers taken from `rows`."""
    cmp = [r for r in rows if r["report"]]
    if not cmp:
        return ""

    def series(f) -> str:
        return " / ".join(f"{f(r):.2f}" for r in cmp)

    def short(r) -> str:
        return r["preset"].removeprefix("gemma3-")

    over = sorted((r["report"]["raw"][f] * 1e9 / r["weights"][f], short(r), memory.FORMATS[f].label)
                  for r in cmp for f in ("int4", "int4_b32"))
    deltas = " / ".join(f"+{r['report']['kv']['bf16'] - r['report']['raw']['bf16']:.1f}" for r in cmp)
    return f"""
Reading the comparison ({" / ".join(map(short, cmp))}): no single convention reproduces every cell
of Table 3.
- The report's bf16 column is 2 bytes times the nominal size. The counted parameters are
  {series(lambda r: r["params"] / 1e9)} B.
- Report / gemmalab for the int4 weights runs from {over[0][0]:.2f} ({over[0][1]}, {over[0][2]}) to
  {over[-1][0]:.2f} ({over[-1][1]}, {over[-1][2]}).
- Its +KV deltas ({deltas} GB, the same in every column) are not the
  sliding-window cache ({series(lambda r: r["kv"] / 1e9)} GB). They are close to an
  all-global, full-length cache ({series(lambda r: r["kv_all_global"] / 1e9)} GB).
- `gemmalab/quant/memory.py` gives the cell-by-cell account.
"""


# ---- --measure: the 270M exported to real files ----------------------------------------------------

# safetensors / GGUF type names -> the storage names memory.py uses
_SAFETENSORS_TYPES = {"BF16": ("bf16", 2), "F16": ("f16", 2), "F32": ("f32", 4), "U8": ("u8", 1)}

# (file, exporter, its keyword arguments, the matrix format in memory.FORMATS). The embedding and
# vector storage of the prediction are read from the file.
EXPORTS = [
    ("model-bf16/model.safetensors", "save_hf", {"dtype": "bf16"}, "bf16"),
    ("q4_0-q8_0embd.gguf", "save_gguf", {"dtype": "q4_0", "embedding": "q8_0"}, "int4_b32"),
    ("q4_0-f16embd.gguf", "save_gguf", {"dtype": "q4_0", "embedding": "f16"}, "int4_b32"),
    ("q4_0_channel-q8_0embd.gguf", "save_gguf", {"dtype": "q4_0_channel", "embedding": "q8_0"}, "int4_b32"),
    ("model-sfp8/model.safetensors", "save_sfp8", {}, "sfp8"),
]


def _call(exporter: str, kwargs: dict) -> str:
    return f"{exporter}({', '.join(f'{k}={v!r}' for k, v in kwargs.items())})".replace("'", '"')


def file_weights(path: Path) -> dict:
    """What a weights file holds: `bytes`, the sum of its tensors' byte sizes (GGUF: the tensor
    infos' n_bytes; safetensors: shape x dtype size from the header, no tensor is read); `embedding`
    and `vectors`, the storage type of the token embedding and of the 1-D tensors (None where mixed);
    `matrices`, the set of types of the other 2-D tensors."""
    if path.suffix == ".gguf":
        import gguf

        reader = gguf.GGUFReader(path)
        items = [(t.name, len(t.shape), t.tensor_type.name.lower(), int(t.n_bytes)) for t in reader.tensors]
        embed_name = "token_embd.weight"
    else:
        from safetensors import safe_open

        items = []
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                sl = f.get_slice(key)
                kind, size = _SAFETENSORS_TYPES[sl.get_dtype()]
                shape = sl.get_shape()
                items.append((key, len(shape), kind, math.prod(shape) * size))
        embed_name = "model.embed_tokens.weight"
    vectors = {kind for name, ndim, kind, _ in items if ndim <= 1 and not name.endswith(".sfp8_scale")}
    return {"bytes": sum(n for *_, n in items), "tensors": len(items),
            "embedding": next(kind for name, _, kind, _ in items if name == embed_name),
            "vectors": vectors.pop() if len(vectors) == 1 else None,
            "matrices": sorted({kind for name, ndim, kind, _ in items if ndim >= 2 and name != embed_name})}


def _git_commit() -> str:
    try:
        out = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=True).stdout.strip()
        return out + (" + uncommitted changes" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def measure(command: str, workdir: str | None = None) -> dict:
    """Export the embedded 270M (loaded once, fp32) in every EXPORTS format under a temporary
    directory (or `workdir`) and measure each file against memory.py's prediction."""
    import gemmalab
    from gemmalab.checkpoints.export import save_gguf, save_hf
    from gemmalab.checkpoints.sfp8 import save_sfp8

    t0 = time.perf_counter()
    lm = gemmalab.load(mode="fp32")
    model, tok = lm.model, lm.tokenizer
    cfg = model.config
    print(f"loaded {lm.path.name} ({cfg.name}) in {time.perf_counter() - t0:.0f} s", flush=True)
    preset = "gemma3-270m"  # the embedded model; its config is named after the GGUF
    if memory.parameter_counts(cfg) != memory.parameter_counts(memory.get_config(preset)):
        raise SystemExit(f"the embedded model's tensors are not {preset}'s")
    # GGUF drops the embedding rows past the tokenizer (export.py); HF keeps every row
    gguf_cfg = cfg.replace(vocab_size=min(cfg.vocab_size, len(tok)))
    rows = []
    with tempfile.TemporaryDirectory(prefix="memory_table_", dir=workdir) as tmp:
        for name, exporter, kwargs, fmt in EXPORTS:
            out, t1 = Path(tmp) / name, time.perf_counter()
            if exporter == "save_gguf":
                save_gguf(model, tok, out, **kwargs)
            else:  # a directory holding model.safetensors
                {"save_hf": save_hf, "save_sfp8": save_sfp8}[exporter](model, tok, out.parent, **kwargs)
            pcfg = gguf_cfg if exporter == "save_gguf" else cfg
            seconds = time.perf_counter() - t1
            held = file_weights(out)
            predicted = memory.weight_bytes(pcfg, fmt, embedding=held["embedding"], vectors=held["vectors"])
            row = {"file": name, "exporter": _call(exporter, kwargs), "format": fmt, "size": out.stat().st_size,
                   "directory": (sum(p.stat().st_size for p in out.parent.iterdir())
                                 if out.parent != Path(tmp) else None),
                   "weights": held["bytes"], "tensors": held["tensors"], "embedding": held["embedding"],
                   "vectors": held["vectors"], "matrices": held["matrices"], "predicted": predicted,
                   "table_convention": memory.weight_bytes(cfg, fmt), "seconds": round(seconds, 1)}
            if kwargs.get("dtype") == "q4_0_channel":  # the ideal int4 per channel: 4 bits + one fp16 scale per row
                row["ideal_int4"] = memory.weight_bytes(pcfg, "int4", embedding=held["embedding"],
                                                        vectors=held["vectors"])
                row["ideal_table_convention"] = memory.weight_bytes(cfg, "int4")
            rows.append(row)
            print(f"{name}: {row['size']:,} B on disk, {row['weights']:,} B of tensors, predicted "
                  f"{predicted:,} ({seconds:.0f} s)", flush=True)
            for p in sorted(out.parent.iterdir()) if out.parent != Path(tmp) else [out]:
                if p.is_file():
                    p.unlink()  # keep the temporary disk use to one export at a time
    return {"model": preset, "source": lm.path.name, "n_tokens": len(tok), "vocab_size": cfg.vocab_size,
            "command": command, "commit": _git_commit(), "date": time.strftime("%Y-%m-%d"), "rows": rows}


def _mb(n: int) -> str:
    return f"{n / MiB:.1f} MiB / {n / 1e6:.1f} MB"


def measured_section(m: dict) -> str:
    """Markdown for the rows of `measure`."""
    lines = ["| file | exporter | matrices / embedding / vectors in the file | size on disk | weight tensors "
             "(B) | predicted (B) | tensors / predicted | file - tensors (B) | report convention |",
             "|" + "---|" * 9]
    for r in m["rows"]:
        types = f"{'+'.join(r['matrices'])} / {r['embedding']} / {r['vectors']}"
        lines.append(f"| `{r['file']}` | `{r['exporter']}` | {types} | {_mb(r['size'])} | {r['weights']:,} | "
                     f"{r['predicted']:,} | {r['weights'] / r['predicted']:.4f} | {r['size'] - r['weights']:,} | "
                     f"{r['table_convention'] / memory.GB:.3f} GB |")
        if "ideal_int4" in r:
            lines.append(f"| (same, as ideal int4 per channel) | 4 bits + fp16 scale per row, same embedding "
                         f"| | | | {r['ideal_int4']:,} | {r['weights'] / r['ideal_int4']:.4f} | | "
                         f"{r['ideal_table_convention'] / memory.GB:.3f} GB |")
    dirs = [r for r in m["rows"] if r["directory"]]
    extra = "; ".join(f"`{r['file'].split('/')[0]}/` {_mb(r['directory'])}" for r in dirs)
    trunc = (f"The GGUF files keep {m['n_tokens']:,} embedding rows (the tokenizer's) of the config's "
             f"{m['vocab_size']:,}" if m["n_tokens"] < m["vocab_size"] else
             f"Every file holds all {m['vocab_size']:,} embedding rows")
    return f"""
### {m['model']} measured

Measured by `{m['command']}` ({m['date']}, commit {m['commit']}).
It loads the embedded {m['source']} once in fp32 and exports it into a temporary directory.
"Weight tensors" is the sum of the tensors' byte sizes read from the file (GGUF tensor infos,
safetensors header). "Predicted" is `memory.weight_bytes` with the matrices in the row's format and
the embedding and vectors in the types the file holds. "Report convention" is the table above:
the embedding in the format, vectors bf16. "File - tensors" is the header, the metadata (the
GGUF's tokenizer) and the alignment padding. {trunc}.
Whole directories (with the tokenizer files): {extra or "none"}.
MiB = 2^20 bytes, MB = 1e6 bytes.

{chr(10).join(lines)}

Q4_0 stores int4 per channel (`q4_0_channel`) as Q4_0 blocks that all repeat the row's fp16 scale:
4.5 bits per weight on disk, the same bytes as `q4_0`, against the ideal 4 bits plus one scale per
row (the "ideal" line; the Int4 column of the table).
"""


def load_measured() -> dict | None:
    return json.loads(MEASURED.read_text()) if MEASURED.exists() else None


def section(rows: list[dict], command: str, check: str, context: int, vision: bool,
            measured: dict | None = None) -> str:
    rules = "\n".join(f"- `{f.name}` ({f.label}): {f.rule}" for f in memory.FORMATS.values())
    scope = ("For the multimodal presets (+vision), the SigLIP encoder (416.9M) and the projector are\n"
             "included and quantized." if vision else "Text models only: no vision encoder (--no-vision).")
    return f"""{BEGIN}
Generated by `{command}`. It uses configs only, no weights.
`gemmalab/quant/memory.py` has the rules and the reasoning. GB = 1e9 bytes, as in the report.

The KV cache is bf16 at {context:,} tokens. The context is capped at the model's maximum, marked
"(max)". "KV (hybrid)" is what the local/global layers hold (5:1 for Gemma 3, 1:1 for Gemma 2): a
local layer holds min(context, W) positions. "KV (all global)" holds every position in every layer.
The "+KV" columns add the hybrid cache.

Formats: matrices and the token embedding are in the format; norms and biases stay bf16.
{scope}
{rules}

{memory.format_table(rows)}
{reading(rows)}
Check: {check}.
{measured_section(measured) if measured else ""}{END}"""


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--context", type=int, default=32_768, help="KV-cache length in tokens")
    ap.add_argument("--presets", nargs="+", default=None, help="default: every preset")
    ap.add_argument("--no-vision", action="store_true",
                    help="text models only (leave out the SigLIP encoder of the multimodal presets)")
    ap.add_argument("--no-write", action="store_true",
                    help="print only; leave docs/qat.md and docs/qat_memory_measured.json alone")
    ap.add_argument("--measure", action="store_true",
                    help="also export the embedded 270M (bf16 HF, Q4_0 GGUFs, SFP8) and measure the files")
    ap.add_argument("--workdir", default=None,
                    help="with --measure: where the temporary export directory goes (default: the system's)")
    args = ap.parse_args(argv)

    check = meta_cross_check()
    rows = memory.memory_table(args.presets, args.context, vision=not args.no_vision)
    print(memory.format_table(rows))
    print(f"\n{check}")
    command = " ".join(["python bench/memory_table.py"] +
                       [shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv)])
    if args.measure:
        measured = measure(command, args.workdir)
        if not args.no_write:
            MEASURED.write_text(json.dumps(measured, indent=1) + "\n")
            print(f"wrote {MEASURED.relative_to(ROOT)}")
        print(measured_section(measured))
    else:
        measured = load_measured()
    if args.no_write:
        return
    if not DOC.exists():
        DOC.write_text(f"# {TITLE}\n\n## Memory\n\n{BEGIN}\n{END}\n")
    elif BEGIN not in DOC.read_text():
        DOC.write_text(DOC.read_text().rstrip("\n") + f"\n\n## Memory\n\n{BEGIN}\n{END}\n")
    replace_section(DOC, BEGIN, END, section(rows, command, check, args.context, not args.no_vision,
                                                 measured), TITLE)
    print(f"wrote {DOC.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
