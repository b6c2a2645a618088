"""One error shape for every 4xx/5xx, readable by both client families.

OpenAI's SDK reads `error.message`; Xinference's client reads `detail`. So every error response carries both:
`{"error": {"message", "type", "param", "code"}, "detail": message}`, including Starlette's own 404/405 and
unexpected faults.
"""

from __future__ import annotations

import logging

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from kiln.engine.errors import EngineError, InvalidRequest, QueueFull, RequestAborted

log = logging.getLogger("kiln.server")

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    409: "request_aborted",
    413: "request_too_large",
    415: "unsupported_media_type",
    429: "rate_limit_error",
    503: "service_unavailable",
}


class ApiError(Exception):
    """An HTTP error with a message that says what to fix; raised anywhere below a route."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers or {}


def error_response(
    status: int,
    message: str,
    *,
    param: str | None = None,
    code: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    return JSONResponse(error_body(status, message, param=param, code=code), status_code=status, headers=headers)


def error_body(status: int, message: str, *, param: str | None = None, code: str | None = None) -> dict:
    """The error JSON; also sent as the data of a streaming `error` event."""
    error_type = _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}, "detail": message}


def bad_request(message: str, param: str | None = None, code: str = "invalid_parameter") -> ApiError:
    return ApiError(400, message, param=param, code=code)


ENGINE_ERRORS = (InvalidRequest, QueueFull, RequestAborted, EngineError)


def from_engine(error: BaseException, retry_after: int) -> ApiError:
    """Translate the engine's exceptions into their HTTP meaning."""
    if isinstance(error, InvalidRequest):
        return ApiError(400, str(error), param=error.param, code=error.code)
    if isinstance(error, QueueFull):
        return ApiError(429, str(error), code="queue_full", headers={"Retry-After": str(retry_after)})
    if isinstance(error, RequestAborted):
        return ApiError(409, str(error), code="request_aborted")
    return ApiError(500, str(error), code="engine_error")


async def _api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    return error_response(exc.status, exc.message, param=exc.param, code=exc.code, headers=exc.headers)


async def _engine_error(request: Request, exc: Exception) -> Response:
    """The one boundary where the engine's exceptions (a bad parameter found by the request schema, a full
    queue, an aborted request) become HTTP errors, wherever under a route they are raised."""
    return await _api_error(request, from_engine(exc, request.app.state.registry.retry_after))


async def _http_exception(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    message = exc.detail
    if exc.status_code == 404:
        message = f"no route {request.method} {request.url.path}"
    elif exc.status_code == 405:
        allowed = (exc.headers or {}).get("Allow", "")
        message = f"method {request.method} not allowed on {request.url.path}; allowed: {allowed}"
    return error_response(exc.status_code, message, headers=exc.headers)


EXCEPTION_HANDLERS = {
    ApiError: _api_error, **{error: _engine_error for error in ENGINE_ERRORS}, HTTPException: _http_exception,
}


class InternalErrors:
    """The JSON 500 for a fault no handler knows, its traceback logged, the exception not raised again.

    Starlette's own handler for `Exception` re-raises once it has replied; uvicorn only logs that, but Ray
    Serve's proxy answers a request whose app raised with a plain-text 500 of its own in place of ours.
    Once the status line has gone out (a stream), nothing can replace it: the exception goes on up, and the
    server closes the connection."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def watched_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, watched_send)
        except Exception as exc:
            if started:
                raise
            log.exception("internal error answering %s %s", scope["method"], scope["path"])
            message = f"internal error: {type(exc).__name__}: {exc}"
            await error_response(500, message, code="internal_error")(scope, receive, send)
