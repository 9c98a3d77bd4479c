"""The admin API (`/twinkle/v1/admin/...`): tenants, their quota overrides and their API keys.
Every route needs the admin key (X-Admin-Key); without a configured admin key the API is off
and answers 404. The same operations are `twinkle tenants ...` and `twinkle keys ...`."""

from __future__ import annotations

from fastapi import APIRouter, Body, Depends, Query

from gateway.deps import Rt, require_admin
from gateway.guard import GuardedRoute
from schemas import admin as api
from server.tenancy import tenants

PREFIX = "/twinkle/v1/admin"
router = APIRouter(prefix=PREFIX, dependencies=[Depends(require_admin)], tags=["admin"], route_class=GuardedRoute)


# ----- tenants -----------------------------------------------------------------------------------
@router.post("/tenants", status_code=201)
async def create_tenant(req: api.CreateTenantRequest, rt: Rt) -> api.Tenant:
    return await rt.db.run(lambda s: tenants.create_tenant(s, req.name, req.limits))


@router.get("/tenants")
async def list_tenants(rt: Rt) -> api.TenantList:
    return api.TenantList(tenants=await rt.db.run(tenants.list_tenants))


@router.get("/tenants/{name}")
async def get_tenant(name: str, rt: Rt) -> api.Tenant:
    return await rt.db.run(lambda s: tenants.get_tenant(s, name))


@router.get("/tenants/{name}/limits")
async def get_limits(name: str, rt: Rt) -> api.Limits:
    return (await rt.db.run(lambda s: tenants.get_tenant(s, name))).limits


@router.put("/tenants/{name}/limits")
async def set_limits(name: str, rt: Rt, limits: api.Limits = Body(...)) -> api.Limits:
    """Replace the tenant's quota overrides with the body, e.g. {"max_live_models": 3}; {} clears them.
    This server applies them at once; others (and changes made with the CLI) within a few seconds."""
    tenant = await rt.db.run(lambda s: tenants.set_limits(s, name, limits))
    rt.quotas.set_limits(tenant.id, tenant.limits)
    return tenant.limits


# ----- keys --------------------------------------------------------------------------------------
@router.post("/keys", status_code=201)
async def create_key(req: api.CreateKeyRequest, rt: Rt) -> api.CreatedApiKey:
    """A new key for the tenant: the answer is the only time it is shown."""
    created = await rt.db.run(lambda s: tenants.create_key(s, req.tenant, req.label))
    rt.keys.forget_misses()  # in case it was tried (and cached as unknown) a moment ago
    return created


@router.get("/keys")
async def list_keys(
    rt: Rt,
    tenant: str | None = Query(None, min_length=1, max_length=200),
    include_revoked: bool = True,
) -> api.KeyList:
    return api.KeyList(keys=await rt.db.run(lambda s: tenants.list_keys(s, tenant, include_revoked=include_revoked)))


@router.post("/keys/{key_id}/revoke")
async def revoke_key(key_id: str, rt: Rt) -> api.ApiKey:
    """Revoke a key; it stops working at once on this server, and on the others at once with Redis
    (within the key cache's few seconds without)."""
    revoked = await rt.db.run(lambda s: tenants.revoke_key(s, key_id))
    await rt.forget_key(key_id)
    return revoked
