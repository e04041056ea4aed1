"""Prompt-lookup speculative decoding (one text prompt): drafts copied from the context, verified in
one forward pass (Saxena 2023, "Prompt Lookup Decoding"; the acceptance rule is speculative
sampling's, Leviathan et al. 2023 / Chen et al. 2023). Greedy output is identical to plain greedy
decoding; sampled output follows exactly the same distribution.
"""
from __future__ import annotations

import time
from typing import Iterator, Sequence

import torch

from ..model.cache import RING_HEADROOM
from .sampling import SamplingParams, filtered_distribution, sample
from .steps import PromptTooLongError, prefill


class NgramIndex:
    """Where every n-gram (n <= max_n) of a growing token list last ended, for draft lookup."""

    def __init__(self, max_n: int):
        self.max_n, self.seq = max_n, []
        self.latest: list[dict[tuple, int]] = [{} for _ in range(max_n + 1)]
        self.before: list[dict[tuple, int | None]] = [{} for _ in range(max_n + 1)]

    def append(self, token: int) -> None:
        self.seq.append(token)
        end = len(self.seq)
        for n in range(1, min(self.max_n, end) + 1):
            key = tuple(self.seq[end - n:end])
            self.before[n][key] = self.latest[n].get(key)
            self.latest[n][key] = end

    def draft(self, k: int) -> list[int]:
        """Up to k tokens that followed the latest earlier occurrence of the longest matching tail."""
        end = len(self.seq)
        for n in range(min(self.max_n, end), 0, -1):
            prev = self.before[n].get(tuple(self.seq[end - n:end]))
            if prev is not None:
                return self.seq[prev:prev + k]
        return []


def lookup_steps(model, prompt: list[int], max_new_tokens: int, params: SamplingParams,
                  stop_ids: Sequence[int], chunk_size: int, stats: dict | None, k: int, ngram: int
                  ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    if not prompt:
        raise ValueError("every prompt needs at least one token")
    if not 1 <= k <= RING_HEADROOM or ngram < 1:
        raise ValueError(f"lookup must be in [1, {RING_HEADROOM}] draft tokens and lookup_ngram >= 1")
    context = model.config.max_position_embeddings
    if len(prompt) >= context:
        raise PromptTooLongError(f"the prompt has {len(prompt)} tokens; the model context is "
                                 f"{context} tokens (and at least one is needed for the answer)")
    max_new_tokens = min(max_new_tokens, context - len(prompt))
    device = model.device
    # k columns of slack: a verification may write past the last token that is kept
    cache = model.make_cache(1, min(context, len(prompt) + max_new_tokens + k))
    generator = None
    if params.seed is not None:
        generator = torch.Generator(device=device).manual_seed(params.seed)
    stops = set(int(t) for t in stop_ids)
    index = NgramIndex(ngram)
    for t in prompt:
        index.append(t)
    t0 = time.perf_counter()
    ids = torch.tensor([prompt], device=device)
    logits = prefill(model, cache, ids, torch.arange(len(prompt), device=device)[None], chunk_size)[0]
    t1 = time.perf_counter()
    drafted = accepted = verify_steps = produced = 0
    pending = [int(sample(logits[None], params, generator)[0])]  # tokens to emit next
    done = torch.tensor([True])
    while True:
        for token in pending:
            produced += 1
            index.append(token)
            finished = token in stops or produced >= max_new_tokens
            yield torch.tensor([token]), done if finished else ~done
            if finished:
                break
        if finished:
            break
        # pending[-1] is not in the cache; the ones before it were accepted drafts (already in it)
        draft = index.draft(min(k, max_new_tokens - produced))
        pos0 = len(index.seq) - 1  # the position of `token`
        length = int(cache.lengths[0])
        block = torch.tensor([token] + draft, device=device)
        logits = _extend(model, cache, block, torch.arange(pos0, pos0 + len(block), device=device))
        verify_steps += 1
        drafted += len(draft)
        n_ok, nxt = _verify(logits, draft, params, generator)
        accepted += n_ok
        cache.truncate(0, length + 1 + n_ok)  # keep `token` and the accepted drafts
        pending = draft[:n_ok] + [nxt]
    if stats is not None:
        t2 = time.perf_counter()
        stats.update(prompt_tokens=len(prompt), prefill_s=t1 - t0, decode_s=t2 - t1,
                     new_tokens=produced, drafted=drafted, accepted=accepted,
                     verify_steps=verify_steps,
                     decode_tok_s=(produced - 1) / (t2 - t1) if produced > 1 else 0.0)


@torch.inference_mode()
def _extend(model, cache, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Append tokens (T,) to the single row of `cache`; next-token logits (T, V)."""
    if getattr(model, "_fuses_rows", False):
        return model.decode_step(tokens, positions, cache, rows=torch.zeros(len(tokens), dtype=torch.long))
    return model(tokens[None], positions[None], cache)[0]


def _verify(logits: torch.Tensor, draft: list[int], params: SamplingParams,
            generator: torch.Generator | None) -> tuple[int, int]:
    """(number of draft tokens kept, the token that follows them) from the verification logits."""
    if params.temperature == 0:
        best = logits.argmax(-1).tolist()
        n = 0
        while n < len(draft) and best[n] == draft[n]:
            n += 1
        return n, best[n]
    for n, d in enumerate(draft):
        probs, index = filtered_distribution(logits[n:n + 1], params)
        probs, index = probs[0], (None if index is None else index[0])
        where = (index == d).nonzero() if index is not None else torch.tensor([[d]])
        p_d = float(probs[where[0, 0]]) if len(where) else 0.0
        u = torch.rand((), generator=generator).item()
        if u < p_d:
            continue
        residual = probs.clone()  # rejected: sample from p with d removed
        if len(where):
            residual[where[0, 0]] = 0.0
        choice = int(torch.multinomial(residual / residual.sum(), 1, generator=generator))
        return n, choice if index is None else int(index[choice])
    return len(draft), int(sample(logits[len(draft):len(draft) + 1], params, generator)[0])
