"""Memory footprints of the presets in the Gemma 3 report's Table 3 formats, from configs alone.

Table 3 of the Gemma 3 Technical Report (arXiv 2503.19786, section 2.3) lists, for 1B / 4B / 12B /
27B, the weights in bf16, per-channel int4, int4 in blocks of 32 and SFP8, and the same with a bf16
KV cache at 32,768 tokens ("+KV"). This module computes that table for every gemmalab preset. It
needs no weights and no torch: every count comes from the config fields. tests/test_memory_table.py
checks the counts against a model built on the meta device.

Units: GB = 1e9 bytes, as in the report. This module uses no GiB.

Format rules (`FORMATS`; integer bytes per tensor; a matrix has shape (rows = outputs, cols = inputs))
--------------------------------------------------------------------------------------------------------
- ``bf16``: 2 bytes per weight, every tensor.
- ``int4`` (per-channel): 4 bits per weight (rows * ceil(cols / 2) bytes) plus one fp16 scale
  (2 bytes) per output row.
- ``int4_b32`` (per-block, llama.cpp Q4_0): 18 bytes (an fp16 scale + 16 bytes of nibbles) per block
  of 32 weights along a row, so 4.5 bits per weight. A row whose length is not a multiple of 32 is
  padded to whole blocks. Only the flattened SigLIP patch conv (588 inputs) is padded.
- ``sfp8`` (gemma.cpp switched floating point): 1 byte per weight plus one 4-byte (f32) scale per
  tensor.

Which tensors each format applies to:
- **Matrices** are quantized. These are the text decoder's q/k/v/o and gate/up/down projections and,
  for a multimodal preset, the SigLIP encoder's. The SigLIP encoder has the patch conv (flattened to
  (d, 3*14*14)), its 4096 x d position table and its q/k/v/out and fc1/fc2. The projector matrix is
  also quantized, with rows = the text width.
- **The token embedding** (the tied LM head, one row per token) gets the same format by default
  (`embedding=` overrides it). The report's int4 columns need it quantized. With it in bf16 the 1B's
  int4 weights would be 0.95 GB, not 0.5.
- **Vectors** stay bf16 in every format: RMSNorm and LayerNorm weights, SigLIP biases and the
  projector's norm. They are at most 0.021% of any real preset (the 270M).
- **Exported files** (`weight_bytes(..., embedding=, vectors=)`): `embedding` also takes the
  storage types of EMBEDDING_STORAGE (q8_0, f16, f32) and `vectors` f32. gemmalab's GGUF exports
  hold the norms in F32 and the embedding as asked; its SFP8 directories hold both in f32.
  `bench/memory_table.py --measure` checks these predictions against the exported 270M files,
  byte for byte (docs/qat.md).
- **The vision encoder** (SigLIP So400m, 416.9M, plus the 3.0 to 6.2M projector) is counted for the
  multimodal presets (gemma3-4b / 12b / 27b and the tiny vision ones). Pass `vision=False` to leave it
  out. The report's 4B / 12B / 27B are multimodal, and its quantized columns fit text + vision better
  than text alone. For 27B: Int4 14.1 vs 13.71 with vision and 13.51 without; Int4(b32) 15.3 vs 15.43
  and 15.19; SFP8 27.4 vs 27.43 and 27.01. The 1B and 270M have no vision tower.

The KV cache (`kv_cache_bytes`) is bf16. A layer holds K and V, num_key_value_heads * head_dim values
each, per position. A global layer holds every position of the context. A local (sliding-window)
layer holds min(context, sliding_window) positions, which is the ideal ring buffer. gemmalab's own
`KVCache` allocates sliding_window + 32 slots (speculative-decoding headroom; `ring_headroom=0` gives
the ideal). The weight formats never touch the KV cache. Gemma 2 presets cannot run 32K (their
max_position_embeddings is 8192), so `memory_table` caps their context and says so in the `context`
column.

How this compares with the report (see `memory_table` / `format_table` for the numbers)
---------------------------------------------------------------------------------------
No single convention reproduces every cell of Table 3. The rules above were not tuned to match it.
The match is within the table's one-decimal rounding (+-0.05 GB) for four cells: the 1B's bf16
(2.00), int4 (0.50) and SFP8 (1.00) weights, and the 27B's SFP8 weights (27.43 vs 27.4). The 27B's
int4 (13.73 vs 14.1) and int4-b32 (15.43 vs 15.3) weights are within 3%. The mismatches:
- **bf16** looks like 2 bytes x the nominal size: 2.0 / 8.0 / 24.0 / 54.0. The counted text + vision
  parameters are 1.00 / 4.30 / 12.19 / 27.43 B, so 4B, 12B and 27B are 8%, 2% and 2% over the
  report. Text alone gives 7.76 / 23.53 / 54.02.
- **1B int4 blocks=32**: 0.7 in the report, but 1.0B weights x 4.5 bpw = 0.56 GB. 0.7 would need the
  embedding in 8 bits, but then the 1B's per-channel int4 would be 0.65, not 0.5. The two 1B cells
  contradict each other under any one embedding rule.
- **4B and 12B int4 weights**: the report is above the count. For 4B it is 21% / 20% above (int4 2.6
  vs 2.15, blocks=32 2.9 vs 2.42). For 12B it is 8% / 3.5% above (6.6 vs 6.10, 7.1 vs 6.86). Their
  SFP8 cells are within 2.5%. No one choice fits every column: a bf16 or 8-bit embedding, or a bf16
  vision tower, fixes some cells and breaks others.
- **The +KV deltas**: +0.9 / +4.7 / +14.9 / +18.7 GB, the same in every format column. They are not
  the sliding-window cache. With the 5:1 pattern (W = 512 for 1B, 1024 otherwise) that cache is
  0.15 / 0.79 / 2.48 / 3.12 GB. They are close to a full-length cache in every layer instead (the
  `kv_all_global` field): 0.87 / 4.56 / 12.88 / 16.64 GB. That is close for 1B and 4B (0.87 vs 0.9,
  4.56 vs 4.7). For 12B and 27B the report sits 16% / 12% above even that. So, although the report
  presents a bf16 cache under the 5:1 local/global design, its numbers do not account for the
  sliding window. gemmalab's table therefore shows the hybrid cache that the
  architecture needs, in a column of its own, and does not fudge it to the report's values. The
  comparison shows both.
A secondary check of the int4-b32 rule: with the token embedding in F16 (`embedding="bf16"`, the
same size), it gives the sizes of Google's released QAT Q4_0 GGUFs (`GOOGLE_QAT_GGUF_GB`):
1.00 / 3.15 / 8.07 / 17.22 GB against 1.0 / 3.16 / 8.07 / 17.2.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable, Union

from ..config import (FULL, MULTIMODAL_PRESETS, PRESETS, Gemma3Config, Gemma3MultimodalConfig,
                      SiglipVisionConfig, get_config, get_multimodal_config)

AnyConfig = Union[Gemma3Config, Gemma3MultimodalConfig]
GB = 1e9


# ---- formats ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Format:
    """A weight storage format: `matrix(rows, cols)` is the bytes of one quantized matrix (rows =
    output channels). Vectors are always bf16 (`VECTOR_BYTES`)."""
    name: str
    label: str  # the report's column header
    rule: str  # one line for the docs
    matrix: Callable[[int, int], int]

    def bytes_per_weight(self, rows: int, cols: int) -> float:
        return self.matrix(rows, cols) / (rows * cols)


VECTOR_BYTES = 2  # norms and biases: bf16 in every format


def _int4_per_channel(rows: int, cols: int) -> int:
    return rows * math.ceil(cols / 2) + 2 * rows  # packed nibbles + one fp16 scale per output row


def _int4_blocks32(rows: int, cols: int) -> int:
    return rows * math.ceil(cols / 32) * 18  # Q4_0: fp16 scale + 32 nibbles per block


FORMATS: dict[str, Format] = {f.name: f for f in [
    Format("bf16", "bf16", "2 B/weight", lambda r, c: 2 * r * c),
    Format("int4", "Int4", "0.5 B/weight + fp16 scale per output row", _int4_per_channel),
    Format("int4_b32", "Int4 blocks=32", "18 B per 32 weights (Q4_0, 4.5 bpw)", _int4_blocks32),
    Format("sfp8", "SFP8", "1 B/weight + f32 scale per tensor", lambda r, c: r * c + 4),
]}

# Further storage types, for the token embedding only (`weight_bytes(..., embedding=...)`): what
# exported files use for it besides the formats above. GGUF's Q8_0 is 34 bytes (an fp16 scale + 32
# int8) per block of 32 weights along a row, 8.5 bits per weight; F16 and F32 are 2 and 4 bytes.
EMBEDDING_STORAGE: dict[str, Format] = {f.name: f for f in [
    Format("q8_0", "Q8_0", "34 B per 32 weights (8.5 bpw)", lambda r, c: r * math.ceil(c / 32) * 34),
    Format("f16", "F16", "2 B/weight", lambda r, c: 2 * r * c),
    Format("f32", "F32", "4 B/weight", lambda r, c: 4 * r * c),
]}
# Bytes per element of a vector (norm, bias) for `weight_bytes(..., vectors=...)`: bf16 by default;
# GGUF files and gemmalab's SFP8 directories store them in f32.
VECTOR_STORAGE = {"bf16": 2, "f16": 2, "f32": 4}


# ---- the report's Table 3 (GB) ------------------------------------------------------------------

# Gemma 3 Technical Report (arXiv 2503.19786) section 2.3, Table 3: weights ("raw") and with a bf16
# KV cache at 32,768 tokens ("+kv"), per format. The same values are in ../shared/spec/gemma3.md
# section 2.3; Google's QAT blog repeats the Int4 column.
REPORT_TABLE3: dict[str, dict[str, dict[str, float]]] = {
    "gemma3-1b": {"raw": {"bf16": 2.0, "int4": 0.5, "int4_b32": 0.7, "sfp8": 1.0},
                  "kv": {"bf16": 2.9, "int4": 1.4, "int4_b32": 1.6, "sfp8": 1.9}},
    "gemma3-4b": {"raw": {"bf16": 8.0, "int4": 2.6, "int4_b32": 2.9, "sfp8": 4.4},
                  "kv": {"bf16": 12.7, "int4": 7.3, "int4_b32": 7.6, "sfp8": 9.1}},
    "gemma3-12b": {"raw": {"bf16": 24.0, "int4": 6.6, "int4_b32": 7.1, "sfp8": 12.4},
                   "kv": {"bf16": 38.9, "int4": 21.5, "int4_b32": 22.0, "sfp8": 27.3}},
    "gemma3-27b": {"raw": {"bf16": 54.0, "int4": 14.1, "int4_b32": 15.3, "sfp8": 27.4},
                   "kv": {"bf16": 72.7, "int4": 32.8, "int4_b32": 34.0, "sfp8": 46.1}},
}
REPORT_CONTEXT = 32_768

# Sizes of Google's QAT Q4_0 GGUF files (GB; text model, token_embd F16, norms F32), as quoted by
# secondary sources (model cards, r/LocalLLaMA; ../shared/spec/qat_long_context.md A3).
GOOGLE_QAT_GGUF_GB = {"gemma3-1b": 1.0, "gemma3-4b": 3.16, "gemma3-12b": 8.07, "gemma3-27b": 17.2}


# ---- tensors ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Tensor:
    """One parameter: its model name, its shape as (rows, cols) for a matrix or (n,) for a vector,
    and its role: "embedding" (the text token table), "matrix" or "vector"."""
    name: str
    shape: tuple[int, ...]
    role: str

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def _text_tensors(c: Gemma3Config, prefix: str = "") -> list[Tensor]:
    d = c.hidden_size
    out = [Tensor(f"{prefix}embed_tokens.weight", (c.vocab_size, d), "embedding")]
    for i in range(c.num_hidden_layers):
        p = f"{prefix}layers.{i}."
        out += [Tensor(p + "self_attn.q_proj.weight", (c.q_dim, d), "matrix"),
                Tensor(p + "self_attn.k_proj.weight", (c.kv_dim, d), "matrix"),
                Tensor(p + "self_attn.v_proj.weight", (c.kv_dim, d), "matrix"),
                Tensor(p + "self_attn.o_proj.weight", (d, c.q_dim), "matrix")]
        if c.use_qk_norm:
            out += [Tensor(p + "self_attn.q_norm.weight", (c.head_dim,), "vector"),
                    Tensor(p + "self_attn.k_norm.weight", (c.head_dim,), "vector")]
        out += [Tensor(p + "mlp.gate_proj.weight", (c.intermediate_size, d), "matrix"),
                Tensor(p + "mlp.up_proj.weight", (c.intermediate_size, d), "matrix"),
                Tensor(p + "mlp.down_proj.weight", (d, c.intermediate_size), "matrix")]
        out += [Tensor(p + n + ".weight", (d,), "vector") for n in (
            "input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
            "post_feedforward_layernorm")]
    return out + [Tensor(f"{prefix}norm.weight", (d,), "vector")]


def _vision_tensors(v: SiglipVisionConfig, prefix: str = "vision_tower.") -> list[Tensor]:
    d, f = v.hidden_size, v.intermediate_size
    out = [Tensor(prefix + "patch_embedding.weight", (d, v.num_channels * v.patch_size ** 2), "matrix"),
           Tensor(prefix + "patch_embedding.bias", (d,), "vector"),
           Tensor(prefix + "position_embedding.weight", (v.num_patches, d), "matrix")]
    for i in range(v.num_hidden_layers):
        p = f"{prefix}layers.{i}."
        for ln in ("layer_norm1", "layer_norm2"):
            out += [Tensor(f"{p}{ln}.weight", (d,), "vector"), Tensor(f"{p}{ln}.bias", (d,), "vector")]
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            out += [Tensor(f"{p}self_attn.{proj}.weight", (d, d), "matrix"),
                    Tensor(f"{p}self_attn.{proj}.bias", (d,), "vector")]
        out += [Tensor(p + "mlp.fc1.weight", (f, d), "matrix"), Tensor(p + "mlp.fc1.bias", (f,), "vector"),
                Tensor(p + "mlp.fc2.weight", (d, f), "matrix"), Tensor(p + "mlp.fc2.bias", (d,), "vector")]
    return out + [Tensor(prefix + "post_layernorm.weight", (d,), "vector"),
                  Tensor(prefix + "post_layernorm.bias", (d,), "vector")]


def weight_tensors(config: AnyConfig, *, vision: bool = True) -> list[Tensor]:
    """Every parameter of `Gemma3(config)`, or of `Gemma3Multimodal(config)` for a multimodal config
    (with the same names; `vision=False` keeps only its language model). Matrices are listed as
    (outputs, inputs): the patch conv is flattened to (d, C*p*p), and the projector, stored
    (d_vision, d_text) and applied as x @ W, is listed as (d_text, d_vision)."""
    if isinstance(config, Gemma3Config):
        return _text_tensors(config)
    if not vision:
        return _text_tensors(config.text)
    pv, pt = config.vision.hidden_size, config.text.hidden_size
    return (_vision_tensors(config.vision) +
            [Tensor("multi_modal_projector.mm_input_projection_weight", (pt, pv), "matrix"),
             Tensor("multi_modal_projector.mm_soft_emb_norm.weight", (pv,), "vector")] +
            _text_tensors(config.text, "language_model."))


def parameter_counts(config: AnyConfig, *, vision: bool = True) -> dict[str, int]:
    """Parameters by role: embedding (text token table), matrices, vectors (norms, biases); vision
    (encoder + projector, all roles; part of matrices / vectors too); total."""
    ts = weight_tensors(config, vision=vision)
    counts = {role: sum(t.numel for t in ts if t.role == role) for role in ("embedding", "matrix",
                                                                             "vector")}
    return {"embedding": counts["embedding"], "matrices": counts["matrix"], "vectors": counts["vector"],
            "vision": sum(t.numel for t in ts if t.name.startswith(("vision_tower.",
                                                                    "multi_modal_projector."))),
            "total": sum(counts.values())}


def _text(config: AnyConfig) -> Gemma3Config:
    return config if isinstance(config, Gemma3Config) else config.text


def weight_bytes(config: AnyConfig, fmt: str, *, embedding: str | None = None,
                 vectors: str = "bf16", vision: bool = True) -> int:
    """Bytes of all weights in format `fmt` (a key of FORMATS): matrices in `fmt`, the token
    embedding in `embedding` (default: `fmt`; a key of FORMATS or EMBEDDING_STORAGE), vectors in
    `vectors` (a key of VECTOR_STORAGE, default bf16). A multimodal config includes the vision
    encoder and projector unless `vision=False`."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; use one of {', '.join(FORMATS)}")
    emb = embedding or fmt
    emb_formats = {**FORMATS, **EMBEDDING_STORAGE}
    if emb not in emb_formats:
        raise ValueError(f"unknown format {emb!r} for the embedding; use one of {', '.join(emb_formats)}")
    if vectors not in VECTOR_STORAGE:
        raise ValueError(f"unknown vector storage {vectors!r}; use one of {', '.join(VECTOR_STORAGE)}")
    total = 0
    for t in weight_tensors(config, vision=vision):
        if t.role == "vector":
            total += VECTOR_STORAGE[vectors] * t.numel
        else:
            total += (emb_formats[emb] if t.role == "embedding" else FORMATS[fmt]).matrix(*t.shape)
    return total


def kv_cache_bytes(config: AnyConfig, context: int = 32_768, dtype_bytes: int = 2, *,
                   hybrid: bool = True) -> int:
    """Bytes of K and V for one sequence of `context` tokens: per layer 2 * n_kv * head_dim *
    dtype_bytes per held position. A global layer holds `context` positions, a local layer
    min(context, sliding_window). `hybrid=False` treats every layer as global."""
    c = _text(config)
    per_position = 2 * c.num_key_value_heads * c.head_dim * dtype_bytes
    held = sum(context if (t == FULL or not hybrid) else min(context, c.sliding_window)
               for t in c.layer_types)
    return per_position * held


# ---- the table ----------------------------------------------------------------------------------

def all_presets() -> list[str]:
    """Every preset name: the text presets, then the multimodal ones that have no text namesake."""
    return list(PRESETS) + [n for n in MULTIMODAL_PRESETS if n not in PRESETS]


def resolve(name: str, *, vision: bool = True) -> AnyConfig:
    """A preset by name: the multimodal config where one exists (and `vision`), else the text one."""
    if vision:
        try:
            return get_multimodal_config(name)
        except ValueError:
            pass
    try:
        return get_config(name)
    except ValueError:
        return get_multimodal_config(name).text  # a multimodal-only preset with vision=False


def memory_table(presets: Iterable[str] | None = None, context: int = 32_768, *,
                 vision: bool = True) -> list[dict]:
    """One row per preset (default: all): bytes of the weights per format, of the hybrid bf16 KV
    cache and of an all-global one, at `context` tokens capped at the model's
    max_position_embeddings. A row of a preset in the report's Table 3 also carries `report` (its GB
    numbers), compared only when the context is the report's 32,768."""
    rows = []
    for name in (all_presets() if presets is None else presets):
        cfg = resolve(name, vision=vision)
        text = _text(cfg)
        ctx = min(context, text.max_position_embeddings)
        counts = parameter_counts(cfg, vision=vision)
        key = text.name if text.name in REPORT_TABLE3 else None
        rows.append({
            "preset": getattr(cfg, "name", name),
            "multimodal": isinstance(cfg, Gemma3MultimodalConfig),
            "params": counts["total"], "embedding_params": counts["embedding"],
            "vision_params": counts["vision"],
            "layers": f"{text.num_global_layers}g/{text.num_local_layers}l W={text.sliding_window}",
            "context": ctx, "context_capped": ctx < context,
            "weights": {f: weight_bytes(cfg, f, vision=vision) for f in FORMATS},
            "kv": kv_cache_bytes(cfg, ctx), "kv_all_global": kv_cache_bytes(cfg, ctx, hybrid=False),
            "report": REPORT_TABLE3[key] if key and ctx == REPORT_CONTEXT else None,
            "gguf_q4_0_f16_embd": (weight_bytes(cfg, "int4_b32", embedding="bf16", vision=False)
                                   if key else None),
        })
    return rows


def _gb(n: float) -> str:
    g = n / GB
    return f"{g:.2f}" if g >= 0.1 or g == 0 else f"{g:.2g}"


def _params(n: int) -> str:
    return f"{n / 1e9:.3f}B" if n >= 1e8 else f"{n / 1e6:.2f}M"


def format_table(rows: list[dict]) -> str:
    """Markdown: the footprint table (GB = 1e9 bytes) for all rows. Rows with report numbers are then
    compared with Table 3, with gemmalab's numbers over the report's and the ratio of the two."""
    fmts = list(FORMATS)
    head = (["preset", "params", "layers", "context", "KV (hybrid)", "KV (all global)"] +
            [FORMATS[f].label for f in fmts] + [f"{FORMATS[f].label} +KV" for f in fmts])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        ctx = f"{r['context']:,}" + (" (max)" if r["context_capped"] else "")
        name = r["preset"] + (" (+vision)" if r["multimodal"] else "")
        cells = ([name, _params(r["params"]), r["layers"], ctx, _gb(r["kv"]), _gb(r["kv_all_global"])] +
                 [_gb(r["weights"][f]) for f in fmts] + [_gb(r["weights"][f] + r["kv"]) for f in fmts])
        lines.append("| " + " | ".join(cells) + " |")
    out = "\n".join(lines)

    compared = [r for r in rows if r["report"]]
    if compared:
        head = ["model", "what"] + [FORMATS[f].label for f in fmts]
        cmp = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

        def cell(ours: float, theirs: float) -> str:
            return f"{ours / GB:.2f} / {theirs:.1f} ({ours / GB / theirs:.2f}x)"

        for r in compared:
            w, rep = r["weights"], r["report"]
            cmp.append(f"| {r['preset']} | weights | " + " | ".join(
                cell(w[f], rep["raw"][f]) for f in fmts) + " |")
            for kv_key, what in (("kv", "+KV hybrid"), ("kv_all_global", "+KV all global")):
                cmp.append(f"| | {what} | " + " | ".join(
                    cell(w[f] + r[kv_key], rep["kv"][f]) for f in fmts) + " |")
            deltas = sorted({round(rep["kv"][f] - rep["raw"][f], 1) for f in fmts})
            cmp.append(f"| | KV alone: report +{'/'.join(map(str, deltas))}, hybrid {_gb(r['kv'])}, "
                       f"all global {_gb(r['kv_all_global'])} | | | | |")
        out += ("\n\nCompared with Table 3 of the Gemma 3 report (GB; cells are gemmalab / report "
                "(ratio)):\n\n" + "\n".join(cmp))

        gg = [r for r in compared if r["preset"] in GOOGLE_QAT_GGUF_GB]
        if gg:
            out += ("\n\nCross-check of the Q4_0 rule against Google's QAT Q4_0 GGUF files (text "
                    "model, token embedding F16; sizes from secondary sources):\n\n"
                    "| model | Q4_0 + F16 embedding (gemmalab) | GGUF file |\n|---|---|---|\n")
            out += "\n".join(f"| {r['preset']} | {_gb(r['gguf_q4_0_f16_embd'])} | "
                             f"{GOOGLE_QAT_GGUF_GB[r['preset']]} |" for r in gg)
    return out
