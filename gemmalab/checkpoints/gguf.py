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

import re
from pathlib import Path

import torch

from ..config import Gemma3Config, layer_pattern
from ..quant.gguf_blocks import UnsupportedTensorType, dequantize
from .errors import CheckpointError
from .gguf_file import GGUFFile

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
    if arch not in ARCHITECTURES:
        raise CheckpointError(f"{path} holds a {arch!r} model; gemmalab runs "
                              f"{' and '.join(ARCHITECTURES)} GGUF files")
    return reader


def config_from_gguf(reader, name: str = "gguf") -> Gemma3Config:
    arch = reader.get("general.architecture")
    get = lambda key, default=None: reader.get(f"{arch}.{key}", default)  # noqa: E731
    required = ["block_count", "embedding_length", "attention.head_count", "feed_forward_length",
                "context_length", "attention.sliding_window"]
    missing = [f"{arch}.{k}" for k in required if get(k) is None]
    if missing:
        raise CheckpointError(f"{reader.path} lacks GGUF metadata {', '.join(missing)}; "
                              "was it written by llama.cpp's converter?")
    layers, d, heads = get("block_count"), get("embedding_length"), get("attention.head_count")
    head_dim = get("attention.key_length", d // heads)
    try:
        vocab = reader.tensor("token_embd.weight").ne[1]
    except KeyError:
        raise CheckpointError(f"{reader.path} has no token_embd.weight tensor") from None
    kv_heads = get("attention.head_count_kv", heads)
    if not isinstance(kv_heads, int):  # per-layer arrays exist in some architectures; Gemma's is uniform
        kv_heads = kv_heads[0]
    # 27B-sized models scale queries by (d / heads)^-1/2 (llama.cpp: LLM_TYPE_27B special case)
    qscalar = d // heads if (arch, layers) in (("gemma3", 62), ("gemma2", 46)) else head_dim
    scaling = get("rope.scaling.type", "none")
    factor = float(get("rope.scaling.factor", 1.0)) if scaling == "linear" else 1.0
    if scaling not in ("none", "linear"):
        raise CheckpointError(f"RoPE scaling {scaling!r} is not supported (Gemma 3 uses linear)")
    common = dict(
        name=name, family=arch, vocab_size=vocab, hidden_size=d, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim,
        intermediate_size=get("feed_forward_length"), query_pre_attn_scalar=qscalar,
        sliding_window=get("attention.sliding_window"),
        max_position_embeddings=get("context_length"),
        rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-6)),
        bos_token_id=reader.get("tokenizer.ggml.bos_token_id", 2),
        eos_token_id=reader.get("tokenizer.ggml.eos_token_id", 1),
        pad_token_id=reader.get("tokenizer.ggml.padding_token_id", 0))
    if arch == "gemma2":
        theta = float(get("rope.freq_base", 10_000.0))
        return Gemma3Config(**common, layer_types=layer_pattern(layers, 2), rope_theta=theta,
                            rope_local_base_freq=theta, use_qk_norm=False,
                            attn_logit_softcapping=get("attn_logit_softcapping", 50.0),
                            final_logit_softcapping=get("final_logit_softcapping", 30.0))
    return Gemma3Config(**common, layer_types=layer_pattern(layers, 6),
                        rope_theta=float(get("rope.freq_base", 1_000_000.0)),
                        rope_local_base_freq=10_000.0, rope_scaling_factor=factor)


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
            rows = torch.empty(t.shape[0], t.n_bytes // t.shape[0], dtype=torch.uint8)
            reader.read_into(t, rows.numpy())
            blocks[ours] = (rows, t.ggml_type)
            continue
        try:
            w = dequantize(reader.data(t), t.ggml_type, t.shape)
        except UnsupportedTensorType as e:
            raise CheckpointError(f"{path}: tensor {t.name}: {e}") from e
        floats[ours] = w - 1.0 if ours.endswith("norm.weight") else w
    return blocks, floats
