"""What every route does before it reads a byte of its body: authenticate the caller, then read the
body counting the bytes as they arrive against the route's own limit (chunked bodies too: no
trust in Content-Length; the counting is BodyGuard's, an ASGI middleware), refusing with a 413
the moment it is passed. So a client without a good key makes the server buffer nothing, and a
JSON control route cannot be sent a 256 MiB body.

`GuardedRoute` is the route class of every router (gateway/errors.py's shaped routes derive from
it, so its refusals leave in each API's own shape). Which key a route takes is read off its
dependencies (the tenant dependencies of gateway/deps.py, or the admin key). Failed
authentications are counted per client address (`AuthFailures`); past `auth_failures_per_minute`
the address gets a 429 before any key lookup.
"""

from __future__ import annotations

import json
import time
from collections import deque
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway import deps
from server.config import Settings, is_loopback
from server.errors import Busy, TooLarge

# Routes that carry training data, rows or datasets: up to settings.max_request_mb. Every other
# route's body is control JSON: up to settings.max_json_mb.
BULK_ROUTES = frozenset({
    "/api/v1/forward_backward", "/api/v1/forward",
    "/api/v1/model/{base:path}/twinkle/{op}", "/api/v1/processor/twinkle/create", "/api/v1/processor/twinkle/call",
})
# Routes that read their own body as it streams, under their own limit (gateway/uploads.py).
STREAMED_ROUTES = frozenset({"/v1/files", "/api/v1/files"})
KEY_READERS: dict[Callable[..., Any], Callable[[Request], str | None]] = {
    deps.get_tenant: deps.tinker_key, deps.get_bearer_tenant: deps.bearer_key, deps.get_native_tenant: deps.native_key,
}
LIMIT_KEY = "twinkle.body_limit"  # the scope key a route's body limit travels in, to BodyGuard
OPEN_MODE_REMOTE = ("this server runs with --auth open (any 'tml-…' key is accepted), so it serves callers on "
                    "this machine only; its operator must serve with --auth keys to let others in")
# Every answer: no MIME sniffing of downloads, no framing (clickjacking), no referrer leaking a
# signed link. No CORS headers are sent at all: browsers keep other origins from reading answers.
SECURITY_HEADERS = ((b"x-content-type-options", b"nosniff"), (b"x-frame-options", b"DENY"),
                    (b"referrer-policy", b"no-referrer"))
WINDOW_SECONDS = 60.0
MAX_ADDRESSES = 100_000


def body_limit(path: str, settings: Settings) -> int | None:
    """The most bytes a route's body may have (None: the route counts its own)."""
    if path in STREAMED_ROUTES:
        return None
    return (settings.max_request_mb if path in BULK_ROUTES else settings.max_json_mb) << 20


class BodyGuard:
    """ASGI middleware: counts each request's body bytes as the server receives them, and refuses
    (TooLarge, raised to whoever is reading) once they pass the limit its route set in the scope
    (GuardedRoute), else `default_limit`. In open mode (every key is a tenant) it also serves only
    callers on loopback, however the server was started (uvicorn on 0.0.0.0 included). Every
    response gets SECURITY_HEADERS."""

    def __init__(self, app: ASGIApp, default_limit: int, open_mode: bool) -> None:
        self.app, self.default_limit, self.open_mode = app, default_limit, open_mode

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self.open_mode and not is_loopback((scope.get("client") or ("",))[0]):
            await _refuse_open_mode(send)
            return
        received = 0

        async def counted() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                limit = scope.get(LIMIT_KEY, self.default_limit)
                if received > limit:
                    raise TooLarge(f"request body over this route's limit of {limit} bytes; send smaller batches",
                                   field="body")
            return message

        async def headed(message: Message) -> None:
            if message["type"] == "http.response.start":
                present = {name.lower() for name, _ in message.get("headers", [])}
                message["headers"] = [*message.get("headers", []),
                                      *((n, v) for n, v in SECURITY_HEADERS if n not in present)]
            await send(message)

        await self.app(scope, counted, headed)


async def _refuse_open_mode(send: Send) -> None:
    body = json.dumps({"error": OPEN_MODE_REMOTE, "category": "user"}).encode()
    await send({"type": "http.response.start", "status": 403,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


class AuthFailures:
    """Failed authentications per client address over the last minute."""

    def __init__(self, per_minute: int) -> None:
        self.per_minute = per_minute
        self._failed: dict[str, deque[float]] = {}

    def _recent(self, address: str, now: float) -> deque[float] | None:
        times = self._failed.get(address)
        while times and times[0] <= now - WINDOW_SECONDS:
            times.popleft()
        if times is not None and not times:
            del self._failed[address]
            return None
        return times

    def check(self, address: str) -> None:
        """A 429 for an address that failed too often lately (nothing is looked up for it)."""
        now = time.monotonic()
        times = self._recent(address, now)
        if times is not None and len(times) >= self.per_minute:
            wait = times[0] + WINDOW_SECONDS - now
            raise Busy(f"too many failed authentications from this address; retry in {wait:.0f} s",
                       retry_after=max(wait, 1.0))

    def failed(self, address: str) -> None:
        now = time.monotonic()
        if len(self._failed) >= MAX_ADDRESSES:  # bounded: drop the addresses with nothing recent
            for known in list(self._failed):
                self._recent(known, now)
        self._failed.setdefault(address, deque(maxlen=self.per_minute)).append(now)


def _auth_of(dependant: Dependant) -> Callable[[Request], Coroutine[Any, Any, Any]] | None:
    """How the route authenticates, found among its dependencies (None: it does not)."""
    for dep in dependant.dependencies:
        if dep.call in KEY_READERS:
            reader = KEY_READERS[dep.call]
            return lambda request: deps.authenticated(request, reader)
        if dep.call is deps.require_admin:
            return deps.admin_of
        if (found := _auth_of(dep)) is not None:
            return found
    return None


class GuardedRoute(APIRoute):
    """Authenticate, then read the body within its limit, then run the route (FastAPI's handler
    finds the body read already and parses it; a route that reads its own body reads it counted)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        authenticate, path, parses_body = _auth_of(self.dependant), self.path, self.body_field is not None

        async def guarded(request: Request) -> Response:
            if authenticate is not None:
                await authenticate(request)
            limit = body_limit(path, request.app.state.runtime.settings)
            if limit is None or request.method in ("GET", "HEAD", "OPTIONS"):
                return await handler(request)
            length = request.headers.get("content-length", "")
            if length.isdigit() and int(length) > limit:
                raise TooLarge(f"request body of {length} bytes over this route's limit of {limit} bytes; "
                               "send smaller batches", field="body")
            request.scope[LIMIT_KEY] = limit  # BodyGuard counts the body against it as it arrives
            if parses_body:  # read here, so that a 413 is not turned into FastAPI's "error parsing the body"
                await request.body()
            return await handler(request)

        return guarded
