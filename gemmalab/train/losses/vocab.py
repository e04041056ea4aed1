"""The vocabulary engine: every loss over the logits `softcap(hidden @ weight.T)` without the
(tokens x vocab) tensor.

Gemma's vocabulary has 262,144 entries, so the fp32 logits of one 8 x 2048 batch take 17 GB and their
gradient as much again. The engine walks the tokens in chunks, each against the whole vocabulary (at
most `logits_budget` bytes of fp32 (chunk x V) arrays at once), and hands each chunk's soft-capped
logits to a *rule*: a small function that returns the per-token loss and, when asked, its gradient
with respect to those logits. The engine then applies the soft-cap's derivative (once, here) and
multiplies the gradient out into the hidden and weight gradients before the next chunk. The same idea
as Liger-Kernel's fused linear cross-entropy and Apple's "Cut Your Losses" (Wijmans et al. 2024), in
plain PyTorch.

    vocab_sum(hidden, weight, rows, rule)   sum_i loss_i, a scalar. The forward pass computes the
                                            gradient as well (three vocabulary-sized matmuls per token:
                                            logits, hidden gradient, weight gradient) and backward only
                                            scales it: the fast path of every training loss.
    vocab_map(hidden, weight, rows, rule)   per-token outputs (n,) with any upstream gradient (policy
                                            gradients weigh each token's log-probability); the forward
                                            pass keeps nothing and backward recomputes the logits.

A rule is called as `rule(z, sl, upstream)`:
    z         (t, V) fp32 logits of the rows `rows[sl]` (soft-capped), a workspace the rule may overwrite;
    sl        the slice of `rows` in this chunk, to index the rule's own per-token data (targets,
              sparse targets, a teacher callable's rows);
    upstream  None: values only (no gradient). Else one entry per output: a float or a (t,) tensor
              that weighs that output's gradient (None: the output gets no gradient).
and returns (outputs, g): a tuple of (t,) fp32 per-token values, and g = sum_k upstream_k * d out_k / dz
of shape (t, V) (or None without upstream), which may live in z's storage. `buffers` tells the engine
how many (t, V) fp32 arrays the rule holds at once, which sizes the token chunks.

Numerics: the rules see fp32 logits and return fp32 gradients whatever the input dtypes;
gradients come back in the dtypes of `hidden` and `weight`. The three vocabulary-sized products run
in fp32 by default (both sides upcast). Inside `with vocab_products(torch.bfloat16):` (what training
under bf16 autocast uses, `model.vocab_products`) they run in bf16 with the results widened to fp32
before the rule: each logit then carries bf16's rounding (a relative error up to 2^-9, 0.04 at a
logit of 20), as it does in transformers' LM head under autocast; log-normalisers, softmax, the
losses and the weight gradient's sum over token chunks stay fp32. A weight already in the product
dtype is used in place; otherwise it is converted whole once per call when gradients are formed, else
`vocab_chunk` rows at a time (no converted copy of the table in evaluation).
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
from typing import Callable, NamedTuple

import torch
from torch import Tensor

__all__ = ["vocab_sum", "vocab_map", "Rule", "DEFAULT_BUDGET", "softmax_", "log_softmax_", "rowdot",
           "weighted", "check_shapes", "normalize", "as_teacher_fn", "selected_rows", "zero_loss",
           "vocab_products", "current_products", "release_workspaces"]

DEFAULT_BUDGET = 256 << 20  # bytes of fp32 (token chunk x V) arrays at once: 256 tokens x 262,144 x 4
Upstream = tuple  # of float | Tensor | None, one entry per rule output
Rule = Callable[[Tensor, slice, "Upstream | None"], "tuple[tuple[Tensor, ...], Tensor | None]"]
# (flat token indices (n,), v0, v1) -> (n, v1 - v0) logits: a fresh tensor, which the rules overwrite.
TeacherFn = Callable[[Tensor, int, int], Tensor]


_PRODUCTS: contextvars.ContextVar[torch.dtype] = contextvars.ContextVar("gemmalab_vocab_products",
                                                                       default=torch.float32)
_PRODUCT_DTYPES = (torch.float32, torch.bfloat16)


@contextlib.contextmanager
def vocab_products(dtype: torch.dtype | None):
    """Run the vocabulary-sized products of every loss inside the block in `dtype` (torch.float32,
    the default, or torch.bfloat16; None leaves the current choice). The choice is taken when a loss
    is called (a backward pass that recomputes uses the forward's)."""
    if dtype is None:
        yield
        return
    if dtype not in _PRODUCT_DTYPES:
        raise ValueError(f"vocabulary products must be torch.float32 or torch.bfloat16, got {dtype}")
    token = _PRODUCTS.set(dtype)
    try:
        yield
    finally:
        _PRODUCTS.reset(token)


def current_products() -> torch.dtype:
    """The dtype the vocabulary-sized products run in here (see `vocab_products`)."""
    return _PRODUCTS.get()


# ---------------------------------------------------------------------------------------------------------
# Small shared pieces

def check_shapes(hidden: Tensor, weight: Tensor, targets: Tensor) -> None:
    if hidden.shape[:-1] != targets.shape:
        raise ValueError(f"hidden {tuple(hidden.shape)} and targets {tuple(targets.shape)} disagree: "
                         "targets need the leading shape of hidden")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight {tuple(weight.shape)} must be (vocab, {hidden.shape[-1]})")


def normalize(loss_sum: Tensor, valid: Tensor, normalizer: float | Tensor | None) -> Tensor:
    """loss_sum / normalizer; the default normalizer is the number of valid targets in this call.

    For gradient accumulation, or data-parallel training where gradients are all-reduced by summing,
    pass the GLOBAL number of target tokens of the whole optimizer step (all micro-batches, all
    processes): the summed gradients then equal those of one big batch, whatever the number of ignored
    tokens in each piece (averaging per micro-batch instead weighs a token of a short micro-batch more,
    TRL issue #4719). DistributedDataParallel averages over its W processes instead of summing: there,
    pass global_count / W. With no target at all the loss is 0 (the sum is empty), not NaN.
    """
    if normalizer is None:
        normalizer = valid.sum().clamp(min=1).to(loss_sum.dtype)
    return loss_sum / normalizer


def selected_rows(hidden: Tensor, targets: Tensor,
                  ignore_index: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(hidden as (N, d), flat targets (N,), valid mask (N,), indices of the valid rows (n,))."""
    h = hidden.reshape(-1, hidden.shape[-1])
    t = targets.reshape(-1)
    valid = t != ignore_index
    return h, t, valid, valid.nonzero().squeeze(1)


def zero_loss(hidden: Tensor, weight: Tensor) -> Tensor:
    """An fp32 0 that is differentiable (zero gradients) in hidden and weight: a sum over nothing."""
    return hidden.reshape(-1)[:0].float().sum() + weight.reshape(-1)[:0].float().sum()


def as_teacher_fn(teacher_logits: Tensor | TeacherFn) -> TeacherFn:
    """A callable (flat token indices, v0, v1) -> fp32 (n, v1 - v0) teacher logits (a new tensor).

    A tensor (..., V) of logits or log-probabilities (any float dtype; a memory-mapped store is read
    chunk by chunk, never whole) is wrapped; a callable is returned as is.
    """
    if callable(teacher_logits):
        return teacher_logits
    flat = teacher_logits.reshape(-1, teacher_logits.shape[-1])

    def fn(rows: Tensor, v0: int, v1: int) -> Tensor:
        return flat[rows.to(flat.device), v0:v1].float()  # advanced indexing: always a copy
    return fn


@functools.lru_cache(maxsize=64)
def _dot_block(v: int) -> int:
    return next(b for b in range(min(v, 128), 0, -1) if v % b == 0)


def rowdot(x: Tensor, y: Tensor) -> Tensor:
    """sum_j x[i, j] * y[i, j] without an (n, v) temporary, accurate for long rows.

    One bmm over whole 262k-entry rows accumulates each lane sequentially in fp32 (errors up to 1e-4
    relative, measured); blocks of at most 128 entries, summed afterwards, keep it at rounding level
    (and were the fastest of bmm, mul + sum and linalg.vecdot on 128 x 262144 rows).
    """
    t, v = x.shape
    if not (x.is_contiguous() and y.is_contiguous()):
        return (x * y).sum(1)
    b = _dot_block(v)
    nb = v // b
    return torch.bmm(x.view(t * nb, 1, b), y.view(t * nb, b, 1)).view(t, nb).sum(1)


def softmax_(z: Tensor) -> Tensor:
    """z <- softmax(z) row-wise, in place; returns the (t,) logsumexp."""
    m = z.amax(dim=1, keepdim=True)
    s = z.sub_(m).exp_().sum(dim=1, keepdim=True)
    z.div_(s)
    return s.log_().add_(m).squeeze(1)


def log_softmax_(z: Tensor) -> Tensor:
    """z <- log_softmax(z) row-wise, in place; returns the (t,) logsumexp (finite if any z is).

    The exponentials are formed about 1 MB at a time (one row at V = 262,144) instead of the (t, V)
    temporary of torch.logsumexp; blocks of 16 rows measured worse (glibc keeps freed 16 MB blocks
    in its heap: +290 MB peak for full KD at 4096 tokens), single rows no worse than in-place work."""
    m = z.amax(dim=1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, 0.0)  # a row of -inf stays -inf, not NaN
    z.sub_(m)
    s = torch.empty(z.shape[0], dtype=z.dtype, device=z.device)
    step = max(1, (1 << 18) // z.shape[1])
    for r0 in range(0, z.shape[0], step):
        s[r0:r0 + step] = z[r0:r0 + step].exp().sum(dim=1)
    lse = s.log_()
    z.sub_(lse[:, None])
    return lse.add_(m.squeeze(1))


def weighted(g: Tensor, u: float | Tensor) -> Tensor:
    """g * upstream weight, in place: a float for the whole chunk, or (t,) per token."""
    if isinstance(u, Tensor):
        return g.mul_(u[:, None])
    return g if u == 1.0 else g.mul_(u)


# ---------------------------------------------------------------------------------------------------------
# The walk over token chunks

class Plan(NamedTuple):
    softcap: float | None
    buffers: int
    token_chunk: int
    vocab_chunk: int
    logits_budget: int
    products: torch.dtype = torch.float32


def _workspace(numel: int, like: Tensor) -> Tensor:
    """One fp32 buffer reused by every chunk: a fresh 128 MB tensor per chunk would be paid again in
    page faults each time (large allocations go straight to mmap)."""
    return torch.empty(numel, dtype=torch.float32, device=like.device)


_HELD: dict[str, Tensor] = {}


def _held(name: str, numel: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A flat buffer of at least `numel` elements kept between calls: the bf16 product path's scratch
    arrays (and its bf16 copy of the weight) are each hundreds of MB, and a fresh allocation that
    size is paid again in page faults every step (measured: converting the 262k x 640 table into a
    new tensor 397 ms, into a kept one 48 ms). `release_workspaces()` frees them."""
    buf = _HELD.get(name)
    if buf is None or buf.numel() < numel or buf.dtype != dtype or buf.device != device:
        _HELD.pop(name, None)
        buf = _HELD[name] = torch.empty(numel, dtype=dtype, device=device)
    return buf[:numel]


def release_workspaces() -> int:
    """Free the buffers the bf16 vocabulary products keep between calls; returns the bytes freed."""
    freed = sum(b.numel() * b.element_size() for b in _HELD.values())
    _HELD.clear()
    return freed


def _add_widened(out: Tensor, x: Tensor, rows: int = 2048) -> None:
    """out (fp32) += x (bf16) through a kept fp32 slab: a mixed-dtype add_ widens x into a fresh
    temporary its size (a (V, d) fp32 array per call, paid in page faults)."""
    slab = _held("slab", rows * out.shape[1], out.dtype, out.device).view(rows, out.shape[1])
    for r0 in range(0, out.shape[0], rows):
        r1 = min(out.shape[0], r0 + rows)
        out[r0:r1].add_(slab[:r1 - r0].copy_(x[r0:r1]))


def _weight_slices(weight: Tensor, vocab_chunk: int, grads: bool, dtype: torch.dtype):
    """(v0, rows in `dtype` or None) covering the vocabulary. A weight in `dtype` is used whole, in
    place. Another dtype is converted once, whole, when gradients are formed (each token chunk reads it
    twice, and the (V, d) fp32 weight gradient is there anyway), else `vocab_chunk` rows at a time
    (None: convert weight[v0:v0 + vocab_chunk] where used), so evaluation makes no copy of the table."""
    if weight.dtype == dtype:
        return [(0, weight)]
    if grads:
        if dtype == torch.float32:
            return [(0, weight.float())]
        held = _held("weight", weight.numel(), dtype, weight.device).view(weight.shape)
        return [(0, held.copy_(weight))]
    return [(v0, None) for v0 in range(0, weight.shape[0], vocab_chunk)]


def _mm_into(a: Tensor, b: Tensor, out: Tensor, scratch: Tensor | None, accumulate: bool = False) -> None:
    """out (fp32) = a @ b, or out += a @ b. fp32 operands multiply straight into out; bf16 ones into
    `scratch` (a bf16 buffer of at least out's size, contiguous whatever out's strides) and are
    widened into out."""
    if scratch is None:
        if accumulate:
            out.addmm_(a, b)
        else:
            torch.mm(a, b, out=out)
        return
    tmp = scratch[:out.numel()].view(out.shape)
    torch.mm(a, b, out=tmp)
    if accumulate:
        out.add_(tmp)
    else:
        out.copy_(tmp)


def _walk(hidden: Tensor, weight: Tensor, rows: Tensor, rule: Rule, plan: Plan, upstream: Upstream | None,
          need_h: bool = False, need_w: bool = False, n_out: int = 1):
    """Run `rule` over the rows in token chunks. Returns (outputs: tuple of (n,), grad_h (n, d) fp32 or
    None, grad_w (V, d) fp32 or None); the gradients are those of sum_k upstream_k * out_k."""
    n, (V, d) = rows.numel(), weight.shape
    dev = hidden.device
    grads = upstream is not None and (need_h or need_w)
    keep_tanh = grads and plan.softcap is not None
    low = plan.products != torch.float32
    per_row = 4 * V * (plan.buffers + keep_tanh) + 2 * V * low  # + the bf16 logits / gradient chunk
    tc = max(1, min(plan.token_chunk, max(n, 1), plan.logits_budget // per_row))
    tc = -(-n // -(-n // tc)) if n else tc  # equal chunks: 512 tokens as 171 + 171 + 170, not 170 x 3 + 2
    buf = _workspace(tc * V, hidden)
    buf2 = _workspace(tc * V, hidden) if keep_tanh else None
    # bf16 products: the (t, V) bf16 logits (then gradient) chunk and the (V, d) bf16 weight gradient
    scratch = _held("logits", tc * V, plan.products, dev) if low else None
    wscratch = (_held("weight_grad", V * d, plan.products, dev).view(V, d) if low and grads and need_w
                else None)
    slices = _weight_slices(weight, plan.vocab_chunk, grads, plan.products)
    grad_h = torch.zeros(n, d, dtype=torch.float32, device=dev) if grads and need_h else None
    grad_w = torch.zeros(V, d, dtype=torch.float32, device=dev) if grads and need_w else None
    outs: list[list[Tensor]] = []
    for n0 in range(0, n, tc):
        sl = slice(n0, n0 + tc)
        h = hidden.index_select(0, rows[sl]).to(plan.products)  # (t, d)
        t = h.shape[0]
        z = buf[:t * V].view(t, V)  # contiguous, so matmul can write into it
        for v0, w in slices:
            if w is None:
                w = weight[v0:v0 + plan.vocab_chunk].to(plan.products)
            _mm_into(h, w.t(), z[:, v0:v0 + w.shape[0]], scratch)
        th = None
        if plan.softcap is not None:  # Gemma 2's final logit soft-capping cap * tanh(z / cap)
            if keep_tanh:
                th = z.div_(plan.softcap).tanh_()
                z = torch.mul(th, plan.softcap, out=buf2[:t * V].view(t, V))
            else:
                z.div_(plan.softcap).tanh_().mul_(plan.softcap)
        up = None
        if grads:
            up = tuple(u[sl] if isinstance(u, Tensor) else u for u in upstream)
        values, g = rule(z, sl, up)
        outs.append(values)
        if g is None or not grads:
            continue
        if th is not None:
            g.mul_(th.square_().neg_().add_(1.0))  # d cap * tanh(z / cap) / dz = 1 - tanh^2, once
        if low:  # the gradient chunk in bf16, once, for both products (the logits' scratch is free now)
            g = scratch[:g.numel()].view(g.shape).copy_(g)
            gscratch = torch.empty(t * d, dtype=plan.products, device=dev)
        else:
            gscratch = None
        for v0, w in slices:
            gs = g[:, v0:v0 + (V if w is not None else plan.vocab_chunk)]
            if need_h:
                if w is None:
                    w = weight[v0:v0 + plan.vocab_chunk].to(plan.products)
                _mm_into(gs, w, grad_h[sl], gscratch, accumulate=v0 != 0)
            if need_w:
                gw = grad_w[v0:v0 + gs.shape[1]]
                if low:  # summed over token chunks in fp32
                    _add_widened(gw, torch.mm(gs.t(), h, out=wscratch[:gs.shape[1]]))
                else:
                    gw.addmm_(gs.t(), h)
    if outs:
        values = tuple(torch.cat(col) for col in zip(*outs))
    else:
        values = tuple(torch.zeros(0, dtype=torch.float32, device=dev) for _ in range(n_out))
    return values, grad_h, grad_w


def _grads_out(rows: Tensor, grad_h, grad_w, h_shape, dtypes):
    """The (n, d) rows gradient scattered into hidden's shape; both in the inputs' dtypes."""
    grad_hidden = grad_weight = None
    if grad_h is not None:
        grad_hidden = torch.zeros(h_shape, dtype=dtypes[0], device=grad_h.device)
        grad_hidden.index_copy_(0, rows, grad_h.to(dtypes[0]))
    if grad_w is not None:
        grad_weight = grad_w.to(dtypes[1])
    return grad_hidden, grad_weight


class _FusedSum(torch.autograd.Function):
    """sum_i loss_i; forward computes the gradient too, backward scales it by grad_out."""

    @staticmethod
    def forward(ctx, hidden, weight, rows, rule, plan):
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        (loss,), grad_h, grad_w = _walk(hidden, weight, rows, rule, plan, (1.0,), need_h, need_w)
        # Held as attributes, not saved tensors: backward hands them out as its only references, so
        # autograd adopts the (V, d) weight gradient as .grad (or adds a sparse embedding gradient
        # into it) in place; a saved tensor is still referenced then, and would be cloned (670 MB for
        # Gemma's table, ~0.4 s of page faults per step, measured).
        ctx.rows, ctx.grads = rows, [grad_h, grad_w]
        ctx.meta = (hidden.shape, (hidden.dtype, weight.dtype))
        return loss.sum()

    @staticmethod
    def backward(ctx, grad_out):
        if ctx.grads is None:  # the stored gradients were handed out by the first backward
            raise RuntimeError("this chunked loss was already backpropagated once (retain_graph is not "
                               "supported): compute the loss again")
        (grad_h, grad_w), rows = ctx.grads, ctx.rows
        ctx.grads = None
        scale = grad_out.float()
        grad_h = grad_h.mul_(scale) if grad_h is not None else None  # in place: no second (V, d) copy
        grad_w = grad_w.mul_(scale) if grad_w is not None else None
        h_shape, dtypes = ctx.meta
        return (*_grads_out(rows, grad_h, grad_w, h_shape, dtypes), None, None, None)


class _Recompute(torch.autograd.Function):
    """Per-token outputs; backward recomputes the logits chunk by chunk with the upstream weights."""

    @staticmethod
    def forward(ctx, hidden, weight, rows, rule, plan, n_out):
        values, _, _ = _walk(hidden, weight, rows, rule, plan, None, n_out=n_out)
        if len(values) != n_out:
            raise RuntimeError(f"rule returned {len(values)} outputs, expected {n_out}")
        ctx.save_for_backward(hidden, weight, rows)
        ctx.rule, ctx.plan = rule, plan
        ctx.set_materialize_grads(False)
        return values

    @staticmethod
    def backward(ctx, *grad_outs):
        hidden, weight, rows = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        upstream = tuple(None if g is None else g.float() for g in grad_outs)
        if all(u is None for u in upstream):
            return None, None, None, None, None, None
        _, grad_h, grad_w = _walk(hidden, weight, rows, ctx.rule, ctx.plan, upstream, need_h, need_w,
                                  n_out=len(upstream))
        return (*_grads_out(rows, grad_h, grad_w, hidden.shape, (hidden.dtype, weight.dtype)),
                None, None, None, None)


def _needs_grad(hidden: Tensor, weight: Tensor) -> bool:
    return torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)


def vocab_sum(hidden: Tensor, weight: Tensor, rows: Tensor, rule: Rule, *, softcap: float | None = None,
              buffers: int = 1, token_chunk: int = 1024, vocab_chunk: int = 32768,
              logits_budget: int = DEFAULT_BUDGET) -> Tensor:
    """sum over `rows` of the rule's single per-token loss: an fp32 scalar, differentiable in hidden
    (N, d) and weight (V, d). With a gradient to compute, forward computes it as well."""
    plan = Plan(softcap, buffers, token_chunk, vocab_chunk, logits_budget, current_products())
    if _needs_grad(hidden, weight):
        return _FusedSum.apply(hidden, weight, rows, rule, plan)
    return _walk(hidden, weight, rows, rule, plan, None)[0][0].sum()


def vocab_map(hidden: Tensor, weight: Tensor, rows: Tensor, rule: Rule, *, n_out: int = 1,
              softcap: float | None = None, buffers: int = 1, token_chunk: int = 1024,
              vocab_chunk: int = 32768, logits_budget: int = DEFAULT_BUDGET) -> tuple[Tensor, ...]:
    """The rule's n_out per-token outputs, each (n,) over `rows`, differentiable with any upstream
    gradient (backward recomputes the logits); without gradients, a single forward walk."""
    plan = Plan(softcap, buffers, token_chunk, vocab_chunk, logits_budget, current_products())
    if _needs_grad(hidden, weight):
        return _Recompute.apply(hidden, weight, rows, rule, plan, n_out)
    return _walk(hidden, weight, rows, rule, plan, None, n_out=n_out)[0]
