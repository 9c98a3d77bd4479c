"""Training endpoints. Submissions answer at once with a future; the work is queued."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Request

from gateway.deps import Fingerprint, Rt, TenantId, sequenced_body
from schemas import tinker as api
from schemas.custom_loss import CreateCustomLossRequest
from schemas.wire import decode_forward_backward_request
from server import custom_losses, training

router = APIRouter()

# JSON submissions that carry a model's seq_id: parsed so that a refused one releases it.
OptimStepBody = Annotated[api.OptimStepRequest, sequenced_body(api.OptimStepRequest)]
SaveWeightsBody = Annotated[api.SaveWeightsRequest, sequenced_body(api.SaveWeightsRequest)]
SaveForSamplerBody = Annotated[api.SaveWeightsForSamplerRequest, sequenced_body(api.SaveWeightsForSamplerRequest)]
LoadWeightsBody = Annotated[api.LoadWeightsRequest, sequenced_body(api.LoadWeightsRequest)]


@router.post("/create_model", response_model_exclude_none=True)
async def create_model(req: api.CreateModelRequest, rt: Rt, tenant: TenantId, fp: Fingerprint) -> api.UntypedAPIFuture:
    return await training.create_model(rt, tenant, req, fp)


@router.post("/get_info", response_model_exclude_none=True)
async def get_info(req: api.GetInfoRequest, rt: Rt, tenant: TenantId) -> api.GetInfoResponse:
    return await training.get_info(rt, tenant, req.model_id)


@router.post("/forward_backward", response_model_exclude_none=True)
async def forward_backward(request: Request, rt: Rt, tenant: TenantId, fp: Fingerprint) -> api.UntypedAPIFuture:
    # Protobuf body (protocol §7); forward() is the same call with forward_only set.
    body = await request.body()
    call = decode_forward_backward_request(body, request.headers.get("content-encoding"))
    return await training.forward_backward(rt, tenant, call, fp)


@router.post("/optim_step", response_model_exclude_none=True)
async def optim_step(req: OptimStepBody, rt: Rt, tenant: TenantId, fp: Fingerprint) -> api.UntypedAPIFuture:
    return await training.optim_step(rt, tenant, req, fp)


@router.post("/save_weights", response_model_exclude_none=True)
async def save_weights(req: SaveWeightsBody, rt: Rt, tenant: TenantId, fp: Fingerprint) -> api.UntypedAPIFuture:
    return await training.save_weights(rt, tenant, req, fp)


@router.post("/save_weights_for_sampler", response_model_exclude_none=True)
async def save_weights_for_sampler(
    req: SaveForSamplerBody, rt: Rt, tenant: TenantId, fp: Fingerprint
) -> api.UntypedAPIFuture:
    return await training.save_weights_for_sampler(rt, tenant, req, fp)


@router.post("/load_weights", response_model_exclude_none=True)
async def load_weights(req: LoadWeightsBody, rt: Rt, tenant: TenantId, fp: Fingerprint) -> api.UntypedAPIFuture:
    return await training.load_weights(rt, tenant, req, fp)


@router.post("/create_custom_loss", response_model_exclude_none=True)
async def create_custom_loss(
    req: CreateCustomLossRequest, rt: Rt, tenant: TenantId, fp: Fingerprint
) -> api.UntypedAPIFuture:
    return await custom_losses.create(rt, tenant, req, fp)
