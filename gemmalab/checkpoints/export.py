"""Our model + tokenizer -> a Hugging Face directory or a GGUF file (the inverse of hf.py / gguf.py).

save_hf(model, tokenizer, out_dir)     config.json, model.safetensors, tokenizer files, generation_config
save_gguf(model, tokenizer, out_path)  what llama.cpp's convert_hf_to_gguf.py (Gemma2Model/Gemma3Model)
                                       writes: the same metadata keys, tensor names and conventions

Both write into a temporary name next to the target and rename it into place, so a failed export
leaves nothing behind, and both refuse to replace existing output unless `overwrite=True`.

Tokenizer files for transformers. transformers 5.x builds `GemmaTokenizer` from `tokenizer.json` only
(its `vocab_files_names`); without one it would convert `tokenizer.model` on every load (~20 s for
262k pieces). So we write the `tokenizer.json` that transformers itself builds for a Gemma GGUF
(integrations/gguf: vocabulary in id order, merges recovered from it best-first, control pieces as
special added tokens, user-defined ones as plain added tokens), which is the reference our
Tokenizer reproduces. We also write `tokenizer.model` (SentencePiece, what llama.cpp's converter and
gemmalab read) and a `tokenizer_config.json` with the special tokens and the chat template (spec 4.3).
"""
from __future__ import annotations

import json
import os
import re
import secrets
import shutil
from dataclasses import fields
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from ..config import Gemma3Config
from .gguf import _LAYER_NAMES, _TOP_NAMES, config_from_gguf
from ..tokenizer import CHAT_TEMPLATE
from .hf import config_to_hf

__all__ = ["save_hf", "save_gguf", "ours_to_gguf", "HF_DTYPES", "GGUF_DTYPES", "GGUF_EMBEDDINGS",
           "CHAT_TEMPLATE"]

HF_DTYPES = {"fp32": torch.float32, "f32": torch.float32, "float32": torch.float32,
             "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}
GGUF_DTYPES = ("f32", "f16", "q8_0", "q4_0", "q4_0_channel")
# q4_0 / q4_0_channel: the matrices in Q4_0 (per block of 32, or per output row with every block
# carrying the row's fp16 scale: int4 per channel, lossless in Q4_0); the embedding in its own format.
GGUF_EMBEDDINGS = ("q8_0", "f16", "f32")

# Our parameter names -> GGUF names: gguf.py's tables, inverted (the table lives there, once).
_GGUF_LAYER = {ours: gguf for gguf, ours in _LAYER_NAMES.items()}
_GGUF_TOP = {ours: gguf for gguf, ours in _TOP_NAMES.items()}
_OUR_LAYER = re.compile(r"layers\.(\d+)\.(.+)\.weight$")

# SentencePiece / GGUF piece types (tokenizer.py uses the same numbers)
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _BYTE = 1, 2, 3, 4, 6
_SPACE = "\u2581"


def ours_to_gguf(name: str) -> str:
    """`layers.3.mlp.up_proj.weight` -> `blk.3.ffn_up.weight`; `norm.weight` -> `output_norm.weight`."""
    m = _OUR_LAYER.match(name)
    if m and m.group(2) in _GGUF_LAYER:
        return f"blk.{m.group(1)}.{_GGUF_LAYER[m.group(2)]}.weight"
    stem = name.removesuffix(".weight")
    if stem in _GGUF_TOP:
        return f"{_GGUF_TOP[stem]}.weight"
    raise ValueError(f"parameter {name!r} has no GGUF name (merge LoRA adapters before exporting)")


# ---------------------------------------------------------------------------------------------------
# Atomic output: build under a hidden temporary name in the target's folder, then rename.

def _check_target(out: Path, overwrite: bool, want_dir: bool) -> None:
    if not (out.exists() or out.is_symlink()):
        return
    if want_dir:
        if not out.is_dir():
            raise FileExistsError(f"{out} exists and is not a directory; choose another output path")
        entries = list(out.iterdir())
        if not entries:
            return  # an empty folder is replaced silently
        if not overwrite:
            raise FileExistsError(f"{out} exists and is not empty; pass overwrite=True "
                                  "(CLI: --overwrite) to replace it")
        if not (out / "config.json").is_file():  # never wipe a folder that is not a model directory
            raise FileExistsError(f"refusing to replace {out}: it is not a model directory "
                                  "(no config.json); choose another output path")
        return
    if out.is_dir():
        raise FileExistsError(f"{out} is a directory; give a .gguf file path")
    if not overwrite:
        raise FileExistsError(f"{out} exists; pass overwrite=True (CLI: --overwrite) to replace it")


def _temp_name(out: Path) -> Path:
    return out.with_name(f".{out.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")


def _replace_dir(tmp: Path, out: Path) -> None:
    """Rename the finished folder `tmp` to `out`, moving an existing `out` aside until it succeeds."""
    if not out.exists():
        os.rename(tmp, out)
        return
    old = _temp_name(out)
    os.rename(out, old)
    try:
        os.rename(tmp, out)
    except BaseException:
        os.rename(old, out)
        raise
    shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------
# Hugging Face directory

def save_hf(model, tokenizer, out_dir: str | Path, *, dtype: str | torch.dtype | None = None,
            overwrite: bool = False) -> Path:
    """Write a directory that `Gemma3ForCausalLM` / `Gemma2ForCausalLM.from_pretrained`, `AutoTokenizer`
    and `gemmalab.load` read offline. `dtype`: "fp32" or "bf16" (default: the model's dtype).

    Files: config.json (transformers 5.x dialect), model.safetensors (`model.`-prefixed names, tied
    embeddings so no lm_head), tokenizer.json, tokenizer.model, tokenizer_config.json,
    generation_config.json.
    """
    from safetensors.torch import save_file

    out = Path(out_dir).expanduser()
    config: Gemma3Config = model.config
    target = _hf_dtype(dtype, model.embed_tokens.weight.dtype)
    _check_vocab(config, tokenizer)
    _check_target(out, overwrite, want_dir=True)
    tensors = _hf_tensors(model, target)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_name(out)
    tmp.mkdir()
    try:
        dtype_name = str(target).removeprefix("torch.")
        cfg = dict(config_to_hf(config), dtype=dtype_name, torch_dtype=dtype_name)
        _write_json(tmp / "config.json", cfg)
        _write_json(tmp / "generation_config.json", _generation_config(config, tokenizer))
        _write_tokenizer_files(tmp, tokenizer, config)
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        # safetensors creates its file 0600; give it the umask-respecting mode of our own files
        os.chmod(tmp / "model.safetensors", (tmp / "config.json").stat().st_mode & 0o777)
        _replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _hf_dtype(dtype, model_dtype: torch.dtype) -> torch.dtype:
    if dtype is None:
        dtype = model_dtype
    if isinstance(dtype, str):
        if dtype.lower() not in HF_DTYPES:
            raise ValueError(f"unknown dtype {dtype!r} for a Hugging Face export; use fp32 or bf16")
        dtype = HF_DTYPES[dtype.lower()]
    if dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"cannot export {dtype} weights: use fp32 or bf16 (fp16 overflows Gemma 3 "
                         "activations, spec 10.1)")
    return dtype


def _hf_tensors(model, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """`model.`-prefixed names, contiguous CPU tensors that share no storage (safetensors refuses that)."""
    out, seen = {}, set()
    for name, t in model.state_dict().items():
        ours_to_gguf(name)  # the same name check as GGUF: no LoRA leftovers, no unknown buffers
        t = t.detach().to(device="cpu", dtype=dtype).contiguous()
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen:
            t = t.clone()
        seen.add(ptr)
        out[f"model.{name}"] = t
    return out


def _check_vocab(config: Gemma3Config, tokenizer) -> None:
    if config.rope_local_scaling_factor != 1.0:  # neither format has a key for it (nor should)
        raise ValueError("the model scales RoPE on its local layers (rope_local_scaling_factor "
                         f"{config.rope_local_scaling_factor:g}), a diagnostic setting that GGUF and "
                         "Hugging Face configs cannot express; reload without it to export")
    if len(tokenizer) > config.vocab_size:
        raise ValueError(f"the tokenizer has {len(tokenizer)} tokens but the model only "
                         f"{config.vocab_size} embedding rows; they do not belong together")


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _generation_config(config: Gemma3Config, tokenizer) -> dict:
    # Spec 4.3: generation ends at <eos> or <end_of_turn> ([1, 106] for Gemma 3); Gemma's sampling
    # defaults ([HFconv] GenerationConfig).
    return dict(bos_token_id=tokenizer.bos_id, eos_token_id=list(tokenizer.stop_ids),
                pad_token_id=tokenizer.pad_id, do_sample=True, top_k=64, top_p=0.95)


def _write_tokenizer_files(folder: Path, tokenizer, config: Gemma3Config) -> None:
    pieces, types = _vocabulary(tokenizer)
    (folder / "tokenizer.model").write_bytes(_sentencepiece_model(tokenizer, pieces, types))
    with open(folder / "tokenizer.json", "w", encoding="utf-8") as f:
        json.dump(_tokenizer_json(tokenizer, pieces, types), f, ensure_ascii=False)
    names = {k: pieces[i] for k, i in (("bos", tokenizer.bos_id), ("eos", tokenizer.eos_id),
                                         ("unk", tokenizer.unk_id), ("pad", tokenizer.pad_id))}
    mask = tokenizer.token_to_id("<mask>")
    _write_json(folder / "tokenizer_config.json", dict(
        tokenizer_class="GemmaTokenizer", bos_token=names["bos"], eos_token=names["eos"],
        unk_token=names["unk"], pad_token=names["pad"],
        mask_token=pieces[mask] if mask is not None else None,  # GemmaTokenizer would add "<mask>"
        add_bos_token=True, add_eos_token=False, padding_side="left",
        clean_up_tokenization_spaces=False, spaces_between_special_tokens=False,
        model_max_length=config.max_position_embeddings, chat_template=CHAT_TEMPLATE))


def _vocabulary(tokenizer) -> tuple[list[str], bytearray]:
    """Pieces (SentencePiece spelling: whitespace runs as "▁▁...") and types; <unk> alone is UNKNOWN."""
    pieces = list(tokenizer._pieces)
    types = bytearray(tokenizer._types)
    if len(set(pieces)) != len(pieces) or "" in pieces:
        raise ValueError("the tokenizer's vocabulary has duplicate or empty pieces; it cannot be written "
                         "as tokenizer.json / tokenizer.model / GGUF")
    for i in [k for k, t in enumerate(types) if t == _UNKNOWN]:
        types[i] = _CONTROL
    types[tokenizer.unk_id] = _UNKNOWN
    return pieces, types


def _merges(pieces: list[str]) -> list[list[str]]:
    """BPE merges recovered from a vocabulary whose order is its merge order (Gemma's).

    Exactly transformers' `generate_merges(vocab, {piece: -id})` as used for Gemma GGUF files: every
    split of every piece into two pieces of the vocabulary, by piece id, longer left part first.
    """
    vocab = set(pieces)
    return [[p[:k], p[k:]] for p in pieces for k in range(len(p) - 1, 0, -1)
            if p[:k] in vocab and p[k:] in vocab]


def _tokenizer_json(tokenizer, pieces: list[str], types: bytearray) -> dict:
    """The `tokenizers` serialisation transformers' GemmaTokenizer writes (normalizer " " -> "▁", no
    pre-split in effect, BPE with byte fallback, decoder Replace/ByteFallback/Fuse, BOS prepended)."""
    bos = pieces[tokenizer.bos_id]
    added = [dict(id=i, content=pieces[i], single_word=False, lstrip=False, rstrip=False,
                  normalized=False, special=types[i] in (_CONTROL, _UNKNOWN))
             for i, t in enumerate(types) if t in (_CONTROL, _UNKNOWN, _USER_DEFINED)]
    return {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
        "normalizer": {"type": "Replace", "pattern": {"String": " "}, "content": _SPACE},
        "pre_tokenizer": {"type": "Split", "pattern": {"String": " "},
                          "behavior": "MergedWithPrevious", "invert": False},
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": bos, "type_id": 0}},
                       {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                     {"SpecialToken": {"id": bos, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {bos: {"id": bos, "ids": [tokenizer.bos_id], "tokens": [bos]}}},
        "decoder": {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": _SPACE}, "content": " "},
            {"type": "ByteFallback"}, {"type": "Fuse"}]},
        "model": {"type": "BPE", "dropout": None, "unk_token": pieces[tokenizer.unk_id],
                  "continuing_subword_prefix": None, "end_of_word_suffix": None, "fuse_unk": True,
                  "byte_fallback": True, "ignore_merges": False,
                  "vocab": {p: i for i, p in enumerate(pieces)}, "merges": _merges(pieces)},
    }


def _sentencepiece_model(tokenizer, pieces: list[str], types: bytearray) -> bytes:
    """A SentencePiece BPE `tokenizer.model`: the proto our Tokenizer runs (tokenizer.py), with the
    user-defined pieces ("\\n", "<start_of_image>", ...) typed USER_DEFINED again, as in Gemma's file."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    from ..tokenizer import _sentencepiece_proto

    proto = _sentencepiece_proto(pieces, types, tokenizer.unk_id, tokenizer.bos_id, tokenizer.eos_id,
                                 tokenizer.pad_id)
    user_defined = [i for i, t in enumerate(types) if t == _USER_DEFINED]
    if not user_defined:
        return proto
    mp = pb.ModelProto()
    mp.ParseFromString(proto)
    for i in user_defined:
        mp.pieces[i].type = _USER_DEFINED
    return mp.SerializeToString()


# ---------------------------------------------------------------------------------------------------
# GGUF file

def save_gguf(model, tokenizer, out_path: str | Path, dtype: str = "f16", *, name: str | None = None,
              overwrite: bool = False, embedding: str = "q8_0", rounding: str = "ref") -> Path:
    """Write a GGUF file as llama.cpp's converter would: dtype "f32", "f16" or "q8_0" for the 2-D
    weights; 1-D tensors (norms) in F32 with Gemma's +1 folded in; token_embd tied (no output.weight).

    dtype "q4_0" writes the seven projections of every block as Q4_0 with ggml's reference rounding
    (what `llama-quantize Q4_0` without an imatrix computes, and what `gemmalab train qat` trains on),
    "q4_0_channel" as int4 per output row stored in Q4_0 blocks that share the row's scale; the
    embedding (= tied LM head) then goes out as `embedding` ("q8_0", llama-quantize's fallback for
    640-wide rows and lossless for a Q8_0 source; "f16", as in Google's QAT files; or "f32"), and
    rounding="rne" breaks Q4_0 ties to even (a baseline; see gemmalab/quant/fake.py).

    Tensors are converted and written one at a time (no second copy of the model in memory).
    Refuses a config that GGUF readers (llama.cpp, gemmalab) would not reconstruct, e.g. a
    query_pre_attn_scalar that is neither head_dim nor the 27B rule, since GGUF has no key for it.
    """
    import gguf

    if dtype not in GGUF_DTYPES:
        raise ValueError(f"unknown GGUF dtype {dtype!r}; use one of {', '.join(GGUF_DTYPES)}")
    if embedding not in GGUF_EMBEDDINGS:
        raise ValueError(f"unknown embedding type {embedding!r}; use one of {', '.join(GGUF_EMBEDDINGS)}")
    if rounding not in ("ref", "rne"):
        raise ValueError(f"unknown Q4_0 rounding {rounding!r}; use 'ref' (ggml's) or 'rne'")
    out = Path(out_path).expanduser()
    config: Gemma3Config = model.config
    n_tokens = len(tokenizer)
    _check_vocab(config, tokenizer)
    _check_target(out, overwrite, want_dir=False)

    tmp = _temp_name(out)
    writer = gguf.GGUFWriter(str(tmp), config.family)  # "gemma3" / "gemma2": llama.cpp's arch names
    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0,
                 "q4_0_channel": gguf.LlamaFileType.MOSTLY_Q4_0}[dtype]
    _add_model_metadata(writer, config, name or config.name, int(file_type))
    _add_tokenizer_metadata(writer, tokenizer)
    _check_gguf_config(writer.kv_data[0], config, n_tokens)
    q4 = dtype.startswith("q4_0")
    wanted = gguf.GGMLQuantizationType.Q4_0 if q4 else gguf.GGMLQuantizationType[dtype.upper()]
    state = model.state_dict()
    plan = {}
    for ours, t in state.items():
        shape = (min(t.shape[0], n_tokens), *t.shape[1:]) if ours == "embed_tokens.weight" else tuple(t.shape)
        own = gguf.GGMLQuantizationType[embedding.upper()] if q4 and ours == "embed_tokens.weight" else wanted
        plan[ours] = qtype = _ggml_type(ours, shape, own)
        if qtype in (gguf.GGMLQuantizationType.Q8_0, gguf.GGMLQuantizationType.Q4_0):
            byte_shape = gguf.quants.quant_shape_to_byte_shape(shape, qtype)
            writer.add_tensor_info(ours_to_gguf(ours), byte_shape, np.dtype(np.uint8),
                                   int(np.prod(byte_shape)), raw_dtype=qtype)
        else:
            np_dtype = np.dtype(np.float16 if qtype == gguf.GGMLQuantizationType.F16 else np.float32)
            writer.add_tensor_info(ours_to_gguf(ours), shape, np_dtype,
                                   int(np.prod(shape)) * np_dtype.itemsize)

    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for ours, t in state.items():
            writer.write_tensor_data(_gguf_data(ours, t, plan[ours], n_tokens,
                                                per_channel=dtype == "q4_0_channel", rounding=rounding))
        writer.close()
        os.replace(tmp, out)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    return out


def _ggml_type(ours: str, shape: tuple[int, ...], wanted):
    """The storage type convert_hf_to_gguf.py picks: F32 for 1-D tensors and norms; the requested
    type for matrices, F16 where rows do not split into quantization blocks (llama.cpp's fallback)."""
    import gguf

    if len(shape) <= 1 or ours.endswith("norm.weight"):
        return gguf.GGMLQuantizationType.F32
    block = gguf.GGML_QUANT_SIZES[wanted][0]
    return wanted if shape[-1] % block == 0 else gguf.GGMLQuantizationType.F16


def _gguf_data(ours: str, t: torch.Tensor, qtype, n_tokens: int, *, per_channel: bool = False,
               rounding: str = "ref") -> np.ndarray:
    import gguf

    from ..quant.fake import q4_0_bytes

    w = t.detach().to(device="cpu", dtype=torch.float32)
    if ours == "embed_tokens.weight":
        # llama.cpp's Gemma3Model drops the rows past the tokenizer (the 64 image-soft-token rows of
        # the multimodal checkpoints): its vocabulary size is the tokenizer's.
        w = w[:n_tokens]
    if ours.endswith("norm.weight"):
        w = w + 1.0  # llama.cpp's converter folds Gemma's (1 + w) into every norm weight
    data = w.contiguous().numpy()
    if qtype == gguf.GGMLQuantizationType.F32:
        return data
    if qtype == gguf.GGMLQuantizationType.F16:
        return data.astype(np.float16)
    if qtype == gguf.GGMLQuantizationType.Q4_0:  # bitwise gguf.quants for "ref" (tests/test_qat.py)
        return q4_0_bytes(torch.from_numpy(data), per_channel=per_channel, rounding=rounding).numpy()
    return gguf.quants.quantize(data, qtype)


def _add_model_metadata(w, c: Gemma3Config, name: str, file_type: int) -> None:
    """The keys convert_hf_to_gguf.py's Gemma3Model / Gemma2Model.set_gguf_parameters write."""
    import gguf

    w.add_type("model")
    w.add_name(name)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_key_length(c.head_dim)
    w.add_value_length(c.head_dim)
    w.add_file_type(file_type)
    if c.family == "gemma3":
        w.add_rope_freq_base(c.rope_theta)  # global layers; llama.cpp hard-codes 10k for local ones
        w.add_sliding_window(c.sliding_window)
        w.add_head_count_kv(c.num_key_value_heads)
        if c.rope_scaling_factor != 1.0:  # applies to global layers only (spec 1.4)
            w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            w.add_rope_scaling_factor(c.rope_scaling_factor)
    else:
        w.add_head_count_kv(c.num_key_value_heads)
        w.add_attn_logit_softcapping(c.attn_logit_softcapping)
        w.add_final_logit_softcapping(c.final_logit_softcapping)
        w.add_sliding_window(c.sliding_window)
        if c.rope_theta != 10_000.0:  # llama.cpp's default; its converter writes no key for Gemma 2
            w.add_rope_freq_base(c.rope_theta)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _add_tokenizer_metadata(w, tokenizer) -> None:
    """`tokenizer.ggml.*` as llama.cpp's `_set_vocab_sentencepiece` writes them for Gemma.

    Gemma's files spell the whitespace-run pieces with real spaces ("  ", user-defined) and mark <unk>
    control; our Tokenizer respells them "▁▁" (tokenizer.py), so we undo that. Scores: -(rank among
    normal pieces): the merge order. The embedded 270M file has exactly these scores up to id 236742
    and the same order after it (its offsets jump by 31 there); control and user-defined pieces
    -1000, byte pieces 0, as in that file.
    """
    pieces, types = list(tokenizer._pieces), bytearray(tokenizer._types)
    for i, p in enumerate(pieces):
        if len(p) > 1 and p == _SPACE * len(p):
            pieces[i], types[i] = " " * len(p), _USER_DEFINED
    types = bytearray(_CONTROL if t == _UNKNOWN else t for t in types)
    t = np.frombuffer(bytes(types), np.uint8)
    normal = t == _NORMAL
    scores = np.where(t == _BYTE, 0.0, -1000.0).astype(np.float32)
    scores[normal] = -np.arange(int(normal.sum()), dtype=np.float32)
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(pieces)
    w.add_token_scores(scores.tolist())
    w.add_token_types(t.astype(np.int32).tolist())
    w.add_bos_token_id(tokenizer.bos_id)
    w.add_eos_token_id(tokenizer.eos_id)
    w.add_unk_token_id(tokenizer.unk_id)
    w.add_pad_token_id(tokenizer.pad_id)
    w.add_add_bos_token(True)
    w.add_add_sep_token(False)
    w.add_add_eos_token(False)
    w.add_add_space_prefix(False)
    w.add_chat_template(CHAT_TEMPLATE)


def _check_gguf_config(kv: dict, config: Gemma3Config, n_tokens: int) -> None:
    """Read the planned metadata back with config_from_gguf; refuse what it would not reconstruct."""
    planned = SimpleNamespace(
        path="<GGUF being written>", get=lambda k, d=None: kv[k].value if k in kv else d,
        tensor=lambda _name: SimpleNamespace(ne=(config.hidden_size, n_tokens)))
    back = config_from_gguf(planned)
    skip = {"name", "vocab_size", "tie_word_embeddings", "pad_token_id", "eos_token_id", "bos_token_id"}
    diff = [f"{f.name}={getattr(config, f.name)!r} (a GGUF reader would use {getattr(back, f.name)!r})"
            for f in fields(config)
            if f.name not in skip and getattr(config, f.name) != getattr(back, f.name)]
    if diff:
        raise ValueError("GGUF cannot express this config, llama.cpp hard-codes these for "
                         f"{config.family}: {'; '.join(diff)}")

