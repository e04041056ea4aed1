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


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None
           ) -> torch.Tensor:
    """Next tokens (B,) from last-position logits (B, V).

    Top-k takes a partial selection (torch.topk) instead of sorting the 262k vocabulary; top-p then
    sorts only the k survivors. A full sort happens only for top-p with top_k=0.
    """
    if params.temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / params.temperature
    if params.top_k and params.top_k < logits.shape[-1]:
        values, index = torch.topk(logits, params.top_k, dim=-1)  # sorted, descending
    elif params.top_p < 1.0:
        values, index = torch.sort(logits, dim=-1, descending=True)
    else:
        probs = torch.softmax(logits, dim=-1)
        return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    probs = torch.softmax(values, dim=-1)
    if params.top_p < 1.0:
        before = torch.cumsum(probs, dim=-1) - probs  # mass strictly before each candidate
        probs = probs.masked_fill(before >= params.top_p, 0.0)  # the top candidate always stays
    choice = torch.multinomial(probs, 1, generator=generator)
    return index.gather(-1, choice).squeeze(-1)


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
    return model(tokens[:, None], positions[:, None], cache)[:, -1]


def generate_steps(model: Gemma3, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                   params: SamplingParams, stop_ids: Sequence[int] = (), pad_id: int = 0,
                   chunk_size: int = 512, stats: dict | None = None,
                   inputs_embeds: Sequence[torch.Tensor] | None = None,
                   image_groups: Sequence[torch.Tensor] | None = None
                   ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield (tokens (B,), finished (B,) bool) once per generated position.

    A row that produced a stop token is marked finished from that step on; its later tokens are
    meaningless. The loop ends when every row finished or after max_new_tokens.
    Prompts with images also give, per prompt, inputs_embeds (T_i, d) and image_groups (T_i,)
    (Gemma3Multimodal.embed and model.multimodal.image_groups); generated tokens are text.
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    context = model.config.max_position_embeddings
    longest = max(len(p) for p in prompts)
    if longest >= context:
        raise PromptTooLongError(f"the prompt has {longest} tokens; the model context is {context} "
                                 "tokens (and at least one is needed for the answer)")
    max_new_tokens = min(max_new_tokens, context - longest)
    device = model.embed_tokens.weight.device
    ids, positions = left_pad(prompts, pad_id)
    ids, positions = ids.to(device), positions.to(device)
    cache = model.make_cache(len(prompts), longest + max_new_tokens)
    generator = None
    if params.seed is not None:
        generator = torch.Generator(device=device).manual_seed(params.seed)
    stop = torch.tensor(list(stop_ids) or [-1], device=device)
    finished = torch.zeros(len(prompts), dtype=torch.bool, device=device)

    embeds = groups = None
    if inputs_embeds is not None:
        embeds, groups = _left_pad_vision(inputs_embeds, image_groups, ids.shape[1], device)

    t0 = time.perf_counter()
    logits = prefill(model, cache, ids, positions, chunk_size, embeds, groups)
    t1 = time.perf_counter()
    next_pos = positions[:, -1] + 1
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
        stats.update(prompt_tokens=int((positions >= 0).sum()), prefill_s=t1 - t0,
                     decode_s=t2 - t1, new_tokens=steps * len(prompts),
                     decode_tok_s=(steps - 1) * len(prompts) / (t2 - t1) if steps > 1 else 0.0)


def _left_pad_vision(embeds: Sequence[torch.Tensor], groups: Sequence[torch.Tensor], T: int,
                     device) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T, d) embeddings and (B, T) image groups, left-padded like `left_pad` (zeros, -1)."""
    out = embeds[0].new_zeros(len(embeds), T, embeds[0].shape[-1], device=device)
    g = torch.full((len(embeds), T), -1, dtype=torch.long, device=device)
    for b, (e, gr) in enumerate(zip(embeds, groups)):
        out[b, T - len(e):] = e
        g[b, T - len(gr):] = gr
    return out, g


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
