"""`GET /metrics`: this process's Prometheus metrics (server/metrics.py; docs/metrics.md lists them).

Open with --auth open (which serves loopback callers only); with --auth keys it wants the admin
key, as `Authorization: Bearer <admin key>` or X-Admin-Key (gateway/deps.py
`require_metrics_reader`): the per-tenant counters are not for tenants to see. Each server process
of a deployment answers for itself: Prometheus scrapes every one. Not in /openapi.json: its body
is not JSON."""

from __future__ import annotations

import gzip

from fastapi import APIRouter, Depends, Request, Response

from gateway.deps import Rt, require_metrics_reader
from gateway.guard import GuardedRoute

GZIP_FROM_BYTES = 4096  # a smaller exposition is sent as it is

router = APIRouter(route_class=GuardedRoute, tags=["metrics"])


@router.get("/metrics", include_in_schema=False, dependencies=[Depends(require_metrics_reader)])
async def metrics(request: Request, rt: Rt) -> Response:
    body, content_type = rt.metrics.render(request.headers.get("accept", ""))
    headers = {}
    if len(body) >= GZIP_FROM_BYTES and "gzip" in request.headers.get("accept-encoding", "").lower():
        body, headers["Content-Encoding"] = gzip.compress(body, compresslevel=1), "gzip"
    return Response(body, media_type=content_type, headers=headers)
