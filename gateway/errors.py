"""Every error leaves as JSON with "error" (a message a person can act on) and "category" (lower
case, as the SDK expects), plus "field" when one request field is at fault. No traceback ever
reaches a client: unexpected exceptions are logged here and answered with a generic 500."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException

from schemas.wire import WireError
from server.errors import Busy, Elsewhere, TwinkleError

log = logging.getLogger(__name__)

STATUS = {"invalid": 400, "not_found": 404, "conflict": 409, "unauthorized": 401, "gone": 410, "busy": 429,
          "unavailable": 503}


def error_body(message: str, *, category: str = "user", field: str | None = None, **extra: object) -> dict:
    body: dict = {"error": message, "category": category}
    if field is not None:
        body["field"] = field
    body.update(extra)
    return body


def install(app: FastAPI) -> None:
    @app.exception_handler(TwinkleError)
    async def twinkle_error(_: Request, exc: TwinkleError) -> JSONResponse:
        headers = None
        if isinstance(exc, Busy):
            # The SDK honours both: Retry-After paces its retries, x-should-retry: false stops them
            # (docs/tinker-protocol-notes.md, "429 and Retry-After").
            headers = {"Retry-After": f"{exc.retry_after:g}", "x-should-retry": str(exc.retryable).lower()}
        return JSONResponse(error_body(exc.message, category=exc.category, field=exc.field), STATUS[exc.kind], headers)

    @app.exception_handler(Elsewhere)
    async def elsewhere(request: Request, exc: Elsewhere) -> Response:
        return await request.app.state.forwarder.forward(request, exc)  # gateway/forwarding.py

    @app.exception_handler(WireError)
    async def wire_error(_: Request, exc: WireError) -> JSONResponse:
        return JSONResponse(error_body(str(exc), field=exc.field), 400)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        # The offending input is not echoed back: it may be large, or a secret.
        problems = [
            {"field": ".".join(str(p) for p in err["loc"]), "message": err["msg"]} for err in exc.errors()
        ]
        message = "; ".join(f"{p['field']}: {p['message']}" for p in problems)
        return JSONResponse(error_body(message, field=problems[0]["field"] if problems else None, problems=problems), 422)

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, exc: HTTPException) -> JSONResponse:
        return JSONResponse(error_body(str(exc.detail)), exc.status_code, headers=exc.headers)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.error("unhandled_error", exc_info=exc, extra={"path": request.url.path})
        return JSONResponse(error_body("internal server error; the server log has details", category="server"), 500)
