"""SFP8 Hugging Face-style directories: the seven block projections as gemma.cpp SFP8 codes.

save_sfp8(model, tokenizer, out_dir)  save_hf's directory (fp32), with each block projection
                                      `model.layers.N.self_attn.{q,k,v,o}_proj.weight` and
                                      `model.layers.N.mlp.{gate,up,down}_proj.weight` replaced by
                                      `<name>.sfp8` (uint8, same shape, 1 byte per weight) and
                                      `<name>.sfp8_scale` (float32 scalar, gemma.cpp's per-tensor
                                      `ScaleWeights` scale); config.json gains a
                                      `quantization_config` {"quant_method": "sfp8", ...}
load_sfp8(path, mode)                 -> (Gemma3, Tokenizer): "fp32" decodes the codes into a plain
                                      model; "sfp8" keeps them, as SFP8Linear modules

Embeddings and norms stay fp32 (the Gemma 3 report's QAT formats quantize the matrices; gemma.cpp
keeps norms in f32). The numerics are in quant/sfp.py. transformers has no "sfp8" quant_method, so
these directories are read by gemmalab only.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch

from ..quant.sfp import SFP8Linear, dequantize, quantize
from .errors import CheckpointError
from .export import _check_target, _replace_dir, _temp_name, save_hf

__all__ = ["PROJECTIONS", "save_sfp8", "load_sfp8", "is_sfp8_dir", "LOAD_MODES"]

PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
LOAD_MODES = ("fp32", "sfp8")
CODES, SCALE = ".sfp8", ".sfp8_scale"  # suffixes appended to the weight's name
_PROJECTION = re.compile(r"layers\.\d+\.(" + "|".join(re.escape(p) for p in PROJECTIONS)
                         + r")\.weight$")


def _is_projection(name: str) -> bool:
    return _PROJECTION.fullmatch(name.removeprefix("model.")) is not None


# ---------------------------------------------------------------------------------------------------
# Export

def save_sfp8(model, tokenizer, out_dir: str | Path, *, exact_rne: bool = False,
              overwrite: bool = False) -> Path:
    """Write an SFP8 directory (see the module docstring). `exact_rne`: round with sfp_test.cc's
    exact RNE instead of gemma.cpp's production encoder. Atomic like save_hf: built under a
    temporary name and renamed into place; an existing non-empty `out_dir` needs `overwrite=True`."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    if any(isinstance(m, SFP8Linear) for m in model.modules()):
        raise ValueError("the model already holds SFP8 codes; load it with mode='fp32' to export it")
    out = Path(out_dir).expanduser()
    _check_target(out, overwrite, want_dir=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_name(out)
    try:
        save_hf(model, tokenizer, tmp, dtype="fp32")
        weights = tmp / "model.safetensors"
        tensors, n_quantized = {}, 0
        with safe_open(str(weights), framework="pt") as f:
            metadata = f.metadata()
            for key in f.keys():
                t = f.get_tensor(key)
                if _is_projection(key):
                    codes, scale = quantize(t, exact_rne)
                    tensors[key + CODES] = codes
                    tensors[key + SCALE] = torch.tensor(scale, dtype=torch.float32)
                    n_quantized += 1
                else:
                    tensors[key] = t
        if n_quantized != 7 * model.config.num_hidden_layers:
            raise ValueError(f"found {n_quantized} block projections to quantize, expected "
                             f"{7 * model.config.num_hidden_layers}")
        part = tmp / ".model.safetensors.part"
        save_file(tensors, str(part), metadata=metadata)
        del tensors
        os.chmod(part, weights.stat().st_mode & 0o777)
        os.replace(part, weights)

        cfg_file = tmp / "config.json"
        cfg = json.loads(cfg_file.read_text(encoding="utf-8"))
        cfg["quantization_config"] = {
            "quant_method": "sfp8", "format": "gemma.cpp SFP8",
            "encoder": "exact_rne" if exact_rne else "production", "modules": list(PROJECTIONS)}
        cfg_file.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        _replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


# ---------------------------------------------------------------------------------------------------
# Loading

def is_sfp8_dir(path: str | Path) -> bool:
    """Whether `path` is a directory whose config.json says quant_method "sfp8"."""
    from .hf import read_json  # bounded: size, UTF-8, nesting depth (a bad file is not SFP8)
    try:
        qc = read_json(Path(path) / "config.json")["quantization_config"]
        return qc["quant_method"] == "sfp8"
    except (CheckpointError, KeyError, TypeError):
        return False


def _sfp8_modules(path: Path) -> tuple[str, ...]:
    """The projection kinds config.json's quantization_config lists, or a CheckpointError."""
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise CheckpointError(f"{path} has no config.json; an SFP8 model directory needs one")
    from .hf import read_json
    cfg = read_json(cfg_file)
    qc = cfg.get("quantization_config") if isinstance(cfg, dict) else None
    if not isinstance(qc, dict):
        raise CheckpointError(f"{path} is not an SFP8 export: config.json has no quantization_config "
                              "(load a plain Hugging Face directory with gemmalab.load)")
    if qc.get("quant_method") != "sfp8":
        raise CheckpointError(f"{path}: quantization_config has quant_method "
                              f"{qc.get('quant_method')!r}, not 'sfp8'; gemmalab cannot read it")
    modules = qc.get("modules", list(PROJECTIONS))
    unknown = [m for m in modules if m not in PROJECTIONS] if isinstance(modules, list) else [modules]
    if unknown:
        raise CheckpointError(f"{path}: quantization_config lists modules {unknown}; SFP8 directories "
                              f"quantize only {', '.join(PROJECTIONS)}")
    return tuple(modules)


def _take_sfp8(path: Path, name: str, shape: tuple[int, ...], tensors: dict
               ) -> tuple[torch.Tensor, float]:
    """Pop and check `name`'s codes and scale (our names, without `model.`)."""
    codes, scale = tensors.pop(name + CODES, None), tensors.pop(name + SCALE, None)
    if codes is None:
        raise CheckpointError(f"{path}: model.{name}{CODES} is missing (quantization_config lists "
                              "this projection as SFP8)")
    if name in tensors:
        raise CheckpointError(f"{path}: model.{name} is stored both as SFP8 codes and as floats")
    if scale is None:
        raise CheckpointError(f"{path}: model.{name}{SCALE} is missing; SFP8 codes need their "
                              "per-tensor scale")
    if codes.dtype != torch.uint8:
        raise CheckpointError(f"{path}: model.{name}{CODES} has dtype {codes.dtype}; SFP8 codes "
                              "are uint8")
    if tuple(codes.shape) != shape:
        raise CheckpointError(f"{path}: model.{name}{CODES} has shape {tuple(codes.shape)}, the "
                              f"config implies {shape}")
    if scale.dtype != torch.float32 or scale.numel() != 1:
        raise CheckpointError(f"{path}: model.{name}{SCALE} must be a float32 scalar, got "
                              f"{scale.dtype} of shape {tuple(scale.shape)}")
    value = float(scale.reshape(()))
    if not (value > 0 and value != float("inf")):
        raise CheckpointError(f"{path}: model.{name}{SCALE} is {value}; a scale must be positive "
                              "and finite")
    if bool((codes == 0x80).any()):
        raise CheckpointError(f"{path}: model.{name}{CODES} holds the reserved SFP8 code 0x80 "
                              "(-0); the file is corrupt")
    return codes, value


def load_sfp8(path: str | Path, mode: str = "fp32", device: str | torch.device = "cpu"):
    """An SFP8 directory -> (Gemma3 model in eval mode, Tokenizer).

    mode "fp32": a plain model whose projections are the decoded weights (decode(codes) * scale),
    what `fake_quant_sfp8` gives for the exported weights. mode "sfp8": the seven projections of
    every block are SFP8Linear modules holding the codes (1 byte per weight), decoded per call.
    """
    from ..lm import build_model
    from ..model import Gemma3
    from ..tokenizer import Tokenizer
    from .hf import read_hf_dir

    if mode not in LOAD_MODES:
        raise ValueError(f"unknown SFP8 load mode {mode!r}; use one of {', '.join(LOAD_MODES)}")
    path, device = Path(path).expanduser(), torch.device(device)
    modules = _sfp8_modules(path)
    config, tensors = read_hf_dir(path)  # text model: a Gemma3Config
    with torch.device("meta"):
        model = Gemma3(config)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    quantized = {name: _take_sfp8(path, name, shape, tensors) for name, shape in shapes.items()
                 if _is_projection(name) and name.split(".", 2)[2].removesuffix(".weight") in modules}
    stray = sorted(k for k in tensors if k.endswith((CODES, SCALE)))
    if stray:
        raise CheckpointError(f"{path}: unexpected SFP8 tensors {stray[:3]} (not block projections "
                              "listed in quantization_config)")
    tokenizer = Tokenizer.from_hf_dir(path)

    if mode == "fp32":
        for name, (codes, scale) in quantized.items():
            tensors[name] = dequantize(codes, scale)
        return build_model(config, tensors, torch.float32, device, source=path), tokenizer

    for name, (codes, scale) in quantized.items():
        parent, child = name.removesuffix(".weight").rsplit(".", 1)
        setattr(model.get_submodule(parent), child, SFP8Linear(codes.to(device), scale))
    state, missing = {}, []
    for name, t in model.state_dict().items():
        if name.endswith(".codes") and name.removesuffix(".codes") + ".weight" in quantized:
            state[name] = t  # the SFP8Linear's own codes
        elif name not in tensors:
            missing.append(name)
        elif tuple(tensors[name].shape) != shapes[name]:
            raise CheckpointError(f"{path}: tensor {name} has shape {tuple(tensors[name].shape)}, "
                                  f"the config implies {shapes[name]}")
        else:
            state[name] = tensors[name].to(device=device, dtype=torch.float32)
    if missing:
        raise CheckpointError(f"{path}: missing {len(missing)} tensors, e.g. {missing[:3]}")
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval().requires_grad_(False), tokenizer
