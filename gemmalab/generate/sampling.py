"""Sampling: temperature, top-k, top-p, and the log-probability of what was drawn.

Defaults are Gemma 3's published generation config. `sample_with_logprob` draws exactly what `sample`
draws (same distribution tensor, same generator call) and also returns the log-probability of each
token under that distribution: what a policy-gradient rollout needs (the distribution actually
sampled from, after temperature / top-k / top-p; torchtune's `generate` returns the same for PPO).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingParams:
    """temperature 0 means greedy. top_k 0 and top_p 1.0 disable those filters.

    The defaults are Gemma 3's published generation config (temperature 1, top-k 64, top-p 0.95).
    """
    temperature: float = 1.0
    top_k: int = 64
    top_p: float = 0.95
    seed: int | None = None

    def __post_init__(self):
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


def filtered_distribution(logits: torch.Tensor, params: SamplingParams
                          ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(probs (B, n), token ids (B, n) or None for the whole vocabulary) after temperature, top-k
    and top-p; the distribution `sample` draws from (temperature > 0).

    Top-k takes a partial selection (torch.topk) instead of sorting the 262k vocabulary; top-p then
    sorts only the k survivors. A full sort happens only for top-p with top_k=0.
    """
    logits = logits.float() / params.temperature
    if params.top_k and params.top_k < logits.shape[-1]:
        values, index = torch.topk(logits, params.top_k, dim=-1)  # sorted, descending
    elif params.top_p < 1.0:
        values, index = torch.sort(logits, dim=-1, descending=True)
    else:
        return torch.softmax(logits, dim=-1), None
    probs = torch.softmax(values, dim=-1)
    if params.top_p < 1.0:
        before = torch.cumsum(probs, dim=-1) - probs  # mass strictly before each candidate
        probs = probs.masked_fill(before >= params.top_p, 0.0)  # the top candidate always stays
        probs = probs / probs.sum(-1, keepdim=True)
    return probs, index


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None
           ) -> torch.Tensor:
    """Next tokens (B,) from last-position logits (B, V); temperature 0 is greedy (argmax)."""
    if params.temperature == 0:
        return logits.argmax(-1)
    probs, index = filtered_distribution(logits, params)
    choice = torch.multinomial(probs, 1, generator=generator)
    return (choice if index is None else index.gather(-1, choice)).squeeze(-1)


def sample_with_logprob(logits: torch.Tensor, params: SamplingParams,
                        generator: torch.Generator | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens (B,), log-probs (B,) fp32): the tokens `sample` draws (the same draws, bit for bit)
    and the log-probability of each under the distribution it was drawn from. Greedy
    (temperature 0) is a point mass: log-prob 0."""
    if params.temperature == 0:
        tokens = logits.argmax(-1)
        return tokens, torch.zeros(tokens.shape, dtype=torch.float32, device=tokens.device)
    probs, index = filtered_distribution(logits, params)
    choice = torch.multinomial(probs, 1, generator=generator)
    logprob = probs.gather(-1, choice).log().squeeze(-1)
    return (choice if index is None else index.gather(-1, choice)).squeeze(-1), logprob
