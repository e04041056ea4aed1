"""Distillation losses over Gemma's 262k vocabulary, chunked like `train.losses.chunked_cross_entropy`.

Every loss here is a cross-entropy between a teacher target distribution t_i and the student's
log-probabilities, summed over the target tokens and divided by `normalizer`:

    loss = sum_i sum_v t_i(v) * (-log p_S(v | x_<i)) / normalizer

which has the gradient of the KL(t_i || p_S) (the two differ by the target's entropy, a constant).
That is the Gemma 3 report's wording ("the student learns the teacher's distribution within these
samples via cross-entropy loss", spec gemma3.md 5.2) and it makes the sparse and the full losses
directly comparable: with the whole support sampled, the sampled loss *equals* the full one. For the
KL itself (an evaluation metric) use `kd_metrics`.

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

Plain next-token cross-entropy is `train.losses.chunked_cross_entropy`.

Memory. No (tokens x vocab) tensor beyond a (token_chunk x vocab_chunk) chunk: forward keeps a few
numbers per token (logsumexps, running sums), backward recomputes the logits chunk by chunk and forms
the gradient d loss / d logits on the spot, exactly as the chunked cross-entropy does. With the
sampled-set normaliser only the K sampled rows of the embedding are touched (K x d per token).

Normalisation: the contract of `train.losses`: the default normalizer is the number of target tokens
(targets != ignore_index) in this call; pass the global count of the optimizer step when accumulating
micro-batches or all-reducing across processes (divided by the world size under DDP, which averages).

Numerics: logits, logsumexps and gradients in fp32 whatever the input dtype; gradients come back in
the dtypes of `hidden` and `weight`.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from .losses import _chunk, _normalize, _workspace

__all__ = ["sparse_kd_loss", "full_kd_loss", "sparse_target_weights", "kd_metrics", "as_teacher_fn",
           "naive_sparse_kd_loss", "naive_full_kd_loss", "NORMALIZERS", "WEIGHTINGS"]

# (flat token indices (n,), v0, v1) -> (n, v1 - v0) logits: a fresh tensor, which the losses overwrite.
TeacherFn = Callable[[Tensor, int, int], Tensor]
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


def as_teacher_fn(teacher_logits: Tensor | TeacherFn) -> TeacherFn:
    """A callable (flat token indices, v0, v1) -> fp32 (n, v1 - v0) teacher logits (a new tensor).

    A tensor (..., V) of logits or log-probabilities (any float dtype; a memory-mapped store is read
    chunk by chunk, never whole) is wrapped; a callable is returned as is.
    """
    if callable(teacher_logits):
        return teacher_logits
    flat = teacher_logits.reshape(-1, teacher_logits.shape[-1])

    def fn(rows: Tensor, v0: int, v1: int) -> Tensor:
        return flat[rows.to(flat.device), v0:v1].float()
    return fn


def _check_shapes(hidden: Tensor, weight: Tensor, targets: Tensor) -> None:
    if hidden.shape[:-1] != targets.shape:
        raise ValueError(f"hidden {tuple(hidden.shape)} and targets {tuple(targets.shape)} disagree: "
                         "targets need the leading shape of hidden")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight {tuple(weight.shape)} must be (vocab, {hidden.shape[-1]})")


def _check_alpha(hard_weight: float) -> None:
    if not 0.0 <= hard_weight <= 1.0:
        raise ValueError(f"hard_weight must be in [0, 1], got {hard_weight}")


# ---------------------------------------------------------------------------------------------------------
# Sparse targets: Gemma's sampled-K, top-k, Random Sampling KD

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
    _check_shapes(hidden, weight, targets)
    _check_alpha(hard_weight)
    if ids.shape[:-1] != targets.shape or weights.shape != ids.shape:
        raise ValueError(f"ids {tuple(ids.shape)} and weights {tuple(weights.shape)} must be "
                         f"targets' shape {tuple(targets.shape)} plus a K dimension")
    if normalizer_over not in NORMALIZERS:
        raise ValueError(f"normalizer_over must be one of {', '.join(NORMALIZERS)}, not {normalizer_over!r}")
    K = ids.shape[-1]
    h = hidden.reshape(-1, hidden.shape[-1])
    t = targets.reshape(-1)
    valid = t != ignore_index
    rows = valid.nonzero().squeeze(1)
    sel_ids = ids.reshape(-1, K)[rows].long()
    sel_w = weights.reshape(-1, K)[rows].float() * (sel_ids >= 0)
    if normalizer_over == "vocab":
        if hard_weight > 0:  # the hard target joins the sparse set: one pass over the vocabulary
            sel_ids = torch.cat([sel_ids, t[rows, None]], 1)
            sel_w = torch.cat([sel_w * (1 - hard_weight),
                               torch.full_like(sel_w[:, :1], hard_weight)], 1)
        loss_sum = _SparseTargetCE.apply(h, weight, rows, sel_ids, sel_w, softcap, token_chunk,
                                         vocab_chunk)
    else:
        loss_sum = _SampledSetCE.apply(h, weight, rows, sel_ids, sel_w, softcap,
                                       max(1, min(token_chunk, 2 ** 22 // max(1, K * h.shape[1]))))
        if hard_weight > 0:
            from .losses import chunked_cross_entropy
            loss_sum = (1 - hard_weight) * loss_sum + hard_weight * chunked_cross_entropy(
                hidden, weight, targets, softcap=softcap, ignore_index=ignore_index, normalizer=1.0,
                token_chunk=token_chunk, vocab_chunk=vocab_chunk)
    return _normalize(loss_sum, valid, normalizer)


def _softcap_grad(g: Tensor, th: Tensor | None) -> Tensor:
    return g if th is None else g.mul_(th.square_().neg_().add_(1.0))  # d cap*tanh(z/cap)/dz


def _entries_by_chunk(ids: Tensor, w: Tensor, n_tokens: int, token_chunk: int, vocab_chunk: int):
    """The sparse entries grouped by (vocabulary chunk, token chunk), computed once per call.

    Returns (rows, local ids, weights, offsets): entries of block (c, t) are [offsets[c*T + t],
    offsets[c*T + t + 1]) of the flat arrays, with rows relative to the token chunk. Walking the
    chunks then costs a slice and three small ops instead of masks over all (n, K) entries per chunk.
    """
    K = ids.shape[1]
    keep = (ids >= 0) & (w != 0)
    flat = keep.reshape(-1).nonzero().squeeze(1)
    rows = flat // K
    idv = ids.reshape(-1)[flat]
    n_tc = (n_tokens + token_chunk - 1) // token_chunk
    key = (idv // vocab_chunk) * n_tc + rows // token_chunk
    if key.device.type == "cpu":  # numpy's single-threaded sort: torch's is ~100x slower on busy cores
        import numpy as np
        order = torch.from_numpy(np.argsort(key.numpy(), kind="stable"))
    else:
        order = key.argsort(stable=True)
    rows, idv, wv, key = rows[order], idv[order], w.reshape(-1)[flat][order], key[order]
    n_vc = max(1, int(idv.max()) // vocab_chunk + 1) if idv.numel() else 1
    counts = torch.bincount(key, minlength=n_vc * n_tc)
    offsets = [0] + torch.cumsum(counts, 0).tolist()
    return rows - (rows // token_chunk) * token_chunk, idv % vocab_chunk, wv, offsets, n_tc


class _SparseTargetCE(torch.autograd.Function):
    """sum_i sum_k w_ik (lse_i - z_i,id_ik) with lse over the full vocabulary, in vocabulary chunks.

    The sampled logits come out of the same chunk loop as the logsumexp (each entry is read from the
    chunk that holds its id), so the sparse target costs no extra matmul over plain cross-entropy.
    """

    @staticmethod
    def forward(ctx, hidden, weight, rows, ids, w, softcap, token_chunk, vocab_chunk):
        n, V = rows.numel(), weight.shape[0]
        lse = torch.full((n,), float("-inf"), dtype=torch.float32, device=hidden.device)
        picked = torch.zeros(n, dtype=torch.float32, device=hidden.device)
        e_rows, e_loc, e_w, offsets, n_tc = _entries_by_chunk(ids, w, n, token_chunk, vocab_chunk)
        buf = _workspace(min(n, token_chunk), min(V, vocab_chunk), hidden)
        for c, v0 in enumerate(range(0, V, vocab_chunk)):
            wc = weight[v0:v0 + vocab_chunk].float()  # (v, d)
            v = wc.shape[0]
            for t, n0 in enumerate(range(0, n, token_chunk)):
                sl = slice(n0, n0 + token_chunk)
                h = hidden.index_select(0, rows[sl]).float()  # (n, d)
                logits = torch.mm(h, wc.t(), out=_chunk(buf, h.shape[0], v))  # (n, v)
                if softcap is not None:
                    logits.div_(softcap).tanh_().mul_(softcap)
                b = c * n_tc + t
                if b + 1 < len(offsets) and offsets[b + 1] > offsets[b]:
                    a, e = offsets[b], offsets[b + 1]
                    r = e_rows[a:e]
                    picked[sl].index_add_(0, r, logits[r, e_loc[a:e]] * e_w[a:e])
                m = logits.amax(dim=-1)
                chunk_lse = logits.sub_(m[:, None]).exp_().sum(dim=-1).log_().add_(m)
                lse[sl] = torch.logaddexp(lse[sl], chunk_lse)
        ctx.save_for_backward(hidden, weight, rows, ids, w, lse)
        ctx.softcap, ctx.token_chunk, ctx.vocab_chunk = softcap, token_chunk, vocab_chunk
        return (w.sum(1) * lse - picked).sum()

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, rows, ids, w, lse = ctx.saved_tensors
        cap, tc, vc = ctx.softcap, ctx.token_chunk, ctx.vocab_chunk
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        n, V = rows.numel(), weight.shape[0]
        wsum = w.sum(1)
        e_rows, e_loc, e_w, offsets, n_tc = _entries_by_chunk(ids, w, n, tc, vc)
        scale = grad_out.float()
        grad_h = torch.zeros(n, hidden.shape[1], dtype=torch.float32, device=hidden.device) if need_h else None
        grad_w = torch.empty_like(weight) if need_w else None
        buf = _workspace(min(n, tc), min(V, vc), hidden)
        buf2 = _workspace(min(n, tc), min(V, vc), hidden) if cap is not None else None
        for c, v0 in enumerate(range(0, V, vc)):
            wc = weight[v0:v0 + vc].float()
            v = wc.shape[0]
            gw = torch.zeros_like(wc) if need_w else None
            for t, n0 in enumerate(range(0, n, tc)):
                sl = slice(n0, n0 + tc)
                h = hidden.index_select(0, rows[sl]).float()
                z = torch.mm(h, wc.t(), out=_chunk(buf, h.shape[0], v))
                if cap is not None:
                    th = z.div_(cap).tanh_()
                    g = torch.mul(th, cap, out=_chunk(buf2, *z.shape))
                else:
                    th, g = None, z
                g.sub_(lse[sl, None]).exp_().mul_(wsum[sl, None])  # (sum_k w_k) * softmax
                b = c * n_tc + t
                if b + 1 < len(offsets) and offsets[b + 1] > offsets[b]:
                    a, e = offsets[b], offsets[b + 1]
                    g.index_put_((e_rows[a:e], e_loc[a:e]), -e_w[a:e], accumulate=True)
                g.mul_(scale)
                _softcap_grad(g, th)
                if need_h:
                    grad_h[sl].addmm_(g, wc)
                if need_w:
                    gw.addmm_(g.t(), h)
            if need_w:
                grad_w[v0:v0 + vc] = gw
        grad_hidden = None
        if need_h:
            grad_hidden = torch.zeros_like(hidden)
            grad_hidden.index_copy_(0, rows, grad_h.to(hidden.dtype))
        return grad_hidden, grad_w, None, None, None, None, None, None


class _SampledSetCE(torch.autograd.Function):
    """sum_i sum_k w_ik (lse_S_i - z_i,id_ik) with lse over the position's own sampled ids only.

    Gathers the K embedding rows of each token (token chunks of (t, K, d)); backward recomputes them
    and scatters the weight gradient into those rows.
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
# Full-vocabulary KD (forward KL)

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
        Gemma 2/3 pre-training distillation).
    Value = KL(t || p_S) + H(t) per token; the gradient is that of the forward KL.
    """
    _check_shapes(hidden, weight, targets)
    _check_alpha(hard_weight)
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if isinstance(teacher_logits, Tensor) and teacher_logits.shape[:-1] != targets.shape:
        raise ValueError(f"teacher logits {tuple(teacher_logits.shape)} must be targets' shape "
                         f"{tuple(targets.shape)} plus the vocabulary")
    h = hidden.reshape(-1, hidden.shape[-1])
    t = targets.reshape(-1)
    valid = t != ignore_index
    rows = valid.nonzero().squeeze(1)
    loss_sum = _FullKD.apply(h, weight, rows, t[rows], as_teacher_fn(teacher_logits), temperature,
                             hard_weight, softcap, token_chunk, vocab_chunk)
    return _normalize(loss_sum, valid, normalizer)


def _rowdot(x: Tensor, y: Tensor) -> Tensor:
    """sum_j x[i, j] * y[i, j] without an (n, v) temporary."""
    return torch.bmm(x[:, None, :], y[:, :, None]).view(-1)


def _full_kd_pass(hidden, weight, rows, tgt, teacher_fn, tau, softcap, tc, vc, need_entropy=False):
    """One pass over the vocabulary: per-token student logsumexp, teacher logsumexp (at tau), the
    teacher-weighted student logit E_t[z_S], the hard targets' logits, and optionally E_t[z_T / tau]."""
    n, V = rows.numel(), weight.shape[0]
    dev = hidden.device
    lse_s = torch.full((n,), float("-inf"), dtype=torch.float32, device=dev)
    m_t = torch.full((n,), float("-inf"), dtype=torch.float32, device=dev)
    s_t = torch.zeros(n, dtype=torch.float32, device=dev)  # sum exp(z_T - m_t)
    b = torch.zeros(n, dtype=torch.float32, device=dev)  # sum exp(z_T - m_t) * z_S
    a = torch.zeros(n, dtype=torch.float32, device=dev) if need_entropy else None  # ... * z_T
    tgt_s = torch.zeros(n, dtype=torch.float32, device=dev)
    tgt_t = torch.zeros(n, dtype=torch.float32, device=dev)
    buf = _workspace(min(n, tc), min(V, vc), hidden)
    for v0 in range(0, V, vc):
        wc = weight[v0:v0 + vc].float()
        v = wc.shape[0]
        for n0 in range(0, n, tc):
            sl = slice(n0, n0 + tc)
            h = hidden.index_select(0, rows[sl]).float()
            zs = torch.mm(h, wc.t(), out=_chunk(buf, h.shape[0], v))
            if softcap is not None:
                zs.div_(softcap).tanh_().mul_(softcap)
            zt = teacher_fn(rows[sl], v0, v0 + v).float()  # a fresh tensor, overwritten below
            if tau != 1.0:
                zt.div_(tau)
            local = tgt[sl] - v0
            inside = (local >= 0) & (local < v)
            idx = local.clamp(0, v - 1)[:, None]
            tgt_s[sl] = torch.where(inside, zs.gather(1, idx).squeeze(1), tgt_s[sl])
            tgt_t[sl] = torch.where(inside, zt.gather(1, idx).squeeze(1), tgt_t[sl])
            # Online teacher softmax: rescale the running sums when the running max grows.
            m_new = torch.maximum(m_t[sl], zt.amax(1))
            shift = torch.where(torch.isfinite(m_new), m_new, 0.0)  # a chunk of -inf logits
            keep = (m_t[sl] - shift).exp()
            if a is not None:  # E[z_T]: evaluation only, one more (n, v) buffer
                e = (zt - shift[:, None]).exp_()
                a[sl] = a[sl] * keep + _rowdot(e, torch.where(e > 0, zt, 0.0))
            else:
                e = zt.sub_(shift[:, None]).exp_()  # (n, v); 0 where the teacher has -inf
            s_t[sl] = s_t[sl] * keep + e.sum(1)
            b[sl] = b[sl] * keep + _rowdot(e, zs)
            m_t[sl] = m_new
            del zt, e  # free the teacher chunk before the next one is formed
            m = zs.amax(dim=-1)
            chunk_lse = zs.sub_(m[:, None]).exp_().sum(dim=-1).log_().add_(m)
            lse_s[sl] = torch.logaddexp(lse_s[sl], chunk_lse)
    lse_t = torch.where(torch.isfinite(m_t), m_t, 0.0) + s_t.log()
    out = dict(lse_s=lse_s, lse_t=lse_t, e_zs=b / s_t, tgt_s=tgt_s, tgt_t=tgt_t)
    if a is not None:
        out["e_zt"] = a / s_t
    return out


class _FullKD(torch.autograd.Function):
    """sum_i alpha (lse_S - z_S[y]) + (1 - alpha) (lse_S - E_t[z_S]); teacher chunks from teacher_fn."""

    @staticmethod
    def forward(ctx, hidden, weight, rows, tgt, teacher_fn, tau, alpha, softcap, token_chunk, vocab_chunk):
        st = _full_kd_pass(hidden, weight, rows, tgt, teacher_fn, tau, softcap, token_chunk, vocab_chunk)
        ctx.save_for_backward(hidden, weight, rows, tgt, st["lse_s"], st["lse_t"])
        ctx.teacher_fn, ctx.tau, ctx.alpha = teacher_fn, tau, alpha
        ctx.softcap, ctx.token_chunk, ctx.vocab_chunk = softcap, token_chunk, vocab_chunk
        soft = st["lse_s"] - st["e_zs"]
        hard = st["lse_s"] - st["tgt_s"]
        return ((1 - alpha) * soft + alpha * hard).sum() if alpha else soft.sum()

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, rows, tgt, lse_s, lse_t = ctx.saved_tensors
        cap, tc, vc, tau, alpha = ctx.softcap, ctx.token_chunk, ctx.vocab_chunk, ctx.tau, ctx.alpha
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        n, V = rows.numel(), weight.shape[0]
        scale = grad_out.float()
        grad_h = torch.zeros(n, hidden.shape[1], dtype=torch.float32, device=hidden.device) if need_h else None
        grad_w = torch.empty_like(weight) if need_w else None
        buf = _workspace(min(n, tc), min(V, vc), hidden)
        buf2 = _workspace(min(n, tc), min(V, vc), hidden) if cap is not None else None
        for v0 in range(0, V, vc):
            wc = weight[v0:v0 + vc].float()
            v = wc.shape[0]
            gw = torch.zeros_like(wc) if need_w else None
            for n0 in range(0, n, tc):
                sl = slice(n0, n0 + tc)
                h = hidden.index_select(0, rows[sl]).float()
                z = torch.mm(h, wc.t(), out=_chunk(buf, h.shape[0], v))
                if cap is not None:
                    th = z.div_(cap).tanh_()
                    g = torch.mul(th, cap, out=_chunk(buf2, *z.shape))
                else:
                    th, g = None, z
                g.sub_(lse_s[sl, None]).exp_()  # softmax_S
                zt = ctx.teacher_fn(rows[sl], v0, v0 + v).float()  # fresh: overwritten in place
                if tau != 1.0:
                    zt.div_(tau)
                g.sub_(zt.sub_(lse_t[sl, None]).exp_().mul_(1 - alpha))  # - (1 - alpha) t
                del zt  # free the teacher chunk before the next one is formed
                if alpha:
                    local = tgt[sl] - v0
                    inside = ((local >= 0) & (local < v)).nonzero().squeeze(1)
                    g[inside, local[inside]] -= alpha
                g.mul_(scale)
                _softcap_grad(g, th)
                if need_h:
                    grad_h[sl].addmm_(g, wc)
                if need_w:
                    gw.addmm_(g.t(), h)
            if need_w:
                grad_w[v0:v0 + vc] = gw
        grad_hidden = None
        if need_h:
            grad_hidden = torch.zeros_like(hidden)
            grad_hidden.index_copy_(0, rows, grad_h.to(hidden.dtype))
        return grad_hidden, grad_w, None, None, None, None, None, None, None, None


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
    _check_shapes(hidden, weight, targets)
    h = hidden.reshape(-1, hidden.shape[-1])
    t = targets.reshape(-1)
    rows = (t != ignore_index).nonzero().squeeze(1)
    if teacher_logits is None:
        from .losses import chunked_cross_entropy
        ce = chunked_cross_entropy(h, weight, t, softcap=softcap, ignore_index=ignore_index,
                                   normalizer=1.0, token_chunk=token_chunk, vocab_chunk=vocab_chunk)
        return {"tokens": float(rows.numel()), "ce": float(ce)}
    st = _full_kd_pass(h, weight, rows, t[rows], as_teacher_fn(teacher_logits), temperature, softcap,
                       token_chunk, vocab_chunk, need_entropy=True)
    entropy = st["lse_t"] - st["e_zt"]
    cross = st["lse_s"] - st["e_zs"]
    return {"tokens": float(rows.numel()), "ce": float((st["lse_s"] - st["tgt_s"]).sum()),
            "kl": float((cross - entropy).sum()), "teacher_ce": float((st["lse_t"] - st["tgt_t"]).sum()),
            "teacher_entropy": float(entropy.sum())}


# ---------------------------------------------------------------------------------------------------------
# Naive references (full logits; tests and tiny vocabularies only)

def _naive_logp(hidden, weight, softcap):
    logits = hidden.reshape(-1, hidden.shape[-1]).float() @ weight.float().t()
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    return logits


def naive_sparse_kd_loss(hidden, weight, targets, ids, weights, *, normalizer_over="vocab",
                         hard_weight=0.0, softcap=None, ignore_index=-100, normalizer=None) -> Tensor:
    """Reference for `sparse_kd_loss` with full (N, V) logits and a dense target."""
    logits = _naive_logp(hidden, weight, softcap)
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
    return _normalize(torch.where(valid, per_token, 0.0).sum(), valid, normalizer)


def naive_full_kd_loss(hidden, weight, targets, teacher_logits, *, temperature=1.0, hard_weight=0.0,
                       softcap=None, ignore_index=-100, normalizer=None) -> Tensor:
    """Reference for `full_kd_loss`: full student and teacher logits in memory."""
    logits = _naive_logp(hidden, weight, softcap)
    t = targets.reshape(-1)
    valid = t != ignore_index
    p_t = F.softmax(teacher_logits.reshape(logits.shape).float() / temperature, -1)
    logp = F.log_softmax(logits, -1)
    soft = -(p_t * logp).sum(1)
    hard = F.cross_entropy(logits, t.clamp(min=0), reduction="none")
    per_token = (1 - hard_weight) * soft + hard_weight * hard
    return _normalize(torch.where(valid, per_token, 0.0).sum(), valid, normalizer)
