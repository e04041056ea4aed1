"""The OpenAI-compatible HTTP API (Starlette/FastAPI + uvicorn) over the continuous-batching engine.

POST /v1/chat/completions, POST /v1/completions (JSON or server-sent events), GET /v1/models,
GET /health. Errors use OpenAI's body `{"error": {"message", "type", "param", "code"}}`.
"""
from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
from dataclasses import dataclass
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..generate import SamplingParams
from .engine import Engine, Event, QueueFull, Request as EngineRequest

log = logging.getLogger("gemmalab.serve")


# ---- settings and errors ----------------------------------------------------------------------

@dataclass
class Settings:
    model_name: str
    api_key: str | None = None
    max_body_bytes: int = 1 << 20
    request_timeout: float = 600.0
    default_max_tokens: int = 1024


class APIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def response(self) -> JSONResponse:
        return error_response(self.status, self.message, self.type, self.param, self.code)


def error_response(status: int, message: str, type: str = "invalid_request_error",
                   param: str | None = None, code: str | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": type, "param": param, "code": code}},
                        status_code=status)


# ---- request bodies -------------------------------------------------------------------------------

class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class _Common(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str
    max_tokens: int | None = Field(default=None)
    max_completion_tokens: int | None = Field(default=None)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=64, ge=0)  # extension (Gemma's recommended default); 0 disables
    n: int = Field(default=1, ge=1, le=16)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = Field(default=None, validate_default=True)
    seed: int | None = None
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        stops = [v] if isinstance(v, str) else (v or [])
        if len(stops) > 4:
            raise ValueError("at most 4 stop sequences")
        return stops

    @field_validator("frequency_penalty", "presence_penalty")
    @classmethod
    def _no_penalties(cls, v):
        if v != 0:
            raise ValueError("penalties are not supported (use 0)")
        return v


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[dict[str, Any]]


class ChatRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)


class CompletionRequest(_Common):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16  # OpenAI's default for completions
    logprobs: int | None = Field(default=None, ge=0, le=20)
    echo: bool = False
    suffix: str | None = None

    @field_validator("echo", "suffix")
    @classmethod
    def _unsupported(cls, v, info):
        if v:
            raise ValueError(f"{info.field_name} is not supported")
        return v


# ---- the app -------------------------------------------------------------------------------------

def create_app(engine: Engine, settings: Settings) -> FastAPI:
    app = FastAPI(title="gemmalab", docs_url=None, redoc_url=None, openapi_url=None)
    tokenizer = engine.tokenizer
    created = int(time.time())

    @app.exception_handler(APIError)
    async def _api_error(request, exc: APIError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation(request, exc: RequestValidationError):
        err = exc.errors()[0] if exc.errors() else {}
        loc = [str(x) for x in err.get("loc", ()) if x != "body"]
        if err.get("type") == "json_invalid":
            return error_response(400, "the request body is not valid JSON", code="invalid_json")
        message = err.get("msg", "invalid request")
        param = ".".join(loc) or None
        return error_response(400, f"{param}: {message}" if param else message, param=param)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc: StarletteHTTPException):
        return error_response(exc.status_code, str(exc.detail), code=None)

    @app.exception_handler(Exception)
    async def _internal(request, exc: Exception):
        log.exception("unhandled error")
        return error_response(500, "internal server error", type="server_error")

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": settings.model_name, **engine.load}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": settings.model_name, "object": "model",
                                            "created": created, "owned_by": "gemmalab"}]}

    def check_model(name: str) -> None:
        if name != settings.model_name:
            raise APIError(404, f"the model '{name}' does not exist; this server serves "
                                f"'{settings.model_name}'", param="model", code="model_not_found")

    def budget(body: _Common, prompt_len: int, param: str) -> int:
        limit = engine.max_context - prompt_len
        if limit < 1:
            raise APIError(400, f"the prompt has {prompt_len} tokens; this model's context is "
                                f"{engine.max_context} tokens", param=param, code="context_length_exceeded")
        asked = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        name = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
        if asked is None:
            return min(limit, settings.default_max_tokens)
        if asked < 1:
            raise APIError(400, f"{name} must be at least 1, got {asked}", param=name)
        if asked > limit:
            raise APIError(400, f"{name}={asked} plus the prompt's {prompt_len} tokens exceed the "
                                f"context of {engine.max_context} tokens", param=name,
                           code="context_length_exceeded")
        return asked

    def params(body: _Common) -> SamplingParams:
        return SamplingParams(temperature=body.temperature, top_k=body.top_k, top_p=body.top_p,
                              seed=body.seed)

    async def parse(request: Request, model_cls):
        raw = await request.body()
        try:
            data = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise APIError(400, f"the request body is not valid JSON ({e})", code="invalid_json") from None
        if not isinstance(data, dict):
            raise APIError(400, "the request body must be a JSON object", code="invalid_json")
        try:
            return model_cls.model_validate(data)
        except ValidationError as e:
            err = e.errors()[0]
            param = ".".join(str(x) for x in err.get("loc", ())) or None
            raise APIError(400, f"{param}: {err.get('msg')}" if param else err.get("msg", "invalid request"),
                           param=param) from None

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await parse(request, ChatRequest)
        check_model(body.model)
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.content}
                    for m in body.messages]
        for m in messages:
            if isinstance(m["content"], list) and any(i.get("type") != "text" for i in m["content"]):
                raise APIError(400, "only text content parts are supported", param="messages")
        try:
            ids = tokenizer.encode_chat(messages)
        except ValueError as e:
            raise APIError(400, str(e), param="messages") from None
        top = (body.top_logprobs or 0) if body.logprobs else None
        return await run(request, body, ids, "chat", top, budget(body, len(ids), "messages"))

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await parse(request, CompletionRequest)
        check_model(body.model)
        prompt = body.prompt
        if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
            if len(prompt) != 1:
                raise APIError(400, "one prompt per request is supported", param="prompt")
            prompt = prompt[0]
        if isinstance(prompt, str):
            if not prompt:
                raise APIError(400, "the prompt is empty", param="prompt")
            ids = tokenizer.encode(prompt, add_bos=True)
        else:
            ids = list(prompt)
            if not ids or not all(0 <= i < engine.lm.config.vocab_size for i in ids):
                raise APIError(400, "prompt token ids must be in [0, vocab size) and not empty", param="prompt")
        return await run(request, body, ids, "text", body.logprobs, budget(body, len(ids), "prompt"))

    async def run(request: Request, body: _Common, ids: list[int], kind: str, top: int | None,
                  max_tokens: int):
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Event] = asyncio.Queue()
        req = EngineRequest(prompt_ids=ids, params=params(body), max_tokens=max_tokens,
                            on_event=lambda e: loop.call_soon_threadsafe(events.put_nowait, e),
                            n=body.n, stop=body.stop, stop_ids=tokenizer.stop_ids, logprobs=top,
                            id=("chatcmpl-" if kind == "chat" else "cmpl-") + secrets.token_hex(12))
        try:
            engine.submit(req)
        except QueueFull as e:
            raise APIError(503, str(e), type="server_error", code="server_overloaded") from None
        except ValueError as e:
            raise APIError(400, str(e), param="messages" if kind == "chat" else "prompt",
                           code="context_length_exceeded") from None
        fmt = _Formatter(kind, req.id, settings.model_name, tokenizer, len(ids), body.n, top is not None)
        if body.stream:
            usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(stream(req, events, fmt, usage), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return await collect(request, req, events, fmt)

    async def next_event(req, events: asyncio.Queue, deadline: float) -> Event:
        remaining = deadline - time.perf_counter()
        if remaining <= 0:
            raise asyncio.TimeoutError
        return await asyncio.wait_for(events.get(), remaining)

    async def collect(request: Request, req, events: asyncio.Queue, fmt: "_Formatter"):
        deadline = time.perf_counter() + settings.request_timeout
        disconnect = asyncio.ensure_future(_wait_disconnect(request))
        try:
            open_choices = req.n
            while open_choices:
                get = asyncio.ensure_future(next_event(req, events, deadline))
                done, _ = await asyncio.wait({get, disconnect}, return_when=asyncio.FIRST_COMPLETED)
                if disconnect in done:
                    get.cancel()
                    req.cancel()
                    return error_response(499, "client closed the request", code="client_closed")
                try:
                    ev = get.result()
                except asyncio.TimeoutError:
                    req.cancel()
                    raise APIError(504, f"the request took longer than {settings.request_timeout:.0f} s",
                                   type="server_error", code="timeout") from None
                fmt.add(ev)
                if ev.finish_reason is not None:
                    if ev.finish_reason == "error":
                        raise APIError(500, ev.error or "generation failed", type="server_error")
                    open_choices -= 1
            log.info(json.dumps(fmt.log_record(req)))
            return JSONResponse(fmt.final())
        finally:
            disconnect.cancel()

    async def stream(req, events: asyncio.Queue, fmt: "_Formatter", include_usage: bool):
        deadline = time.perf_counter() + settings.request_timeout
        finished = False
        try:
            for chunk in fmt.opening():
                yield _sse(chunk)
            open_choices = req.n
            while open_choices:
                try:
                    ev = await next_event(req, events, deadline)
                except asyncio.TimeoutError:
                    yield _sse({"error": {"message": "the request timed out", "type": "server_error",
                                          "param": None, "code": "timeout"}})
                    return
                if ev.finish_reason == "error":
                    yield _sse({"error": {"message": ev.error or "generation failed",
                                          "type": "server_error", "param": None, "code": None}})
                    return
                chunk = fmt.chunk(ev)
                if chunk is not None:
                    yield _sse(chunk)
                if ev.finish_reason is not None:
                    open_choices -= 1
            if include_usage:
                yield _sse(fmt.usage_chunk())
            yield "data: [DONE]\n\n"
            finished = True
            log.info(json.dumps(fmt.log_record(req)))
        finally:
            if not finished:  # the client went away (or an error ended the stream): free the slot
                req.cancel()

    return app


async def _wait_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


class _Formatter:
    """Builds OpenAI response objects (whole or as stream chunks) from engine events."""

    def __init__(self, kind: str, rid: str, model: str, tokenizer, prompt_tokens: int, n: int,
                 logprobs: bool):
        self.kind, self.id, self.model, self.tok = kind, rid, model, tokenizer
        self.prompt_tokens, self.n, self.want_lp = prompt_tokens, n, logprobs
        self.created = int(time.time())
        self.text = [""] * n
        self.tokens = [0] * n
        self.finish = [None] * n
        self.lp: list[list[dict]] = [[] for _ in range(n)]

    def _piece(self, i: int) -> tuple[str, list[int]]:
        text = self.tok.decode([i]) if i not in self.tok.stop_ids else ""
        return text, list(text.encode("utf-8"))

    def _lp_chat(self, lps: list[dict]) -> list[dict]:
        out = []
        for e in lps:
            text, raw = self._piece(e["id"])
            out.append({"token": text, "logprob": e["logprob"], "bytes": raw,
                        "top_logprobs": [{"token": self._piece(t)[0], "logprob": v, "bytes": self._piece(t)[1]}
                                         for t, v in e["top"]]})
        return out

    def _lp_text(self, lps: list[dict], offset: int) -> dict:
        tokens, values, tops, offsets = [], [], [], []
        for e in lps:
            text = self._piece(e["id"])[0]
            tokens.append(text)
            values.append(e["logprob"])
            tops.append({self._piece(t)[0]: v for t, v in e["top"]})
            offsets.append(offset)
            offset += len(text)
        return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}

    def add(self, ev: Event) -> None:
        i = ev.index
        self.text[i] += ev.text
        self.tokens[i] += len(ev.token_ids)
        if ev.logprobs:
            self.lp[i] += ev.logprobs
        if ev.finish_reason is not None:
            self.finish[i] = ev.finish_reason if ev.finish_reason in ("stop", "length") else "stop"

    def usage(self) -> dict:
        completion = sum(self.tokens)
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion,
                "total_tokens": self.prompt_tokens + completion}

    def final(self) -> dict:
        if self.kind == "chat":
            choices = [{"index": i, "message": {"role": "assistant", "content": self.text[i]},
                        "logprobs": {"content": self._lp_chat(self.lp[i])} if self.want_lp else None,
                        "finish_reason": self.finish[i]} for i in range(self.n)]
            obj = "chat.completion"
        else:
            choices = [{"index": i, "text": self.text[i],
                        "logprobs": self._lp_text(self.lp[i], 0) if self.want_lp else None,
                        "finish_reason": self.finish[i]} for i in range(self.n)]
            obj = "text_completion"
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                "choices": choices, "usage": self.usage(), "system_fingerprint": "gemmalab"}

    def _chunk(self, choices: list[dict]) -> dict:
        obj = "chat.completion.chunk" if self.kind == "chat" else "text_completion"
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                "choices": choices, "system_fingerprint": "gemmalab"}

    def opening(self) -> list[dict]:
        if self.kind != "chat":
            return []
        return [self._chunk([{"index": i, "delta": {"role": "assistant", "content": ""},
                              "logprobs": None, "finish_reason": None}]) for i in range(self.n)]

    def chunk(self, ev: Event) -> dict | None:
        before = len(self.text[ev.index])
        self.add(ev)
        if not ev.text and ev.finish_reason is None and not ev.logprobs:
            return None
        fin = self.finish[ev.index] if ev.finish_reason is not None else None
        if self.kind == "chat":
            delta = {"content": ev.text} if ev.text or ev.finish_reason is None else {}
            lp = {"content": self._lp_chat(ev.logprobs)} if (self.want_lp and ev.logprobs) else None
            choice = {"index": ev.index, "delta": delta, "logprobs": lp, "finish_reason": fin}
        else:
            lp = self._lp_text(ev.logprobs, before) if (self.want_lp and ev.logprobs) else None
            choice = {"index": ev.index, "text": ev.text, "logprobs": lp, "finish_reason": fin}
        return self._chunk([choice])

    def usage_chunk(self) -> dict:
        chunk = self._chunk([])
        chunk["usage"] = self.usage()
        return chunk

    def log_record(self, req) -> dict:
        ttft = None if req.first_token is None else round(1000 * (req.first_token - req.submitted), 1)
        return {"event": "completion", "id": self.id, "prompt_tokens": self.prompt_tokens,
                "completion_tokens": sum(self.tokens), "ttft_ms": ttft,
                "ms": round(1000 * (time.perf_counter() - req.submitted), 1), "finish": self.finish}


class Guard:
    """Pure ASGI middleware (streams and disconnects pass through untouched): the bearer API key on
    /v1/*, the request body limit, and one structured log line per HTTP request."""

    def __init__(self, app, settings: Settings):
        self.app, self.settings = app, settings

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        headers = dict(scope.get("headers") or [])
        status = {"code": 0}

        async def send_logged(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            key = self.settings.api_key
            if key is not None and scope["path"].startswith("/v1/"):
                header = headers.get(b"authorization", b"").decode("latin-1")
                if not header:
                    return await _send_error(send_logged, 401, "missing API key: send 'Authorization: "
                                             "Bearer <key>'", "missing_api_key")
                given = header[7:] if header.lower().startswith("bearer ") else ""
                if not secrets.compare_digest(given.encode(), key.encode()):
                    return await _send_error(send_logged, 401, "invalid API key", "invalid_api_key")
            limit = self.settings.max_body_bytes
            length = headers.get(b"content-length")
            if length is not None and length.isdigit() and int(length) > limit:
                return await _send_error(send_logged, 413, f"the request body exceeds {limit} bytes",
                                         "request_too_large")
            seen = 0

            async def limited():
                nonlocal seen
                message = await receive()
                if message["type"] == "http.request":
                    seen += len(message.get("body", b""))
                    if seen > limit:
                        raise _TooLarge
                return message

            try:
                await self.app(scope, limited, send_logged)
            except _TooLarge:
                await _send_error(send_logged, 413, f"the request body exceeds {limit} bytes",
                                  "request_too_large")
        finally:
            log.info(json.dumps({"event": "http", "method": scope.get("method"), "path": scope["path"],
                                 "status": status["code"],
                                 "ms": round(1000 * (time.perf_counter() - t0), 1)}))


class _TooLarge(Exception):
    pass


async def _send_error(send, status: int, message: str, code: str) -> None:
    body = json.dumps({"error": {"message": message, "type": "invalid_request_error", "param": None,
                                 "code": code}}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
