"""Forwarding a model's request to the server process that runs the model's work.

With several server processes on one database (a load balancer in front, or a client with two
base URLs), a model's requests may arrive anywhere, but only its owner's queue can keep their
seq_id order (server/queue/instances.py). A process that is not the owner passes the request on
unchanged (path, query, headers, body) and returns the owner's answer unchanged: the client cannot
tell. A request arrives forwarded at most once; if the model moved again in between, or the owner
does not answer (it may just have died: the next try adopts the model), the answer is a 503 the
SDK retries.
"""

from __future__ import annotations

import logging

import httpx
from fastapi import Request, Response
from fastapi.responses import JSONResponse

from gateway.errors import error_body
from server.errors import Elsewhere

log = logging.getLogger(__name__)

FORWARDED = "x-twinkle-forwarded-by"
# Per connection, or recomputed by whoever sends the body on (RFC 9110 §7.6.1).
_HOP = {"connection", "keep-alive", "te", "trailer", "transfer-encoding", "upgrade", "proxy-connection", "host",
        "content-length"}


class Forwarder:
    def __init__(self, instance_id: str, timeout: float = 60.0) -> None:
        self._instance_id = instance_id
        self._client = httpx.AsyncClient(timeout=httpx.Timeout(timeout, connect=5.0), follow_redirects=False)

    async def forward(self, request: Request, to: Elsewhere) -> Response:
        if request.headers.get(FORWARDED):
            return _retry_later(f"model {to.model_id} is moving between server processes; try again")
        path = request.scope["path"]
        root = request.scope.get("root_path", "")
        if root and path.startswith(root):
            path = path[len(root):]
        url = to.url + path + (f"?{request.url.query}" if request.url.query else "")
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP}
        headers[FORWARDED] = self._instance_id
        try:
            answer = await self._client.request(request.method, url, headers=headers, content=await request.body())
        except httpx.HTTPError as exc:
            log.warning("forward_failed", extra={"model_id": to.model_id, "to": to.url, "error": type(exc).__name__})
            return _retry_later(f"the server process running model {to.model_id} did not answer; try again")
        log.info("request_forwarded", extra={"model_id": to.model_id, "to": to.url, "path": path,
                                             "status": answer.status_code})
        # httpx has undone any content-encoding: the body goes back as plain bytes.
        back = {k: v for k, v in answer.headers.items() if k.lower() not in _HOP | {"content-encoding"}}
        return Response(answer.content, answer.status_code, headers=back)

    async def close(self) -> None:
        await self._client.aclose()


def _retry_later(message: str) -> JSONResponse:
    return JSONResponse(error_body(message, category="server"), 503, headers={"Retry-After": "1"})
