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
# transformers' SiglipVisionConfig defaults, used where a vision_config leaves a field out
_HF_SIGLIP_DEFAULTS = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                           num_attention_heads=12, num_channels=3, image_size=224, patch_size=16,
                           layer_norm_eps=1e-6, hidden_act="gelu_pytorch_tanh")


def config_from_hf(d: dict, name: str = "hf") -> Gemma3Config:
    """Our config from a config.json dict (any of the dialects above)."""
    model_type = d.get("model_type", "")
    if model_type == "gemma3" or "text_config" in d:
        d = d.get("text_config") or {}
        model_type = "gemma3_text"
    if model_type not in ("gemma3_text", "gemma2"):
        raise CheckpointError(f"config.json has model_type {model_type!r}; gemmalab reads "
                              "'gemma3', 'gemma3_text' and 'gemma2'")
    family = "gemma2" if model_type == "gemma2" else "gemma3"
    g = dict(_HF_GEMMA2_DEFAULTS if family == "gemma2" else _HF_GEMMA3_DEFAULTS)
    g.update({k: v for k, v in d.items() if v is not None})
    n = g["num_hidden_layers"]
    period = 2 if family == "gemma2" else g.get("sliding_window_pattern",
                                                 g.get("_sliding_window_pattern", 6))
    layer_types = tuple(g.get("layer_types") or layer_pattern(n, period))

    theta_global, theta_local, factor = _rope(g, family)
    return Gemma3Config(
        name=name, family=family, vocab_size=g["vocab_size"], hidden_size=g["hidden_size"],
        num_hidden_layers=n, num_attention_heads=g["num_attention_heads"],
        num_key_value_heads=g["num_key_value_heads"], head_dim=g["head_dim"],
        intermediate_size=g["intermediate_size"], layer_types=layer_types,
        sliding_window=g["sliding_window"], rope_theta=theta_global,
        rope_local_base_freq=theta_local, rope_scaling_factor=factor,
        query_pre_attn_scalar=g["query_pre_attn_scalar"],
        max_position_embeddings=g["max_position_embeddings"], rms_norm_eps=g["rms_norm_eps"],
        use_qk_norm=family == "gemma3",
        attn_logit_softcapping=g.get("attn_logit_softcapping"),
        final_logit_softcapping=g.get("final_logit_softcapping"),
        pad_token_id=_first(g.get("pad_token_id", 0)), eos_token_id=_first(g.get("eos_token_id", 1)),
        bos_token_id=_first(g.get("bos_token_id", 2)))


def _first(x):
    return x[0] if isinstance(x, list) else x


def _rope(g: dict, family: str) -> tuple[float, float, float]:
    """(global theta, local theta, global linear factor) from either config dialect."""
    params = g.get("rope_parameters")
    if params and (FULL in params or SLIDING in params):  # transformers 5.x, per layer type
        full, sliding = params.get(FULL, {}), params.get(SLIDING, {})
        return (float(full.get("rope_theta", 1e6)), float(sliding.get("rope_theta", 1e4)),
                _linear_factor(full))
    if params:  # 5.x single dict (Gemma 2): one theta for all layers
        theta = float(params.get("rope_theta", 1e4))
        return theta, theta, _linear_factor(params)
    if family == "gemma2":
        theta = float(g.get("rope_theta", 1e4))
        return theta, theta, 1.0
    # transformers 4.5x: rope_scaling applies to global layers only
    return (float(g.get("rope_theta", 1e6)), float(g.get("rope_local_base_freq", 1e4)),
            _linear_factor(g.get("rope_scaling") or {}))


def _linear_factor(p: dict) -> float:
    kind = p.get("rope_type", p.get("type", "default"))
    if kind == "default":
        return 1.0
    if kind != "linear":
        raise CheckpointError(f"RoPE type {kind!r} is not supported (Gemma 3 uses 'linear')")
    return float(p.get("factor", 1.0))


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


def multimodal_config_from_hf(d: dict, name: str = "hf") -> Gemma3MultimodalConfig | None:
    """Our multimodal config from a Gemma3ForConditionalGeneration config.json; None without a
    vision_config (a text-only model)."""
    v = d.get("vision_config")
    if not v:
        return None
    if v.get("model_type", "siglip_vision_model") != "siglip_vision_model":
        raise CheckpointError(f"vision_config has model_type {v.get('model_type')!r}; Gemma 3 uses "
                              "'siglip_vision_model'")
    g = dict(_HF_SIGLIP_DEFAULTS)
    g.update({k: x for k, x in v.items() if x is not None})
    if g["hidden_act"] != "gelu_pytorch_tanh":
        raise CheckpointError(f"vision hidden_act {g['hidden_act']!r} is not supported "
                              "(Gemma 3's SigLIP uses 'gelu_pytorch_tanh')")
    vision = SiglipVisionConfig(
        name=f"{name}-vision", **{k: g[k] for k in ("hidden_size", "intermediate_size",
                                                    "num_hidden_layers", "num_attention_heads",
                                                    "num_channels", "image_size", "patch_size",
                                                    "layer_norm_eps")})

    def pick(*keys, default):
        return next((d[k] for k in keys if d.get(k) is not None), default)

    try:
        return Gemma3MultimodalConfig(
            name=name, text=config_from_hf(d, name), vision=vision,
            mm_tokens_per_image=pick("mm_tokens_per_image", default=256),
            boi_token_id=pick("boi_token_index", "boi_token_id", default=255_999),
            eoi_token_id=pick("eoi_token_index", "eoi_token_id", default=256_000),
            image_token_id=pick("image_token_index", "image_token_id", default=262_144))
    except ValueError as e:
        raise CheckpointError(f"unsupported multimodal config: {e}") from e


def has_vision(path: str | Path) -> bool:
    """Whether a Hugging Face directory's config.json describes a vision encoder."""
    try:
        return bool(json.loads((Path(path) / "config.json").read_text()).get("vision_config"))
    except (OSError, json.JSONDecodeError, AttributeError):
        return False


def read_hf_dir(path: str | Path, vision: bool = False
                ) -> tuple[Gemma3Config | Gemma3MultimodalConfig, dict[str, torch.Tensor]]:
    """Config and tensors (memory-mapped safetensors) under our parameter names.

    By default the text model only (a Gemma3Config, text names). With `vision=True`, a directory
    that has a vision tower gives a Gemma3MultimodalConfig and the names of model/multimodal.py
    (`language_model.*`, `vision_tower.*`, `multi_modal_projector.*`).
    """
    from safetensors import safe_open

    path = Path(path)
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise CheckpointError(f"{path} has no config.json; a Hugging Face model directory needs one")
    try:
        raw = json.loads(cfg_file.read_text())
        config = config_from_hf(raw, name=path.name)
        mm = multimodal_config_from_hf(raw, name=path.name) if vision else None
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{cfg_file} is not a valid Gemma config: {e}") from e
    files = _weight_files(path)
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as st:
                for key in st.keys():
                    ours = hf_to_ours(key)
                    if mm is not None:
                        ours = "language_model." + ours if ours is not None else hf_vision_to_ours(key)
                    if ours is not None:
                        tensors[ours] = st.get_tensor(key)
        except Exception as e:  # safetensors raises its own error types for corrupt headers
            raise CheckpointError(f"cannot read {f}: {e}") from e
    return mm or config, tensors


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
    index = path / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        missing = [s for s in shards if not (path / s).is_file()]
        if missing:
            raise CheckpointError(f"{path}: shards listed in the index are missing: {missing}")
        return [path / s for s in shards]
    single = path / "model.safetensors"
    if single.is_file():
        return [single]
    raise CheckpointError(f"{path} has no model.safetensors nor model.safetensors.index.json")


def tensor_dtypes(path: str | Path) -> dict[str, str]:
    """Text-model tensor name -> safetensors dtype, read from the file headers only."""
    from safetensors import safe_open

    out = {}
    for f in _weight_files(Path(path)):
        with safe_open(str(f), framework="pt") as st:
            for key in st.keys():
                if hf_to_ours(key) is not None:
                    out[key] = st.get_slice(key).get_dtype()
    return out
