"""What the server holds and how full it is: adapter pools, queues, a tenant's usage against its limits
(the capacity/status endpoints and the dashboard)."""

from __future__ import annotations

from dataclasses import asdict

from schemas import twinkle as tw
from server.runtime import Runtime
from server.tenancy.quotas import Limits
from workers.types import PoolStatus


def pool_view(pool: PoolStatus) -> tw.PoolView:
    return tw.PoolView(
        max_resident_adapters=pool.max_resident, resident_adapters=len(pool.resident), pinned_adapters=pool.pinned,
        paged_in_host=pool.paged_in_host, paged_on_disk=pool.paged_on_disk, host_bytes=pool.host_bytes,
        page_ins=pool.page_ins, page_outs=pool.page_outs,
    )


def pools(rt: Runtime) -> dict[str, tw.PoolView]:
    """Per served base model: its adapters resident and paged out."""
    return {name: pool_view(pool) for name, engine in rt.engines.items() if (pool := engine.pool_status())}


def limits_view(limits: Limits) -> dict[str, float]:
    return {k: float(v) for k, v in asdict(limits).items()}


async def capacity(rt: Runtime, tenant: str) -> tw.CapacityResponse:
    held = [v for v in rt.versions.held() if v.tenant_id == tenant]
    usage = tw.TenantUsage(
        queue_depth=rt.scheduler.tenant_depth(tenant), inflight_requests=rt.quotas.inflight(tenant),
        live_models=await rt.live_models(tenant), limits=limits_view(await rt.refresh_limits(tenant)),
        adapter_versions=len(held), adapter_version_bytes=sum(v.nbytes for v in held),
    )
    by_base = pools(rt)
    return tw.CapacityResponse(pool=by_base.get(rt.base.name), pools=by_base, samples_pending=rt.sample_admission.pending,
                               sample_queue_limit=rt.settings.sample_queue_limit, tenant=usage)
