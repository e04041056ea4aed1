"""Cross-entropy over the vocabulary without materialising the (tokens x vocab) logits.

Gemma's vocabulary has 262,144 entries, so the full fp32 logits of one 8 x 2048 batch take 17 GB, and
their gradient as much again. `chunked_cross_entropy` walks the vocabulary in chunks with an online
logsumexp, keeps only one log-normaliser per token, and in backward recomputes each logits chunk to
form its gradient (softmax - onehot) on the spot: peak memory is O(token_chunk x vocab_chunk) plus the
gradients themselves. The same idea as Liger-Kernel's fused linear cross-entropy and Apple's
"Cut Your Losses" (Wijmans et al. 2024), in plain PyTorch.

When a gradient is needed, the forward pass computes it too (like Liger-Kernel's fused linear
cross-entropy): it walks the *tokens* in chunks, each against the whole vocabulary (a chunk of logits of
at most `logits_budget` bytes), so the log-normaliser of a chunk is known at once and its gradient
(softmax - onehot) is formed and multiplied out before the next chunk. That is three vocabulary-sized
matmuls per token (logits, hidden gradient, weight gradient) instead of four, and backward only scales
the stored gradients. Without gradients (evaluation) the vocabulary-outer pass above runs instead.

Normalisation. Both functions return  sum_i -log softmax(logits_i)[target_i] / normalizer  over the
tokens whose target is not `ignore_index`. The default normalizer is the number of such tokens *in
this call*. For gradient accumulation, or data-parallel training where gradients are all-reduced by
summing, pass the GLOBAL number of target tokens of the whole optimizer step (all micro-batches, all
processes): the summed gradients then equal those of one big batch, whatever the number of ignored
tokens in each piece. (Averaging per micro-batch instead weighs a token of a short micro-batch more.)
DistributedDataParallel averages gradients over its W processes instead of summing them: there,
pass global_count / W.
With no target token at all the loss is 0, not NaN.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["chunked_cross_entropy", "naive_cross_entropy"]


def _normalize(loss_sum: Tensor, valid: Tensor, normalizer: float | Tensor | None) -> Tensor:
    if normalizer is None:
        normalizer = valid.sum().clamp(min=1).to(loss_sum.dtype)
    return loss_sum / normalizer


def naive_cross_entropy(hidden: Tensor, weight: Tensor, targets: Tensor, softcap: float | None = None,
                        ignore_index: int = -100, normalizer: float | Tensor | None = None) -> Tensor:
    """Reference: the full fp32 logits `hidden @ weight.T` (soft-capped), then cross-entropy.

    Same contract as `chunked_cross_entropy`; fine for tiny vocabularies and tests only.
    """
    h = hidden.reshape(-1, hidden.shape[-1]).float()
    t = targets.reshape(-1)
    logits = h @ weight.float().t()  # (N, V)
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    loss_sum = F.cross_entropy(logits, t, ignore_index=ignore_index, reduction="sum")
    return _normalize(loss_sum, t != ignore_index, normalizer)


def chunked_cross_entropy(hidden: Tensor, weight: Tensor, targets: Tensor, *, softcap: float | None = None,
                          ignore_index: int = -100, normalizer: float | Tensor | None = None,
                          token_chunk: int = 1024, vocab_chunk: int = 32768,
                          logits_budget: int = 256 << 20) -> Tensor:
    """Cross-entropy of the logits `softcap(hidden @ weight.T)` against `targets`, in chunks.

    hidden: (N, d) or (B, T, d), e.g. `Gemma3.hidden_states(...)`; any float dtype.
    weight: (V, d), the tied embedding table `model.embed_tokens.weight` (unscaled).
    targets: (N,) or (B, T) token ids; entries equal to `ignore_index` contribute nothing.
    softcap: Gemma 2's final logit soft-capping `cap * tanh(z / cap)` (config.final_logit_softcapping).
    normalizer: the sum is divided by this; default the local count of target tokens. Pass the global
        count of the whole optimizer step when accumulating micro-batches or all-reducing across
        processes (see the module docstring).

    Returns a fp32 scalar. Logits, logsumexp and gradients are computed in fp32 whatever the input
    dtype; the gradients come back in the dtypes of `hidden` and `weight`. Only tokens with a target
    are computed (ignored prompt or padding tokens cost nothing). Peak extra memory is a few
    (token_chunk x vocab_chunk) fp32 buffers, a (vocab_chunk x d) fp32 weight chunk and its gradient
    accumulator, and an (N, d) fp32 accumulator for the hidden gradient; with gradients, one
    (token chunk x V) fp32 logits chunk of at most `logits_budget` bytes instead.
    """
    if hidden.shape[:-1] != targets.shape:
        raise ValueError(f"hidden {tuple(hidden.shape)} and targets {tuple(targets.shape)} disagree: "
                         "targets need the leading shape of hidden")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight {tuple(weight.shape)} must be (vocab, {hidden.shape[-1]})")
    h = hidden.reshape(-1, hidden.shape[-1])
    t = targets.reshape(-1)
    valid = t != ignore_index
    loss_sum = _ChunkedCrossEntropy.apply(h, weight, t, valid, softcap, token_chunk, vocab_chunk,
                                          logits_budget)
    return _normalize(loss_sum, valid, normalizer)


def _workspace(n: int, v: int, like: Tensor) -> Tensor:
    """One fp32 (n, v) buffer reused by every chunk: a fresh 128 MB tensor per chunk would be paid
    again in page faults each time (large allocations go straight to mmap)."""
    return torch.empty(n * v, dtype=torch.float32, device=like.device)


def _chunk(buf: Tensor, n: int, v: int) -> Tensor:
    return buf[:n * v].view(n, v)  # contiguous, so matmul can write into it


class _ChunkedCrossEntropy(torch.autograd.Function):
    """Summed token losses. With a gradient to compute, forward computes it as well (token chunks
    against the whole vocabulary) and backward only scales it; without, forward loops vocabulary-outer,
    tokens-inner with an online logsumexp, keeping nothing."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, valid, softcap, token_chunk, vocab_chunk, logits_budget):
        rows = valid.nonzero().squeeze(1)  # only tokens with a target are computed
        tgt = targets[rows]
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        ctx.dtypes = (hidden.dtype, weight.dtype)
        if need_h or need_w:
            loss, grad_h, grad_w = _loss_and_grads(hidden, weight, rows, tgt, softcap, need_h, need_w,
                                                   logits_budget)
            ctx.save_for_backward(rows, grad_h, grad_w)
            ctx.hidden_shape = hidden.shape
            return loss
        n, V = rows.numel(), weight.shape[0]
        lse = torch.full((n,), float("-inf"), dtype=torch.float32, device=hidden.device)
        target_logit = torch.zeros(n, dtype=torch.float32, device=hidden.device)
        buf = _workspace(min(n, token_chunk), min(V, vocab_chunk), hidden)
        for v0 in range(0, V, vocab_chunk):
            w = weight[v0:v0 + vocab_chunk].float()  # (v, d)
            for n0 in range(0, n, token_chunk):
                sl = slice(n0, n0 + token_chunk)
                h = hidden.index_select(0, rows[sl]).float()  # (n, d)
                logits = torch.mm(h, w.t(), out=_chunk(buf, h.shape[0], w.shape[0]))  # (n, v)
                if softcap is not None:
                    logits.div_(softcap).tanh_().mul_(softcap)
                local = tgt[sl] - v0
                inside = (local >= 0) & (local < w.shape[0])
                picked = logits.gather(1, local.clamp(0, w.shape[0] - 1)[:, None]).squeeze(1)
                target_logit[sl] = torch.where(inside, picked, target_logit[sl])
                # Online logsumexp over vocabulary chunks, in place on the workspace.
                m = logits.amax(dim=-1)
                chunk_lse = logits.sub_(m[:, None]).exp_().sum(dim=-1).log_().add_(m)
                lse[sl] = torch.logaddexp(lse[sl], chunk_lse)
        return (lse - target_logit).sum()

    @staticmethod
    def backward(ctx, grad_out):
        rows, grad_h, grad_w = ctx.saved_tensors
        scale = grad_out.float()  # d loss_sum / d loss_i, the same for every token
        h_dtype, w_dtype = ctx.dtypes
        grad_hidden = grad_weight = None
        if ctx.needs_input_grad[0]:
            grad_hidden = torch.zeros(ctx.hidden_shape, dtype=h_dtype, device=grad_h.device)
            grad_hidden.index_copy_(0, rows, grad_h.mul_(scale).to(h_dtype))
        if ctx.needs_input_grad[1]:
            grad_weight = grad_w.mul_(scale).to(w_dtype)
        return grad_hidden, grad_weight, None, None, None, None, None, None


def _loss_and_grads(hidden, weight, rows, tgt, softcap, need_h, need_w, logits_budget):
    """Summed loss and its gradients (fp32) in one pass: token chunks against the whole vocabulary."""
    n, V = rows.numel(), weight.shape[0]
    w = weight.float()  # (V, d); no copy for fp32 weights
    loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
    grad_h = torch.zeros(n, hidden.shape[1], dtype=torch.float32, device=hidden.device) if need_h else None
    grad_w = torch.zeros(V, weight.shape[1], dtype=torch.float32, device=hidden.device) if need_w else None
    tc = max(1, min(max(n, 1), logits_budget // (4 * V)))
    buf = _workspace(min(max(n, 1), tc), V, hidden)
    buf2 = _workspace(min(max(n, 1), tc), V, hidden) if softcap is not None else None
    for n0 in range(0, n, tc):
        sl = slice(n0, n0 + tc)
        h = hidden.index_select(0, rows[sl]).float()  # (t, d)
        z = torch.mm(h, w.t(), out=_chunk(buf, h.shape[0], V))  # (t, V)
        th = None
        if softcap is not None:
            th = z.div_(softcap).tanh_()  # logits = cap * th
            z = torch.mul(th, softcap, out=_chunk(buf2, *th.shape))
        idx = tgt[sl][:, None]
        picked = z.gather(1, idx).squeeze(1)
        m = z.amax(dim=-1, keepdim=True)
        g = z.sub_(m).exp_()  # in place: no second (t, V) buffer
        total = g.sum(dim=-1, keepdim=True)
        loss += (total.log().add_(m).squeeze(1) - picked).sum()  # logsumexp - target logit
        g.div_(total)  # softmax
        g.scatter_add_(1, idx, torch.full_like(idx, -1.0, dtype=g.dtype))  # - onehot
        if th is not None:
            g.mul_(th.square_().neg_().add_(1.0))  # d logits / dz = 1 - tanh^2
        if need_h:
            torch.mm(g, w, out=grad_h[sl])
        if need_w:
            grad_w.addmm_(g.t(), h)
    return loss, grad_h, grad_w
