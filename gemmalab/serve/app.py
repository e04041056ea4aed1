"""The OpenAI-compatible HTTP API (Starlette/FastAPI + uvicorn) over the continuous-batching engine.

POST /v1/chat/completions, POST /v1/completions (JSON or server-sent events), GET /v1/models,
GET /health, and GET /openapi.json: the OpenAPI document of all of them, request bodies and
responses included (the handlers read the raw body themselves, so the error for a bad one is OpenAI's,
and the document is built from the same pydantic models they validate with). Errors use OpenAI's body
`{"error": {"message", "type", "param", "code"}}`, with a 4xx status for every bad request.
"""
from __future__ import annotations

import asyncio
import json
import logging
import re
import secrets
import time
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, WithJsonSchema, field_validator
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
# Field names and meanings follow the OpenAI API reference (Chat Completions, Completions). The
# WithJsonSchema / json_schema_extra annotations change only the OpenAPI document (what the
# validators below accept, stated as JSON Schema), never the validation itself.

INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1
GREEDY_BELOW = 1e-5  # temperatures in (0, this) sample as temperature 0: see `sampling_values`
TOP_P_FLOOR = 1e-7  # smaller top_p values sample as this one: see `sampling_values`

_zero_only = WithJsonSchema({"type": "number", "enum": [0],
                             "description": "accepted for compatibility; only 0 is supported"})

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
    stop: Annotated[str | list[str] | None, WithJsonSchema(
        {"anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}, "maxItems": 4},
                   {"type": "null"}]})] = Field(default=None, validate_default=True)
    # a 64-bit integer like OpenAI's; beyond it torch's generator cannot take it
    seed: int | None = Field(default=None, ge=INT64_MIN, le=INT64_MAX)
    frequency_penalty: Annotated[float, _zero_only] = 0.0
    presence_penalty: Annotated[float, _zero_only] = 0.0

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
    content: Annotated[str | list[dict[str, Any]], WithJsonSchema(
        {"anyOf": [{"type": "string"},
                   {"type": "array", "items": {
                       "type": "object", "required": ["type", "text"],
                       "properties": {"type": {"type": "string", "enum": ["text"]},
                                      "text": {"type": "string"}}}}]})]


class ChatRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)


class CompletionRequest(_Common):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16  # OpenAI's default for completions
    logprobs: int | None = Field(default=None, ge=0, le=20)
    echo: Annotated[bool, WithJsonSchema({"type": "boolean", "enum": [False],
                                          "description": "not supported: only false"})] = False
    suffix: Annotated[str | None, WithJsonSchema({"anyOf": [{"type": "null"}, {"type": "string", "maxLength": 0}],
                                                  "description": "not supported: null or empty"})] = None

    @field_validator("echo", "suffix")
    @classmethod
    def _unsupported(cls, v, info):
        if v:
            raise ValueError(f"{info.field_name} is not supported")
        return v


# ---- the OpenAPI document --------------------------------------------------------------------------

def _nullable(schema: dict) -> dict:
    return {"anyOf": [schema, {"type": "null"}]}


_STR, _INT, _NUM = {"type": "string"}, {"type": "integer"}, {"type": "number"}
_FINISH = {"type": "string", "enum": ["stop", "length"]}
_USAGE = {"type": "object", "required": ["prompt_tokens", "completion_tokens", "total_tokens"],
          "properties": {k: {"type": "integer", "minimum": 0}
                         for k in ("prompt_tokens", "completion_tokens", "total_tokens")}}
_TOP_CHAT = {"type": "object", "required": ["token", "logprob", "bytes"],
             "properties": {"token": _STR, "logprob": _NUM, "bytes": {"type": "array", "items": _INT}}}
_LOGPROBS_CHAT = {"type": "object", "required": ["content"], "properties": {"content": {
    "type": "array", "items": {**_TOP_CHAT, "required": ["token", "logprob", "bytes", "top_logprobs"],
                               "properties": {**_TOP_CHAT["properties"],
                                              "top_logprobs": {"type": "array", "items": _TOP_CHAT}}}}}}
_LOGPROBS_TEXT = {"type": "object", "required": ["tokens", "token_logprobs", "top_logprobs", "text_offset"],
                  "properties": {"tokens": {"type": "array", "items": _STR},
                                 "token_logprobs": {"type": "array", "items": _NUM},
                                 "top_logprobs": {"type": "array", "items": {
                                     "type": "object", "additionalProperties": _NUM}},
                                 "text_offset": {"type": "array", "items": _INT}}}


def _completion_schema(chat: bool) -> dict:
    """A whole (non-streamed) response; streams are text/event-stream of the matching chunks."""
    if chat:
        choice = {"type": "object", "required": ["index", "message", "logprobs", "finish_reason"],
                  "properties": {"index": _INT, "finish_reason": _FINISH,
                                 "logprobs": _nullable(_LOGPROBS_CHAT),
                                 "message": {"type": "object", "required": ["role", "content"],
                                             "properties": {"role": {"type": "string", "enum": ["assistant"]},
                                                            "content": _STR}}}}
    else:
        choice = {"type": "object", "required": ["index", "text", "logprobs", "finish_reason"],
                  "properties": {"index": _INT, "text": _STR, "finish_reason": _FINISH,
                                 "logprobs": _nullable(_LOGPROBS_TEXT)}}
    return {"type": "object", "required": ["id", "object", "created", "model", "choices", "usage"],
            "properties": {"id": _STR, "created": _INT, "model": _STR, "usage": _USAGE,
                           "object": {"type": "string",
                                      "enum": ["chat.completion" if chat else "text_completion"]},
                           "choices": {"type": "array", "minItems": 1, "items": choice},
                           "system_fingerprint": _STR}}


# OpenAPI before 3.2: the schema of a text/event-stream describes each event (data: one JSON chunk,
# or "[DONE]" last)
_SSE_EVENT = {"type": "object", "required": ["data"],
              "properties": {"data": {"type": "string", "minLength": 1}, "event": _STR, "id": _STR}}
ERROR_SCHEMA = {"type": "object", "required": ["error"], "properties": {"error": {
    "type": "object", "required": ["message", "type", "param", "code"],
    "properties": {"message": {"type": "string", "minLength": 1}, "type": _STR,
                   "param": _nullable(_STR), "code": _nullable(_STR)}}}}
_ERROR_STATUSES = {400: "a bad request (invalid JSON, a field out of range, a prompt over the context)",
                   401: "a missing or wrong API key (with --api-key)",
                   404: "a model this server does not serve",
                   413: "a request body over --max-body",
                   503: "too many requests waiting (--max-queue)",
                   504: "a request that ran past --timeout"}


def _errors(*statuses: int) -> dict:
    return {str(s): {"description": _ERROR_STATUSES[s],
                     "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
            for s in statuses}


def _request_schema(model_cls: type[BaseModel], model_name: str, max_context: int, max_n: int,
                    vocab_size: int) -> dict:
    """The JSON Schema of a request body, with this server's own limits: the one model it serves,
    max_tokens below its context, n up to its batch, prompt token ids in its vocabulary."""
    schema = model_cls.model_json_schema(ref_template="#/components/schemas/{model}")
    props = schema["properties"]
    props["model"] = {"type": "string", "enum": [model_name], "description": "the model this server serves"}
    tokens = {"type": "integer", "minimum": 1, "maximum": max(1, max_context - 1),
              "description": "new tokens at most; prompt plus these must fit the context"}
    props["max_completion_tokens"] = _nullable(tokens)
    props["max_tokens"] = {**_nullable(tokens), **({"default": 16} if "prompt" in props else {})}
    props["n"] = {"type": "integer", "minimum": 1, "maximum": max_n, "default": 1}
    if "prompt" in props:  # one prompt per request: a string, one token-id list, or a list of one
        ids = {"type": "array", "minItems": 1,
               "items": {"type": "integer", "minimum": 0, "maximum": vocab_size - 1}}
        text = {"type": "string", "minLength": 1}
        props["prompt"] = {"anyOf": [text, {"type": "array", "minItems": 1, "maxItems": 1, "items": text}, ids,
                                     {"type": "array", "minItems": 1, "maxItems": 1, "items": ids}]}
    return schema


def openapi_document(settings: Settings, max_context: int, max_n: int, vocab_size: int) -> dict:
    """The OpenAPI 3.1 document of the API: what /openapi.json serves (and schemathesis fuzzes)."""
    components: dict[str, Any] = {"Error": ERROR_SCHEMA}
    bodies = {}
    for name, cls in (("ChatCompletionRequest", ChatRequest), ("CompletionRequest", CompletionRequest)):
        schema = _request_schema(cls, settings.model_name, max_context, max_n, vocab_size)
        components.update(schema.pop("$defs", {}))
        components[name] = schema
        bodies[name] = {"required": True, "content": {"application/json": {
            "schema": {"$ref": f"#/components/schemas/{name}"}}}}
    auth = (401,) if settings.api_key is not None else ()

    def ok(description: str, schema: dict, stream: bool = False) -> dict:
        content = {"application/json": {"schema": schema}}
        if stream:
            content["text/event-stream"] = {"schema": _SSE_EVENT}
        return {"200": {"description": description, "content": content}}

    def post(summary: str, op_id: str, body: str, chat: bool) -> dict:
        return {"post": {"summary": summary, "operationId": op_id, "requestBody": bodies[body],
                         "responses": {**ok("the completion, or with stream=true its server-sent events",
                                            _completion_schema(chat), stream=True),
                                       **_errors(400, *auth, 404, 413, 503, 504)}}}

    model = {"type": "object", "required": ["id", "object", "created", "owned_by"],
             "properties": {"id": _STR, "object": {"type": "string", "enum": ["model"]}, "created": _INT,
                            "owned_by": _STR}}
    models = {"type": "object", "required": ["object", "data"],
              "properties": {"object": {"type": "string", "enum": ["list"]},
                             "data": {"type": "array", "items": model}}}
    counts = {k: {"type": "integer", "minimum": 0} for k in ("running", "prefilling", "waiting", "free_rows")}
    health = {"type": "object", "required": ["status", "model", *counts],
              "properties": {"status": {"type": "string", "enum": ["ok"]}, "model": _STR, **counts}}
    return {
        "openapi": "3.1.0",
        "info": {"title": "gemmalab", "version": "1",
                 "description": "OpenAI-compatible API (Chat Completions, Completions, Models) over "
                                "gemmalab's continuous-batching engine"},
        "paths": {
            "/v1/chat/completions": post("Create a chat completion", "create_chat_completion",
                                         "ChatCompletionRequest", True),
            "/v1/completions": post("Create a text completion", "create_completion", "CompletionRequest", False),
            "/v1/models": {"get": {"summary": "List the served model", "operationId": "list_models",
                                   "responses": {**ok("the one model this server serves", models),
                                                 **_errors(*auth)}}},
            "/health": {"get": {"summary": "Liveness and engine load (no API key needed)", "operationId": "health",
                                "responses": ok("the server is up", health)}},
        },
        "components": {"schemas": components},
    }


# ---- the app -------------------------------------------------------------------------------------

def create_app(engine: Engine, settings: Settings) -> FastAPI:
    app = FastAPI(title="gemmalab", docs_url=None, redoc_url=None, openapi_url=None)
    tokenizer = engine.tokenizer
    created = int(time.time())
    document = openapi_document(settings, engine.max_context, min(16, engine.max_batch),
                                engine.lm.config.vocab_size)
    app.openapi = lambda: document  # the handlers read raw bodies: FastAPI alone would see no bodies

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
        response = error_response(exc.status_code, str(exc.detail), code=None)
        response.headers.update(exc.headers or {})  # e.g. Allow on a 405 (RFC 9110 15.5.6)
        return response

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
        if body.n > engine.max_batch:
            raise APIError(400, f"n={body.n} exceeds this server's batch of {engine.max_batch} sequences",
                           param="n")
        temperature, top_p = sampling_values(body.temperature, body.top_p)
        return SamplingParams(temperature=temperature, top_k=body.top_k, top_p=top_p, seed=body.seed)

    async def parse(request: Request, model_cls):
        raw = await request.body()
        try:
            data = json.loads(raw)
        except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError; nesting too deep
            why = "nested too deeply" if isinstance(e, RecursionError) else str(e)
            raise APIError(400, f"the request body is not valid JSON ({why})", code="invalid_json") from None
        if not isinstance(data, dict):
            raise APIError(400, "the request body must be a JSON object", code="invalid_json")
        try:
            return model_cls.model_validate(data)
        except ValidationError as e:
            err = e.errors()[0]
            param = _param(err.get("loc", ()))
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
            try:
                ids = tokenizer.encode(prompt, add_bos=True)
            except ValueError as e:  # TokenizerError: a lone surrogate (JSON can spell one: "\ud800")
                raise APIError(400, str(e), param="prompt") from None
        else:
            ids = list(prompt)
            if not ids or not all(0 <= i < engine.lm.config.vocab_size for i in ids):
                raise APIError(400, "prompt token ids must be in [0, vocab size) and not empty", param="prompt")
        return await run(request, body, ids, "text", body.logprobs, budget(body, len(ids), "prompt"))

    @app.get("/openapi.json", include_in_schema=False)
    async def openapi():
        return document

    async def run(request: Request, body: _Common, ids: list[int], kind: str, top: int | None,
                  max_tokens: int):
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Event] = asyncio.Queue()
        sampling = params(body)
        req = EngineRequest(prompt_ids=ids, params=sampling, max_tokens=max_tokens,
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


def sampling_values(temperature: float, top_p: float) -> tuple[float, float]:
    """(temperature, top_p) the engine samples with, the same distribution as asked for in float32.

    A temperature below GREEDY_BELOW is 0 (greedy), its limit: logits divided by a tiny one overflow
    float32 to inf, and a distribution of infs cannot be sampled. A top_p below TOP_P_FLOOR is
    TOP_P_FLOOR: one that small rounds to 0 in float32 and would filter out every token, while any
    top_p below 1/vocabulary (TOP_P_FLOOR is, for any vocabulary under 10^7) keeps just the most
    likely token, since it alone has at least that mass.
    """
    return (0.0 if temperature < GREEDY_BELOW else temperature), max(top_p, TOP_P_FLOOR)


_UNION_TAG = re.compile(r"(str|int|float|bool|none|(list|dict|function-\w+)\[.*\])$")


def _param(loc: tuple) -> str | None:
    """OpenAI's `param` for a pydantic error location: the field path ('messages.0.role') without
    the union-member tags pydantic adds ('prompt.str', 'stop.list[str].0')."""
    return ".".join(str(x) for x in loc if not (isinstance(x, str) and _UNION_TAG.fullmatch(x))) or None


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
