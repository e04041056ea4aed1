"""Teacher targets: the sparse (ids, probabilities, counts) that the logit store keeps and online
distillation computes on the fly. No gradients here; everything runs under `torch.no_grad`.

    head_logits(h, W)                  a chunk callable (flat rows, v0, v1) -> logits, for the losses
    sample_targets(logits, k, ...)     K draws from softmax(logits / T): with replacement (unique ids +
                                       counts, Gemma 3's reading) or without (Gumbel top-k)
    topk_targets(logits, k, ...)       the K most probable ids (top-k KD)
    teacher_targets(model, batch, ...) (B, T, K) targets for every target position of a packed batch

Sampling is reproducible: the caller passes a `torch.Generator`; the logit store seeds one per row,
so a resumed cache run draws exactly what an uninterrupted one would.

Layout of sparse targets: ids are unique within a position, in ascending order, padded with -1
(probability 0, count 0) when fewer than K distinct ids were drawn.
"""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["head_logits", "sample_targets", "topk_targets", "teacher_targets", "SAMPLINGS"]

SAMPLINGS = ("with_replacement", "without_replacement", "topk")


def head_logits(hidden: Tensor, weight: Tensor, softcap: float | None = None):
    """(flat token indices, v0, v1) -> fp32 logits chunk `softcap(hidden[rows] @ weight[v0:v1].T)`.

    hidden: (..., d) final-norm hidden states of the teacher; weight: its (V, d) tied embedding.
    """
    flat = hidden.reshape(-1, hidden.shape[-1])

    def fn(rows: Tensor, v0: int, v1: int) -> Tensor:
        z = flat.index_select(0, rows.to(flat.device)).float() @ weight[v0:v1].float().t()
        if softcap is not None:
            z = torch.tanh(z / softcap) * softcap
        return z
    return fn


def _unique_with_counts(draws: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Per row: the distinct ids of `draws` (n, m) ascending, padded to k with -1, and their counts."""
    s, _ = draws.sort(dim=1)
    new = torch.ones_like(s, dtype=torch.bool)
    new[:, 1:] = s[:, 1:] != s[:, :-1]
    slot = new.cumsum(1) - 1  # which distinct value each draw belongs to
    ids = torch.full((s.shape[0], k), -1, dtype=torch.int64)
    ids.scatter_(1, slot, s)
    counts = torch.zeros((s.shape[0], k), dtype=torch.int64)
    counts.scatter_add_(1, slot, torch.ones_like(s))
    return ids, counts


@torch.no_grad()
def sample_targets(logits: Tensor, k: int, *, temperature: float = 1.0, replacement: bool = True,
                   generator: torch.Generator | None = None) -> tuple[Tensor, Tensor, Tensor | None]:
    """Draw K ids per row from p = softmax(logits / temperature).

    logits: (n, V) fp32 (a chunk of tokens, the full vocabulary).
    With replacement: K independent draws; returns the distinct ids (ascending, -1 padded), p of each
    and the counts (summing to K): "We sample 256 logits per token, weighted by teacher probabilities"
    (Gemma 3 report 2.2), and counts / K is the unbiased estimate of p (arXiv 2503.16870).
    Without replacement: K distinct ids by the Gumbel-top-k trick (ids of zero probability are
    dropped, so K >= the support returns the whole support); counts is None.
    Returns (ids int64 (n, K), probs fp32 (n, K), counts int64 (n, K) or None).
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)
    if replacement:
        draws = torch.multinomial(logp.exp(), k, replacement=True, generator=generator)
        ids, counts = _unique_with_counts(draws, k)
    else:
        k_eff = min(k, logp.shape[1])
        u = torch.rand(logp.shape, generator=generator, dtype=torch.float32)
        keys = logp - torch.log(-torch.log(u.clamp_min(torch.finfo(torch.float32).tiny)))
        top = keys.topk(k_eff, dim=1).indices
        top = torch.where(torch.isfinite(logp.gather(1, top)), top, -1)  # zero-probability picks
        ids = torch.full((logp.shape[0], k), -1, dtype=torch.int64)
        ids[:, :k_eff] = top
        ids = _pad_last(ids)
        counts = None
    probs = torch.where(ids >= 0, logp.gather(1, ids.clamp(min=0)).exp(), 0.0)
    return ids, probs, counts


def _pad_last(ids: Tensor) -> Tensor:
    """Move the -1 slots of each row to the end, keeping the ascending order of the others."""
    big = torch.iinfo(torch.int64).max
    s = torch.where(ids < 0, big, ids).sort(dim=1).values
    return torch.where(s == big, -1, s)


@torch.no_grad()
def topk_targets(logits: Tensor, k: int, *, temperature: float = 1.0) -> tuple[Tensor, Tensor]:
    """The K most probable ids per row (ascending id order, ids of zero probability dropped) and their
    probabilities softmax(z / T)."""
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)
    top = logp.topk(min(k, logp.shape[1]), dim=1).indices
    top = torch.where(torch.isfinite(logp.gather(1, top)), top, -1)
    ids = torch.full((logp.shape[0], k), -1, dtype=torch.int64)
    ids[:, :top.shape[1]] = top
    ids = _pad_last(ids)
    probs = torch.where(ids >= 0, logp.gather(1, ids.clamp(min=0)).exp(), 0.0)
    return ids, probs


@torch.no_grad()
def teacher_targets(teacher, batch: dict, *, k: int, sampling: str = "with_replacement",
                    temperature: float = 1.0, generator: torch.Generator | None = None,
                    token_chunk: int = 64, hidden: Tensor | None = None,
                    on_logits=None) -> dict[str, Tensor]:
    """Sparse targets for every target position of a packed batch (targets != -100).

    teacher: a `Gemma3` model; batch: {input_ids, positions, segment_ids, targets}, each (B, T).
    Returns teacher_ids (B, T, K) int64 (-1 elsewhere), teacher_probs (B, T, K) fp32 and, when
    sampling with replacement, teacher_counts (B, T, K) int64. The logits are formed token_chunk
    positions at a time, so memory stays at token_chunk x V floats; `on_logits(rows, logits)`, when
    given, sees each chunk (flat position indices, fp32 (n, V) logits), e.g. to store them.
    """
    if sampling not in SAMPLINGS:
        raise ValueError(f"unknown sampling {sampling!r}; use one of {', '.join(SAMPLINGS)}")
    if hidden is None:
        hidden = teacher.hidden_states(batch["input_ids"], batch["positions"],
                                       segment_ids=batch["segment_ids"])
    B, T = batch["targets"].shape
    fn = head_logits(hidden, teacher.embed_tokens.weight, teacher.config.final_logit_softcapping)
    rows = (batch["targets"].reshape(-1) != -100).nonzero().squeeze(1)
    ids = torch.full((B * T, k), -1, dtype=torch.int64)
    probs = torch.zeros((B * T, k), dtype=torch.float32)
    counts = torch.zeros((B * T, k), dtype=torch.int64) if sampling == "with_replacement" else None
    V = teacher.embed_tokens.weight.shape[0]
    for n0 in range(0, rows.numel(), token_chunk):
        r = rows[n0:n0 + token_chunk]
        z = fn(r, 0, V)
        if on_logits is not None:
            on_logits(r, z)
        if sampling == "topk":
            i, p = topk_targets(z, k, temperature=temperature)
            c = None
        else:
            i, p, c = sample_targets(z, k, temperature=temperature,
                                     replacement=sampling == "with_replacement", generator=generator)
        ids[r], probs[r] = i, p
        if counts is not None:
            counts[r] = c
    out = {"teacher_ids": ids.view(B, T, k), "teacher_probs": probs.view(B, T, k)}
    if counts is not None:
        out["teacher_counts"] = counts.view(B, T, k)
    return out
