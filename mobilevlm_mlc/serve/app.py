"""The HTTP side: OpenAI's `/v1/chat/completions` (streaming or not), `/v1/models`, `/health` and
Prometheus `/metrics`, over the scheduler. Every request is checked here, before it is queued: what is
wrong comes back as OpenAI's error object with its status (400 bad value, 401 key, 404 model or route,
413 image too large, 422 wrong type, 429 queue full), and the server goes on serving."""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from mobilevlm_mlc.errors import MobileVLMError
from mobilevlm_mlc.runtime.conversation import (
    IMAGE_PLACEHOLDER,
    IMAGE_TOKEN_ID,
    preamble,
    render_chat,
    tokenize_with_images,
)
from mobilevlm_mlc.runtime.engine import Engine
from mobilevlm_mlc.runtime.sampling import GenerationConfig

from .images import ImagePolicy
from .metrics import ServerMetrics
from .protocol import APIError, ChatCompletionRequest, validation_message
from .scheduler import QueueFull, Scheduler
from .scheduler import Request as Job

MAX_STOP_STRINGS = 4  # as OpenAI
DISCONNECT_POLL_S = 0.25


@dataclass(frozen=True)
class ServerOptions:
    model_id: str
    api_key: str | None = None
    max_waiting: int = 64
    max_images: int = 1  # per request: MobileVLM was trained on one image per conversation
    prefix_cache: int = 8  # finished sequences kept in the KV cache for requests that begin the same
    images: ImagePolicy = ImagePolicy()


def create_app(engine: Engine, options: ServerOptions) -> FastAPI:
    metrics = ServerMetrics()
    scheduler = Scheduler(engine, options.max_waiting, metrics, options.prefix_cache)
    template = engine.dist.chat_config["conv_template"]

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        scheduler.start(tokenize_with_images(engine.tokenizer, preamble(template), add_bos=True))
        yield
        scheduler.stop()

    app = FastAPI(title="mobilevlm-mlc", lifespan=lifespan, docs_url=None, redoc_url=None)
    # room for the allowed images as base64 and a long conversation beside them
    body_limit = options.max_images * options.images.max_bytes * 4 // 3 + 4 * 2**20
    app.state.scheduler = scheduler

    def error_response(err: APIError, headers: dict | None = None) -> JSONResponse:
        metrics.requests.labels(str(err.status)).inc()
        return JSONResponse(err.body(), status_code=err.status, headers=headers)

    @app.exception_handler(APIError)
    async def on_api_error(_request: Request, err: APIError) -> JSONResponse:
        return error_response(err, {"Retry-After": "1"} if err.status == 429 else None)

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(_request: Request, err: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if err.status_code == 404 else "invalid_request_error"
        return error_response(APIError(err.status_code, str(err.detail), kind))

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(_request: Request, err: RequestValidationError) -> JSONResponse:
        param, message = validation_message(err.errors())
        return error_response(APIError(422, message, param=param))

    @app.exception_handler(Exception)
    async def on_unexpected(_request: Request, err: Exception) -> JSONResponse:
        return error_response(APIError(500, f"internal error: {type(err).__name__}", "server_error"))

    if options.api_key:
        app.add_middleware(
            _RequireKey,
            key=options.api_key.encode(),
            refusal=lambda: error_response(
                APIError(401, "missing or wrong API key (Authorization: Bearer KEY)", "authentication_error")
            ),
        )

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    model_card = {"id": options.model_id, "object": "model", "created": 0, "owned_by": "mobilevlm-mlc"}

    def check_model(name: str) -> None:
        if name != options.model_id:
            raise APIError(
                404, f"model {name!r} not found; this server has {options.model_id!r}", "not_found_error", "model"
            )

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [model_card]}

    @app.get("/v1/models/{model:path}")  # OpenAI's "retrieve model" (`client.models.retrieve`)
    async def model(model: str) -> dict:
        check_model(model)
        return model_card

    @app.get("/metrics")
    async def prometheus() -> PlainTextResponse:
        return PlainTextResponse(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        raw = await request.body()
        if len(raw) > body_limit:
            raise APIError(413, f"the request body is {len(raw)} bytes, more than the {body_limit} allowed")
        body = _parse(raw)
        check_model(body.model)
        unsupported = body.unsupported()
        if unsupported:
            raise APIError(400, f"{unsupported}: not supported by this server", param=unsupported)
        job, events = _job(engine, options, body, scheduler.capacity)
        try:
            scheduler.submit(job)
        except QueueFull as err:
            raise APIError(429, f"{err}; retry later", "rate_limit_error") from None
        except MobileVLMError as err:
            raise APIError(400, str(err), param="max_tokens") from None
        metrics.prompt_tokens.inc(job.prompt_tokens)
        completion_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            stream = _stream(request, job, events, completion_id, created, options.model_id, include_usage, metrics)
            return StreamingResponse(stream, media_type="text/event-stream")
        text, finish = [], None
        async for kind, detail in _events(request, job, events):
            if kind == "delta":
                text.append(detail)
            elif kind == "error":
                raise APIError(500, str(detail), "server_error")
            else:
                finish = detail
        if finish is None:  # the client went away
            return PlainTextResponse("", status_code=499)
        metrics.requests.labels("200").inc()
        return {
            "id": completion_id,
            "object": "chat.completion",
            "created": created,
            "model": options.model_id,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": "".join(text)},
                    "logprobs": None,
                    "finish_reason": finish,
                }
            ],
            "usage": _usage(job),
        }

    return app


class _RequireKey:
    """Every route but /health needs `Authorization: Bearer KEY` (the scheme in any case, as HTTP's auth
    schemes are; the key compared in constant time). A plain ASGI middleware: Starlette's
    `@app.middleware("http")` (BaseHTTPMiddleware) passes each streamed chunk through a memory stream and
    a task of its own, work the event loop did for every token of every stream (and on a 2-core machine
    the loop's time is taken from the engine's threads)."""

    def __init__(self, app, key: bytes, refusal) -> None:
        self.app, self.key, self.refusal = app, key, refusal

    def allows(self, authorization: bytes | None) -> bool:
        scheme, _, token = (authorization or b"").partition(b" ")
        return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(b" "), self.key)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["path"] != "/health":
            if not self.allows(dict(scope["headers"]).get(b"authorization")):
                await self.refusal()(scope, receive, send)
                return
        await self.app(scope, receive, send)


# ---- one request: parsed, rendered, queued ----------------------------------------------------------


def _parse(raw: bytes) -> ChatCompletionRequest:
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise APIError(400, f"the body is not valid JSON ({err})") from None
    except RecursionError:
        raise APIError(400, "the body's JSON is nested deeper than this server parses") from None
    if not isinstance(data, dict):
        raise APIError(400, f"the body is a JSON {type(data).__name__}, expected an object")
    try:
        return ChatCompletionRequest.model_validate(data)
    except ValidationError as err:
        param, message = validation_message(err.errors())
        raise APIError(422, message, param=param) from None


def _job(
    engine: Engine, options: ServerOptions, body: ChatCompletionRequest, capacity: int
) -> tuple[Job, asyncio.Queue]:
    """The request as the scheduler runs it, and the queue its events arrive on."""
    messages, images = [], []
    for i, message in enumerate(body.messages):
        content = message.content if message.content is not None else ""
        parts = [content] if isinstance(content, str) else content
        texts = []
        for j, part in enumerate(parts):
            where = f"messages[{i}].content" + ("" if isinstance(content, str) else f"[{j}]")
            if isinstance(part, str) or part.type == "text":
                text = part if isinstance(part, str) else part.text
                if IMAGE_PLACEHOLDER in text:
                    raise APIError(
                        400,
                        f"{where}: text may not hold {IMAGE_PLACEHOLDER!r}; send images as image_url parts",
                        param=where,
                    )
                texts.append(text)
                continue
            if message.role != "user":
                raise APIError(400, f"{where}: only user messages may hold images", param=where)
            if len(images) == options.max_images:
                raise APIError(400, f"{where}: more than {options.max_images} image(s) in one request", param=where)
            url = part.image_url if isinstance(part.image_url, str) else part.image_url.url
            images.append(options.images.load(url, f"{where}.image_url"))
            texts.append(IMAGE_PLACEHOLDER)
        messages.append((message.role, "\n".join(texts)))
    try:
        prompt_ids = tokenize_with_images(
            engine.tokenizer, render_chat(engine.dist.chat_config["conv_template"], messages), add_bos=True
        )
    except MobileVLMError as err:
        raise APIError(400, str(err), param="messages") from None
    prompt_tokens = len(prompt_ids) + prompt_ids.count(IMAGE_TOKEN_ID) * (engine.dist.config.num_image_tokens - 1)
    window = engine.context_window_size
    room = min(window, capacity) - prompt_tokens  # a request's budget must fit the whole KV cache
    asked = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
    if asked is not None and asked < 1:
        raise APIError(400, f"{param} is {asked}, expected an integer >= 1", param=param)
    if room < 1 or (asked is not None and asked > room):
        raise APIError(
            400,
            f"this model's context window is {window} tokens and the server's KV cache {capacity}; the messages take {prompt_tokens}"
            + (f" and {param} asks for {asked}" if asked is not None else ", leaving none to answer"),
            param="messages",
        )
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(stop) > MAX_STOP_STRINGS or any(not s for s in stop):
        raise APIError(400, f"stop: expected up to {MAX_STOP_STRINGS} non-empty strings", param="stop")
    config = _config(engine, body, asked or room)
    events: asyncio.Queue = asyncio.Queue()
    loop = asyncio.get_running_loop()

    def emit(kind: str, detail: object) -> None:  # called from the scheduler thread
        try:
            loop.call_soon_threadsafe(events.put_nowait, (kind, detail))
        except RuntimeError:  # the event loop has closed (shutdown): nobody is listening
            pass

    return Job(prompt_ids, images, prompt_tokens, config, stop, emit=emit), events


def _config(engine: Engine, body: ChatCompletionRequest, max_new_tokens: int) -> GenerationConfig:
    bias = {}
    for token, value in (body.logit_bias or {}).items():
        if not (token.isascii() and token.isdigit()):
            raise APIError(400, f"logit_bias: key {token!r} is not a token id", param="logit_bias")
        bias[int(token)] = value
    chosen = {
        "temperature": body.temperature,
        "top_p": body.top_p,
        "seed": body.seed,
        "presence_penalty": body.presence_penalty,
        "frequency_penalty": body.frequency_penalty,
    }
    try:
        config = GenerationConfig(
            max_new_tokens=max_new_tokens, logit_bias=bias, **{k: v for k, v in chosen.items() if v is not None}
        )
        engine.check_generation(config)
    except MobileVLMError as err:
        raise APIError(400, str(err), param=str(err).split(" ", 1)[0].rstrip(":")) from None
    return config


def _usage(job: Job) -> dict:
    return {
        "prompt_tokens": job.prompt_tokens,
        "completion_tokens": job.completion_tokens,
        "total_tokens": job.prompt_tokens + job.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": job.cached_tokens},
    }


async def _events(request: Request, job: Job, events: asyncio.Queue) -> AsyncIterator[tuple[str, object]]:
    """The job's events until it ends; if the client disconnects first, the job is cancelled (the
    scheduler frees its pages at its next step) and the iteration stops."""
    checked = time.monotonic()
    try:
        while True:
            try:
                kind, detail = await asyncio.wait_for(events.get(), DISCONNECT_POLL_S)
            except asyncio.TimeoutError:
                kind = None
            now = time.monotonic()
            if now - checked >= DISCONNECT_POLL_S:  # however busy the stream, the client is asked
                checked = now
                if await request.is_disconnected():
                    return
            if kind is None:
                continue
            yield kind, detail
            if kind != "delta":
                return
    finally:
        job.cancelled.set()  # a no-op for a finished job: the scheduler has already let it go


async def _stream(
    request: Request,
    job: Job,
    events: asyncio.Queue,
    completion_id: str,
    created: int,
    model: str,
    include_usage: bool,
    metrics: ServerMetrics,
) -> AsyncIterator[str]:
    """Server-sent events in OpenAI's chunk shape, `data: [DONE]` last."""

    def chunk(delta: dict, finish: str | None = None) -> str:
        body = {
            "id": completion_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
        }
        if include_usage:
            body["usage"] = None
        return f"data: {json.dumps(body)}\n\n"

    metrics.requests.labels("200").inc()
    yield chunk({"role": "assistant", "content": ""})
    async for kind, detail in _events(request, job, events):
        if kind == "delta":
            yield chunk({"content": detail})
        elif kind == "error":
            yield f"data: {json.dumps(APIError(500, str(detail), 'server_error').body())}\n\n"
            break
        else:
            yield chunk({}, detail)
            if include_usage:
                usage = {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": model}
                yield f"data: {json.dumps(usage | {'choices': [], 'usage': _usage(job)})}\n\n"
    yield "data: [DONE]\n\n"
