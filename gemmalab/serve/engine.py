"""The server's engine: a queue and one thread in front of the generation core.

A single engine thread owns the model through a `generate.BatchGenerator` (a KV cache of `max_batch`
rows; continuous batching, n samples per prompt from one prefill, per-row seeds, log-probs, stops).
Requests wait in a queue; between steps the engine admits waiting requests into free rows, cancels
what the HTTP side gave up on, and runs one core step (one prefill chunk, so a long prompt does not
stall the others for long, and one decode step for every running sequence), turning the core's
events into each request's `Event` callbacks. A finished, failed or cancelled sequence frees its row
at once, for the next waiting request.

Each row computes exactly what it would compute alone (see generate/batch.py), so a greedy request
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

from ..generate import BatchGenerator, SamplingParams, SequenceEvent

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


class Engine:
    """Owns the model; `submit` requests from any thread; `close` stops the loop."""

    def __init__(self, lm, max_batch: int = 16, max_queue: int = 256, max_context: int | None = None,
                 prefill_chunk: int = 512):
        self.lm, self.model, self.tokenizer = lm, lm.model, lm.tokenizer
        self.max_batch, self.max_queue = max_batch, max_queue
        self.max_context = min(max_context or lm.config.max_position_embeddings,
                               lm.config.max_position_embeddings)
        self.prefill_chunk = prefill_chunk
        self.core = BatchGenerator(self.model, self.tokenizer, max_batch, self.max_context,
                                   prefill_chunk, catch_errors=True)
        self.cache = self.core.cache
        self.queue: queue.Queue[Request] = queue.Queue()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._ids = itertools.count()
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
    def running(self) -> list:
        return self.core.running

    @property
    def prefilling(self) -> list:
        return self.core.prefilling

    @property
    def free_rows(self) -> list[int]:
        return self.core.free_rows

    @property
    def steps(self) -> int:
        return self.core.steps

    @property
    def load(self) -> dict:
        return {"running": len(self.core.running), "prefilling": len(self.core.prefilling),
                "waiting": self.queue.qsize(), "free_rows": len(self.core.free_rows)}

    # ---- the loop -------------------------------------------------------------------------------
    def _loop(self) -> None:
        torch.set_grad_enabled(False)
        while not self._stop.is_set():
            try:
                busy = self._admit() | self._step()
            except Exception as e:  # never let one bad step kill the server: fail what runs
                log.exception("engine step failed")
                self._dispatch(self.core.abort("error", str(e)))
                busy = True
            if not busy:
                self._wake.wait(0.05)
                self._wake.clear()
        self._dispatch(self.core.abort("cancelled", "the server is shutting down"))
        while not self.queue.empty():
            req = self.queue.get_nowait()
            for i in range(req.n):
                req.on_event(Event(i, finish_reason="cancelled", error="the server is shutting down"))

    def _admit(self) -> bool:
        admitted = False
        while self.core.free_rows and not self.queue.empty():
            req = self.queue.queue[0]
            if req.cancelled.is_set():
                self.queue.get_nowait()
                continue
            if not self.core.can_admit(req.n):
                break
            self.queue.get_nowait()
            try:
                self.core.admit(req.prompt_ids, req.params, n=req.n, max_tokens=req.max_tokens,
                                stop=req.stop or (), stop_ids=req.stop_ids, logprobs=req.logprobs,
                                tag=req)
            except Exception as e:  # this request fails; the others go on
                log.exception("admission failed")
                for i in range(req.n):
                    req.on_event(Event(i, finish_reason="error", error=f"{type(e).__name__}: {e}"))
                continue
            admitted = True
        return admitted

    def _step(self) -> bool:
        groups = {id(g): g for g in self.core.prefilling}
        groups.update((id(s.group), s.group) for s in self.core.running)
        for group in groups.values():
            if group.tag.cancelled.is_set():
                self._dispatch(self.core.cancel(group))
        if self.core.idle:
            return False
        self._dispatch(self.core.step())
        return True

    def _dispatch(self, events: list[SequenceEvent]) -> None:
        """The core's events as the requests' callbacks."""
        for ev in events:
            req: Request = ev.group.tag
            if ev.token is not None:
                if req.first_token is None:
                    req.first_token = time.perf_counter()
                req.completion_tokens += 1
                lp = None if ev.model_logprobs is None else [ev.model_logprobs]
                req.on_event(Event(ev.index, ev.text, [ev.token], lp))
            if ev.finish_reason is not None:
                if ev.text:
                    req.on_event(Event(ev.index, ev.text))
                req._open -= 1
                req.on_event(Event(ev.index, finish_reason=ev.finish_reason, error=ev.error))


class QueueFull(RuntimeError):
    """Too many requests are waiting."""
