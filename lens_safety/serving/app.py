"""The safeguard's HTTP application (Starlette, ASGI): ``/v1/chat/completions``, ``/v1/models``, ``/health``.

A chat completion is checked (:mod:`lens_safety.serving.protocol`), its prompt is counted against
the model's context, and it is queued for the worker (:mod:`lens_safety.serving.scheduler`). The
answer is one choice, the ranker's top candidate, with the extension field ``safeguard``::

    {"enabled": true, "n_sampled": 8, "n_unique": 7, "chosen_index": 3, "scores": [...7 floats],
     "sample_index": [...], "timing": {...}, "ranker": {"sha256": ..., "layer": 15, ...},
     "candidates": [...]}   # candidates only when the server was started with expose_candidates

``chosen_index`` and ``scores`` index the unique candidates (``sample_index`` maps them back to the
``n`` samples). With ``"stream": true`` the chosen answer is sent as OpenAI server-sent events
after the choice (which needs all N candidates): the text arrives in word-sized chunks and the
final chunk carries ``safeguard``.

Every error is OpenAI's ``{"error": {"message", "type", "param", "code"}}`` with its HTTP status:
400 bad request, 401 missing or wrong bearer token, 404 unknown model or path, 405, 413 body too
large, 429 queue full, 500 internal, 503 shutting down, 504 timeout.
"""

from __future__ import annotations

import hmac
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from lens_safety.serving.audit import AuditLog
from lens_safety.serving.engine import Engine
from lens_safety.serving.protocol import APIError, ChatRequest, Limits, decode_body, parse_chat_request
from lens_safety.serving.responses import completion_body, stream_events
from lens_safety.serving.safeguard import Answer
from lens_safety.serving.scheduler import QueueFull, RequestTimeout, Scheduler, ShuttingDown

log = logging.getLogger("lens_safety.serving")


@dataclass
class ServerState:
    """What the handlers share: limits, the worker's scheduler, the optional audit log and key."""

    limits: Limits
    scheduler: Scheduler
    count_prompt_tokens: Callable[[str], int]
    context_length: int | None
    ranker: dict[str, Any]
    api_key: str | None = None
    audit: AuditLog | None = None
    engine: Engine | None = None
    expose_candidates: bool = False
    started: float = field(default_factory=time.time)
    stopping: bool = False


def error_response(error: APIError, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error.to_dict(), status_code=error.status, headers=headers)


def _authorize(state: ServerState, request: Request) -> None:
    if state.api_key is None:
        return
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise APIError(
            401, "missing bearer token: send the header 'Authorization: Bearer <key>'", code="invalid_api_key"
        )
    if not hmac.compare_digest(token.strip().encode(), state.api_key.encode()):
        raise APIError(401, "invalid API key", code="invalid_api_key")


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise APIError(
            413,
            f"request body of {declared} bytes is over the limit of {limit} bytes",
            code="request_too_large",
        )
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise APIError(413, f"request body is over the limit of {limit} bytes", code="request_too_large")
        chunks.append(chunk)
    return b"".join(chunks)


async def _checked_request(state: ServerState, request: Request) -> tuple[ChatRequest, int]:
    _authorize(state, request)
    body = decode_body(await _read_body(request, state.limits.max_body_bytes), state.limits)
    chat = parse_chat_request(body, state.limits)
    prompt_tokens = await run_in_threadpool(state.count_prompt_tokens, chat.instruction)
    if state.context_length is not None and prompt_tokens + chat.max_tokens > state.context_length:
        raise APIError(
            400,
            f"the prompt has {prompt_tokens} tokens + {chat.max_tokens} new tokens, more than the model's "
            f"context of {state.context_length}; shorten the message or lower max_tokens",
            param="messages",
            code="context_length_exceeded",
        )
    return chat, prompt_tokens


async def _answer(state: ServerState, chat: ChatRequest) -> Answer:
    try:
        return await state.scheduler.run(chat)
    except QueueFull:
        raise APIError(
            429,
            f"the server's queue is full ({state.scheduler.max_queue} requests waiting); retry later",
            kind="rate_limit_error",
            code="queue_full",
        ) from None
    except ShuttingDown:
        raise APIError(
            503, "the server is shutting down", kind="server_error", code="shutting_down"
        ) from None
    except RequestTimeout:
        raise APIError(
            504,
            f"no answer within the server's request timeout of {state.scheduler.timeout:g} s",
            kind="timeout_error",
            code="request_timeout",
        ) from None
    except Exception as exc:
        log.exception("the worker failed on a request")
        raise APIError(
            500, f"the server failed to answer: {exc}", kind="server_error", code="internal_error"
        ) from None


def _extension(state: ServerState, answer: Answer) -> dict[str, Any]:
    out = {**answer.to_dict(), "ranker": state.ranker}
    if state.expose_candidates:
        out["candidates"] = answer.candidates
    return out


async def chat_completions(request: Request) -> Response:
    state: ServerState = request.app.state.serving
    request_id = f"chatcmpl-{uuid.uuid4().hex}"
    started = time.perf_counter()
    entry: dict[str, Any] = {"request_id": request_id, "model": state.limits.served_name}
    chat: ChatRequest | None = None
    answer: Answer | None = None
    try:
        chat, prompt_tokens = await _checked_request(state, request)
        entry.update(
            safeguard=chat.safeguard,
            n=chat.n,
            temperature=chat.temperature,
            max_tokens=chat.max_tokens,
            seed=chat.seed,
        )
        answer = await _answer(state, chat)
    except APIError as error:
        entry.update(status=error.status, code=error.code)
        _audit(state, entry, chat, None, started)
        return error_response(error, {"x-request-id": request_id})
    usage = {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": answer.completion_tokens,
        "total_tokens": prompt_tokens + answer.completion_tokens,
    }
    entry.update(status=200, **{k: v for k, v in answer.to_dict().items() if k != "enabled"})
    _audit(state, entry, chat, answer, started)
    extension = _extension(state, answer)
    headers = {"x-request-id": request_id}
    if chat.stream:
        events = stream_events(
            request_id,
            state.limits.served_name,
            answer.text,
            answer.finish_reason,
            usage if chat.include_usage else None,
            extension,
        )
        return StreamingResponse(events, media_type="text/event-stream", headers=headers)
    body = completion_body(
        request_id, state.limits.served_name, answer.text, answer.finish_reason, usage, extension
    )
    return JSONResponse(body, headers=headers)


def _audit(
    state: ServerState, entry: dict[str, Any], chat: ChatRequest | None, answer: Answer | None, started: float
) -> None:
    if state.audit is None:
        return
    entry["latency_seconds"] = time.perf_counter() - started
    entry["ranker_sha256"] = state.ranker.get("sha256")
    state.audit.record(entry, chat.instruction if chat else None, answer.candidates if answer else None)


async def models(request: Request) -> Response:
    state: ServerState = request.app.state.serving
    try:
        _authorize(state, request)
    except APIError as error:
        return error_response(error)
    card = {
        "id": state.limits.served_name,
        "object": "model",
        "created": int(state.started),
        "owned_by": "lens-safety",
    }
    return JSONResponse({"object": "list", "data": [card]})


async def health(request: Request) -> Response:
    state: ServerState = request.app.state.serving
    body = {
        "status": "stopping" if state.stopping else "ok",
        "model": state.limits.served_name,
        "ranker_sha256": state.ranker.get("sha256"),
        "engine": state.engine.name if state.engine is not None else None,
        **state.scheduler.stats(),
    }
    return JSONResponse(body, status_code=503 if state.stopping else 200)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
    message = f"{request.method} {request.url.path}: {exc.detail}"
    return error_response(APIError(exc.status_code, message, code=code))


async def _internal_error(request: Request, exc: Exception) -> Response:
    log.exception("unhandled error", exc_info=exc)
    return error_response(APIError(500, f"internal error: {exc}", kind="server_error", code="internal_error"))


def build_app(state: ServerState) -> Starlette:
    """The ASGI application over ``state``; its lifespan starts the worker and, at shutdown, closes
    the scheduler (queued requests fail with 503, the step in progress finishes), the engine and
    the audit log."""

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        state.scheduler.start()
        try:
            yield
        finally:
            state.stopping = True
            await run_in_threadpool(state.scheduler.close)
            if state.engine is not None and not state.scheduler.alive:
                await run_in_threadpool(state.engine.close)
            if state.audit is not None:
                await run_in_threadpool(state.audit.close)

    app = Starlette(
        routes=[
            Route("/v1/chat/completions", chat_completions, methods=["POST"]),
            Route("/v1/models", models, methods=["GET"]),
            Route("/health", health, methods=["GET"]),
        ],
        exception_handlers={HTTPException: _http_error, Exception: _internal_error},
        lifespan=lifespan,
    )
    app.state.serving = state
    return app


def locked(function: Callable[[str], int]) -> Callable[[str], int]:
    """``function`` behind a lock (a tokenizer is not safe to call from several threads at once)."""
    lock = threading.Lock()

    def call(text: str) -> int:
        with lock:
            return function(text)

    return call
