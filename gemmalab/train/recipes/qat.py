"""Quantization-aware training, end to end: `gemmalab train qat CONFIG`.

Gemma 3 (report §2.3): "we fine-tune the model for ~5,000 steps using QAT ... we use probabilities from
the non-quantized checkpoint as targets". Here that is the distillation recipe (train.recipes.distill: the
shared optimizer loop, accumulation, torchrun, atomic checkpoints, exact resume, metrics) with

    student = the checkpoint, its seven projections fake-quantized on the export grid (quant.fake:
              Q4_0, int4 per channel or SFP8, straight-through gradients), the embedding / tied LM
              head rounded once to its own format and frozen;
    targets = the same checkpoint's probabilities: online full-vocabulary KD by default
              (distill.mode = "online", distill.loss = "full", distill.teacher = model.path), or any
              target the distillation recipe reads (a teacher-logit store, top-k, a hard-label mix
              through distill.hard_weight).

The checkpoints hold the trained (unquantized) matrices, like Google's "-qat-...-unquantized"
releases; `gemmalab export RUN_DIR --to gguf` (or `--to hf --dtype sfp8`) rounds them on the grid they
were trained on, so the file holds exactly the values the student was trained with.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from ..config import QATConfig, build_config

__all__ = ["train_qat", "attach_from_config", "load_qat_run", "is_qat_run", "EXPORT_DTYPE"]

# the export dtype that holds each trained format exactly
EXPORT_DTYPE = {"q4_0": ("gguf", "q4_0"), "int4_channel": ("gguf", "q4_0_channel"), "sfp8": ("hf", "sfp8")}


def attach_from_config(model, cfg: QATConfig, move_ties: bool = True) -> list[str]:
    """Fake-quantize `model` as cfg.qat says (and freeze the norms unless qat.train_norms); with
    move_ties, weights on exact Q4_0 ties start a random fraction of a step inside their cell."""
    from ...quant.fake import attach, move_off_ties

    q = cfg.qat
    swapped = attach(model, q.format, modules=tuple(q.modules), embedding=q.embedding,
                     rounding=q.rounding, exact_rne=q.sfp8_encoder == "exact_rne")
    if move_ties and q.tie_margin > 0:
        model.qat_ties_moved = move_off_ties(model, max_margin=q.tie_margin, seed=cfg.run.seed)
    if not q.train_norms:
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.requires_grad_(False)
    return swapped


def train_qat(cfg: QATConfig, resume: bool = False, progress: bool = True) -> dict:
    """Run (or resume) a QAT job; return the last logged metrics."""
    import sys

    from .distill import train_distill

    def hook(model):
        swapped = attach_from_config(model, cfg)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        ties = getattr(model, "qat_ties_moved", 0)
        print(f"gemmalab train qat: {len(swapped)} projections fake-quantized as {cfg.qat.format}"
              f"{' (' + cfg.qat.rounding + ' rounding)' if cfg.qat.format != 'sfp8' else ''}, embedding "
              f"{cfg.qat.embedding} (frozen); {trainable / 1e6:.1f}M trainable parameters"
              f"{f'; {ties / 1e6:.1f}M weights moved off exact rounding ties' if ties else ''}",
              file=sys.stderr, flush=True)
    return train_distill(cfg, resume=resume, progress=progress, student_hook=hook)


def is_qat_run(path: str | Path) -> bool:
    p = Path(path)
    try:
        return p.is_dir() and "qat" in json.loads((p / "config.json").read_text()) and (p / "checkpoints").is_dir()
    except (OSError, json.JSONDecodeError):
        return False


def load_qat_run(run_dir: str | Path, *, quantized: bool = False, step: int | None = None,
                 device: str = "cpu"):
    """(model, tokenizer, cfg) of a QAT run's latest checkpoint (or the one of `step`): a plain Gemma3 holding the trained
    matrices (quantized=False, for export, which rounds them itself) or fq(W) (quantized=True, what
    the exported file computes), with the embedding at the run's format."""
    from safetensors.torch import load_file

    from .. import checkpoint as ckpt
    from ...lm import load
    from ...quant.fake import materialize

    run_dir = Path(run_dir)
    if not is_qat_run(run_dir):
        raise ValueError(f"{run_dir} is not a `gemmalab train qat` run (no config.json with a [qat] "
                         "section and a checkpoints/ folder)")
    cfg = build_config(json.loads((run_dir / "config.json").read_text()), QATConfig)
    latest = ckpt.latest(run_dir) if step is None else run_dir / "checkpoints" / f"step-{step:06d}"
    if latest is None or not (latest / "model.safetensors").is_file():
        raise ValueError(f"{run_dir} has no checkpoint {'yet' if step is None else f'of step {step}'}")
    lm = load(cfg.model.path, mode="fp32", dtype=torch.float32, device=device)
    model = lm.model
    attach_from_config(model, cfg, move_ties=False)  # the checkpoint holds every trained matrix
    state = load_file(str(latest / "model.safetensors"))
    missing = sorted(set(state) - set(model.state_dict()))
    if missing:
        raise ValueError(f"{latest}: tensors {missing[:3]} do not belong to {cfg.model.path or 'the embedded model'}")
    model.load_state_dict(state, strict=False)
    materialize(model, quantized=quantized)
    return model.eval().requires_grad_(False), lm.tokenizer, cfg
