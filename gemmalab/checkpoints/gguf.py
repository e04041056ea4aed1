"""GGUF files (llama.cpp) -> our config and state dict.

gguf_file.py parses the container (memory-mapped); the block formats are dequantized by
gemmalab.quant.gguf_blocks in PyTorch. Conventions of llama.cpp's converter (convert_hf_to_gguf.py,
Gemma2Model/Gemma3Model.modify_tensors) that we undo here:
- every `*norm.weight` is stored with the +1 of Gemma's (1 + w) folded in; our RMSNorm holds w,
  so we subtract 1 (exact in fp32 for gains in [0.5, 2], the usual range) and never add it twice;
- the LM head is tied to token_embd (no output.weight);
- GGUF `ne` lists the contiguous axis first, so a PyTorch (out, in) weight has ne = [in, out].
llama.cpp hard-codes the local RoPE base (10k) and the 5:1 / 1:1 layer patterns; so do we.
"""
from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import torch

from ..config import Gemma3Config, layer_pattern
from ..quant.gguf_blocks import UnsupportedTensorType, block_size_bytes, dequantize
from .errors import CheckpointError
from .gguf_file import GGUFFile, _short

# Bounds for the sizes a damaged file's metadata may claim (the largest Gemma has 62 layers, width
# 5376, a 262k vocabulary and 128K context): far above any real model, far below an allocation bomb.
_MAX_LAYERS, _MAX_SIZE, _MAX_CONTEXT = 4096, 2**31 - 1, 2**31 - 1

GGUF_MAGIC = b"GGUF"
ARCHITECTURES = ("gemma3", "gemma2")

_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm", "attn_norm": "input_layernorm",
    "post_attention_norm": "post_attention_layernorm", "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm", "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
_TOP_NAMES = {"token_embd": "embed_tokens", "output_norm": "norm"}
_BLOCK = re.compile(r"blk\.(\d+)\.(\w+)\.weight$")


def is_gguf(path: str | Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == GGUF_MAGIC


def open_gguf(path: str | Path) -> GGUFFile:
    """The parsed GGUF after checking that the file exists, is GGUF, is complete and is Gemma."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"no such file: {path}")
    if path.is_dir():
        raise CheckpointError(f"{path} is a directory, not a GGUF file")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise CheckpointError(f"{path} is not a GGUF file (it starts with {magic!r}, not b'GGUF')")
    reader = GGUFFile(path)
    arch = reader.get("general.architecture")
    if not isinstance(arch, str) or arch not in ARCHITECTURES:
        raise CheckpointError(f"{path} holds a {_short(arch)} model; gemmalab runs "
                              f"{' and '.join(ARCHITECTURES)} GGUF files")
    return reader


def _number(reader, key: str, value, lo: float, hi: float, integer: bool):
    """A metadata value as a Python int (or float) in [lo, hi], or a one-line CheckpointError: a
    damaged file may hold any GGUF type under any key (a string, an array, NaN, 2^64 - 1)."""
    if isinstance(value, np.generic):
        value = value.item()
    ok = isinstance(value, int) if integer else isinstance(value, (int, float)) and math.isfinite(value)
    if not ok or isinstance(value, bool) or not lo <= value <= hi:
        kind, bounds = ("an integer", f"[{lo}, {hi}]") if integer else ("a number", f"[{lo:g}, {hi:g}]")
        raise CheckpointError(f"{reader.path}: GGUF metadata {key} is {_short(value)}, expected {kind} "
                              f"in {bounds}")
    return value if integer else float(value)


def config_from_gguf(reader, name: str = "gguf") -> Gemma3Config:
    arch = reader.get("general.architecture")
    if not isinstance(arch, str):
        raise CheckpointError(f"{reader.path}: GGUF metadata general.architecture is {_short(arch)}, "
                              f"expected one of {', '.join(ARCHITECTURES)}")
    get = lambda key, default=None: reader.get(f"{arch}.{key}", default)  # noqa: E731
    required = ["block_count", "embedding_length", "attention.head_count", "feed_forward_length",
                "context_length", "attention.sliding_window"]
    missing = [f"{arch}.{k}" for k in required if get(k) is None]
    if missing:
        raise CheckpointError(f"{reader.path} lacks GGUF metadata {', '.join(missing)}; "
                              "was it written by llama.cpp's converter?")

    def num(key: str, default=None, lo: float = 1, hi: float = _MAX_SIZE, integer: bool = True,
            prefix: str = f"{arch}."):
        value = reader.get(f"{prefix}{key}", default)
        return _number(reader, f"{prefix}{key}", value, lo, hi, integer)

    layers, d = num("block_count", hi=_MAX_LAYERS), num("embedding_length")
    heads = num("attention.head_count", hi=_MAX_LAYERS)
    head_dim = num("attention.key_length", max(1, d // heads))
    try:
        token_embd = reader.tensor("token_embd.weight")
    except KeyError:
        raise CheckpointError(f"{reader.path} has no token_embd.weight tensor") from None
    if len(token_embd.ne) != 2 or not 0 < token_embd.ne[1] <= _MAX_SIZE:
        raise CheckpointError(f"{reader.path}: token_embd.weight has dimensions {list(token_embd.ne)}, "
                              "expected [hidden size, vocabulary size]")
    vocab = int(token_embd.ne[1])
    kv_heads = get("attention.head_count_kv", heads)
    if isinstance(kv_heads, (list, np.ndarray)):  # per-layer arrays exist in some architectures;
        if not len(kv_heads):                     # Gemma's is uniform
            raise CheckpointError(f"{reader.path}: GGUF metadata {arch}.attention.head_count_kv is an empty array")
        kv_heads = kv_heads[0]
    kv_heads = _number(reader, f"{arch}.attention.head_count_kv", kv_heads, 1, heads, True)
    if heads % kv_heads:
        raise CheckpointError(f"{reader.path}: {heads} attention heads are not a multiple of {kv_heads} "
                              "key/value heads")
    # 27B-sized models scale queries by (d / heads)^-1/2 (llama.cpp: LLM_TYPE_27B special case)
    qscalar = d // heads if (arch, layers) in (("gemma3", 62), ("gemma2", 46)) else head_dim
    scaling = get("rope.scaling.type", "none")
    if scaling not in ("none", "linear") if isinstance(scaling, str) else True:
        raise CheckpointError(f"{reader.path}: RoPE scaling {_short(scaling)} is not supported "
                              "(Gemma 3 uses linear)")
    factor = num("rope.scaling.factor", 1.0, 1e-3, 1024, False) if scaling == "linear" else 1.0
    token_id = lambda key, default: num(key, default, 0, _MAX_SIZE, prefix="tokenizer.ggml.")  # noqa: E731
    common = dict(
        name=name, family=arch, vocab_size=vocab, hidden_size=d, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim,
        intermediate_size=num("feed_forward_length"), query_pre_attn_scalar=qscalar,
        sliding_window=num("attention.sliding_window", hi=_MAX_CONTEXT),
        max_position_embeddings=num("context_length", hi=_MAX_CONTEXT),
        rms_norm_eps=num("attention.layer_norm_rms_epsilon", 1e-6, 0, 1, False),
        bos_token_id=token_id("bos_token_id", 2), eos_token_id=token_id("eos_token_id", 1),
        pad_token_id=token_id("padding_token_id", 0))
    if arch == "gemma2":
        theta = num("rope.freq_base", 10_000.0, 1e-3, 1e30, False)
        config = Gemma3Config(**common, layer_types=layer_pattern(layers, 2), rope_theta=theta,
                              rope_local_base_freq=theta, use_qk_norm=False,
                              attn_logit_softcapping=num("attn_logit_softcapping", 50.0, 1e-3, 1e30, False),
                              final_logit_softcapping=num("final_logit_softcapping", 30.0, 1e-3, 1e30, False))
    else:
        config = Gemma3Config(**common, layer_types=layer_pattern(layers, 6),
                              rope_theta=num("rope.freq_base", 1_000_000.0, 1e-3, 1e30, False),
                              rope_local_base_freq=10_000.0, rope_scaling_factor=factor)
    if hasattr(reader, "tensors"):  # a GGUFFile (export checks planned metadata without tensors)
        _check_tensors(reader, config)
    return config


def expected_shapes(config: Gemma3Config) -> dict[str, tuple[int, ...]]:
    """The PyTorch shape of every weight of a text model of `config`, by our name, from arithmetic
    alone: a damaged file's metadata may ask for a model too large to build even on the meta
    device, so the file is checked against this before anything is built (tests compare it with
    the model's state dict)."""
    d, q, kv, hd, ff = (config.hidden_size, config.q_dim, config.kv_dim, config.head_dim,
                        config.intermediate_size)
    per_layer = {"self_attn.q_proj": (q, d), "self_attn.k_proj": (kv, d), "self_attn.v_proj": (kv, d),
                 "self_attn.o_proj": (d, q), "mlp.gate_proj": (ff, d), "mlp.up_proj": (ff, d),
                 "mlp.down_proj": (d, ff), "input_layernorm": (d,), "post_attention_layernorm": (d,),
                 "pre_feedforward_layernorm": (d,), "post_feedforward_layernorm": (d,)}
    if config.use_qk_norm:
        per_layer |= {"self_attn.q_norm": (hd,), "self_attn.k_norm": (hd,)}
    shapes = {"embed_tokens.weight": (config.vocab_size, d), "norm.weight": (d,)}
    for i in range(config.num_hidden_layers):
        shapes |= {f"layers.{i}.{k}.weight": v for k, v in per_layer.items()}
    return shapes


def _check_tensors(reader, config: Gemma3Config) -> None:
    """The metadata and the tensor directory must describe the same model."""
    want = expected_shapes(config)
    found = set()
    for t in reader.tensors:
        ours = gguf_to_ours(t.name)
        if ours in want:
            found.add(ours)
            if tuple(t.shape) != want[ours]:
                raise CheckpointError(f"{reader.path}: tensor {t.name} has shape {tuple(t.shape)}, "
                                      f"the metadata implies {want[ours]}")
    if len(found) < len(want):
        missing = [k for k in want if k not in found]
        raise CheckpointError(f"{reader.path}: missing {len(missing)} tensors the metadata implies, "
                              f"e.g. {missing[:3]}")


def gguf_to_ours(name: str) -> str | None:
    """`blk.3.ffn_up.weight` -> `layers.3.mlp.up_proj.weight`; None for tensors we do not use."""
    m = _BLOCK.match(name)
    if m:
        ours = _LAYER_NAMES.get(m.group(2))
        return f"layers.{m.group(1)}.{ours}.weight" if ours else None
    stem = name.removesuffix(".weight")
    return f"{_TOP_NAMES[stem]}.weight" if stem in _TOP_NAMES else None


def read_tensors(reader, path: str | Path = "", dtype: torch.dtype = torch.float32
                 ) -> dict[str, torch.Tensor]:
    """All tensors we use, dequantized to `dtype`, under our names (norms with the +1 removed)."""
    out = {}
    for t in reader.tensors:
        ours = gguf_to_ours(t.name)
        if ours is None:
            continue
        try:
            w = dequantize(reader.data(t), t.ggml_type, t.shape)
        except UnsupportedTensorType as e:
            raise CheckpointError(f"{path}: tensor {t.name}: {e}") from e
        if ours.endswith("norm.weight"):
            w = w - 1.0
        out[ours] = w if w.dtype == dtype else w.to(dtype)
    return out


def read_blocks(reader, path: str | Path = "", kernel_types=frozenset()
                ) -> tuple[dict[str, tuple[torch.Tensor, int]], dict[str, torch.Tensor]]:
    """Tensors for a quantized model: ({name: (uint8 rows of blocks, ggml type)}, {name: fp32}).

    Matrices whose ggml type is in `kernel_types` come back as their raw block rows (read from the
    file into owned memory, not mapped); every other tensor (norms, float or unsupported matrices) is
    dequantized to fp32, norms with the +1 removed.
    """
    blocks, floats = {}, {}
    for t in reader.tensors:
        ours = gguf_to_ours(t.name)
        if ours is None:
            continue
        if t.ggml_type in kernel_types and len(t.shape) == 2 and not ours.endswith("norm.weight"):
            weights, size = block_size_bytes(t.ggml_type)  # bytes per row from the layout: a row count
            rows = torch.empty(t.shape[0], t.shape[1] // weights * size, dtype=torch.uint8)  # may be 0
            reader.read_into(t, rows.numpy())
            blocks[ours] = (rows, t.ggml_type)
            continue
        try:
            w = dequantize(reader.data(t), t.ggml_type, t.shape)
        except UnsupportedTensorType as e:
            raise CheckpointError(f"{path}: tensor {t.name}: {e}") from e
        floats[ours] = w - 1.0 if ours.endswith("norm.weight") else w
    return blocks, floats
