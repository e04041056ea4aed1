"""Hugging Face directories <-> our config and state dict.

A directory holds config.json and model.safetensors (or model.safetensors.index.json with shards).
Both model classes are read: Gemma3ForCausalLM / Gemma2ForCausalLM (`model.layers...`) and the text
part of Gemma3ForConditionalGeneration (`model.language_model.layers...` in transformers >= 4.52,
`language_model.model.layers...` before). Both config dialects are read: transformers 4.5x
(`rope_theta`, `rope_local_base_freq`, `rope_scaling` for global layers) and 5.x (`rope_parameters`
per layer type). Spec 1.4 and 10.17.

Gemma3ForConditionalGeneration directories also load whole (`read_hf_dir(path, vision=True)`): the
SigLIP tower (`vision_tower.vision_model.*` on the hub, `model.vision_tower.vision_model.*` from
transformers 4.52-4.5x, `vision_tower.*` from 5.x) and the projector (`model.multi_modal_projector.*`) go to the multimodal model (model/multimodal.py),
the text part under `language_model.`.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from ..config import (FULL, SLIDING, Gemma3Config, Gemma3MultimodalConfig, SiglipVisionConfig,
                      layer_pattern)
from .errors import CheckpointError

# transformers' Gemma3TextConfig defaults, used where a (multimodal) config.json leaves a field out
_HF_GEMMA3_DEFAULTS = dict(vocab_size=262_208, hidden_size=2304, intermediate_size=9216,
                           num_hidden_layers=26, num_attention_heads=8, num_key_value_heads=4,
                           head_dim=256, max_position_embeddings=131_072, rms_norm_eps=1e-6,
                           query_pre_attn_scalar=256, sliding_window=4096)
_HF_GEMMA2_DEFAULTS = dict(_HF_GEMMA3_DEFAULTS, vocab_size=256_000, max_position_embeddings=8192,
                           attn_logit_softcapping=50.0, final_logit_softcapping=30.0)
_TEXT_PREFIXES = ("model.language_model.", "language_model.model.", "model.")
_SKIP_PREFIXES = ("model.vision_tower.", "vision_tower.", "model.multi_modal_projector.",
                  "multi_modal_projector.", "lm_head.", "language_model.lm_head.")
# hub checkpoints: `vision_tower.vision_model.`; transformers 4.52-4.5x: `model.vision_tower.vision_model.`;
# transformers 5.x save_pretrained: `vision_tower.` (longest prefix first)
_VISION_PREFIXES = ("model.vision_tower.vision_model.", "vision_tower.vision_model.",
                    "model.vision_tower.", "vision_tower.")
_PROJECTOR_PREFIXES = ("model.multi_modal_projector.", "multi_modal_projector.")
# Limits on what a config.json may ask for: far above any Gemma (262,208-row vocabulary, 62 layers),
# far below what would make building the config itself allocate gigabytes.
_MAX_INT = 2**31 - 1
_MAX_LAYERS = 1024
_MAX_JSON_BYTES = 64 * 2**20  # config.json is a few KB, the index of a 27B model ~100 KB
# safetensors' own header limit (MAX_HEADER_SIZE in the safetensors crate, 100 MB)
_MAX_HEADER_BYTES = 100_000_000
_MAX_DIMS = 16  # Gemma's tensors have at most 4 dimensions (the SigLIP patch convolution)
# bytes per element of the safetensors dtypes torch reads (safetensors format docs, "dtype")
_ST_DTYPES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2,
              "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}
# transformers' SiglipVisionConfig defaults, used where a vision_config leaves a field out
_HF_SIGLIP_DEFAULTS = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                           num_attention_heads=12, num_channels=3, image_size=224, patch_size=16,
                           layer_norm_eps=1e-6, hidden_act="gelu_pytorch_tanh")


def config_from_hf(d: dict, name: str = "hf", source: str = "config.json") -> Gemma3Config:
    """Our config from a config.json dict (any of the dialects above); a CheckpointError naming
    `source` and the field for values no Gemma has (wrong types, out-of-range sizes)."""
    if not isinstance(d, dict):
        raise CheckpointError(f"{source} holds a JSON {_json_type(d)}, not an object")
    model_type = d.get("model_type", "")
    if model_type == "gemma3" or "text_config" in d:
        d = d.get("text_config") or {}
        if not isinstance(d, dict):
            raise CheckpointError(f"{source}: text_config is a JSON {_json_type(d)}, not an object")
        model_type = "gemma3_text"
    if model_type not in ("gemma3_text", "gemma2"):
        raise CheckpointError(f"{source} has model_type {_short(model_type)}; gemmalab reads "
                              "'gemma3', 'gemma3_text' and 'gemma2'")
    family = "gemma2" if model_type == "gemma2" else "gemma3"
    g = dict(_HF_GEMMA2_DEFAULTS if family == "gemma2" else _HF_GEMMA3_DEFAULTS)
    g.update({k: v for k, v in d.items() if v is not None})
    ints = {k: _int(g[k], k, source) for k in (
        "vocab_size", "hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim",
        "intermediate_size", "sliding_window", "query_pre_attn_scalar", "max_position_embeddings")}
    n = _int(g["num_hidden_layers"], "num_hidden_layers", source, hi=_MAX_LAYERS)
    if g.get("layer_types"):
        types = g["layer_types"]
        if not isinstance(types, list) or not all(isinstance(t, str) for t in types):
            raise CheckpointError(f"{source}: layer_types must be a list of {SLIDING!r} / {FULL!r}, "
                                  f"not {_short(types)}")
        layer_types = tuple(types)
    else:
        period = 2 if family == "gemma2" else g.get("sliding_window_pattern",
                                                     g.get("_sliding_window_pattern", 6))
        layer_types = layer_pattern(n, _int(period, "sliding_window_pattern", source, hi=_MAX_LAYERS))

    theta_global, theta_local, factor = _rope(g, family, source)
    try:
        return Gemma3Config(
            name=name, family=family, num_hidden_layers=n, layer_types=layer_types,
            rope_theta=theta_global, rope_local_base_freq=theta_local, rope_scaling_factor=factor,
            rms_norm_eps=_float(g["rms_norm_eps"], "rms_norm_eps", source),
            use_qk_norm=family == "gemma3",
            attn_logit_softcapping=_cap(g.get("attn_logit_softcapping"), "attn_logit_softcapping", source),
            final_logit_softcapping=_cap(g.get("final_logit_softcapping"), "final_logit_softcapping",
                                         source),
            pad_token_id=_token(g.get("pad_token_id", 0), "pad_token_id", source),
            eos_token_id=_token(g.get("eos_token_id", 1), "eos_token_id", source),
            bos_token_id=_token(g.get("bos_token_id", 2), "bos_token_id", source), **ints)
    except ValueError as e:  # Gemma3Config's own checks (layer_types, heads)
        raise CheckpointError(f"{source}: unsupported config: {e}") from None


def _json_type(x) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}.get(
        type(x), "number")


def _short(x, n: int = 60) -> str:
    """repr(x) cut to n characters: error messages quote values from untrusted files."""
    r = repr(x)
    return r if len(r) <= n else r[:n] + "..."


def _int(v, key: str, source: str, lo: int = 1, hi: int = _MAX_INT) -> int:
    """An integer field (2.0 reads as 2) in [lo, hi]."""
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise CheckpointError(f"{source}: {key} must be an integer in [{lo}, {hi:,}], not {_short(v)}")
    return v


def _float(v, key: str, source: str) -> float:
    """A positive finite number field."""
    try:
        x = float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else math.nan
    except OverflowError:  # an integer with hundreds of digits
        x = math.inf
    if not (math.isfinite(x) and x > 0):
        raise CheckpointError(f"{source}: {key} must be a positive number, not {_short(v)}")
    return x


def _cap(v, key: str, source: str) -> float | None:
    return None if v is None else _float(v, key, source)


def _token(x, key: str, source: str) -> int:
    """A token id, or the first of a list of them (eos_token_id: [1, 106])."""
    if isinstance(x, list):
        if not x:
            raise CheckpointError(f"{source}: {key} is an empty list")
        x = x[0]
    return _int(x, key, source, lo=0)


def _dict(v, key: str, source: str) -> dict:
    if not isinstance(v, dict):
        raise CheckpointError(f"{source}: {key} must be a JSON object, not {_short(v)}")
    return v


def _rope(g: dict, family: str, source: str = "config.json") -> tuple[float, float, float]:
    """(global theta, local theta, global linear factor) from either config dialect."""
    params = g.get("rope_parameters")
    if params:
        params = _dict(params, "rope_parameters", source)
    if params and (FULL in params or SLIDING in params):  # transformers 5.x, per layer type
        full = _dict(params.get(FULL, {}), f"rope_parameters.{FULL}", source)
        sliding = _dict(params.get(SLIDING, {}), f"rope_parameters.{SLIDING}", source)
        return (_float(full.get("rope_theta", 1e6), "rope_theta", source),
                _float(sliding.get("rope_theta", 1e4), "rope_theta", source),
                _linear_factor(full, source))
    if params:  # 5.x single dict (Gemma 2): one theta for all layers
        theta = _float(params.get("rope_theta", 1e4), "rope_theta", source)
        return theta, theta, _linear_factor(params, source)
    if family == "gemma2":
        theta = _float(g.get("rope_theta", 1e4), "rope_theta", source)
        return theta, theta, 1.0
    # transformers 4.5x: rope_scaling applies to global layers only
    return (_float(g.get("rope_theta", 1e6), "rope_theta", source),
            _float(g.get("rope_local_base_freq", 1e4), "rope_local_base_freq", source),
            _linear_factor(_dict(g.get("rope_scaling") or {}, "rope_scaling", source), source))


def _linear_factor(p: dict, source: str = "config.json") -> float:
    kind = p.get("rope_type", p.get("type", "default"))
    if kind == "default":
        return 1.0
    if kind != "linear":
        raise CheckpointError(f"{source}: RoPE type {_short(kind)} is not supported (Gemma 3 uses "
                              "'linear')")
    return _float(p.get("factor", 1.0), "rope factor", source)


def config_to_hf(c: Gemma3Config) -> dict:
    """A transformers 5.x config.json dict for Gemma3ForCausalLM / Gemma2ForCausalLM."""
    common = dict(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads, head_dim=c.head_dim,
        max_position_embeddings=c.max_position_embeddings, rms_norm_eps=c.rms_norm_eps,
        query_pre_attn_scalar=c.query_pre_attn_scalar, sliding_window=c.sliding_window,
        layer_types=list(c.layer_types), hidden_activation="gelu_pytorch_tanh",
        attn_logit_softcapping=c.attn_logit_softcapping,
        final_logit_softcapping=c.final_logit_softcapping, tie_word_embeddings=True,
        pad_token_id=c.pad_token_id, eos_token_id=c.eos_token_id, bos_token_id=c.bos_token_id)
    if c.family == "gemma2":
        return dict(common, model_type="gemma2", architectures=["Gemma2ForCausalLM"],
                    rope_parameters={"rope_type": "default", "rope_theta": c.rope_theta})
    full = {"rope_type": "default", "rope_theta": c.rope_theta}
    if c.rope_scaling_factor != 1.0:
        full = {"rope_type": "linear", "factor": c.rope_scaling_factor, "rope_theta": c.rope_theta}
    return dict(common, model_type="gemma3_text", architectures=["Gemma3ForCausalLM"],
                rope_parameters={FULL: full, SLIDING: {"rope_type": "default",
                                                       "rope_theta": c.rope_local_base_freq}})


def multimodal_config_from_hf(d: dict, name: str = "hf", source: str = "config.json"
                              ) -> Gemma3MultimodalConfig | None:
    """Our multimodal config from a Gemma3ForConditionalGeneration config.json; None without a
    vision_config (a text-only model)."""
    if not isinstance(d, dict):
        raise CheckpointError(f"{source} holds a JSON {_json_type(d)}, not an object")
    v = d.get("vision_config")
    if not v:
        return None
    v = _dict(v, "vision_config", source)
    if v.get("model_type", "siglip_vision_model") != "siglip_vision_model":
        raise CheckpointError(f"{source}: vision_config has model_type {_short(v.get('model_type'))}; "
                              "Gemma 3 uses 'siglip_vision_model'")
    g = dict(_HF_SIGLIP_DEFAULTS)
    g.update({k: x for k, x in v.items() if x is not None})
    if g["hidden_act"] != "gelu_pytorch_tanh":
        raise CheckpointError(f"{source}: vision hidden_act {_short(g['hidden_act'])} is not supported "
                              "(Gemma 3's SigLIP uses 'gelu_pytorch_tanh')")
    ints = {k: _int(g[k], f"vision_config.{k}", source, hi=_MAX_LAYERS if k == "num_hidden_layers"
                    else _MAX_INT)
            for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                      "num_channels", "image_size", "patch_size")}
    eps = _float(g["layer_norm_eps"], "vision_config.layer_norm_eps", source)

    def pick(*keys, default, lo=0):
        key = next((k for k in keys if d.get(k) is not None), None)
        return default if key is None else _int(d[key], key, source, lo=lo)

    try:
        vision = SiglipVisionConfig(name=f"{name}-vision", layer_norm_eps=eps, **ints)
        return Gemma3MultimodalConfig(
            name=name, text=config_from_hf(d, name, source), vision=vision,
            mm_tokens_per_image=pick("mm_tokens_per_image", default=256, lo=1),
            boi_token_id=pick("boi_token_index", "boi_token_id", default=255_999),
            eoi_token_id=pick("eoi_token_index", "eoi_token_id", default=256_000),
            image_token_id=pick("image_token_index", "image_token_id", default=262_144))
    except ValueError as e:
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(f"{source}: unsupported multimodal config: {e}") from None


def read_json(file: Path) -> dict:
    """A JSON object from config.json / model.safetensors.index.json, or a one-line CheckpointError
    naming the file (unreadable, too large, not UTF-8, not JSON, nested too deeply, not an object)."""
    try:
        size = file.stat().st_size
        if size > _MAX_JSON_BYTES:
            raise CheckpointError(f"{file} is {size:,} bytes; a Hugging Face JSON file is far smaller "
                                  f"(the limit is {_MAX_JSON_BYTES:,})")
        obj = json.loads(file.read_bytes().decode("utf-8"))
    except CheckpointError:
        raise
    except OSError as e:
        raise CheckpointError(f"cannot read {file}: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{file} is not a valid JSON file: not UTF-8 (byte {e.start})") from None
    except RecursionError:
        raise CheckpointError(f"{file} is not a valid JSON file: it nests too deeply") from None
    except ValueError as e:  # json.JSONDecodeError, or an integer of over 4,300 digits
        raise CheckpointError(f"{file} is not a valid JSON file: {_one_line(e)}") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{file} holds a JSON {_json_type(obj)}, not an object")
    return obj


def _one_line(e: BaseException) -> str:
    msg = " ".join(str(e).split())
    return (msg[:300] + "...") if len(msg) > 300 else msg or type(e).__name__


def read_hf_config(path: str | Path, vision: bool = False) -> Gemma3Config | Gemma3MultimodalConfig:
    """The config of a Hugging Face directory, as read_hf_dir reads it (vision=True: a
    Gemma3MultimodalConfig when config.json has a vision_config)."""
    path = Path(path)
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise CheckpointError(f"{path} has no config.json; a Hugging Face model directory needs one")
    raw = read_json(cfg_file)
    try:
        config = config_from_hf(raw, name=path.name, source=str(cfg_file))
        mm = multimodal_config_from_hf(raw, name=path.name, source=str(cfg_file)) if vision else None
    except (KeyError, TypeError) as e:  # defence in depth: the checks above should catch all
        raise CheckpointError(f"{cfg_file} is not a valid Gemma config: {_one_line(e)}") from None
    return mm or config


def has_vision(path: str | Path) -> bool:
    """Whether a Hugging Face directory's config.json describes a vision encoder."""
    try:
        return bool(read_json(Path(path) / "config.json").get("vision_config"))
    except CheckpointError:
        return False


def read_hf_dir(path: str | Path, vision: bool = False
                ) -> tuple[Gemma3Config | Gemma3MultimodalConfig, dict[str, torch.Tensor]]:
    """Config and tensors (memory-mapped safetensors) under our parameter names.

    By default the text model only (a Gemma3Config, text names). With `vision=True`, a directory
    that has a vision tower gives a Gemma3MultimodalConfig and the names of model/multimodal.py
    (`language_model.*`, `vision_tower.*`, `multi_modal_projector.*`).
    Every safetensors header is validated (read_safetensors_header) before safetensors maps the file.
    """
    from safetensors import safe_open

    path = Path(path)
    config = read_hf_config(path, vision)
    mm = config if isinstance(config, Gemma3MultimodalConfig) else None
    tensors: dict[str, torch.Tensor] = {}
    for f in _weight_files(path):
        read_safetensors_header(f)
        try:
            with safe_open(str(f), framework="pt") as st:
                for key in st.keys():
                    ours = hf_to_ours(key)
                    if mm is not None:
                        ours = "language_model." + ours if ours is not None else hf_vision_to_ours(key)
                    if ours is not None:
                        tensors[ours] = st.get_tensor(key)
        except (KeyboardInterrupt, SystemExit, MemoryError):
            raise
        except BaseException as e:  # noqa: BLE001 - safetensors' errors; pyo3 panics are BaseException
            raise CheckpointError(f"cannot read {f}: {_one_line(e)}") from None
    return config, tensors


def read_safetensors_header(f: Path) -> dict[str, dict]:
    """The tensors of a safetensors file's header (name -> dtype, shape, data_offsets), checked
    against the format (safetensors docs, "Format"): an 8-byte little-endian header length that fits
    the file, a UTF-8 JSON object without duplicate keys, known dtypes, shapes whose size matches
    their byte range, and byte ranges that tile the data exactly (no holes, no overlaps). A
    CheckpointError naming the file otherwise; nothing is allocated from the length fields."""
    try:
        size = f.stat().st_size
        with open(f, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{f} is not a safetensors file: {size} bytes, shorter than the "
                                      "8-byte header length")
            n = int.from_bytes(head, "little")
            if n > size - 8:
                raise CheckpointError(f"{f}: the safetensors header length {n:,} exceeds the file "
                                      f"({size:,} bytes); the file is truncated or not safetensors")
            if n > _MAX_HEADER_BYTES:
                raise CheckpointError(f"{f}: the safetensors header is {n:,} bytes (the format's "
                                      f"limit is {_MAX_HEADER_BYTES:,})")
            raw = fh.read(n)
    except OSError as e:
        raise CheckpointError(f"cannot read {f}: {e.strerror or e}") from None
    if len(raw) != n or not raw.startswith(b"{"):
        raise CheckpointError(f"{f}: the safetensors header is not a JSON object")
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except _DuplicateKey as e:
        raise CheckpointError(f"{f}: the safetensors header repeats the key {_short(str(e))}") from None
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{f}: the safetensors header is not UTF-8 (byte {e.start})") from None
    except RecursionError:
        raise CheckpointError(f"{f}: the safetensors header nests too deeply") from None
    except ValueError as e:
        raise CheckpointError(f"{f}: the safetensors header is not valid JSON: {_one_line(e)}") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{f}: the safetensors header is a JSON {_json_type(header)}, not an object")
    data_len = size - 8 - n
    meta = header.pop("__metadata__", None)
    if meta is not None and not (isinstance(meta, dict) and
                                 all(isinstance(v, str) for v in meta.values())):
        raise CheckpointError(f"{f}: the safetensors __metadata__ must map strings to strings")
    spans = []
    for name, info in header.items():
        where = f"{f}: tensor {_short(name)}"
        if not isinstance(info, dict):
            raise CheckpointError(f"{where}: the header entry is not an object")
        dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if not isinstance(dtype, str) or dtype not in _ST_DTYPES:
            raise CheckpointError(f"{where}: dtype {_short(dtype)} is not one of "
                                  f"{', '.join(_ST_DTYPES)}")
        if (not isinstance(shape, list) or len(shape) > _MAX_DIMS or
                not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in shape)):
            raise CheckpointError(f"{where}: shape {_short(shape)} is not a list of at most "
                                  f"{_MAX_DIMS} non-negative integers")
        if (not isinstance(offsets, list) or len(offsets) != 2 or
                not all(isinstance(x, int) and not isinstance(x, bool) for x in offsets) or
                not 0 <= offsets[0] <= offsets[1] <= data_len):
            raise CheckpointError(f"{where}: data_offsets {_short(offsets)} are not [begin, end] "
                                  f"within the {data_len:,} data bytes")
        count = 1
        for x in shape:  # stops as soon as the size exceeds the data: no huge products
            count *= x or 1
            if count > data_len:
                raise CheckpointError(f"{where}: shape {_short(shape)} is larger than the file's "
                                      f"{data_len:,} data bytes")
        nbytes = 0 if 0 in shape else count * _ST_DTYPES[dtype]
        if nbytes != offsets[1] - offsets[0]:
            raise CheckpointError(f"{where}: shape {shape} of {dtype} takes {nbytes:,} bytes, "
                                  f"data_offsets {offsets} hold {offsets[1] - offsets[0]:,}")
        spans.append((offsets[0], offsets[1], name))
    end = 0
    for begin, stop, name in sorted(spans):
        if begin != end:
            raise CheckpointError(f"{f}: tensor {_short(name)} starts at byte {begin:,} of the data, "
                                  f"not at {end:,} (tensors must tile the data without holes or "
                                  "overlaps)")
        end = stop
    if end != data_len:
        raise CheckpointError(f"{f}: the tensors cover {end:,} of the {data_len:,} data bytes")
    return header


class _DuplicateKey(ValueError):
    pass


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        raise _DuplicateKey(next(k for k, _ in pairs if k in seen or seen.add(k)))
    return out


def hf_vision_to_ours(key: str) -> str | None:
    """`vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight` ->
    `vision_tower.layers.0.mlp.fc1.weight`; projector names keep theirs; the SigLIP pooling head
    (unused by Gemma 3) and text names give None."""
    for prefix in _VISION_PREFIXES:
        if key.startswith(prefix):
            rest = key[len(prefix):]
            if rest.startswith("head."):
                return None
            for part in ("embeddings.", "encoder."):
                if rest.startswith(part):
                    rest = rest[len(part):]
            return "vision_tower." + rest
    for prefix in _PROJECTOR_PREFIXES:
        if key.startswith(prefix):
            return "multi_modal_projector." + key[len(prefix):]
    return None


def hf_to_ours(key: str) -> str | None:
    """`model.language_model.layers.0.mlp.up_proj.weight` -> `layers.0.mlp.up_proj.weight`."""
    if key.startswith(_SKIP_PREFIXES):
        return None
    for prefix in _TEXT_PREFIXES:
        if key.startswith(prefix):
            return key[len(prefix):]
    return None


def _weight_files(path: Path) -> list[Path]:
    """model.safetensors, or the shards model.safetensors.index.json names: file names in `path`
    only (an index naming `../x` or `/etc/x` is refused), all present."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index} has no weight_map (tensor name -> shard file)")
        bad = [s for s in weight_map.values() if not isinstance(s, str) or not _plain_name(s)]
        if bad:
            raise CheckpointError(f"{index}: weight_map names shards that are not file names in "
                                  f"{path}: {_short(bad[:3])}")
        shards = set(weight_map.values())
        missing = sorted(s for s in shards if not (path / s).is_file())
        if missing:
            raise CheckpointError(f"{path}: shards listed in the index are missing: "
                                  f"{_short(missing[:3], 200)}")
        return [path / s for s in sorted(shards)]
    single = path / "model.safetensors"
    if single.is_file():
        return [single]
    raise CheckpointError(f"{path} has no model.safetensors nor model.safetensors.index.json")


def _plain_name(s: str) -> bool:
    """A file name (no directory part, not . or ..): shards live next to their index."""
    return bool(s) and s not in (".", "..") and "/" not in s and "\\" not in s and "\x00" not in s


def tensor_dtypes(path: str | Path) -> dict[str, str]:
    """Text-model tensor name -> safetensors dtype, read from the (validated) file headers only."""
    out = {}
    for f in _weight_files(Path(path)):
        for key, info in read_safetensors_header(f).items():
            if hf_to_ours(key) is not None:
                out[key] = info["dtype"]
    return out
