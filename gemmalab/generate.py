"""Generation outside the model: prefill, decode step, sampling, stop tokens and strings, streaming.

Batches of prompts of different lengths are left-padded; padding gets position -1 so it is invisible
to real tokens (see model/cache.py), and each row counts its own positions from 0. The loop is a
plain generator (`generate_steps`) so that a trainer can drive it inside its loop and a server can
interleave requests.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch

from .model import Gemma3, KVCache
from .model.cache import RING_HEADROOM


class PromptTooLongError(ValueError):
    """The prompt does not fit in the model context."""


@dataclass(frozen=True)
class SamplingParams:
    """temperature 0 means greedy. top_k 0 and top_p 1.0 disable those filters.

    The defaults are Gemma 3's published generation config (temperature 1, top-k 64, top-p 0.95).
    """
    temperature: float = 1.0
    top_k: int = 64
    top_p: float = 0.95
    seed: int | None = None

    def __post_init__(self):
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]  # new tokens only; ends with the stop token when one ended the text
    finish_reason: str  # "stop" (stop token or string) or "length"
    prompt_tokens: int
    stats: dict = field(default_factory=dict)


def filtered_distribution(logits: torch.Tensor, params: SamplingParams
                          ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(probs (B, n), token ids (B, n) or None for the whole vocabulary) after temperature, top-k
    and top-p; the distribution `sample` draws from (temperature > 0).

    Top-k takes a partial selection (torch.topk) instead of sorting the 262k vocabulary; top-p then
    sorts only the k survivors. A full sort happens only for top-p with top_k=0.
    """
    logits = logits.float() / params.temperature
    if params.top_k and params.top_k < logits.shape[-1]:
        values, index = torch.topk(logits, params.top_k, dim=-1)  # sorted, descending
    elif params.top_p < 1.0:
        values, index = torch.sort(logits, dim=-1, descending=True)
    else:
        return torch.softmax(logits, dim=-1), None
    probs = torch.softmax(values, dim=-1)
    if params.top_p < 1.0:
        before = torch.cumsum(probs, dim=-1) - probs  # mass strictly before each candidate
        probs = probs.masked_fill(before >= params.top_p, 0.0)  # the top candidate always stays
        probs = probs / probs.sum(-1, keepdim=True)
    return probs, index


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None
           ) -> torch.Tensor:
    """Next tokens (B,) from last-position logits (B, V); temperature 0 is greedy (argmax)."""
    if params.temperature == 0:
        return logits.argmax(-1)
    probs, index = filtered_distribution(logits, params)
    choice = torch.multinomial(probs, 1, generator=generator)
    return (choice if index is None else index.gather(-1, choice)).squeeze(-1)


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """ids (B, T) and positions (B, T) with -1 on padding."""
    T = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), T), pad_id, dtype=torch.long)
    pos = torch.full((len(prompts), T), -1, dtype=torch.long)
    for b, p in enumerate(prompts):
        if len(p):
            ids[b, T - len(p):] = torch.tensor(list(p), dtype=torch.long)
            pos[b, T - len(p):] = torch.arange(len(p))
    return ids, pos


def chunk_bounds(T: int, chunk_size: int, image_groups: torch.Tensor | None = None
                 ) -> list[tuple[int, int]]:
    """Column ranges [s, e) of about chunk_size columns covering [0, T). With image_groups (B, T),
    a chunk is extended until it does not end inside an image in any row: the soft tokens of an
    image attend to each other in both directions, so all of them must be in one forward call
    (spec 2.2; llama.cpp needs n_ubatch to hold a whole image for the same reason)."""
    bounds, s = [], 0
    while s < T:
        e = min(s + chunk_size, T)
        if image_groups is not None:
            while e < T and bool(((image_groups[:, e - 1] >= 0) &
                                  (image_groups[:, e] == image_groups[:, e - 1])).any()):
                e += 1
        bounds.append((s, e))
        s = e
    return bounds


@torch.inference_mode()
def prefill(model: Gemma3, cache: KVCache, ids: torch.Tensor, positions: torch.Tensor,
            chunk_size: int = 512, inputs_embeds: torch.Tensor | None = None,
            image_groups: torch.Tensor | None = None) -> torch.Tensor:
    """Run the prompt through the model in chunks of columns; return last-position logits (B, V).

    inputs_embeds (B, T, d) and image_groups (B, T), for prompts with images, go to the model with
    the ids (see model/multimodal.py); chunks then never split an image.
    """
    logits = None
    for s, e in chunk_bounds(ids.shape[1], chunk_size, image_groups):
        extra = {}
        if inputs_embeds is not None:
            extra = dict(inputs_embeds=inputs_embeds[:, s:e], image_groups=image_groups[:, s:e])
        logits = model(ids[:, s:e], positions[:, s:e], cache, last_only=True, **extra)
    return logits[:, -1]


@torch.inference_mode()
def decode_step(model: Gemma3, cache: KVCache, tokens: torch.Tensor, positions: torch.Tensor
                ) -> torch.Tensor:
    """Append one token per row (B,) at positions (B,); return next-token logits (B, V)."""
    return model.decode_step(tokens, positions, cache)


def generate_steps(model: Gemma3, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                   params: SamplingParams, stop_ids: Sequence[int] = (), pad_id: int = 0,
                   chunk_size: int = 512, stats: dict | None = None, lookup: int = 0,
                   lookup_ngram: int = 3, inputs_embeds: Sequence[torch.Tensor] | None = None,
                   image_groups: Sequence[torch.Tensor] | None = None
                   ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield (tokens (B,), finished (B,) bool) once per generated position.

    A row that produced a stop token is marked finished from that step on; its later tokens are
    meaningless. The loop ends when every row finished or after max_new_tokens.

    lookup > 0 turns on prompt-lookup speculative decoding (one prompt only): up to `lookup` draft
    tokens are copied from the text after the latest earlier occurrence of the last n-gram
    (n = lookup_ngram down to 1) and verified in one forward pass. Greedy output is identical to plain
    greedy decoding; sampled output follows exactly the same distribution (a draft token d is kept
    with probability p(d), a rejected position samples from p without d). Acceptance counts go to
    `stats` (drafted, accepted, verify_steps).

    Prompts with images also give, per prompt, inputs_embeds (T_i, d) and image_groups (T_i,)
    (Gemma3Multimodal.embed and model.multimodal.image_groups); generated tokens are text.
    """
    if lookup:
        if inputs_embeds is not None:
            raise ValueError("prompt-lookup decoding takes text prompts (no images)")
        if len(prompts) != 1:
            raise ValueError("prompt-lookup decoding runs one prompt at a time")
        yield from _lookup_steps(model, list(prompts[0]), max_new_tokens, params, stop_ids,
                                 chunk_size, stats, lookup, lookup_ngram)
        return
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    context = model.config.max_position_embeddings
    longest = max(len(p) for p in prompts)
    if longest >= context:
        raise PromptTooLongError(f"the prompt has {longest} tokens; the model context is {context} "
                                 "tokens (and at least one is needed for the answer)")
    max_new_tokens = min(max_new_tokens, context - longest)
    device = model.device
    B = len(prompts)
    cache = model.make_cache(B, longest + max_new_tokens)
    generator = None
    if params.seed is not None:
        generator = torch.Generator(device=device).manual_seed(params.seed)
    stop = torch.tensor(list(stop_ids) or [-1], device=device)
    finished = torch.zeros(B, dtype=torch.bool, device=device)

    t0 = time.perf_counter()
    # Each prompt is prefilled into its own row, unpadded: a row then computes exactly what it
    # would alone, and the rows decode together, each at its own position.
    logits = []
    for b, p in enumerate(prompts):
        vision = (None, None)
        if inputs_embeds is not None:
            vision = (inputs_embeds[b][None].to(device), image_groups[b][None].to(device))
        logits.append(prefill(model, cache.rows(b, b + 1), torch.tensor([p], device=device),
                              torch.arange(len(p), device=device)[None], chunk_size, *vision))
    logits = torch.cat(logits)
    t1 = time.perf_counter()
    next_pos = torch.tensor([len(p) for p in prompts], device=device)
    steps = 0
    for steps in range(1, max_new_tokens + 1):
        tokens = sample(logits, params, generator)
        finished = finished | torch.isin(tokens, stop)
        yield tokens, finished
        if steps == max_new_tokens or bool(finished.all()):
            break
        logits = decode_step(model, cache, tokens, next_pos)
        next_pos = next_pos + 1
    if stats is not None:
        t2 = time.perf_counter()
        stats.update(prompt_tokens=sum(len(p) for p in prompts), prefill_s=t1 - t0,
                     decode_s=t2 - t1, new_tokens=steps * len(prompts),
                     decode_tok_s=(steps - 1) * len(prompts) / (t2 - t1) if steps > 1 else 0.0)


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


def _lookup_steps(model, prompt: list[int], max_new_tokens: int, params: SamplingParams,
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


class StopStrings:
    """Finds stop strings in streamed text and holds back text that may be the start of one."""

    def __init__(self, stops: Sequence[str] = ()):
        self.stops = [s for s in stops if s]
        self.text = ""  # everything emitted or held
        self.emitted = 0

    def push(self, piece: str) -> tuple[str, bool]:
        """Add new text; return (text safe to emit now, stopped)."""
        self.text += piece
        hits = [i for i in (self.text.find(s) for s in self.stops) if i >= 0]
        if hits:
            out = self.text[self.emitted:min(hits)]
            self.text, self.emitted = self.text[:min(hits)], min(hits)
            return out, True
        hold = 0
        for s in self.stops:  # longest suffix of the text that is a proper prefix of a stop string
            for n in range(min(len(s) - 1, len(self.text) - self.emitted), 0, -1):
                if self.text.endswith(s[:n]):
                    hold = max(hold, n)
                    break
        end = len(self.text) - hold
        out, self.emitted = self.text[self.emitted:end], max(self.emitted, end)
        return out, False

    def flush(self) -> str:
        out, self.emitted = self.text[self.emitted:], len(self.text)
        return out
