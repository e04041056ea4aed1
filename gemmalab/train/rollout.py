"""Rollouts for on-policy recipes: N samples per prompt from a sampler, the trainer's exact log-probs,
the sampler/learner mismatch, and truncated importance ratios.

    sampler      the policy as it generates: the training model itself (fp32, exact), or a fast copy
                 (the GGUF's own quantized blocks + the fp32 LoRA path, train.roles; or merged and
                 requantized every k steps) whose distribution differs slightly from the learner's
    rollout()    N samples per prompt through the one generation core (gemmalab.generate.sample_batch),
                 as training rows {input_ids, positions, segment_ids, targets = the sampled tokens},
                 with the group (prompt) id, finish reason and the sampler's per-token log-probs
    learner      learner_logprobs(model, rows): the trainer's log-probs of the same tokens, with
                 gradient, chunked over the vocabulary (train.losses.token_logprobs)
    mismatch     per-token KL(sampler || learner) estimated on the samples (k1 and k3 of Schulman's
                 "Approximating KL divergence"), logged every step
    correction   truncated importance ratios min(pi_learner / pi_sampler, C) (TIS, Yao et al. 2025,
                 "Your efficient RL framework secretly brings you off-policy RL training"), detached,
                 multiplying the per-token policy-gradient terms; off by option (cap = 0)

With the exact fp32 sampler, temperature 1 and no top-k / top-p, the sampler's log-probs are the
learner's (to fp32 rounding), the ratios are 1 and the corrected loss equals the plain one.
Rollouts never import the server: they use the same generation core it does.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..generate import SamplingParams, sample_batch
from .data import IGNORE_INDEX, completion_row

__all__ = ["Rollouts", "rollout", "learner_logprobs", "mismatch_metrics", "truncated_ratios",
           "policy_gradient_loss"]


@dataclass
class Rollouts:
    """N samples for each of P prompts as P * N training rows, grouped by prompt (group j = rows
    j*N .. j*N + N-1)."""
    rows: dict[str, Tensor]  # input_ids, positions, segment_ids, targets, prompt_len: (P*N, T) / (P*N,)
    group: Tensor  # (P*N,) prompt index of each row
    sampler_logprobs: Tensor  # (P*N, T) fp32, at the target positions (0 elsewhere)
    finish_reasons: list[str]
    completion_lens: Tensor  # (P*N,) sampled tokens per row (the stop token included)
    texts: list[str] | None = None  # with a tokenizer: each completion's text, stop strings cut

    @property
    def mask(self) -> Tensor:
        return self.rows["targets"] != IGNORE_INDEX


@torch.no_grad()
def rollout(sampler, prompts: list[list[int]], *, n: int, max_new_tokens: int, params: SamplingParams,
            stop_ids=(), seed: int | None, seq_len: int, pad_id: int = 0,
            max_batch: int | None = None, tokenizer=None, stop=(), exact: bool = True) -> Rollouts:
    """Sample n continuations of every prompt from `sampler` (prompt j, choice i seeded seed + j*n + i,
    so a row does not depend on what shares its batch) and lay them out as training rows of seq_len
    tokens (prompt + completion, cut to seq_len; targets on the completion only). With a tokenizer,
    `stop` strings end a completion too (the token completing one is kept, its text cut) and the
    texts come back in `texts`; exact=False decodes the fp32 rows in one batched forward."""
    was_training = sampler.training
    sampler.eval()
    try:
        samples = sample_batch(sampler, prompts, n=n, max_new_tokens=max_new_tokens, params=params,
                               stop_ids=stop_ids, seed=seed, max_batch=max_batch, tokenizer=tokenizer,
                               stop=tuple(stop), exact=exact)
    finally:
        sampler.train(was_training)
    rows, lps, group, reasons, lens = [], [], [], [], []
    for s in samples:
        prompt = prompts[s.prompt_index]
        row = completion_row(prompt, s.token_ids, seq_len, pad_id)
        lp = torch.zeros(seq_len, dtype=torch.float32)
        kept = min(len(s.token_ids), seq_len - len(prompt))
        # the token at row position p + k is predicted at position p + k - 1 (targets are shifted)
        lp[len(prompt) - 1:len(prompt) - 1 + kept] = torch.tensor(s.logprobs[:kept], dtype=torch.float32)
        rows.append(row)
        lps.append(lp)
        group.append(s.prompt_index)
        reasons.append(s.finish_reason)
        lens.append(kept)
    stacked = {k: torch.stack([r[k] for r in rows]) for k in rows[0]}
    return Rollouts(stacked, torch.tensor(group), torch.stack(lps), reasons, torch.tensor(lens),
                    [s.text for s in samples] if tokenizer is not None else None)


def learner_logprobs(model, rows: dict[str, Tensor]) -> Tensor:
    """(B, T) fp32 log-probs of the rows' targets under `model` (0 at ignored positions), with
    gradient: the trainer's side of the importance ratio and of any policy-gradient loss."""
    from .losses import token_logprobs

    h = model.hidden_states(rows["input_ids"], rows["positions"], segment_ids=rows["segment_ids"])
    return token_logprobs(h, model.embed_tokens.weight, rows["targets"],
                          softcap=model.config.final_logit_softcapping)


def mismatch_metrics(sampler_lp: Tensor, learner_lp: Tensor, mask: Tensor) -> dict[str, float]:
    """Sampler vs learner on the sampled tokens (x ~ sampler): k1 = E[log q - log p] and the
    always-positive k3 = E[r - 1 - log r], r = p / q, both estimating KL(sampler q || learner p) per
    token; the largest |log p - log q|."""
    n = int(mask.sum())
    if n == 0:
        return {"mismatch_kl_k1": 0.0, "mismatch_kl_k3": 0.0, "mismatch_max_abs_logratio": 0.0}
    log_r = (learner_lp.detach() - sampler_lp)[mask].double()
    return {"mismatch_kl_k1": float(-log_r.mean()),
            "mismatch_kl_k3": float((log_r.exp() - 1 - log_r).mean()),
            "mismatch_max_abs_logratio": float(log_r.abs().max())}


def truncated_ratios(learner_lp: Tensor, sampler_lp: Tensor, mask: Tensor, cap: float = 2.0) -> Tensor:
    """min(p_learner / q_sampler, cap) per token, detached (no gradient flows through the weight),
    1 at ignored positions; cap = 0 turns the correction off (all ones)."""
    if cap < 0:
        raise ValueError(f"the importance-ratio cap must be >= 0 (0: off), got {cap}")
    if cap == 0:
        return torch.ones_like(sampler_lp)
    r = (learner_lp.detach() - sampler_lp).exp().clamp(max=cap)
    return torch.where(mask, r, torch.ones_like(r))


def policy_gradient_loss(learner_lp: Tensor, advantages: Tensor, mask: Tensor, normalizer: float,
                         ratios: Tensor | None = None) -> Tensor:
    """-sum_t w_t A_t log p(x_t) / normalizer over the sampled tokens (REINFORCE with per-token or
    per-row advantages, broadcast to (B, T)); `ratios` the truncated importance weights w."""
    a = advantages if advantages.dim() == 2 else advantages[:, None].expand_as(learner_lp)
    w = torch.ones_like(learner_lp) if ratios is None else ratios
    return -(w * a * learner_lp * mask).sum() / normalizer
