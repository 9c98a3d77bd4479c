"""Every error leaves as JSON with "error" (a message a person can act on) and "category" (lower
case, as the SDK expects), plus "field" when one request field is at fault. No traceback ever
reaches a client: unexpected exceptions are logged here and answered with a generic 500.

The OpenAI-compatible routes (/v1) answer OpenAI's shape instead, which its clients parse:
{"error": {"message", "type", "param", "code"}}, "param" being the field at fault; the native
Twinkle API's routes answer {"detail", "field"}, which twinkle_client shows. Their routes are
`OpenAIRoute`s / `NativeRoute`s, which catch errors where the route runs (dependencies included)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException

from gateway.guard import GuardedRoute
from schemas.wire import WireError
from server.errors import Busy, Elsewhere, OperationFailed, TwinkleError
from server.kinds import ErrorCategory

log = logging.getLogger(__name__)

STATUS = {"invalid": 400, "not_found": 404, "conflict": 409, "unauthorized": 401, "gone": 410, "busy": 429,
          "unavailable": 503, "not_implemented": 501, "too_large": 413, "forbidden": 403}


def error_body(message: str, *, category: str = "user", field: str | None = None, **extra: object) -> dict:
    body: dict = {"error": message, "category": category}
    if field is not None:
        body["field"] = field
    body.update(extra)
    return body


def retry_headers(exc: TwinkleError) -> dict[str, str] | None:
    if not isinstance(exc, Busy):
        return None
    # The SDK (and the openai client) honour both: Retry-After paces its retries, x-should-retry:
    # false stops them (docs/tinker-protocol-notes.md, "429 and Retry-After").
    return {"Retry-After": f"{exc.retry_after:g}", "x-should-retry": str(exc.retryable).lower()}


def validation_problems(exc: RequestValidationError) -> list[dict[str, str]]:
    # The offending input is not echoed back: it may be large, or a secret.
    return [{"field": ".".join(str(p) for p in err["loc"]), "message": err["msg"]} for err in exc.errors()]


def install(app: FastAPI) -> None:
    @app.exception_handler(TwinkleError)
    async def twinkle_error(_: Request, exc: TwinkleError) -> JSONResponse:
        return JSONResponse(error_body(exc.message, category=exc.category, field=exc.field), STATUS[exc.kind],
                            retry_headers(exc))

    @app.exception_handler(Elsewhere)
    async def elsewhere(request: Request, exc: Elsewhere) -> Response:
        return await request.app.state.forwarder.forward(request, exc)  # gateway/forwarding.py

    @app.exception_handler(WireError)
    async def wire_error(_: Request, exc: WireError) -> JSONResponse:
        return JSONResponse(error_body(str(exc), field=exc.field), 400)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        problems = validation_problems(exc)
        message = "; ".join(f"{p['field']}: {p['message']}" for p in problems)
        return JSONResponse(error_body(message, field=problems[0]["field"] if problems else None, problems=problems), 422)

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, exc: HTTPException) -> JSONResponse:
        return JSONResponse(error_body(str(exc.detail)), exc.status_code, headers=exc.headers)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.error("unhandled_error", exc_info=exc, extra={"path": request.url.path})
        return JSONResponse(error_body("internal server error; the server log has details", category="server"), 500)


# ----- the OpenAI-compatible API -----------------------------------------------------------------
OPENAI_TYPES = {401: "authentication_error", 403: "permission_error", 429: "rate_limit_error"}
OPENAI_CODES = {"not_found": "not_found", "unauthorized": "invalid_api_key", "busy": "rate_limit_exceeded",
                "unavailable": "service_unavailable", "gone": "gone", "conflict": "conflict"}


def openai_body(message: str, status: int, *, param: str | None = None, code: str | None = None) -> dict:
    kind = OPENAI_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def openai_error(exc: Exception, path: str) -> JSONResponse:
    """An exception as OpenAI's error body; anything unexpected is logged and becomes a bare 500."""
    if isinstance(exc, TwinkleError):
        code = "model_not_found" if exc.kind == "not_found" and exc.field == "model" else OPENAI_CODES.get(exc.kind)
        status = STATUS[exc.kind]
        return JSONResponse(openai_body(exc.message, status, param=exc.field, code=code), status, retry_headers(exc))
    if isinstance(exc, RequestValidationError):
        problems = [{**p, "field": p["field"].removeprefix("body.")} for p in validation_problems(exc)]
        message = "; ".join(f"{p['field']}: {p['message']}" for p in problems)
        return JSONResponse(openai_body(message, 400, param=problems[0]["field"] if problems else None), 400)
    if isinstance(exc, WireError):
        return JSONResponse(openai_body(str(exc), 400, param=exc.field), 400)
    if isinstance(exc, OperationFailed):  # the sample ran and failed (the engine's message is for the user)
        status = 400 if exc.category == ErrorCategory.USER else 500
        return JSONResponse(openai_body(exc.message, status), status)
    if isinstance(exc, HTTPException):
        return JSONResponse(openai_body(str(exc.detail), exc.status_code), exc.status_code, headers=exc.headers)
    log.error("unhandled_error", exc_info=exc, extra={"path": path})
    return JSONResponse(openai_body("internal server error; the server log has details", 500), 500)


# ----- the native Twinkle API --------------------------------------------------------------------
# twinkle_client reads `detail` from any non-2xx body and turns a 410 into StopIteration (the end
# of a data loader), so an ended session or released weights must not answer 410 here.
NATIVE_STATUS = {**STATUS, "gone": 404}


def native_body(message: str, field: str | None = None) -> dict:
    return {"detail": message if field is None else f"{field}: {message}", "field": field}


def native_error(exc: Exception, path: str) -> JSONResponse:
    """An exception as the native API's error body; anything unexpected is logged and becomes a bare 500."""
    if isinstance(exc, TwinkleError):
        status = NATIVE_STATUS[exc.kind]
        return JSONResponse(native_body(exc.message, exc.field), status, retry_headers(exc))
    if isinstance(exc, RequestValidationError):
        problems = [{**p, "field": p["field"].removeprefix("body.")} for p in validation_problems(exc)]
        message = "; ".join(f"{p['field']}: {p['message']}" for p in problems)
        return JSONResponse({"detail": message, "field": problems[0]["field"] if problems else None}, 422)
    if isinstance(exc, WireError):
        return JSONResponse(native_body(str(exc), exc.field), 400)
    if isinstance(exc, OperationFailed):  # it ran and failed (the engine's message names the field)
        status = 400 if exc.category == ErrorCategory.USER else 500
        return JSONResponse({"detail": exc.message, "field": exc.field}, status)
    if isinstance(exc, HTTPException):
        return JSONResponse(native_body(str(exc.detail)), exc.status_code, headers=exc.headers)
    log.error("unhandled_error", exc_info=exc, extra={"path": path})
    return JSONResponse(native_body("internal server error; the server log has details"), 500)


def shaped_route(render: Callable[[Exception, Request], Response], doc: str,
                 catch: type[Exception] = Exception) -> type[APIRoute]:
    """A route class whose errors of type `catch` (its dependencies' too) leave as `render` shapes
    them; other errors go to the app's handlers."""

    class ShapedRoute(GuardedRoute):
        def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
            handler = super().get_route_handler()

            async def guarded(request: Request) -> Response:
                try:
                    return await handler(request)
                except Elsewhere:
                    raise  # forwarded to the process that runs the model (gateway/forwarding.py)
                except catch as exc:
                    return render(exc, request)

            return guarded

    ShapedRoute.__doc__ = doc
    return ShapedRoute


OpenAIRoute = shaped_route(lambda exc, request: openai_error(exc, request.url.path),
                           "A route whose errors leave in OpenAI's shape.")
NativeRoute = shaped_route(lambda exc, request: native_error(exc, request.url.path),
                           "A route whose errors leave as the native Twinkle API's {detail}.")
