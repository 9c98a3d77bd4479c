"""Twinkle's export of a checkpoint (under /twinkle/v1): signed links to its adapter as a peft
folder, or to a full model folder with the adapter merged in (server/ops/export.py)."""

from __future__ import annotations

from fastapi import APIRouter, Query, Request

from gateway.deps import Rt, TenantId
from gateway.guard import GuardedRoute
from gateway.routes.rest import download_base
from schemas import twinkle as tw
from server.ops import export

router = APIRouter(route_class=GuardedRoute)


@router.get("/export/{model_id}/{checkpoint_id:path}")
async def export_checkpoint(
    model_id: str, checkpoint_id: str, request: Request, rt: Rt, tenant: TenantId,
    fmt: str = Query("peft", alias="format", max_length=40),  # checked by the operation, which names it in its 400
) -> tw.ExportResponse:
    return await export.export_urls(rt, tenant, model_id, checkpoint_id, fmt, download_base(request))
