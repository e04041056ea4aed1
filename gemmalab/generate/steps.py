"""Static-batch generation: left padding, chunked prefill, the decode step, and `generate_steps`.

Batches of prompts of different lengths are left-padded; padding gets position -1 so it is invisible
to real tokens (see model/cache.py), and each row counts its own positions from 0. `generate_steps`
is a plain generator over one fixed batch (every row decodes until all have stopped, in one joint
forward pass): the loop the benchmarks and the evaluation harness time. Continuous admission, n
samples per prompt, per-row seeds and log-probs are the batch decoder's (generate/batch.py), which
`LM.generate`, the server and training rollouts use.
"""
from __future__ import annotations

import contextlib

import time
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch

from ..model import Gemma3, KVCache
from .sampling import SamplingParams, sample


class PromptTooLongError(ValueError):
    """The prompt does not fit in the model context."""


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]  # new tokens only; ends with the stop token when one ended the text
    finish_reason: str  # "stop" (stop token or string) or "length"
    prompt_tokens: int
    stats: dict = field(default_factory=dict)


def check_prompts(prompts: Sequence[Sequence[int]], context: int) -> None:
    """Every prompt non-empty and shorter than the context (at least one token for the answer)."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    longest = max(len(p) for p in prompts)
    if longest >= context:
        raise PromptTooLongError(f"the prompt has {longest} tokens; the model context is {context} "
                                 "tokens (and at least one is needed for the answer)")


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
    from ..quant.linear import bulk_weights

    logits = None
    bounds = list(chunk_bounds(ids.shape[1], chunk_size, image_groups))
    # several chunks: a quantized model dequantizes each weight once for all of them
    with bulk_weights() if len(bounds) > 1 else contextlib.nullcontext():
        for s, e in bounds:
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
        from .lookup import lookup_steps
        yield from lookup_steps(model, list(prompts[0]), max_new_tokens, params, stop_ids,
                                 chunk_size, stats, lookup, lookup_ngram)
        return
    context = model.config.max_position_embeddings
    check_prompts(prompts, context)
    longest = max(len(p) for p in prompts)
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
