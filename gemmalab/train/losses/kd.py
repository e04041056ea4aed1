"""Distillation as cross-entropy to a teacher target, on the vocabulary engine (`vocab.py`).

Every loss here is a cross-entropy between a teacher target distribution t_i and the student's
log-probabilities, summed over the target tokens and divided by `normalizer`:

    loss = sum_i sum_v t_i(v) * (-log p_S(v | x_<i)) / normalizer

which has the gradient of the KL(t_i || p_S) (the two differ by the target's entropy, a constant).
That is the Gemma 3 report's wording ("the student learns the teacher's distribution within these
samples via cross-entropy loss", spec gemma3.md 5.2) and it makes the sparse and the full losses
directly comparable: with the whole support sampled, the sampled loss *equals* the full one. For the
KL itself (an evaluation metric) use `kd_metrics`; for the KL as a loss, `divergences.forward_kl_loss`.

    sparse_kd_loss   t_i is sparse: K token ids per position with weights (Gemma's sampled-K, top-k, the
                     unbiased importance-weighted "Random Sampling KD" of arXiv 2503.16870). The
                     student is normalised over the full vocabulary (default) or over the sampled set.
    full_kd_loss     t_i = softmax(teacher logits / temperature) over the full vocabulary (forward KL,
                     Hinton et al. 2015; Gemma 2's pre-training loss). The teacher logits come chunk by
                     chunk from a callable (e.g. `teacher.head_logits(teacher_hidden, teacher_weight)`)
                     or from a (..., V) tensor such as a memory-mapped store of log-probabilities.
    hard_weight      both take a mix  alpha * CE(hard next token) + (1 - alpha) * soft,  the "hard +
                     soft targets" of Hinton et al.; alpha = 0 is pure distillation.
    kd_metrics       no-grad sums for evaluation: student CE on the data, KL(teacher || student), ...

Memory: the engine's (token chunk x V) arrays; with the sampled-set normaliser only the K sampled rows
of the embedding are touched (K x d per token), outside the engine.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .ce import _ce_rule, naive_logits
from .vocab import (TeacherFn, as_teacher_fn, check_shapes, log_softmax_, normalize, rowdot, selected_rows,
                    softmax_, vocab_map, vocab_sum, weighted)

__all__ = ["sparse_kd_loss", "full_kd_loss", "sparse_target_weights", "kd_metrics", "as_teacher_fn",
           "naive_sparse_kd_loss", "naive_full_kd_loss", "NORMALIZERS", "WEIGHTINGS"]

NORMALIZERS = ("vocab", "sampled")
WEIGHTINGS = ("renormalized", "importance")


# ---------------------------------------------------------------------------------------------------------
# Targets

def sparse_target_weights(probs: Tensor, counts: Tensor | None = None, *,
                          weighting: str = "renormalized") -> Tensor:
    """Weights t(v) of the sparse target from a store's (or sampler's) fields, shape of `probs`.

    probs: (..., K) teacher probabilities of the stored ids (0 in empty slots).
    counts: (..., K) how often each id was drawn (sampling with replacement).
    weighting:
      "renormalized"  Gemma 3 as written: the teacher's probabilities, zero outside the sampled set,
                      renormalised to sum to 1 over it. Exact when the set covers the support; a
                      biased estimate of the full target otherwise (it over-weights the sampled tail).
      "importance"    counts / K: the Monte-Carlo estimate of the teacher distribution, unbiased in
                      expectation, so the expected gradient equals the full-KD gradient. It is the
                      importance-sampled "Random Sampling KD" of arXiv 2503.16870 with the teacher as
                      proposal (the weights p/q are then 1). Needs sampling with replacement.
    Positions without any stored id get all-zero weights.
    """
    if weighting == "renormalized":
        p = probs.float()
        return p / p.sum(-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    if weighting == "importance":
        if counts is None:
            raise ValueError("weighting='importance' needs draw counts: sample with replacement "
                             "(the store was built without replacement, or is a top-k store)")
        c = counts.float()
        return c / c.sum(-1, keepdim=True).clamp_min(1.0)
    raise ValueError(f"unknown weighting {weighting!r}; use one of {', '.join(WEIGHTINGS)}")


def check_hard_weight(hard_weight: float) -> None:
    if not 0.0 <= hard_weight <= 1.0:
        raise ValueError(f"hard_weight must be in [0, 1], got {hard_weight}")


def check_teacher(teacher_logits, targets: Tensor, temperature: float) -> None:
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if isinstance(teacher_logits, Tensor) and teacher_logits.shape[:-1] != targets.shape:
        raise ValueError(f"teacher logits {tuple(teacher_logits.shape)} must be targets' shape "
                         f"{tuple(targets.shape)} plus the vocabulary")


def sparse_entries(ids: Tensor, weights: Tensor, targets: Tensor, rows: Tensor) -> tuple[Tensor, Tensor]:
    """The selected rows' (ids (n, K) int64, weights (n, K) fp32), weight 0 in empty slots (id -1)."""
    if ids.shape[:-1] != targets.shape or weights.shape != ids.shape:
        raise ValueError(f"ids {tuple(ids.shape)} and weights {tuple(weights.shape)} must be "
                         f"targets' shape {tuple(targets.shape)} plus a K dimension")
    K = ids.shape[-1]
    sel_ids = ids.reshape(-1, K)[rows].long()
    sel_w = weights.reshape(-1, K)[rows].float() * (sel_ids >= 0)
    return sel_ids, sel_w


# ---------------------------------------------------------------------------------------------------------
# Sparse targets: Gemma's sampled-K, top-k, Random Sampling KD

def _sparse_rule(ids: Tensor, w: Tensor):
    """sum_k w_k (lse - z[id_k]); gradient (sum_k w_k) softmax - sum_k w_k onehot(id_k)."""
    wsum = w.sum(1)

    def rule(z, sl, up):
        idx, wk = ids[sl], w[sl]
        picked = rowdot(z.gather(1, idx), wk)  # sum_k w_k z[id_k]
        lse = softmax_(z)
        loss = wsum[sl] * lse - picked
        if up is None:
            return (loss,), None
        g = z.mul_(wsum[sl, None]).scatter_add_(1, idx, -wk)
        return (loss,), weighted(g, up[0])
    return rule


def sparse_kd_loss(hidden: Tensor, weight: Tensor, targets: Tensor, ids: Tensor, weights: Tensor, *,
                   normalizer_over: str = "vocab", hard_weight: float = 0.0,
                   softcap: float | None = None, ignore_index: int = -100,
                   normalizer: float | Tensor | None = None, token_chunk: int = 1024,
                   vocab_chunk: int = 32768) -> Tensor:
    """Cross-entropy of the student against a sparse teacher target, chunked.

    hidden (..., d), weight (V, d): as for `chunked_cross_entropy` (final-norm hidden states and the
        tied embedding table).
    targets (...): the next-token ids; positions equal to `ignore_index` carry no loss. They also
        serve the hard part of the mix when hard_weight > 0.
    ids (..., K): token ids of the sparse target (-1 marks an empty slot); weights (..., K): t(v),
        e.g. from `sparse_target_weights`. Ids must be unique within a position (the store and the
        samplers write each id once, with its count).
    normalizer_over: "vocab" (default): log p_S over the full vocabulary, the plain-CE reading of the
        report; "sampled": a softmax restricted to the position's sampled set ("the teacher's
        distribution within these samples"), which costs K x d per token instead of V x d.
    hard_weight: alpha of  alpha * CE(targets) + (1 - alpha) * soft.
    """
    check_shapes(hidden, weight, targets)
    check_hard_weight(hard_weight)
    if normalizer_over not in NORMALIZERS:
        raise ValueError(f"normalizer_over must be one of {', '.join(NORMALIZERS)}, not {normalizer_over!r}")
    h, t, valid, rows = selected_rows(hidden, targets, ignore_index)
    sel_ids, sel_w = sparse_entries(ids, weights, targets, rows)
    if normalizer_over == "vocab":
        sel_ids = sel_ids.clamp(min=0)  # an empty slot reads id 0 with weight 0
        if hard_weight > 0:  # the hard target joins the sparse set: one pass over the vocabulary
            sel_ids = torch.cat([sel_ids, t[rows, None]], 1)
            sel_w = torch.cat([sel_w * (1 - hard_weight), torch.full_like(sel_w[:, :1], hard_weight)], 1)
        loss_sum = vocab_sum(h, weight, rows, _sparse_rule(sel_ids, sel_w), softcap=softcap,
                             token_chunk=token_chunk, vocab_chunk=vocab_chunk)
    else:
        K = ids.shape[-1]
        loss_sum = _SampledSetCE.apply(h, weight, rows, sel_ids, sel_w, softcap,
                                       max(1, min(token_chunk, 2 ** 22 // max(1, K * h.shape[1]))))
        if hard_weight > 0:
            loss_sum = (1 - hard_weight) * loss_sum + hard_weight * vocab_sum(
                h, weight, rows, _ce_rule(t[rows]), softcap=softcap, token_chunk=token_chunk,
                vocab_chunk=vocab_chunk)
    return normalize(loss_sum, valid, normalizer)


class _SampledSetCE(torch.autograd.Function):
    """sum_i sum_k w_ik (lse_S_i - z_i,id_ik) with lse over the position's own sampled ids only.

    Not a vocabulary pass: gathers the K embedding rows of each token (token chunks of (t, K, d));
    backward recomputes them and scatters the weight gradient into those rows.
    """

    @staticmethod
    def _logits(hidden, weight, rows, ids, sl, softcap):
        h = hidden.index_select(0, rows[sl]).float()  # (t, d)
        idc = ids[sl]
        wg = weight[idc.clamp(min=0)].float()  # (t, K, d)
        z = torch.bmm(wg, h[:, :, None]).squeeze(-1)  # (t, K)
        th = None
        if softcap is not None:
            th = torch.tanh(z / softcap)
            z = th * softcap
        return h, idc, wg, z.masked_fill(idc < 0, float("-inf")), th

    @staticmethod
    def forward(ctx, hidden, weight, rows, ids, w, softcap, token_chunk):
        n = rows.numel()
        lse = torch.zeros(n, dtype=torch.float32, device=hidden.device)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for n0 in range(0, n, token_chunk):
            sl = slice(n0, n0 + token_chunk)
            _, idc, _, z, _ = _SampledSetCE._logits(hidden, weight, rows, ids, sl, softcap)
            chunk_lse = z.logsumexp(1)
            chunk_lse = torch.where(torch.isfinite(chunk_lse), chunk_lse, 0.0)  # no sampled id at all
            lse[sl] = chunk_lse
            total += torch.where(idc >= 0, w[sl] * (chunk_lse[:, None] - z), 0.0).sum()
        ctx.save_for_backward(hidden, weight, rows, ids, w, lse)
        ctx.softcap, ctx.token_chunk = softcap, token_chunk
        return total

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, rows, ids, w, lse = ctx.saved_tensors
        cap, tc = ctx.softcap, ctx.token_chunk
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        n = rows.numel()
        scale = grad_out.float()
        grad_h = torch.zeros(n, hidden.shape[1], dtype=torch.float32, device=hidden.device) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        for n0 in range(0, n, tc):
            sl = slice(n0, n0 + tc)
            h, idc, wg, z, th = _SampledSetCE._logits(hidden, weight, rows, ids, sl, cap)
            valid = idc >= 0
            p = torch.where(valid, (z - lse[sl, None]).exp(), 0.0)
            g = (p * w[sl].sum(1, keepdim=True) - torch.where(valid, w[sl], 0.0)) * scale  # (t, K)
            if th is not None:
                g = g * (1 - th.square())
            if need_h:
                grad_h[sl] = torch.bmm(g[:, None, :], wg).squeeze(1)
            if need_w:
                grad_w.index_add_(0, idc.clamp(min=0).reshape(-1),
                                  (g[:, :, None] * h[:, None, :]).reshape(-1, h.shape[1]))
        grad_hidden = None
        if need_h:
            grad_hidden = torch.zeros_like(hidden)
            grad_hidden.index_copy_(0, rows, grad_h.to(hidden.dtype))
        return (grad_hidden, grad_w.to(weight.dtype) if need_w else None,
                None, None, None, None, None)


# ---------------------------------------------------------------------------------------------------------
# Full-vocabulary KD (forward KL, written as cross-entropy)

def teacher_log_probs(teacher_fn: TeacherFn, rows: Tensor, V: int, temperature: float) -> Tensor:
    """log softmax(teacher logits / temperature) of a chunk's rows, (t, V) fp32 (a fresh tensor)."""
    zt = teacher_fn(rows, 0, V).float()
    if temperature != 1.0:
        zt.div_(temperature)
    log_softmax_(zt)
    return zt


def _full_kd_rule(rows: Tensor, tgt: Tensor, teacher_fn: TeacherFn, tau: float, alpha: float):
    """alpha (lse - z[y]) + (1 - alpha) (lse - E_t[z]); gradient softmax - (1 - alpha) t - alpha onehot."""
    def rule(z, sl, up):
        pt = teacher_log_probs(teacher_fn, rows[sl], z.shape[1], tau).exp_()
        y = tgt[sl, None]
        soft = rowdot(pt, z)  # E_t[z_S], before z is overwritten
        hard = z.gather(1, y).squeeze(1) if alpha else None
        lse = softmax_(z)
        loss = lse - soft if not alpha else lse - (1 - alpha) * soft - alpha * hard
        if up is None:
            return (loss,), None
        if alpha != 1:
            g = z.sub_(pt if not alpha else pt.mul_(1 - alpha))
        else:
            g = z
        del pt  # free the teacher chunk before the next one is formed
        if alpha:
            g.scatter_add_(1, y, torch.full(y.shape, -alpha, device=g.device))
        return (loss,), weighted(g, up[0])
    return rule


def full_kd_loss(hidden: Tensor, weight: Tensor, targets: Tensor, teacher_logits: Tensor | TeacherFn, *,
                 temperature: float = 1.0, hard_weight: float = 0.0, softcap: float | None = None,
                 ignore_index: int = -100, normalizer: float | Tensor | None = None,
                 token_chunk: int = 1024, vocab_chunk: int = 32768) -> Tensor:
    """Cross-entropy H(t, p_S) to the full teacher distribution t = softmax(teacher_logits / T), chunked.

    teacher_logits: a (..., V) tensor aligned with `hidden` (logits or log-probabilities, any float
        dtype, read one chunk at a time), or a callable (flat token indices, v0, v1) -> (n, v1 - v0)
        such as `teacher.head_logits(teacher_hidden, teacher_weight)` that computes the teacher's
        logits chunk by chunk from its final hidden states.
    temperature: applies to the teacher only (the student is trained at temperature 1, as in
        Gemma 2/3 pre-training distillation); `forward_kl_loss` divides both sides, as GKD does.
    Value = KL(t || p_S) + H(t) per token; the gradient is that of the forward KL.
    """
    check_shapes(hidden, weight, targets)
    check_hard_weight(hard_weight)
    check_teacher(teacher_logits, targets, temperature)
    h, t, valid, rows = selected_rows(hidden, targets, ignore_index)
    rule = _full_kd_rule(rows, t[rows], as_teacher_fn(teacher_logits), temperature, hard_weight)
    loss_sum = vocab_sum(h, weight, rows, rule, softcap=softcap, buffers=2, token_chunk=token_chunk,
                         vocab_chunk=vocab_chunk)
    return normalize(loss_sum, valid, normalizer)


def _metrics_rule(rows: Tensor, tgt: Tensor, teacher_fn: TeacherFn, tau: float):
    """(student CE, KL(t || p_S), teacher CE, H(t)) per token; no gradient."""
    def rule(z, sl, up):
        lt = teacher_log_probs(teacher_fn, rows[sl], z.shape[1], tau)
        y = tgt[sl, None]
        log_softmax_(z)
        pt = lt.exp()
        lt.nan_to_num_(neginf=0.0)  # 0 * log 0 = 0 where the teacher has no mass
        entropy = -rowdot(pt, lt)
        cross = -rowdot(pt, z)
        return (-z.gather(1, y).squeeze(1), cross - entropy, -lt.gather(1, y).squeeze(1), entropy), None
    return rule


@torch.no_grad()
def kd_metrics(hidden: Tensor, weight: Tensor, targets: Tensor,
               teacher_logits: Tensor | TeacherFn | None = None, *, temperature: float = 1.0,
               softcap: float | None = None, ignore_index: int = -100, token_chunk: int = 1024,
               vocab_chunk: int = 32768) -> dict[str, float]:
    """Sums over the target tokens, for evaluation (divide by "tokens" for means, in nats):

    ce          -log p_S(next token): the student's cross-entropy on the data
    kl          KL(t || p_S), t = softmax(teacher_logits / temperature)   (with a teacher)
    teacher_ce  -log t(next token)                                         (with a teacher)
    teacher_entropy  H(t)                                                  (with a teacher)
    """
    check_shapes(hidden, weight, targets)
    h, t, valid, rows = selected_rows(hidden, targets, ignore_index)
    kw = dict(softcap=softcap, token_chunk=token_chunk, vocab_chunk=vocab_chunk)
    if teacher_logits is None:
        (ce,) = vocab_map(h, weight, rows, _ce_rule(t[rows]), **kw)
        return {"tokens": float(rows.numel()), "ce": float(ce.sum())}
    rule = _metrics_rule(rows, t[rows], as_teacher_fn(teacher_logits), temperature)
    ce, kl, teacher_ce, entropy = vocab_map(h, weight, rows, rule, n_out=4, buffers=3, **kw)
    return {"tokens": float(rows.numel()), "ce": float(ce.sum()), "kl": float(kl.sum()),
            "teacher_ce": float(teacher_ce.sum()), "teacher_entropy": float(entropy.sum())}


# ---------------------------------------------------------------------------------------------------------
# Naive references (full logits; tests and tiny vocabularies only)

def naive_sparse_kd_loss(hidden, weight, targets, ids, weights, *, normalizer_over="vocab",
                         hard_weight=0.0, softcap=None, ignore_index=-100, normalizer=None) -> Tensor:
    """Reference for `sparse_kd_loss` with full (N, V) logits and a dense target."""
    logits = naive_logits(hidden, weight, softcap)
    N, V = logits.shape
    t = targets.reshape(-1)
    valid = t != ignore_index
    K = ids.shape[-1]
    idf, wf = ids.reshape(-1, K).long(), weights.reshape(-1, K).float()
    dense = torch.zeros(N, V).scatter_add(1, idf.clamp(min=0), torch.where(idf >= 0, wf, 0.0))
    if normalizer_over == "vocab":
        logp = F.log_softmax(logits, -1)
    else:
        member = torch.zeros(N, V).scatter_add(1, idf.clamp(min=0), (idf >= 0).float()) > 0
        logp = F.log_softmax(logits.masked_fill(~member, float("-inf")), -1)
    soft = -(dense * torch.where(dense > 0, logp, 0.0)).sum(1)
    hard = F.cross_entropy(logits, t.clamp(min=0), reduction="none")
    per_token = (1 - hard_weight) * soft + hard_weight * hard
    return normalize(torch.where(valid, per_token, 0.0).sum(), valid, normalizer)


def naive_full_kd_loss(hidden, weight, targets, teacher_logits, *, temperature=1.0, hard_weight=0.0,
                       softcap=None, ignore_index=-100, normalizer=None) -> Tensor:
    """Reference for `full_kd_loss`: full student and teacher logits in memory."""
    logits = naive_logits(hidden, weight, softcap)
    t = targets.reshape(-1)
    valid = t != ignore_index
    p_t = F.softmax(teacher_logits.reshape(logits.shape).float() / temperature, -1)
    logp = F.log_softmax(logits, -1)
    soft = -(p_t * logp).sum(1)
    hard = F.cross_entropy(logits, t.clamp(min=0), reduction="none")
    per_token = (1 - hard_weight) * soft + hard_weight * hard
    return normalize(torch.where(valid, per_token, 0.0).sum(), valid, normalizer)
