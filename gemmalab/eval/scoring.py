"""Token scoring for evaluation: next-token log-probabilities without (tokens x 262k) logits.

Every eval that scores text (perplexity, perplexity by position, passkey log-probabilities, the
lm-eval backend's rolling log-likelihoods) runs the decoder to its final-norm hidden states and
then forms logits a bounded block of rows at a time (`logits_budget` bytes), keeping only what it
needs per token: the log-normaliser, the target's log-probability, and optionally the KL from a
reference model's distribution and whether both put their top token on the same id. Scoring a
32K-token document therefore never holds more than one block of logits, whatever the mode: the
block goes through the model's own LM head (the quantized table's kernel in native / q8 mode).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["TokenScores", "score_hidden", "document_hidden", "score_document", "bulk_head"]


def bulk_head(*models) -> contextlib.ExitStack:
    """A context in which the quantized LM heads of `models` keep their table dequantized, for
    scoring many blocks of positions (a no-op for fp32 models, whose table is already dense)."""
    stack = contextlib.ExitStack()
    for m in models:
        if m is not None and hasattr(m.embed_tokens, "bulk_weights"):
            stack.enter_context(m.embed_tokens.bulk_weights())
    return stack


@dataclass
class TokenScores:
    """Per-token results (all (n,) CPU tensors). nll = -log p_model(target) in nats.

    With a reference: kl = KL(p_ref || p_model) per token (llama-perplexity's --kl-divergence
    direction), ref_nll = -log p_ref(target), same_top = argmax of both equal.
    """
    nll: Tensor
    kl: Tensor | None = None
    ref_nll: Tensor | None = None
    same_top: Tensor | None = None

    @staticmethod
    def cat(parts: list["TokenScores"]) -> "TokenScores":
        def join(name):
            vals = [getattr(p, name) for p in parts]
            return None if any(v is None for v in vals) else torch.cat(vals)
        return TokenScores(join("nll"), join("kl"), join("ref_nll"), join("same_top"))


def _rows_per_block(vocab: int, copies: int, logits_budget: int) -> int:
    return max(1, logits_budget // (vocab * 4 * copies))


@torch.inference_mode()
def score_hidden(model, hidden: Tensor, targets: Tensor, *, ref_model=None,
                 ref_hidden: Tensor | None = None, logits_budget: int = 256 << 20) -> TokenScores:
    """Score `targets` (n,) from final-norm hidden states (n, d) through `model.lm_head`.

    ref_model / ref_hidden: a reference model's LM head and hidden states at the same positions
    (same vocabulary); adds kl, ref_nll and same_top.
    """
    hidden = hidden.reshape(-1, hidden.shape[-1])
    targets = targets.reshape(-1).to(hidden.device)
    if hidden.shape[0] != targets.shape[0]:
        raise ValueError(f"{hidden.shape[0]} hidden states for {targets.shape[0]} targets")
    vocab = model.config.vocab_size
    with_ref = ref_model is not None
    if with_ref and (ref_hidden is None or ref_hidden.reshape(-1, ref_hidden.shape[-1]).shape[0]
                     != hidden.shape[0]):
        raise ValueError("a reference model needs its hidden states at the same positions")
    if with_ref:
        ref_hidden = ref_hidden.reshape(-1, ref_hidden.shape[-1])
    step = _rows_per_block(vocab, 2 if with_ref else 1, logits_budget)
    parts = []
    for s in range(0, hidden.shape[0], step):
        e = min(s + step, hidden.shape[0])
        tgt = targets[s:e, None]
        logits = model.lm_head(hidden[s:e], bulk=True).float()
        logp = logits.log_softmax(-1)
        del logits
        nll = -logp.gather(1, tgt)[:, 0]
        if not with_ref:
            parts.append(TokenScores(nll.cpu()))
            continue
        ref_logp = ref_model.lm_head(ref_hidden[s:e], bulk=True).float().log_softmax(-1)
        if ref_logp.shape[-1] != logp.shape[-1]:
            raise ValueError(f"the reference model has {ref_logp.shape[-1]} vocabulary entries, the "
                             f"model {logp.shape[-1]}; KL needs the same vocabulary")
        kl = (ref_logp.exp() * (ref_logp - logp)).sum(-1).clamp(min=0)
        same = ref_logp.argmax(-1) == logp.argmax(-1)
        parts.append(TokenScores(nll.cpu(), kl.cpu(), (-ref_logp.gather(1, tgt)[:, 0]).cpu(),
                                 same.cpu()))
    return TokenScores.cat(parts)


@torch.inference_mode()
def document_hidden(model, ids: Tensor, chunk: int = 512):
    """Yield (start, hidden (n, d)) for consecutive chunks of one long sequence `ids` (T,).

    Prefill through a KV cache sized for the whole sequence, so every position sees its full
    causal context (global layers) or its window (local layers), exactly like one long forward.
    """
    ids = ids.reshape(1, -1).to(model.device)
    T = ids.shape[1]
    cache = model.make_cache(1, T)
    for s in range(0, T, chunk):
        e = min(s + chunk, T)
        yield s, model.hidden_states(ids[:, s:e], cache=cache)[0]


def score_document(model, ids: Tensor, *, chunk: int = 512, progress=None,
                   logits_budget: int = 256 << 20) -> Tensor:
    """nll (T-1,): -log p(ids[p+1] | ids[:p+1]) for every p, with the full preceding context."""
    ids = torch.as_tensor(ids).reshape(-1)
    with bulk_head(model):
        return _score_document(model, ids, chunk, progress, logits_budget)


def _score_document(model, ids, chunk, progress, logits_budget):
    out = []
    for s, h in document_hidden(model, ids, chunk):
        e = s + h.shape[0]
        targets = ids[s + 1:e + 1]
        out.append(score_hidden(model, h[:targets.shape[0]], targets,
                                logits_budget=logits_budget).nll)
        if progress is not None:
            progress.update(e - s)
    return torch.cat(out)
