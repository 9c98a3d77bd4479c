"""Refuse request bodies over the configured size before reading them."""

from __future__ import annotations

import json

from starlette.types import ASGIApp, Receive, Scope, Send


class BodySizeLimit:
    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            length = dict(scope["headers"]).get(b"content-length")
            if length is not None and length.isdigit() and int(length) > self.max_bytes:
                await self._refuse(send, int(length))
                return
        await self.app(scope, receive, send)

    async def _refuse(self, send: Send, length: int) -> None:
        body = json.dumps({
            "error": f"request body of {length} bytes exceeds this server's limit of {self.max_bytes}; "
                     "send smaller batches",
            "category": "user",
        }).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})
