"""gemmalab.quant.memory: the Gemma 3 report's Table 3 (weights per format, KV cache) from configs."""
import pytest
import torch

from gemmalab.config import FULL, PRESETS, SLIDING, get_config, get_multimodal_config
from gemmalab.model import Gemma3, Gemma3Multimodal, KVCache
from gemmalab.quant import memory

# Table 3 prints one decimal, so a reproduced cell may differ from the printed one by up to
# half a unit of that digit.
ROUNDING_GB = 0.05 + 1e-9


def _meta_split(model: torch.nn.Module, embedding_name: str) -> dict[str, int]:
    params = dict(model.named_parameters())
    return {"embedding": params[embedding_name].numel(),
            "matrices": sum(p.numel() for n, p in params.items() if p.dim() >= 2 and n != embedding_name),
            "vectors": sum(p.numel() for p in params.values() if p.dim() == 1)}


def test_270m_counts_equal_meta_model():
    cfg = get_config("270m")
    with torch.device("meta"):
        model = Gemma3(cfg)
    counts = memory.parameter_counts(cfg)
    assert _meta_split(model, "embed_tokens.weight") == {k: counts[k] for k in ("embedding", "matrices",
                                                                               "vectors")}
    assert counts["total"] == sum(p.numel() for p in model.parameters())
    assert counts["embedding"] == cfg.embedding_parameters
    assert counts["matrices"] + counts["vectors"] == cfg.non_embedding_parameters
    # every tensor by name, with its size
    assert {t.name: t.numel for t in memory.weight_tensors(cfg)} == {
        n: p.numel() for n, p in model.named_parameters()}


def test_multimodal_tensors_equal_meta_model():
    cfg = get_multimodal_config("tiny-vision")
    with torch.device("meta"):
        model = Gemma3Multimodal(cfg)
    ts = memory.weight_tensors(cfg)
    assert {t.name: t.numel for t in ts} == {n: p.numel() for n, p in model.named_parameters()}
    params = dict(model.named_parameters())
    for t in ts:  # matrices are the >= 2-d parameters, vectors the 1-d ones
        assert (t.role == "vector") == (params[t.name].dim() == 1), t.name
    counts = memory.parameter_counts(cfg)
    assert counts["vision"] == sum(p.numel() for n, p in params.items()
                                   if not n.startswith("language_model."))
    assert counts["vision"] == cfg.vision.num_parameters + cfg.projector_parameters
    assert memory.parameter_counts(cfg, vision=False)["total"] == sum(
        p.numel() for p in model.language_model.parameters())


def test_bf16_is_two_bytes_per_parameter():
    for name in ("gemma3-270m", "gemma3-27b"):
        cfg = memory.resolve(name)
        assert memory.weight_bytes(cfg, "bf16") == 2 * memory.parameter_counts(cfg)["total"]


def test_kv_cache_all_global_closed_form():
    cfg = PRESETS["gemma3-1b"]
    cfg = cfg.replace(layer_types=(FULL,) * cfg.num_hidden_layers)
    T = 32_768
    closed = 2 * cfg.num_hidden_layers * T * cfg.num_key_value_heads * cfg.head_dim * 2
    assert memory.kv_cache_bytes(cfg, T) == closed == 872_415_232
    assert memory.kv_cache_bytes(cfg, T, dtype_bytes=4) == 2 * closed
    # hybrid=False treats the real (5:1) config the same way
    assert memory.kv_cache_bytes(PRESETS["gemma3-1b"], T, hybrid=False) == closed


def test_local_layer_caps_at_window():
    base = PRESETS["tiny"]  # W = 8, 2 kv heads x 16
    one_local = base.replace(num_hidden_layers=1, layer_types=(SLIDING,))
    one_global = base.replace(num_hidden_layers=1, layer_types=(FULL,))
    per_position = 2 * base.num_key_value_heads * base.head_dim * 2
    for T in (1, 5, 8, 9, 100, 512):
        assert memory.kv_cache_bytes(one_local, T) == per_position * min(T, base.sliding_window)
        assert memory.kv_cache_bytes(one_global, T) == per_position * T
    # the real mix: n_global * T + n_local * min(W, T), and the config's own formula agrees
    for name, cfg in PRESETS.items():
        for T in (100, 4096, 32_768):
            assert memory.kv_cache_bytes(cfg, T) == cfg.kv_cache_bytes(T), (name, T)


def test_kv_cache_matches_gemmalab_cache_allocation():
    # gemmalab's KVCache without speculative headroom holds exactly min(W, T) slots per local layer
    cfg = PRESETS["gemma3-270m"]
    for T in (300, 4096):
        cache = KVCache(cfg, 1, T, torch.bfloat16, "meta", ring_headroom=0)
        assert sum(layer.nbytes() for layer in cache.layers) == memory.kv_cache_bytes(cfg, T)


@pytest.mark.parametrize("rows,cols", [(64, 32), (7, 640), (2048, 640), (262_144, 1152)])
def test_int4_blocks32_is_18_bytes_per_32_weights(rows, cols):
    fmt = memory.FORMATS["int4_b32"]
    assert fmt.matrix(rows, cols) * 32 == 18 * rows * cols
    assert fmt.bytes_per_weight(rows, cols) == 18 / 32
    assert fmt.matrix(rows, cols + 1) == rows * (cols // 32 + 1) * 18  # a partial block is padded


def test_int4_per_channel_and_sfp8_rules():
    assert memory.FORMATS["int4"].matrix(10, 64) == 10 * 32 + 10 * 2
    assert memory.FORMATS["sfp8"].matrix(10, 64) == 640 + 4
    assert memory.FORMATS["bf16"].matrix(10, 64) == 1280
    cfg = PRESETS["tiny"]  # the embedding format is its own switch; vectors stay bf16
    emb = memory.FORMATS["sfp8"].matrix(cfg.vocab_size, cfg.hidden_size)
    assert (memory.weight_bytes(cfg, "sfp8", embedding="bf16") - memory.weight_bytes(cfg, "sfp8")
            == 2 * cfg.embedding_parameters - emb)
    with pytest.raises(ValueError, match="unknown format"):
        memory.weight_bytes(cfg, "int3")


def test_report_1b_row():
    """Table 3's 1B row, within its rounding (+-0.05 GB per printed cell).

    Reproduced: the bf16, int4 and SFP8 weights, and those plus a full-length cache in every layer.
    Not reproduced (pinned here so that the documentation's account stays true): the int4 blocks=32
    weights (0.56 vs 0.7), and anything with the sliding-window cache the architecture actually needs
    (+0.15 GB, not the report's +0.9)."""
    (row,) = memory.memory_table(["gemma3-1b"], 32_768)
    report = memory.REPORT_TABLE3["gemma3-1b"]
    assert row["report"] == report and row["context"] == 32_768
    gb = {f: b / 1e9 for f, b in row["weights"].items()}
    for f in ("bf16", "int4", "sfp8"):
        assert abs(gb[f] - report["raw"][f]) <= ROUNDING_GB, f
        assert abs(gb[f] + row["kv_all_global"] / 1e9 - report["kv"][f]) <= ROUNDING_GB, f
    assert abs(gb["int4_b32"] - report["raw"]["int4_b32"]) > 0.1  # 0.5625 B/weight x 1.0B
    assert abs(row["kv"] / 1e9 - 0.1458) < 1e-4  # 4 global x 32768 + 22 local x 512 positions
    for f in memory.FORMATS:
        assert report["kv"][f] - gb[f] - row["kv"] / 1e9 > 0.5


def test_memory_table_every_preset_and_markdown():
    rows = memory.memory_table()
    names = [r["preset"] for r in rows]
    assert set(PRESETS) <= set(names) and "tiny-vision" in names
    by = {r["preset"]: r for r in rows}
    assert by["gemma3-4b"]["multimodal"] and not by["gemma3-1b"]["multimodal"]
    assert by["gemma2-2b"]["context"] == 8192 and by["gemma2-2b"]["context_capped"]
    for r in rows:  # smaller formats are smaller; the quantized matrices dominate
        w = r["weights"]
        assert w["int4"] < w["int4_b32"] < w["sfp8"] < w["bf16"], r["preset"]
    md = memory.format_table(rows)
    assert md.count("\n| gemma3-") >= 5 and "Compared with Table 3" in md
    assert "| gemma3-27b | weights | 54.86 / 54.0 (1.02x)" in md
    # no comparison at another context
    assert "Compared" not in memory.format_table(memory.memory_table(["gemma3-1b"], 8192))


# ---- real files: memory.py's prediction against exported tensors (bench/memory_table.py --measure) --

def _bench_memory_table():
    """bench/memory_table.py as a module (its file_weights reads the exported files)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "bench" / "memory_table.py"
    spec = importlib.util.spec_from_file_location("bench_memory_table", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def tiny_export():
    from .test_export import tiny_tokenizer
    tok = tiny_tokenizer()
    # 520 embedding rows for a 512-piece tokenizer: GGUF keeps the tokenizer's 512 (export.py), HF all
    cfg = get_config("tiny").replace(query_pre_attn_scalar=16, vocab_size=520)
    torch.manual_seed(0)
    return Gemma3(cfg), tok


@pytest.mark.parametrize("dtype", ["q4_0", "q4_0_channel"])
def test_gguf_q4_0_weight_bytes_equal_prediction(tmp_path, tiny_export, dtype):
    import gguf

    from gemmalab.checkpoints.export import save_gguf

    model, tok = tiny_export
    cfg = model.config
    gguf_cfg = cfg.replace(vocab_size=len(tok))
    bench = _bench_memory_table()
    for embedding in ("q8_0", "f16", "f32"):
        path = save_gguf(model, tok, tmp_path / f"{embedding}.gguf", dtype, embedding=embedding)
        reader = gguf.GGUFReader(path)
        types = {t.name: t.tensor_type.name for t in reader.tensors}
        assert types.pop("token_embd.weight") == embedding.upper()
        assert {v for k, v in types.items() if "norm" in k} == {"F32"}
        assert {v for k, v in types.items() if "norm" not in k} == {"Q4_0"}
        got = sum(int(t.n_bytes) for t in reader.tensors)
        # Q4_0 blocks (int4_b32) for the matrices, the embedding as written, norms in F32
        assert got == memory.weight_bytes(gguf_cfg, "int4_b32", embedding=embedding, vectors="f32")
        assert bench.file_weights(path) == {"bytes": got, "tensors": len(reader.tensors),
                                            "embedding": embedding, "vectors": "f32", "matrices": ["q4_0"]}
        # per channel in Q4_0 costs what per block does: every block repeats the row's fp16 scale,
        # 2 bytes per 32 weights instead of 2 per row (the ideal int4 per channel)
        ideal = memory.weight_bytes(gguf_cfg, "int4", embedding=embedding, vectors="f32")
        extra = sum(r * (c // 32 - 1) * 2 for t in memory.weight_tensors(cfg) if t.role == "matrix"
                    for r, c in [t.shape])
        assert got - ideal == extra > 0
        assert path.stat().st_size > got  # plus the header and the tokenizer metadata


def test_safetensors_weight_bytes_equal_prediction(tmp_path, tiny_export):
    from gemmalab.checkpoints.export import save_hf
    from gemmalab.checkpoints.sfp8 import save_sfp8

    model, tok = tiny_export
    cfg = model.config
    bench = _bench_memory_table()
    held = bench.file_weights(save_hf(model, tok, tmp_path / "bf16", dtype="bf16") / "model.safetensors")
    assert (held["embedding"], held["vectors"], held["matrices"]) == ("bf16", "bf16", ["bf16"])
    assert held["bytes"] == memory.weight_bytes(cfg, "bf16") == 2 * memory.parameter_counts(cfg)["total"]
    # SFP8: 1-byte codes and an f32 scale per matrix; the embedding and the norms stay f32
    held = bench.file_weights(save_sfp8(model, tok, tmp_path / "sfp8") / "model.safetensors")
    assert (held["embedding"], held["vectors"], held["matrices"]) == ("f32", "f32", ["u8"])
    assert held["bytes"] == memory.weight_bytes(cfg, "sfp8", embedding="f32", vectors="f32")


def test_weight_bytes_storage_keywords():
    cfg = PRESETS["tiny"]
    base = memory.weight_bytes(cfg, "int4_b32")
    emb, vec = cfg.embedding_parameters, memory.parameter_counts(cfg)["vectors"]
    b32 = memory.FORMATS["int4_b32"].matrix(cfg.vocab_size, cfg.hidden_size)
    assert memory.weight_bytes(cfg, "int4_b32", embedding="q8_0") == base - b32 + emb * 34 // 32
    assert memory.weight_bytes(cfg, "int4_b32", embedding="f16") == memory.weight_bytes(
        cfg, "int4_b32", embedding="bf16") == base - b32 + 2 * emb
    assert memory.weight_bytes(cfg, "int4_b32", embedding="f32") == base - b32 + 4 * emb
    assert memory.weight_bytes(cfg, "int4_b32", vectors="f32") == base + 2 * vec
    for bad in ({"embedding": "q5_k"}, {"vectors": "q8_0"}):
        with pytest.raises(ValueError, match="unknown"):
            memory.weight_bytes(cfg, "int4_b32", **bad)
    with pytest.raises(ValueError, match="unknown format"):
        memory.weight_bytes(cfg, "q8_0")  # an embedding storage, not a matrix format


def test_measured_rows_survive_the_fast_path(tmp_path, monkeypatch):
    """Without --measure the script renders the rows kept in docs/qat_memory_measured.json."""
    bench = _bench_memory_table()
    row = {"file": "q4_0_channel-q8_0embd.gguf", "exporter": 'save_gguf(dtype="q4_0_channel")',
           "format": "int4_b32", "size": 300_000_000, "directory": None, "weights": 240_000_000,
           "tensors": 236, "embedding": "q8_0", "vectors": "f32", "matrices": ["q4_0"],
           "predicted": 240_000_000, "table_convention": 150_000_000, "ideal_int4": 234_000_000,
           "ideal_table_convention": 130_000_000}
    measured = {"model": "gemma3-270m", "source": "x.gguf", "n_tokens": 262_144, "vocab_size": 262_144,
                "command": "python bench/memory_table.py --measure", "commit": "abc", "date": "2025-01-01",
                "rows": [row]}
    json_file, doc = tmp_path / "measured.json", tmp_path / "qat.md"
    json_file.write_text(__import__("json").dumps(measured))
    monkeypatch.setattr(bench, "MEASURED", json_file)
    monkeypatch.setattr(bench, "DOC", doc)
    monkeypatch.setattr(bench, "ROOT", tmp_path)
    monkeypatch.setattr(bench, "meta_cross_check", lambda: "skipped")
    bench.main(["--presets", "gemma3-270m"])
    text = doc.read_text()
    assert "### gemma3-270m measured" in text and "`python bench/memory_table.py --measure`" in text
    assert "| 240,000,000 | 240,000,000 | 1.0000 |" in text and "ideal int4 per channel" in text
    assert text.index("measured") < text.index(bench.END)
