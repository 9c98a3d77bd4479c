"""Telemetry: an ASGI middleware that counts and times every HTTP request by method, route template
(never the raw path: no ids in labels) and status, into the Runtime's metrics (server/metrics.py
`Metrics.request`), and, when tracing is on, makes its server span (server/tracing.py). A request
no route matched (or refused before routing) counts under route "unmatched". No header is ever recorded but `traceparent`."""

from __future__ import annotations

import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.metrics import UNMATCHED, Metrics
from server.tracing import Tracing


class Telemetry:
    def __init__(self, app: ASGIApp, metrics: Metrics, tracing: Tracing) -> None:
        self.app, self.metrics, self.tracing = app, metrics, tracing

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started, status, method = time.perf_counter(), 500, scope["method"]  # 500: an exception that escapes
        span = self.tracing.start_request(method, scope["headers"]) if self.tracing.on else None

        async def answered(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, answered)
        finally:
            # The router puts the matched route in the scope (Starlette: scope["route"]).
            route = getattr(scope.get("route"), "path", None) or UNMATCHED
            self.metrics.request(method, route, status, time.perf_counter() - started)
            if span is not None:
                self.tracing.end_request(span, method, route, status)
