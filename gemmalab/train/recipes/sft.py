"""Supervised fine-tuning, end to end: `gemmalab train sft CONFIG`.

    model (a checkpoint, or a preset with random init; full fine-tuning or LoRA)
    data  packed rows of JSONL / Parquet text or chat (train.data), loss on the model's turns
    loss  next-token cross-entropy over the 262k vocabulary, chunked (train.losses)

Everything else (AdamW, accumulation normalised by the global target count, torchrun, atomic
checkpoints, exact resume, metrics) is the shared loop, `train.trainer.train_loop`.
"""
from __future__ import annotations

import torch

from ..build import build_model_and_tokenizer
from ..config import SFTConfig
from ..data import PackedDataset
from ..losses import chunked_cross_entropy
from ..trainer import setup_run, train_loop

__all__ = ["train_sft", "micro_batch_loss"]


def micro_batch_loss(model, batch: dict, normalizer: float) -> torch.Tensor:
    h = model.hidden_states(batch["input_ids"], batch["positions"],
                            segment_ids=batch["segment_ids"])
    return chunked_cross_entropy(h, model.embed_tokens.weight, batch["targets"],
                                 softcap=model.config.final_logit_softcapping,
                                 normalizer=normalizer)


def train_sft(cfg: SFTConfig, resume: bool = False, progress: bool = True) -> dict:
    """Run (or resume) an SFT job; return the last logged metrics."""
    rank, world, device = setup_run(cfg)
    model, tokenizer = build_model_and_tokenizer(cfg, device)
    data = PackedDataset(cfg.data.train, tokenizer, cfg.data.seq_len,
                         cfg.data.batch_size, seed=cfg.run.seed,
                         shuffle_buffer=cfg.data.shuffle_buffer, train_on=cfg.data.train_on)
    return train_loop(cfg, model, data, micro_batch_loss, rank=rank, world=world, device=device,
                      resume=resume, progress=progress)
