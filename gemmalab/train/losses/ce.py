"""Next-token cross-entropy and per-token log-probabilities on the vocabulary engine (`vocab.py`).

    chunked_cross_entropy   sum_i -log softmax(logits_i)[target_i] / normalizer (SFT, pre-training)
    token_logprobs          log p(target_i) per token, optionally with the entropy H(p_i), each with a
                            gradient for any upstream weights (policy-gradient losses weigh tokens by
                            their advantages); without gradients it is a single forward walk, the fast
                            path for scoring.

Normalisation: see `vocab.normalize` (the default normalizer is the local count of target tokens;
pass the global count of the optimizer step when accumulating micro-batches or all-reducing).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .vocab import (DEFAULT_BUDGET, check_shapes, normalize, rowdot, selected_rows, vocab_map, vocab_sum,
                    weighted)

__all__ = ["chunked_cross_entropy", "naive_cross_entropy", "token_logprobs", "score_logprobs",
           "naive_token_logprobs"]


def _ce_rule(tgt: Tensor):
    """-log softmax(z)[y]; gradient softmax - onehot."""
    def rule(z, sl, up):
        y = tgt[sl, None]
        picked = z.gather(1, y).squeeze(1)
        m = z.amax(dim=1, keepdim=True)
        total = z.sub_(m).exp_().sum(dim=1, keepdim=True)  # in place: no second (t, V) buffer
        loss = total.log().add_(m).squeeze(1) - picked  # logsumexp - target logit
        if up is None:
            return (loss,), None
        g = z.div_(total)  # softmax
        g.scatter_add_(1, y, torch.full_like(y, -1.0, dtype=g.dtype))  # - onehot
        return (loss,), weighted(g, up[0])
    return rule


def chunked_cross_entropy(hidden: Tensor, weight: Tensor, targets: Tensor, *, softcap: float | None = None,
                          ignore_index: int = -100, normalizer: float | Tensor | None = None,
                          token_chunk: int = 1024, vocab_chunk: int = 32768,
                          logits_budget: int = DEFAULT_BUDGET) -> Tensor:
    """Cross-entropy of the logits `softcap(hidden @ weight.T)` against `targets`, in chunks.

    hidden: (N, d) or (B, T, d), e.g. `Gemma3.hidden_states(...)`; any float dtype.
    weight: (V, d), the tied embedding table `model.embed_tokens.weight` (unscaled).
    targets: (N,) or (B, T) token ids; entries equal to `ignore_index` contribute nothing.
    softcap: Gemma 2's final logit soft-capping `cap * tanh(z / cap)` (config.final_logit_softcapping).
    normalizer: the sum is divided by this; default the local count of target tokens. Pass the global
        count of the whole optimizer step when accumulating micro-batches or all-reducing across
        processes (see `vocab.normalize`).
    token_chunk, logits_budget: tokens are walked in chunks of at most token_chunk, each against the
        whole vocabulary, with at most logits_budget bytes of fp32 logits (and their soft-cap) at once.
    vocab_chunk: rows of a non-fp32 weight converted to fp32 at a time.

    Returns a fp32 scalar; with no target token at all, 0. Only tokens with a target are computed
    (ignored prompt or padding tokens cost nothing). With a gradient to compute, the forward pass
    computes it as well and backward only scales it; peak extra memory is the logits budget, the
    (V, d) fp32 weight gradient and an (N, d) fp32 hidden gradient.
    """
    check_shapes(hidden, weight, targets)
    h, t, valid, rows = selected_rows(hidden, targets, ignore_index)
    loss_sum = vocab_sum(h, weight, rows, _ce_rule(t[rows]), softcap=softcap, token_chunk=token_chunk,
                         vocab_chunk=vocab_chunk, logits_budget=logits_budget)
    return normalize(loss_sum, valid, normalizer)


def naive_logits(hidden: Tensor, weight: Tensor, softcap: float | None, dtype=torch.float32) -> Tensor:
    """Full (N, V) logits `softcap(hidden @ weight.T)`; tests and tiny vocabularies only."""
    logits = hidden.reshape(-1, hidden.shape[-1]).to(dtype) @ weight.to(dtype).t()
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    return logits


def naive_cross_entropy(hidden: Tensor, weight: Tensor, targets: Tensor, softcap: float | None = None,
                        ignore_index: int = -100, normalizer: float | Tensor | None = None) -> Tensor:
    """Reference: the full fp32 logits `hidden @ weight.T` (soft-capped), then cross-entropy.

    Same contract as `chunked_cross_entropy`; fine for tiny vocabularies and tests only.
    """
    t = targets.reshape(-1)
    logits = naive_logits(hidden, weight, softcap)  # (N, V)
    loss_sum = F.cross_entropy(logits, t, ignore_index=ignore_index, reduction="sum")
    return normalize(loss_sum, t != ignore_index, normalizer)


# ---------------------------------------------------------------------------------------------------------
# Per-token log-probabilities (and entropies)

def _logprob_rule(tgt: Tensor, entropy: bool):
    """log p(y) and optionally H(p); gradients onehot - p and -p (log p + H)."""
    def rule(z, sl, up):
        y = tgt[sl, None]
        picked = z.gather(1, y).squeeze(1)
        m = z.amax(dim=1, keepdim=True)
        if not entropy:
            total = z.sub_(m).exp_().sum(dim=1, keepdim=True)
            logp = picked - total.log().add_(m).squeeze(1)
            if up is None or up[0] is None:
                return (logp,), None
            g = z.div_(total).neg_()  # - softmax
            g.scatter_add_(1, y, torch.ones_like(y, dtype=g.dtype))  # + onehot
            return (logp,), weighted(g, up[0])
        p = (z - m).exp_()  # (t, V): z itself is needed for E_p[z]
        total = p.sum(dim=1, keepdim=True)
        lse = total.log().add_(m)  # (t, 1)
        p.div_(total)
        ent = lse.squeeze(1) - rowdot(p, z)  # H = lse - E_p[z]
        logp = picked - lse.squeeze(1)
        if up is None:
            return (logp, ent), None
        a, b = up
        if b is None:  # -a p
            g = p.mul_(-a[:, None] if isinstance(a, Tensor) else -a)
        else:  # -p (a + b (log p + H)), with log p = z - lse
            c = z.sub_(lse).add_(ent[:, None])  # log p + H
            weighted(c, b)
            if a is not None:
                c.add_(a[:, None] if isinstance(a, Tensor) else a)
            g = p.mul_(c).neg_()
        if a is not None:  # + a onehot
            av = a[:, None] if isinstance(a, Tensor) else torch.full(y.shape, a, device=g.device)
            g.scatter_add_(1, y, av.to(g.dtype))
        return (logp, ent), g
    return rule


def token_logprobs(hidden: Tensor, weight: Tensor, targets: Tensor, *, softcap: float | None = None,
                   entropy: bool = False, ignore_index: int = -100, token_chunk: int = 1024,
                   vocab_chunk: int = 32768,
                   logits_budget: int = DEFAULT_BUDGET) -> Tensor | tuple[Tensor, Tensor]:
    """log p(target) under softmax(softcap(hidden @ weight.T)) for every position, in chunks.

    Returns fp32 log-probabilities of targets' shape (0 where the target is `ignore_index`), and with
    entropy=True also the entropies H(p) of the same shape (0 at ignored positions). Both are
    differentiable with any upstream gradient: backward recomputes the logits chunk by chunk and forms
    sum_i (a_i (onehot - p_i) - b_i p_i (log p_i + H_i)) for the upstream weights a (log-probs) and
    b (entropies). Without gradients (torch.no_grad, or inputs that need none) it is one forward walk:
    one vocabulary-sized matmul per token, for scoring.
    """
    check_shapes(hidden, weight, targets)
    h, t, valid, rows = selected_rows(hidden, targets, ignore_index)
    outs = vocab_map(h, weight, rows, _logprob_rule(t[rows], entropy), n_out=2 if entropy else 1,
                     softcap=softcap, buffers=2 if entropy else 1, token_chunk=token_chunk,
                     vocab_chunk=vocab_chunk, logits_budget=logits_budget)
    full = tuple(torch.zeros(t.shape, dtype=torch.float32, device=h.device).index_put((rows,), o)
                 for o in outs)
    full = tuple(f.view(targets.shape) for f in full)
    return full if entropy else full[0]


@torch.no_grad()
def score_logprobs(hidden: Tensor, weight: Tensor, targets: Tensor, **kw) -> Tensor | tuple[Tensor, Tensor]:
    """`token_logprobs` without autograd, for scoring (rewards, evaluation, teacher log-probs): one
    vocabulary-sized matmul per token and nothing kept. Same arguments and outputs."""
    return token_logprobs(hidden, weight, targets, **kw)


def naive_token_logprobs(hidden: Tensor, weight: Tensor, targets: Tensor, *, softcap: float | None = None,
                         entropy: bool = False, ignore_index: int = -100) -> Tensor | tuple[Tensor, Tensor]:
    """Reference for `token_logprobs` with the full fp32 logits."""
    t = targets.reshape(-1)
    valid = t != ignore_index
    logp = F.log_softmax(naive_logits(hidden, weight, softcap), -1)
    lp = torch.where(valid, logp.gather(1, t.clamp(min=0)[:, None]).squeeze(1), 0.0).view(targets.shape)
    if not entropy:
        return lp
    ent = torch.where(valid, -(logp.exp() * logp).sum(1), 0.0).view(targets.shape)
    return lp, ent
