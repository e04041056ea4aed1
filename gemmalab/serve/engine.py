"""Continuous batching: one decode batch shared by every running request.

A single engine thread owns the model and a KV cache of `max_batch` rows. Requests wait in a queue;
between decode steps the engine admits waiting requests into free rows (their prompts are prefilled
one chunk per step, so a long prompt does not stall the others for long), runs one decode step for
every running sequence (`model.decode_step` with each row at its own position), samples each
sequence with its own settings, and hands the new text to the request's callback. A finished,
failed or cancelled sequence frees its row at once, for the next waiting request.

Each row computes exactly what it would compute alone (see `Gemma3.decode_step`), so a greedy request
gives the same tokens as `gemmalab generate`, whatever else is running.
"""
from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from ..generate import SamplingParams, StopStrings, sample

log = logging.getLogger("gemmalab.serve")


@dataclass
class Event:
    """What a request's callback receives: new text of one choice, or its end."""
    index: int  # choice index (n > 1)
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict] | None = None  # per token: {"id", "logprob", "top": [(id, logprob)]}
    finish_reason: str | None = None  # "stop" | "length" | "error" | "cancelled"
    error: str | None = None


@dataclass
class Request:
    prompt_ids: list[int]
    params: SamplingParams
    max_tokens: int
    on_event: Callable[[Event], None]
    n: int = 1
    stop: Sequence[str] = ()
    stop_ids: Sequence[int] = ()
    logprobs: int | None = None  # None: none; k >= 0: the chosen token's logprob and the top k
    id: str = ""
    cancelled: threading.Event = field(default_factory=threading.Event)
    submitted: float = field(default_factory=time.perf_counter)
    first_token: float | None = None
    completion_tokens: int = 0
    _open: int = 0  # choices still running

    def cancel(self) -> None:
        self.cancelled.set()


class _Sequence:
    """One choice of one request, decoding in one cache row."""

    def __init__(self, req: Request, index: int, row: int, tokenizer, seed_offset: int):
        self.req, self.index, self.row = req, index, row
        self.pos = len(req.prompt_ids)
        self.generated = 0
        self.decoder = tokenizer.stream_decoder()
        self.stopper = StopStrings(req.stop or ())
        self.generator = None
        if req.params.seed is not None:
            self.generator = torch.Generator().manual_seed(req.params.seed + seed_offset)
        self.last: int | None = None  # the sampled token not yet in the cache
        self.done = False


class Engine:
    """Owns the model; `submit` requests from any thread; `close` stops the loop."""

    def __init__(self, lm, max_batch: int = 16, max_queue: int = 256, max_context: int | None = None,
                 prefill_chunk: int = 512):
        self.lm, self.model, self.tokenizer = lm, lm.model, lm.tokenizer
        self.max_batch, self.max_queue = max_batch, max_queue
        self.max_context = min(max_context or lm.config.max_position_embeddings,
                               lm.config.max_position_embeddings)
        self.prefill_chunk = prefill_chunk
        self.cache = self.model.make_cache(max_batch, self.max_context)
        self.free_rows = list(range(max_batch))
        self.queue: queue.Queue[Request] = queue.Queue()
        self.running: list[_Sequence] = []
        # (request, its n rows (reserved at admission, so a later request cannot take them), tokens done)
        self.prefilling: list[tuple[Request, list[int], int]] = []
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._ids = itertools.count()
        self.steps = 0
        self.thread = threading.Thread(target=self._loop, name="gemmalab-engine", daemon=True)
        self.thread.start()

    # ---- public ---------------------------------------------------------------------------------
    def submit(self, req: Request) -> Request:
        """Queue a request; raises QueueFull when too many wait, ValueError for a bad request."""
        if not req.prompt_ids:
            raise ValueError("the prompt is empty")
        if req.n < 1 or req.n > self.max_batch:
            raise ValueError(f"n must be in [1, {self.max_batch}]")
        if len(req.prompt_ids) + 1 > self.max_context:
            raise ValueError(f"the prompt has {len(req.prompt_ids)} tokens; this server's context is "
                             f"{self.max_context} tokens (and at least one is needed for the answer)")
        if self.queue.qsize() >= self.max_queue:
            raise QueueFull(f"{self.queue.qsize()} requests are waiting; try again later")
        req.id = req.id or f"req-{next(self._ids)}"
        req._open = req.n
        self.queue.put(req)
        self._wake.set()
        return req

    def close(self, timeout: float = 30.0) -> None:
        """Stop after cancelling whatever still runs (graceful: the callbacks get their end)."""
        self._stop.set()
        self._wake.set()
        self.thread.join(timeout)

    @property
    def load(self) -> dict:
        return {"running": len(self.running), "prefilling": len(self.prefilling),
                "waiting": self.queue.qsize(), "free_rows": len(self.free_rows)}

    # ---- the loop -------------------------------------------------------------------------------
    def _loop(self) -> None:
        torch.set_grad_enabled(False)
        while not self._stop.is_set():
            try:
                busy = self._admit() | self._prefill_one_chunk() | self._decode()
            except Exception as e:  # never let one bad step kill the server: fail what runs
                log.exception("engine step failed")
                for seq in list(self.running):
                    self._finish(seq, "error", str(e))
                for req, rows, _ in list(self.prefilling):
                    self._fail_prefill(req, rows, str(e))
                busy = True
            if not busy:
                self._wake.wait(0.05)
                self._wake.clear()
        for seq in list(self.running):
            self._finish(seq, "cancelled", "the server is shutting down")
        for req, rows, _ in list(self.prefilling):
            self._fail_prefill(req, rows, "the server is shutting down")
        while not self.queue.empty():
            req = self.queue.get_nowait()
            for i in range(req.n):
                req.on_event(Event(i, finish_reason="cancelled", error="the server is shutting down"))

    def _admit(self) -> bool:
        admitted = False
        while self.free_rows and not self.queue.empty():
            req = self.queue.queue[0]
            if req.cancelled.is_set():
                self.queue.get_nowait()
                continue
            if len(self.free_rows) < req.n:
                break
            self.queue.get_nowait()
            rows = [self.free_rows.pop(0) for _ in range(req.n)]
            self.cache.reset(slice(rows[0], rows[0] + 1))
            self.prefilling.append((req, rows, 0))
            admitted = True
        return admitted

    def _prefill_one_chunk(self) -> bool:
        if not self.prefilling:
            return False
        req, rows, done = self.prefilling[0]
        row = rows[0]
        if req.cancelled.is_set():
            self.prefilling.pop(0)
            self.free_rows.extend(rows)
            return True
        try:
            ids = req.prompt_ids[done:done + self.prefill_chunk]
            view = self.cache.rows(row, row + 1)
            with torch.inference_mode():
                logits = self.model(torch.tensor([ids]), torch.arange(done, done + len(ids))[None], view,
                                    last_only=True)[:, -1]
            done += len(ids)
            if done < len(req.prompt_ids):
                self.prefilling[0] = (req, rows, done)
                return True
            for r in rows[1:]:  # n > 1: the other choices start from a copy of the prompt's cache
                self._copy_row(row, r)
            seqs = [_Sequence(req, i, r, self.tokenizer, seed_offset=i) for i, r in enumerate(rows)]
        except Exception as e:  # this request fails; the others go on
            log.exception("prefill failed")
            self._fail_prefill(req, rows, f"{type(e).__name__}: {e}")
            return True
        self.prefilling.pop(0)
        self.running.extend(seqs)
        for seq in seqs:
            self._emit(seq, logits[0])
        return True

    def _copy_row(self, src: int, dst: int) -> None:
        c = self.cache
        for layer in c.layers:
            layer.k[dst].copy_(layer.k[src])
            layer.v[dst].copy_(layer.v[src])
        c.full_pos[dst].copy_(c.full_pos[src])
        c.ring_pos[dst].copy_(c.ring_pos[src])
        c.lengths[dst] = c.lengths[src]

    def _decode(self) -> bool:
        for seq in [s for s in self.running if s.req.cancelled.is_set()]:
            self._finish(seq, "cancelled", None)
        if not self.running:
            return False
        seqs = list(self.running)
        tokens = torch.tensor([s.last for s in seqs])
        positions = torch.tensor([s.pos for s in seqs])
        rows = torch.tensor([s.row for s in seqs])
        with torch.inference_mode():
            logits = self.model.decode_step(tokens, positions, self.cache, rows=rows)
        self.steps += 1
        for seq in seqs:
            seq.pos += 1
        for i, seq in enumerate(seqs):
            self._emit(seq, logits[i])
        return True

    def _emit(self, seq: _Sequence, logits: torch.Tensor) -> None:
        """`_sample_and_report`, failing only this sequence when it raises (its own sampling
        settings, say): the others in the decode batch go on."""
        try:
            self._sample_and_report(seq, logits)
        except Exception as e:
            log.exception("sampling failed")
            self._finish(seq, "error", f"{type(e).__name__}: {e}")

    def _sample_and_report(self, seq: _Sequence, logits: torch.Tensor) -> None:
        """Sample the next token of `seq` from its logits and report it (or the end)."""
        req = seq.req
        token = int(sample(logits[None], req.params, seq.generator)[0])
        lp = None
        if req.logprobs is not None:
            logp = torch.log_softmax(logits.float(), -1)
            top = torch.topk(logp, req.logprobs) if req.logprobs else None
            lp = [{"id": token, "logprob": float(logp[token]),
                   "top": [] if top is None else list(zip(top.indices.tolist(), top.values.tolist()))}]
        if req.first_token is None:
            req.first_token = time.perf_counter()
        seq.generated += 1
        req.completion_tokens += 1
        if token in req.stop_ids:
            req.on_event(Event(seq.index, "", [token], lp))
            self._finish(seq, "stop", None)
            return
        piece, hit = seq.stopper.push(seq.decoder.push(token))
        if piece or lp:
            req.on_event(Event(seq.index, piece, [token], lp))
        if hit:
            self._finish(seq, "stop", None)
        elif seq.generated >= req.max_tokens or seq.pos + 1 >= self.max_context:
            tail = seq.stopper.push(seq.decoder.flush())[0] + seq.stopper.flush()
            if tail:
                req.on_event(Event(seq.index, tail))
            self._finish(seq, "length", None)
        else:
            seq.last = token

    def _finish(self, seq: _Sequence, reason: str, error: str | None) -> None:
        if seq.done:
            return
        seq.done = True
        self.running.remove(seq)
        self.free_rows.append(seq.row)
        req = seq.req
        req._open -= 1
        req.on_event(Event(seq.index, finish_reason=reason, error=error))

    def _fail_prefill(self, req: Request, rows: list[int], error: str) -> None:
        self.prefilling = [p for p in self.prefilling if p[0] is not req]
        self.free_rows.extend(r for r in rows if r not in self.free_rows)
        for i in range(req.n):
            req.on_event(Event(i, finish_reason="error", error=error))


class QueueFull(RuntimeError):
    """Too many requests are waiting."""
