"""Twinkle's own endpoints: capacity and status (each tenant sees only its own usage)."""

from __future__ import annotations

from dataclasses import asdict

from fastapi import APIRouter

from gateway.deps import Rt, TenantId
from gateway.guard import GuardedRoute
from schemas import twinkle as tw
from server.runtime import Runtime
from workers.types import PoolStatus

router = APIRouter(route_class=GuardedRoute)


def _pool_view(pool: PoolStatus) -> tw.PoolView:
    return tw.PoolView(
        max_resident_adapters=pool.max_resident, resident_adapters=len(pool.resident), pinned_adapters=pool.pinned,
        paged_in_host=pool.paged_in_host, paged_on_disk=pool.paged_on_disk, host_bytes=pool.host_bytes,
        page_ins=pool.page_ins, page_outs=pool.page_outs,
    )


async def capacity(rt: Runtime, tenant: str) -> tw.CapacityResponse:
    limits = await rt.refresh_limits(tenant)
    pools = {name: _pool_view(pool) for name, engine in rt.engines.items() if (pool := engine.pool_status())}
    held = [v for v in rt.versions.held() if v.tenant_id == tenant]
    usage = tw.TenantUsage(
        queue_depth=rt.scheduler.tenant_depth(tenant), inflight_requests=rt.quotas.inflight(tenant),
        live_models=await rt.live_models(tenant), limits={k: float(v) for k, v in asdict(limits).items()},
        adapter_versions=len(held), adapter_version_bytes=sum(v.nbytes for v in held),
    )
    return tw.CapacityResponse(pool=pools.get(rt.base.name), pools=pools, samples_pending=rt.sample_admission.pending,
                               sample_queue_limit=rt.settings.sample_queue_limit, tenant=usage)


@router.get("/capacity", response_model_exclude_none=True)
async def get_capacity(rt: Rt, tenant: TenantId) -> tw.CapacityResponse:
    return await capacity(rt, tenant)


@router.get("/status", response_model_exclude_none=True)
async def get_status(rt: Rt, tenant: TenantId) -> tw.StatusResponse:
    return tw.StatusResponse(status="ok", base_model=rt.base.name, base_models=[b.name for b in rt.bases],
                             uptime_seconds=round(rt.uptime(), 1),
                             capacity=await capacity(rt, tenant))
