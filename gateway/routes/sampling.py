"""Sampling endpoints."""

from __future__ import annotations

from fastapi import APIRouter

from gateway.deps import Fingerprint, Rt, TenantId
from gateway.guard import GuardedRoute
from schemas import tinker as api
from server.ops import sampling

router = APIRouter(route_class=GuardedRoute)


@router.post("/create_sampling_session", response_model_exclude_none=True)
async def create_sampling_session(
    req: api.CreateSamplingSessionRequest, rt: Rt, tenant: TenantId
) -> api.CreateSamplingSessionResponse:
    return api.CreateSamplingSessionResponse(sampling_session_id=await sampling.create_sampling_session(rt, tenant, req))


@router.get("/samplers/{sampler_id}", response_model_exclude_none=True)
async def get_sampler(sampler_id: str, rt: Rt, tenant: TenantId) -> api.GetSamplerResponse:
    return await sampling.get_sampler(rt, tenant, sampler_id)


@router.post("/asample", response_model_exclude_none=True)
async def asample(req: api.SampleRequest, rt: Rt, tenant: TenantId, fp: Fingerprint) -> api.UntypedAPIFuture:
    return await sampling.sample(rt, tenant, req, fp)
