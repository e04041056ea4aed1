"""Policy-gradient pieces for REINFORCE / RLOO with a KL to the reference (imports torch only).

    rloo_advantages(R, valid)    A_i = R_i - mean_{j != i} R_j over the scored samples of a prompt's
                                 group (Kool, van Hoof & Welling 2019, "Buy 4 REINFORCE samples, get a
                                 baseline for free!"; Ahmadian et al. 2024, "Back to basics"): an
                                 unbiased gradient, since the baseline does not depend on sample i
    reinforce_advantages(R, valid, baseline)   A = R (baseline "none") or R - the batch mean
    sequence_kl_k1(lp, ref_lp, mask)           sum_t (log pi - log ref) along each sample
    sequence_kl_k3(lp, ref_lp, mask)           sum_t (r - 1 - log r), r = ref / pi

KL estimators (Schulman 2020, "Approximating KL divergence"). "k1 in the reward" is the default:
R_i = r_i - beta * sum_t (log pi(y_t) - log ref(y_t)), detached, so the score-function gradient of
E[R] is exactly the gradient of E[r] - beta KL(pi || ref) (tested on an exact categorical policy).
"k3 in the loss" (GRPO's form: beta * sum_t k3_t added to the loss and differentiated directly) has
a biased gradient: d/dtheta E[k3] taken along the samples without the score-function term is the
gradient of the forward KL(ref || pi) to first order, not of KL(pi || ref) (TRL #4637, verl
PR #2953); it is offered for comparison only, with that bias documented and tested.
"exact": the full-vocabulary per-token KL(pi || ref) at each sampled position, summed along the
sample, both as a detached reward penalty (its score-function part) and differentiated in the loss
(its pathwise part): together the exact gradient of the sequence KL (chain rule of KL over tokens).
"""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["rloo_advantages", "reinforce_advantages", "sequence_kl_k1", "sequence_kl_k3",
           "token_kl_k3"]


def rloo_advantages(rewards: Tensor, valid: Tensor) -> Tensor:
    """(P, G) rewards of G samples per prompt -> (P, G) leave-one-out advantages. Samples with
    valid = False (unscorable) get 0 and are left out of the others' baselines; a group with one
    scored sample has no baseline, so its advantage is 0 (no signal rather than a biased one)."""
    if rewards.dim() != 2 or rewards.shape != valid.shape:
        raise ValueError(f"rewards and valid must both be (prompts, samples), got {tuple(rewards.shape)} "
                         f"and {tuple(valid.shape)}")
    r = torch.where(valid, rewards, torch.zeros_like(rewards)).double()
    n = valid.sum(1, keepdim=True).double()
    others = (r.sum(1, keepdim=True) - r) / (n - 1).clamp(min=1)
    adv = torch.where(valid & (n > 1), r - others, torch.zeros_like(r))
    return adv.to(rewards.dtype)


def reinforce_advantages(rewards: Tensor, valid: Tensor, baseline: str = "none") -> Tensor:
    """Plain REINFORCE (Williams 1992): the reward itself ("none"), or minus the mean over the
    batch's scored samples ("batch_mean": slightly biased in a finite batch, like any baseline that
    includes the sample)."""
    if baseline not in ("none", "batch_mean"):
        raise ValueError(f"unknown REINFORCE baseline {baseline!r}; use 'none' or 'batch_mean'")
    r = torch.where(valid, rewards, torch.zeros_like(rewards))
    if baseline == "batch_mean" and valid.any():
        r = torch.where(valid, r - rewards[valid].mean(), r)
    return r


def sequence_kl_k1(logprobs: Tensor, ref_logprobs: Tensor, mask: Tensor) -> Tensor:
    """(B, T) log-probs of the sampled tokens under the policy and the reference -> (B,) k1 sums."""
    return ((logprobs - ref_logprobs) * mask).sum(-1)


def token_kl_k3(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """k3 = r - 1 - log r per token, r = ref / pi (non-negative; differentiable in logprobs)."""
    log_r = ref_logprobs - logprobs
    return log_r.exp() - 1 - log_r


def sequence_kl_k3(logprobs: Tensor, ref_logprobs: Tensor, mask: Tensor) -> Tensor:
    return (token_kl_k3(logprobs, ref_logprobs) * mask).sum(-1)
