"""FastAPI routes over :class:`~.service.InferenceService`: thin handlers, state on ``app.state``, OpenAI errors.

Every error leaves as ``{"error": {"message", "type", "param", "code"}}``: request validation (including invalid
JSON) -> 400, unknown model -> 404, missing/wrong API key -> 401, a body over 4 MiB -> 413, a chunked body (no
Content-Length) -> 411, full queue or shutdown -> 503 (with ``Retry-After``), a bug -> 500. Each is an ordinary
response: the connection stays open for the client's next request.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import threading
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from . import protocol as P
from .service import InferenceService, ServeSettings, ServiceError

log = logging.getLogger("bayeslora.serve")

PUBLIC_PATHS = {"/health"}
MAX_BODY_BYTES = 4 * 1024 * 1024  # larger bodies are refused before they are read (413)
ERROR_RESPONSES = {code: {"model": P.ErrorResponse} for code in (400, 401, 404, 411, 413, 503)}
_END = object()


def error_response(status: int, message: str, type_: str, param: str | None = None,
                   code: str | None = None) -> JSONResponse:
    body = P.ErrorResponse(error=P.ErrorInfo(message=message, type=type_, param=param, code=code))
    return JSONResponse(body.model_dump(), status_code=status)


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        errors = exc.errors()
        shown = 5

        def where(error) -> str:  # the field's path; a JSON syntax error's location is a character offset
            if error.get("type") == "json_invalid":
                return ""
            return ".".join(str(x) for x in error.get("loc", ()) if x != "body")

        def described(error) -> str:
            if error.get("type") == "json_invalid":
                at = f"character {error.get('loc', ('',))[-1]}"
            else:
                at = where(error)
            return error.get("msg", "Invalid request") + (f" (at {at})" if at else "")

        message = "; ".join(described(e) for e in errors[:shown]) or "Invalid request"
        if len(errors) > shown:
            message += f"; and {len(errors) - shown} more error(s)"
        first = errors[0] if errors else {}
        return error_response(400, message, "invalid_request_error", where(first) or None, first.get("type"))

    @app.exception_handler(ServiceError)
    async def _service(request: Request, exc: ServiceError):
        response = error_response(exc.status, str(exc), exc.type, exc.param, exc.code)
        if exc.status == 503:
            response.headers["Retry-After"] = "1"
        return response

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        type_ = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return error_response(exc.status_code, str(exc.detail), type_, None, None)

    # Last resort, a bug: logged with its traceback and answered 500. A middleware, not an exception handler for
    # Exception: Starlette re-raises to the server after such a handler answers, and uvicorn then drops the
    # connection, so the client's next request on it failed too.
    @app.middleware("http")
    async def _unexpected(request: Request, call_next):
        try:
            return await call_next(request)
        except Exception as exc:  # noqa: BLE001
            log.exception("unexpected error on %s", request.url.path)
            return error_response(500, f"Internal error: {type(exc).__name__}", "server_error", None,
                                  "internal_error")


def _install_body_limit(app: FastAPI) -> None:
    @app.middleware("http")
    async def _limit(request: Request, call_next):
        length = request.headers.get("content-length")
        if length is None:
            if "transfer-encoding" in request.headers:  # its size is known only once it is read: refused unread
                return error_response(411, "A request body needs a Content-Length header (chunked bodies are not "
                                      "accepted)", "invalid_request_error", None, "length_required")
            length = "0"
        if not length.isdigit() or int(length) > MAX_BODY_BYTES:
            return error_response(413, f"The request body must be at most {MAX_BODY_BYTES} bytes with a valid "
                                  "Content-Length", "invalid_request_error", None, "request_too_large")
        return await call_next(request)


def _install_auth(app: FastAPI, api_key: str | None) -> None:
    if not api_key:
        return
    expected = api_key.encode()

    @app.middleware("http")
    async def _auth(request: Request, call_next):
        if request.url.path not in PUBLIC_PATHS:
            scheme, _, token = request.headers.get("authorization", "").strip().partition(" ")
            # the scheme is case-insensitive (RFC 7235); compare_digest always runs, so a wrong scheme takes as long
            right_key = secrets.compare_digest(token.strip().encode(), expected)
            if not (right_key and scheme.lower() == "bearer"):
                return error_response(401, "Missing or invalid API key: send `Authorization: Bearer KEY`",
                                      "invalid_request_error", None, "invalid_api_key")
        return await call_next(request)


async def _run(service: InferenceService, fn, *args):
    return await asyncio.wrap_future(service.submit(fn, *args))


async def _stream(service: InferenceService, fn, req) -> StreamingResponse:
    """Run ``fn(req, emit, cancelled)`` on the worker and relay what it emits as server-sent events.

    Errors raised before the first event (validation) become normal error responses; later ones end the stream
    with an ``error`` event. A client that disconnects cancels its generation at the next token.
    """
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()
    cancelled = threading.Event()
    future = asyncio.wrap_future(service.submit(fn, req, lambda ev: loop.call_soon_threadsafe(events.put_nowait, ev),
                                                cancelled))
    future.add_done_callback(lambda _: events.put_nowait(_END))
    first = await events.get()
    if first is _END:
        future.result()  # raises the request's error

    async def body() -> AsyncIterator[str]:
        try:
            item = first
            while item is not _END:
                yield f"data: {item.model_dump_json()}\n\n"
                item = await events.get()
            exc = future.exception()
            if exc is not None:
                status, type_ = (exc.status, exc.type) if isinstance(exc, ServiceError) else (500, "server_error")
                error = P.ErrorResponse(error=P.ErrorInfo(message=str(exc), type=type_, code=str(status)))
                yield f"data: {error.model_dump_json()}\n\n"
            else:
                yield "data: [DONE]\n\n"
        finally:
            cancelled.set()

    return StreamingResponse(body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


async def _answer(service: InferenceService, fn, req, request: Request):
    """Run ``fn(req, None, cancelled)`` on the worker and return its response; a client that disconnects while it
    runs cancels its generation at the next token (as a stream's does), so the worker moves on to the next
    request instead of finishing an answer nobody reads."""
    cancelled = threading.Event()
    future = asyncio.wrap_future(service.submit(fn, req, None, cancelled))

    async def watch() -> None:  # the body is read: what the server sends next is the client's disconnect
        while (await request.receive())["type"] != "http.disconnect":
            pass
        cancelled.set()

    watcher = asyncio.ensure_future(watch())
    try:
        return await future
    finally:
        watcher.cancel()


async def _complete(service: InferenceService, fn, req, request: Request):
    """A completion request: streamed as server-sent events or answered in one response."""
    return await (_stream(service, fn, req) if req.stream else _answer(service, fn, req, request))


def create_app(settings: ServeSettings, service: InferenceService) -> FastAPI:
    """The ASGI app; the service's worker starts with the app and drains its queue on shutdown."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        service.start()
        try:
            yield
        finally:
            await asyncio.to_thread(service.close)

    app = FastAPI(title="bayeslora", version="0.1.0", lifespan=lifespan, responses=ERROR_RESPONSES,
                  description="OpenAI-compatible completions with calibrated confidence, and multiple-choice "
                  "predictions with uncertainty, from a (Bayesian) LoRA fine-tuned model.")
    app.state.settings = settings
    app.state.service = service
    _install_error_handlers(app)
    _install_body_limit(app)
    _install_auth(app, settings.api_key)  # added last: runs first, so unauthenticated bodies are never examined

    @app.get("/health", response_model=P.Health)
    async def health(request: Request) -> P.Health:
        return request.app.state.service.health()

    @app.get("/v1/models", response_model=P.ModelList)
    async def models(request: Request) -> P.ModelList:
        return request.app.state.service.models()

    @app.get("/v1/models/{model_id:path}", response_model=P.ModelCard)
    async def model(model_id: str, request: Request) -> P.ModelCard:
        return request.app.state.service.model_card(model_id)

    @app.post("/v1/chat/completions", response_model=P.ChatCompletionResponse)
    async def chat_completions(req: P.ChatCompletionRequest, request: Request):
        svc = request.app.state.service
        return await _complete(svc, svc.chat_completion, req, request)

    @app.post("/v1/completions", response_model=P.CompletionResponse)
    async def completions(req: P.CompletionRequest, request: Request):
        svc = request.app.state.service
        return await _complete(svc, svc.completion, req, request)

    @app.post("/v1/choices", response_model=P.ChoicesResponse)
    async def choices(req: P.ChoicesRequest, request: Request) -> P.ChoicesResponse:
        svc = request.app.state.service
        return await _run(svc, svc.choose, req)

    return app
