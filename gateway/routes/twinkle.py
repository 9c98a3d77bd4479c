"""Twinkle's own endpoints: capacity and status (each tenant sees only its own usage)."""

from __future__ import annotations

from fastapi import APIRouter

from gateway.deps import Rt, TenantId
from gateway.guard import GuardedRoute
from schemas import twinkle as tw
from server.ops.capacity import capacity

router = APIRouter(route_class=GuardedRoute)


@router.get("/capacity", response_model_exclude_none=True)
async def get_capacity(rt: Rt, tenant: TenantId) -> tw.CapacityResponse:
    return await capacity(rt, tenant)


@router.get("/status", response_model_exclude_none=True)
async def get_status(rt: Rt, tenant: TenantId) -> tw.StatusResponse:
    return tw.StatusResponse(status="ok", base_model=rt.base.name, base_models=[b.name for b in rt.bases],
                             uptime_seconds=round(rt.uptime(), 1),
                             capacity=await capacity(rt, tenant))
