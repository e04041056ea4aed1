"""Divergences between the teacher's and the student's token distributions, on the vocabulary engine:
GKD's generalized Jensen-Shannon divergence JSD(beta) and its two ends, forward and reverse KL
(Agarwal et al. 2024, "On-policy distillation of language models: learning from self-generated
mistakes", spec post_training.md A.4).

With P = teacher, Q = student, both at the same temperature tau (softmax(logits / tau), as in GKD and
TRL's GKDTrainer; `kd.full_kd_loss` instead divides the teacher only), and M = beta P + (1 - beta) Q:

    JSD(beta) = beta KL(P || M) + (1 - beta) KL(Q || M)

JSD(beta) -> 0 at both ends (M -> Q at beta = 0, M -> P at beta = 1), like beta KL(P || Q) and
(1 - beta) KL(Q || P). Two scales:

    scale="paper"       JSD(beta) itself; exactly 0 (and zero gradient) at beta in {0, 1}.
    scale="normalized"  JSD(beta) / (beta (1 - beta)), which is continuous on [0, 1] with the ends
                        forward KL(P || Q) at beta = 0 and reverse KL(Q || P) at beta = 1, returned
                        exactly there. (TRL's `GKDTrainer.generalized_jsd_loss` returns JSD(beta)
                        inside (0, 1) but the full KLs at exactly 0 and 1: its loss jumps by a factor
                        1 / beta at the ends.)
                        At beta = 1/2 it is 4 JS(P, Q), at most 4 log 2.

Value per token, in nats; the sum is divided by `normalizer` as everywhere in `train.losses`. The
gradient with respect to the student's logits s: d JSD / d Q_j = (1 - beta) log(Q_j / M_j) (the other
terms cancel), so d / d s = Q (a - E_Q[a]) / tau with a = (1 - beta) log(Q / M), scaled like the value.

Numerics: log(Q / M) and log(P / M) are formed from d = log P - log Q as softplus terms, accurate to
fp32 rounding for any beta (the naive logaddexp loses the O(beta) term of log(Q / M) near beta = 0,
which the normalized scale divides by beta). Teacher entries of probability 0 (-inf logits) are fine
for JSD (bounded); reverse KL is then infinite where the student has mass.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .ce import naive_logits
from .kd import check_teacher, teacher_log_probs
from .vocab import (DEFAULT_BUDGET, TeacherFn, as_teacher_fn, check_shapes, log_softmax_, normalize,
                    rowdot, selected_rows, vocab_sum, weighted, zero_loss)

__all__ = ["generalized_jsd", "forward_kl_loss", "reverse_kl_loss", "naive_generalized_jsd",
           "naive_reverse_kl_loss", "JSD_SCALES"]

JSD_SCALES = ("normalized", "paper")


def _student_log_probs(z: Tensor, tau: float) -> Tensor:
    if tau != 1.0:
        z.div_(tau)
    log_softmax_(z)
    return z


def _forward_kl_rule(rows, teacher_fn, tau):
    """KL(P || Q) = sum P (log P - log Q); gradient (Q - P) / tau."""
    def rule(z, sl, up):
        lq = _student_log_probs(z, tau)
        lp = teacher_log_probs(teacher_fn, rows[sl], z.shape[1], tau)
        p = lp.exp()
        lp.nan_to_num_(neginf=0.0)  # 0 log 0 = 0
        loss = rowdot(p, lp) - rowdot(p, lq)
        if up is None:
            return (loss,), None
        g = lq.exp_().sub_(p).div_(tau)
        return (loss,), weighted(g, up[0])
    return rule


def _reverse_kl_rule(rows, teacher_fn, tau):
    """KL(Q || P) = sum Q (log Q - log P); gradient Q (a - E_Q[a]) / tau with a = log Q - log P."""
    def rule(z, sl, up):
        lq = _student_log_probs(z, tau)
        a = teacher_log_probs(teacher_fn, rows[sl], z.shape[1], tau).neg_().add_(lq)  # log Q - log P
        q = lq.exp_()
        loss = rowdot(q, a)
        if up is None:
            return (loss,), None
        g = q.mul_(a.sub_(loss[:, None])).div_(tau)
        return (loss,), weighted(g, up[0])
    return rule


def _jsd_rule(rows, teacher_fn, tau, beta, normalized):
    """JSD(beta) for 0 < beta < 1, or JSD(beta) / (beta (1 - beta)) when normalized."""
    c = math.log(beta) - math.log1p(-beta)  # log(beta / (1 - beta))
    kp, kq = (1 / (1 - beta), 1 / beta) if normalized else (beta, 1 - beta)  # weights of the two KLs

    def rule(z, sl, up):
        lq = _student_log_probs(z, tau)
        lp = teacher_log_probs(teacher_fn, rows[sl], z.shape[1], tau)
        x = lp.sub(lq)  # d = log P - log Q
        if beta <= 0.5:  # log(Q / M) = -log(1 - beta) - softplus(c + d), O(beta) near beta = 0
            rq = F.softplus(x.add_(c)).neg_().sub_(math.log1p(-beta))
            rp = x.sub_(c).add_(rq)  # log(P / M) = d + log(Q / M)
        else:  # log(P / M) = -log(beta) - softplus(-c - d), O(1 - beta) near beta = 1
            rp = F.softplus(x.add_(c).neg_()).neg_().sub_(math.log(beta))
            rq = x.add_(c).add_(rp)  # log(Q / M) = log(P / M) - d
            rq.nan_to_num_(nan=-math.log1p(-beta))  # P = 0: log(Q / M) = -log(1 - beta) exactly
        rp.nan_to_num_(nan=0.0, neginf=0.0)  # P = 0: the P log(P / M) term is 0
        p, q = lp.exp_(), lq.exp_()
        eq = rowdot(q, rq)  # E_Q[log(Q / M)] = KL(Q || M)
        loss = kp * rowdot(p, rp) + kq * eq
        if up is None:
            return (loss,), None
        g = q.mul_(rq.sub_(eq[:, None])).mul_(kq / tau)
        return (loss,), weighted(g, up[0])
    return rule


def generalized_jsd(hidden: Tensor, weight: Tensor, targets: Tensor, teacher_logits: Tensor | TeacherFn, *,
                    beta: float = 0.5, temperature: float = 1.0, scale: str = "normalized",
                    softcap: float | None = None, ignore_index: int = -100,
                    normalizer: float | Tensor | None = None, token_chunk: int = 1024,
                    vocab_chunk: int = 32768, logits_budget: int = DEFAULT_BUDGET) -> Tensor:
    """GKD's generalized JSD(beta) between the teacher P and the student Q at `temperature`, chunked.

    hidden (..., d), weight (V, d), targets (...): the student's final hidden states, its tied
        embedding and the positions to score (entries equal to `ignore_index` carry no loss; the
        target ids themselves are not used).
    teacher_logits: a (..., V) tensor aligned with hidden (logits or log-probabilities) or a callable
        (flat token indices, v0, v1) -> (n, v1 - v0) logits such as `teacher.head_logits(...)`, which
        projects the teacher's hidden states chunk by chunk.
    beta: in [0, 1]; the mixture is beta P + (1 - beta) Q (TRL's convention since its PR #3043).
    scale: "normalized" (default): JSD / (beta (1 - beta)), forward KL at beta = 0 and reverse KL at
        beta = 1; "paper": JSD(beta) itself (see the module docstring).
    """
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    if scale not in JSD_SCALES:
        raise ValueError(f"scale must be one of {', '.join(JSD_SCALES)}, not {scale!r}")
    check_shapes(hidden, weight, targets)
    check_teacher(teacher_logits, targets, temperature)
    h, t, valid, rows = selected_rows(hidden, targets, ignore_index)
    teacher_fn = as_teacher_fn(teacher_logits)
    if beta in (0.0, 1.0):
        if scale == "paper":  # JSD(0) = JSD(1) = 0: the mixture is one of the two distributions
            return normalize(zero_loss(hidden, weight), valid, normalizer)
        make = _forward_kl_rule if beta == 0.0 else _reverse_kl_rule
        rule, buffers = make(rows, teacher_fn, temperature), 3 if beta == 0.0 else 2
    else:
        rule, buffers = _jsd_rule(rows, teacher_fn, temperature, beta, scale == "normalized"), 4
    loss_sum = vocab_sum(h, weight, rows, rule, softcap=softcap, buffers=buffers, token_chunk=token_chunk,
                         vocab_chunk=vocab_chunk, logits_budget=logits_budget)
    return normalize(loss_sum, valid, normalizer)


def forward_kl_loss(hidden: Tensor, weight: Tensor, targets: Tensor, teacher_logits: Tensor | TeacherFn,
                    **kw) -> Tensor:
    """KL(P || Q) with both distributions at `temperature` (mean-seeking): `generalized_jsd` at
    beta = 0, normalized. At temperature 1 its gradient equals `full_kd_loss`'s (hard_weight 0), whose
    value is this KL plus the teacher's entropy."""
    return generalized_jsd(hidden, weight, targets, teacher_logits, beta=0.0, scale="normalized", **kw)


def reverse_kl_loss(hidden: Tensor, weight: Tensor, targets: Tensor, teacher_logits: Tensor | TeacherFn,
                    **kw) -> Tensor:
    """KL(Q || P), the student's divergence from the teacher (mode-seeking), both at `temperature`:
    `generalized_jsd` at beta = 1, normalized. Infinite where the teacher has probability 0 and the
    student does not."""
    return generalized_jsd(hidden, weight, targets, teacher_logits, beta=1.0, scale="normalized", **kw)


# ---------------------------------------------------------------------------------------------------------
# Naive references (full logits in float64; tests and tiny vocabularies only)

def naive_generalized_jsd(hidden, weight, targets, teacher_logits, *, beta=0.5, temperature=1.0,
                          scale="normalized", softcap=None, ignore_index=-100, normalizer=None) -> Tensor:
    """Reference for `generalized_jsd` from the definition, with full float64 logits (the result is
    fp32). The KL terms are written with torch.xlogy, so 0 log 0 = 0."""
    logits = naive_logits(hidden, weight, softcap, torch.float64)
    t = targets.reshape(-1)
    valid = t != ignore_index
    p = F.softmax(teacher_logits.reshape(logits.shape).double() / temperature, -1)
    q = F.softmax(logits / temperature, -1)

    def kl(a, b):
        return (torch.xlogy(a, a) - torch.xlogy(a, b)).sum(1)
    if beta == 0.0 and scale == "normalized":
        per_token = kl(p, q)
    elif beta == 1.0 and scale == "normalized":
        per_token = kl(q, p)
    else:
        m = beta * p + (1 - beta) * q
        per_token = beta * kl(p, m) + (1 - beta) * kl(q, m)
        if scale == "normalized":
            per_token = per_token / (beta * (1 - beta))
    loss = torch.where(valid, per_token, 0.0).sum().float()
    return normalize(loss, valid, normalizer)


def naive_reverse_kl_loss(hidden, weight, targets, teacher_logits, *, temperature=1.0, softcap=None,
                          ignore_index=-100, normalizer=None) -> Tensor:
    """Reference for `reverse_kl_loss`: sum Q (log Q - log P) with full float64 log-softmaxes."""
    logits = naive_logits(hidden, weight, softcap, torch.float64)
    t = targets.reshape(-1)
    valid = t != ignore_index
    lq = F.log_softmax(logits / temperature, -1)
    lp = F.log_softmax(teacher_logits.reshape(logits.shape).double() / temperature, -1)
    per_token = (lq.exp() * (lq - lp)).sum(1)
    return normalize(torch.where(valid, per_token, 0.0).sum().float(), valid, normalizer)
