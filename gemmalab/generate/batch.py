"""The batch decoder: continuous admission into the rows of one KV cache (the generation core).

`BatchGenerator` owns a model, a cache of `max_batch` rows, the free rows and the running sequences
(mlx-lm's `BatchGenerator` is the model for the split; vLLM / Orca call the scheduling "continuous
batching"). `admit` reserves n rows for one prompt; `prefill_step` runs one chunk of the oldest
prompt still prefilling into its first row, and when the prompt is done copies that row to the other
n - 1 (`KVCache.copy_row`), so n samples share one prefill; `decode` runs one step for every running
sequence (`model.decode_step` with each row at its own position) and samples each with its own
settings and generator (seed + choice index). Each call returns `SequenceEvent`s: a token (with its
UTF-8-safe text piece and its log-probability under the distribution it was drawn from), or the end
of a sequence ("stop" | "length" | "cancelled" | "error"). A finished sequence frees its row at once.

Each row computes exactly what it would compute alone: prefill is per row, unpadded, and
`decode_step` keeps rows independent (the module path runs each row by itself, the fused quantized
step is row-independent). So a sequence's tokens and log-probs do not depend on what else runs.

`sample_batch` is the rollout front: N samples per prompt with per-token sampling log-probs, finish
reasons and prompt indices (what GKD, BOND, WARP and RL rollouts consume).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import torch

from .sampling import SamplingParams, sample_with_logprob
from .steps import chunk_bounds, check_prompts
from .text import TextStream

log = logging.getLogger("gemmalab.generate")


@dataclass
class SequenceEvent:
    """One token of one sequence, or its end (token None, finish_reason set)."""
    group: "Group"
    index: int  # choice index within the group (0 .. n-1)
    token: int | None = None
    text: str = ""  # new text: the token's piece, or on the final event what the decoder held back
    logprob: float | None = None  # log p(token) under the distribution sampled from (0 for greedy)
    model_logprobs: dict | None = None  # with logprobs=k: {"id", "logprob" (raw model), "top": [(id, lp)]}
    finish_reason: str | None = None  # "stop" | "length" | "cancelled" | "error"
    error: str | None = None


@dataclass(eq=False)
class Group:
    """One admitted prompt and its n choices (what `admit` returns)."""
    prompt_ids: list[int]
    params: SamplingParams
    n: int
    max_tokens: int
    stop: tuple[str, ...]
    stop_ids: frozenset[int]
    logprobs: int | None
    seed: int | None
    rows: list[int]
    chunks: list[tuple[int, int]]
    tag: Any = None  # the caller's handle (a server request, a prompt index)
    inputs_embeds: torch.Tensor | None = None  # (T, d), prompts with images
    image_groups: torch.Tensor | None = None  # (T,)
    prefilled: int = 0  # chunks done
    open: int = 0  # choices still running
    sequences: list["_Sequence"] = field(default_factory=list)
    cancelled: bool = False


class _Sequence:
    """One choice of one group, decoding in one cache row."""

    def __init__(self, group: Group, index: int, row: int, tokenizer, device):
        self.group, self.index, self.row = group, index, row
        self.pos = len(group.prompt_ids)  # where the next token goes
        self.generated = 0
        self.text = TextStream(tokenizer, group.stop, group.stop_ids)
        self.generator = None
        if group.seed is not None:
            self.generator = torch.Generator(device=device).manual_seed(group.seed + index)
        self.last: int | None = None  # the sampled token not yet in the cache
        self.done = False


class BatchGenerator:
    """Continuous batching over one cache of `max_batch` rows of `max_len` positions.

    catch_errors: a failing prefill or sampling call ends only its group / sequence with
    finish_reason "error" (a server); False (library use) lets the exception propagate.
    exact=False lets a model whose decode step is not row-wise (the fp32 module path; the fused
    quantized step always is) run all rows in one batched forward instead of one forward per row:
    the tied 262k-row LM head is then read once per step, not once per row, but a row's last bits
    may depend on the batch (BLAS blocks by batch size), as in `generate_steps`. LM.generate uses
    it; sample_batch and the server keep exact rows.
    """

    def __init__(self, model, tokenizer=None, max_batch: int = 16, max_len: int | None = None,
                 prefill_chunk: int = 512, catch_errors: bool = False, exact: bool = True):
        context = model.config.max_position_embeddings
        self.model, self.tokenizer = model, tokenizer
        self.max_batch = max_batch
        self.max_len = min(max_len or context, context)
        self.prefill_chunk, self.catch_errors = prefill_chunk, catch_errors
        self.batched_forward = not exact and not getattr(model, "_fuses_rows", False)
        self.device = model.device
        self.cache = model.make_cache(max_batch, self.max_len)
        self.free_rows = list(range(max_batch))
        self.prefilling: list[Group] = []
        self.running: list[_Sequence] = []
        self.steps = 0  # decode steps run

    # ---- admission ------------------------------------------------------------------------------
    def can_admit(self, n: int = 1) -> bool:
        return len(self.free_rows) >= n

    @property
    def idle(self) -> bool:
        return not self.prefilling and not self.running

    def admit(self, prompt_ids: Sequence[int], params: SamplingParams = SamplingParams(), *,
              n: int = 1, max_tokens: int = 128, stop: Sequence[str] = (),
              stop_ids: Sequence[int] = (), logprobs: int | None = None, seed: int | None = None,
              tag: Any = None, inputs_embeds: torch.Tensor | None = None,
              image_groups: torch.Tensor | None = None) -> Group:
        """Reserve n rows for a prompt (ids; with images also inputs_embeds (T, d) and
        image_groups (T,)); it is prefilled by the next `prefill_step`s. seed (default
        params.seed): choice i samples with a generator seeded seed + i. logprobs=k also reports
        the raw model log-prob of each token and the top k. Raises ValueError when fewer than n
        rows are free (see `can_admit`) or the prompt does not fit."""
        prompt_ids = [int(t) for t in prompt_ids]
        check_prompts([prompt_ids], self.max_len)
        if n < 1 or n > self.max_batch:
            raise ValueError(f"n must be in [1, {self.max_batch}]")
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
        if stop and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer (BatchGenerator(model, tokenizer))")
        if not self.can_admit(n):
            raise ValueError(f"{n} rows asked, {len(self.free_rows)} free")
        groups = None if image_groups is None else image_groups[None]
        rows = [self.free_rows.pop(0) for _ in range(n)]
        group = Group(prompt_ids, params, n, max_tokens, tuple(s for s in stop if s),
                      frozenset(int(t) for t in stop_ids), logprobs,
                      params.seed if seed is None else seed, rows,
                      chunk_bounds(len(prompt_ids), self.prefill_chunk, groups), tag,
                      inputs_embeds, image_groups, open=n)
        self.cache.reset(rows[0])
        self.prefilling.append(group)
        return group

    # ---- one unit of work -----------------------------------------------------------------------
    def step(self) -> list[SequenceEvent]:
        """One prefill chunk (if a prompt waits) and one decode step (if sequences run)."""
        return self.prefill_step() + self.decode()

    def prefill_step(self) -> list[SequenceEvent]:
        """Run the next chunk of the oldest prefilling prompt; when it is done, its n sequences
        start (their first tokens are sampled and returned)."""
        if not self.prefilling:
            return []
        group = self.prefilling[0]
        try:
            s, e = group.chunks[group.prefilled]
            row = group.rows[0]
            ids = torch.tensor([group.prompt_ids[s:e]], device=self.device)
            extra = {}
            if group.inputs_embeds is not None:
                extra = dict(inputs_embeds=group.inputs_embeds[None, s:e].to(self.device),
                             image_groups=group.image_groups[None, s:e].to(self.device))
            with torch.inference_mode():
                logits = self.model(ids, torch.arange(s, e, device=self.device)[None],
                                    self.cache.rows(row, row + 1), last_only=True, **extra)[:, -1]
            group.prefilled += 1
            if group.prefilled < len(group.chunks):
                return []
            for r in group.rows[1:]:  # n > 1: the other choices start from a copy of the prompt
                self.cache.copy_row(row, r)
            seqs = [_Sequence(group, i, r, self.tokenizer, self.device)
                    for i, r in enumerate(group.rows)]
        except Exception as e:
            if not self.catch_errors:
                raise
            log.exception("prefill failed")
            return self._fail_group(group, "error", f"{type(e).__name__}: {e}")
        self.prefilling.pop(0)
        group.sequences = seqs
        self.running.extend(seqs)
        events: list[SequenceEvent] = []
        for seq in seqs:
            self._emit(seq, logits[0], events)
        return events

    def decode(self) -> list[SequenceEvent]:
        """One decode step for every running sequence."""
        if not self.running:
            return []
        seqs = list(self.running)
        tokens = torch.tensor([s.last for s in seqs], device=self.device)
        positions = torch.tensor([s.pos for s in seqs], device=self.device)
        rows = torch.tensor([s.row for s in seqs])
        with torch.inference_mode():
            if self.batched_forward and len(seqs) > 1 and int(self.cache.lengths.max()) < self.max_len:
                logits = self._decode_all_rows(tokens, positions, rows)
            else:
                logits = self.model.decode_step(tokens, positions, self.cache, rows=rows)
        self.steps += 1
        events: list[SequenceEvent] = []
        for i, seq in enumerate(seqs):
            seq.pos += 1
            self._emit(seq, logits[i], events)
        return events

    def _decode_all_rows(self, tokens, positions, rows) -> torch.Tensor:
        """One forward over every cache row (exact=False): rows without a running sequence
        append a filler token at their next column (they are reset when admitted again)."""
        index = rows.to(self.device)
        all_tokens = torch.zeros(self.max_batch, dtype=torch.long, device=self.device)
        all_positions = self.cache.lengths.to(self.device, copy=True)
        all_tokens[index], all_positions[index] = tokens, positions
        return self.model.decode_step(all_tokens, all_positions, self.cache)[index]

    def run(self) -> Iterator[SequenceEvent]:
        """Step until every admitted group has finished."""
        while not self.idle:
            yield from self.step()

    # ---- ends -----------------------------------------------------------------------------------
    def cancel(self, group: Group, error: str | None = None) -> list[SequenceEvent]:
        """End every choice of a group now ("cancelled") and free its rows."""
        return self._fail_group(group, "cancelled", error)

    def abort(self, reason: str, error: str | None) -> list[SequenceEvent]:
        """End everything admitted (a failed step, a shutdown)."""
        events: list[SequenceEvent] = []
        for seq in list(self.running):
            events += self._finish(seq, reason, error)
        for group in list(self.prefilling):
            events += self._fail_group(group, reason, error)
        return events

    def _fail_group(self, group: Group, reason: str, error: str | None) -> list[SequenceEvent]:
        events: list[SequenceEvent] = []
        if group in self.prefilling:
            self.prefilling.remove(group)
            self.free_rows.extend(r for r in group.rows if r not in self.free_rows)
            group.open = 0
            events = [SequenceEvent(group, i, finish_reason=reason, error=error)
                      for i in range(group.n)]
        for seq in group.sequences:
            events += self._finish(seq, reason, error)
        group.cancelled = group.cancelled or reason == "cancelled"
        return events

    def _finish(self, seq: _Sequence, reason: str, error: str | None, text: str = ""
                ) -> list[SequenceEvent]:
        if seq.done:
            return []
        seq.done = True
        self.running.remove(seq)
        self.free_rows.append(seq.row)
        seq.group.open -= 1
        return [SequenceEvent(seq.group, seq.index, text=text, finish_reason=reason, error=error)]

    # ---- sampling -------------------------------------------------------------------------------
    def _emit(self, seq: _Sequence, logits: torch.Tensor, events: list[SequenceEvent]) -> None:
        """`_sample`, failing only this sequence when it raises (its own sampling settings, say):
        the others in the decode batch go on."""
        try:
            self._sample(seq, logits, events)
        except Exception as e:
            if not self.catch_errors:
                raise
            log.exception("sampling failed")
            events += self._finish(seq, "error", f"{type(e).__name__}: {e}")

    def _sample(self, seq: _Sequence, logits: torch.Tensor, events: list[SequenceEvent]) -> None:
        """Sample the next token of `seq` from its logits (V,) and report it (and the end)."""
        group = seq.group
        if group.params.temperature == 0:  # greedy: a point mass, log-prob 0
            token, logprob = int(logits.argmax()), 0.0
        else:
            tokens, logprobs = sample_with_logprob(logits[None], group.params, seq.generator)
            token, logprob = int(tokens[0]), float(logprobs[0])
        lp = None
        if group.logprobs is not None:
            logp = torch.log_softmax(logits.float(), -1)
            top = torch.topk(logp, group.logprobs) if group.logprobs else None
            lp = {"id": token, "logprob": float(logp[token]),
                  "top": [] if top is None else list(zip(top.indices.tolist(), top.values.tolist()))}
        seq.generated += 1
        event = SequenceEvent(group, seq.index, token, "", logprob, lp)
        events.append(event)
        event.text, stopped = seq.text.push(token)
        if stopped:
            events += self._finish(seq, "stop", None)
        elif seq.generated >= group.max_tokens or seq.pos + 1 >= self.max_len:
            events += self._finish(seq, "length", None, seq.text.flush())
        else:
            seq.last = token


# ---- rollouts -------------------------------------------------------------------------------------

@dataclass
class Sample:
    """One sampled continuation of one prompt."""
    prompt_index: int  # the group id: which prompt this continues
    index: int  # choice index within its prompt (0 .. n-1)
    token_ids: list[int]  # new tokens; ends with the stop id when one ended it
    logprobs: list[float]  # per token: log p under the distribution sampled from
    finish_reason: str  # "stop" | "length"
    text: str = ""  # with a tokenizer: the decoded text (stop strings cut)


def sample_batch(model, prompts: Sequence[Sequence[int]], n: int = 1, max_new_tokens: int = 128,
                 params: SamplingParams = SamplingParams(), *, stop_ids: Sequence[int] = (),
                 seed: int | None = None, tokenizer=None, stop: Sequence[str] = (),
                 max_batch: int | None = None, prefill_chunk: int = 512,
                 stats: dict | None = None, exact: bool = True) -> list[Sample]:
    """n samples for each prompt (token ids), ordered by (prompt_index, index).

    Prompts are admitted as rows free up (continuous batching over max_batch rows, default
    min(16 or n, prompts x n)). Prompt j's choice i samples with a generator seeded
    seed + j * n + i (seed None: unseeded), so each sample is bit-identical to
    `sample_batch(model, [prompts[j]], n, ..., seed=seed + j * n)[i]`, whatever else runs.
    exact=False decodes the rows of the fp32 module path in one batched forward (faster: the LM head
    is read once per step, not once per row), at the price of that row-for-row identity: a row's
    last bits then depend on the rows beside it (see BatchGenerator).
    """
    prompts = [[int(t) for t in p] for p in prompts]
    if not prompts:
        return []
    context = model.config.max_position_embeddings
    check_prompts(prompts, context)
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    seed = params.seed if seed is None else seed
    max_batch = max_batch or max(n, min(16, len(prompts) * n))
    gen = BatchGenerator(model, tokenizer, max_batch,
                         min(context, max(len(p) for p in prompts) + max_new_tokens), prefill_chunk,
                         exact=exact)
    out: dict[tuple[int, int], Sample] = {}
    waiting = list(range(len(prompts)))
    t0 = time.perf_counter()
    while waiting or not gen.idle:
        while waiting and gen.can_admit(n):
            j = waiting.pop(0)
            gen.admit(prompts[j], params, n=n, max_tokens=max_new_tokens, stop=stop,
                      stop_ids=stop_ids, seed=None if seed is None else seed + j * n, tag=j)
        for ev in gen.step():
            key = (ev.group.tag, ev.index)
            s = out.setdefault(key, Sample(ev.group.tag, ev.index, [], [], ""))
            if ev.token is not None:
                s.token_ids.append(ev.token)
                s.logprobs.append(ev.logprob)
            s.text += ev.text
            if ev.finish_reason is not None:
                s.finish_reason = ev.finish_reason
    if stats is not None:
        stats.update(prompt_tokens=sum(len(p) for p in prompts), decode_steps=gen.steps,
                     new_tokens=sum(len(s.token_ids) for s in out.values()),
                     seconds=time.perf_counter() - t0)
    return [out[k] for k in sorted(out)]
