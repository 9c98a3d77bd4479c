"""The dashboard: a page at /dashboard (hand-written HTML, CSS and JS in gateway/static/, no CDN)
and the JSON API it polls under /twinkle/v1/dashboard.

The page keeps the key the user logs in with in the browser session only (sessionStorage; a key in
the URL fragment, `/dashboard#key=tml-…`, which browsers never send, is taken from there and
removed) and sends it as `Authorization: Bearer`. The admin key sees every tenant; a tenant key
sees its own objects, as everywhere else (docs/dashboard.md)."""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import Response

from gateway import deps
from gateway.deps import Rt
from gateway.guard import GuardedRoute
from gateway.routes.rest import download_base
from schemas import dashboard as db_api
from server.errors import NotFound
from server.ops import dashboard

STATIC = Path(__file__).resolve().parent.parent / "static"
ASSETS = {"dashboard.js": "text/javascript", "dashboard.css": "text/css"}
# The page loads its own script and style and talks to its own origin, nothing else.
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
                               "img-src 'self' data:; form-action 'self'; base-uri 'none'; frame-ancestors 'none'",
    "Cache-Control": "no-cache",
}

page = APIRouter(route_class=GuardedRoute)  # no key: the page itself holds nothing
router = APIRouter(route_class=GuardedRoute)


@cache
def _asset(name: str) -> bytes:
    return (STATIC / name).read_bytes()


@page.get("/dashboard", include_in_schema=False)
async def dashboard_page() -> Response:
    return Response(_asset("dashboard.html"), media_type="text/html; charset=utf-8", headers=PAGE_HEADERS)


@page.get("/dashboard/{asset}", include_in_schema=False)
async def dashboard_asset(asset: str) -> Response:
    if asset not in ASSETS:
        raise NotFound(f"no dashboard file {asset!r}", field="asset")
    return Response(_asset(asset), media_type=ASSETS[asset], headers={"Cache-Control": "no-cache"})


async def viewer(request: Request) -> str | None:
    """Whose objects the caller sees: None for the admin key, else the tenant of its key."""
    if deps.is_admin_key(request, deps.bearer_key(request)):
        return None
    return await deps.authenticated(request, deps.bearer_key)


Viewer = Annotated[str | None, Depends(viewer)]


@router.get("/overview")
async def get_overview(rt: Rt, tenant: Viewer) -> db_api.Overview:
    return await dashboard.overview(rt, tenant)


@router.get("/runs/{model_id}/curve")
async def get_curve(model_id: str, rt: Rt, tenant: Viewer,
                    after: Annotated[int, Query(ge=-1, le=2**62)] = -1) -> db_api.RunCurve:
    return await dashboard.curve(rt, tenant, model_id, after)


@router.get("/checkpoint_link")
async def get_checkpoint_link(request: Request, rt: Rt, tenant: Viewer,
                              path: Annotated[str, Query(max_length=700)]) -> db_api.DownloadLink:
    """A signed link to a tar of the checkpoint (the same one the SDK's archive URL gives)."""
    return await dashboard.checkpoint_link(rt, tenant, path, download_base(request))
