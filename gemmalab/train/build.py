"""Models for every role a recipe needs, built from the config's sections.

    policy      build_model_and_tokenizer: the model to train (fp32 master weights), a preset with
                random init or a checkpoint, full fine-tuning or LoRA
    teacher     load_frozen(path): another model, forward-only, no gradients
    reference   the policy's base with the adapter off, or load_frozen(path) (train.roles)
    anchor      an EMA of the policy's adapter (train.roles)

Roles that share one base (reference, anchor, a context-distillation teacher) cost no second copy of
the weights; see train.roles.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from ..config import get_config
from ..model import Gemma3
from .lora import apply_lora

__all__ = ["build_model_and_tokenizer", "load_frozen", "preset_config", "init_weights"]


def build_model_and_tokenizer(cfg, device: torch.device, tokenizer=None):
    """The model to train (fp32 master weights unless told otherwise) and its tokenizer.

    A preset model (random init) takes `model.arch` overrides of its Gemma3Config fields and its
    tokenizer from `model.tokenizer`, or from the `tokenizer` argument when that is not set.
    """
    dtype = getattr(torch, cfg.model.dtype)
    if cfg.model.arch and not cfg.model.preset:
        raise ValueError("model.arch overrides a preset's fields; set model.preset too")
    if cfg.model.preset:
        from ..tokenizer import Tokenizer
        if cfg.model.tokenizer:
            src = Path(cfg.model.tokenizer)
            tokenizer = Tokenizer.from_hf_dir(src) if src.is_dir() else Tokenizer.from_gguf(src)
        elif tokenizer is None:
            raise ValueError("a preset model needs model.tokenizer (a GGUF file or HF directory)")
        config = preset_config(cfg.model.preset, cfg.model.arch)
        if tokenizer.vocab_size > config.vocab_size:
            raise ValueError(f"the tokenizer has {tokenizer.vocab_size} tokens, the preset "
                             f"{config.name} only {config.vocab_size} embedding rows")
        torch.manual_seed(cfg.run.seed)
        model = Gemma3(config)
        init_weights(model)
        model = model.to(device=device, dtype=dtype)
    else:
        from ..lm import load
        lm = load(cfg.model.path, mode="fp32", dtype=dtype, device=device)
        model, tokenizer = lm.model, lm.tokenizer
    model.train().requires_grad_(True)
    model.activation_checkpointing = cfg.model.activation_checkpointing
    if cfg.lora.rank:
        apply_lora(model, cfg.lora.rank, cfg.lora.alpha, cfg.lora.targets)
    return model, tokenizer


def load_frozen(path: str | Path | None, device: torch.device, mode: str = "fp32"):
    """(model, tokenizer) of a forward-only role (a teacher, a separate reference): eval mode, no
    gradients. mode="fp32" is the exact path; "native" computes on the GGUF's own blocks."""
    from ..lm import load
    lm = load(path, mode=mode, dtype=torch.float32 if mode == "fp32" else None, device=device)
    return lm.model.eval().requires_grad_(False), lm.tokenizer


def preset_config(preset: str, arch: dict | None = None):
    """A named preset with some Gemma3Config fields replaced (lists become tuples, e.g. layer_types)."""
    config = get_config(preset)
    if not arch:
        return config
    valid = {f.name for f in dataclasses.fields(config)}
    bad = sorted(set(arch) - valid)
    if bad:
        raise ValueError(f"model.arch: unknown Gemma3Config field(s) {bad}; valid: {sorted(valid)}")
    return config.replace(**{k: tuple(v) if isinstance(v, list) else v for k, v in arch.items()})


@torch.no_grad()
def init_weights(model: Gemma3, std: float = 0.02) -> None:
    """Normal(0, std) linears and embedding; norms at w = 0 (gain 1), as in transformers."""
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            p.zero_()
        else:
            p.normal_(0.0, std)
