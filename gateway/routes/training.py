"""Training endpoints. Submissions answer at once with a future; the work is queued."""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Annotated

from fastapi import APIRouter, Request

from gateway.deps import Fingerprint, Rt, TenantId, sequenced_body
from gateway.guard import GuardedRoute
from schemas import legacy, wire
from schemas import tinker as api
from schemas.custom_loss import CreateCustomLossRequest
from schemas.wire import ForwardBackwardCall, WireError, decode_forward_backward_request
from server.ops import custom_losses, training

router = APIRouter(route_class=GuardedRoute)

# JSON submissions that carry a model's seq_id: parsed so that a refused one releases it.
OptimStepBody = Annotated[api.OptimStepRequest, sequenced_body(api.OptimStepRequest)]
SaveWeightsBody = Annotated[api.SaveWeightsRequest, sequenced_body(api.SaveWeightsRequest)]
SaveForSamplerBody = Annotated[api.SaveWeightsForSamplerRequest, sequenced_body(api.SaveWeightsForSamplerRequest)]
LoadWeightsBody = Annotated[api.LoadWeightsRequest, sequenced_body(api.LoadWeightsRequest)]
SaveExternalBody = Annotated[api.SaveWeightsExternalRequest, sequenced_body(api.SaveWeightsExternalRequest)]


@router.post("/create_model", response_model_exclude_none=True)
async def create_model(req: api.CreateModelRequest, rt: Rt, tenant: TenantId, fp: Fingerprint) -> api.UntypedAPIFuture:
    return await training.create_model(rt, tenant, req, fp)


@router.post("/get_info", response_model_exclude_none=True)
async def get_info(req: api.GetInfoRequest, rt: Rt, tenant: TenantId) -> api.GetInfoResponse:
    return await training.get_info(rt, tenant, req.model_id)


@router.post("/forward_backward", response_model_exclude_none=True)
async def forward_backward(request: Request, rt: Rt, tenant: TenantId, fp: Fingerprint) -> api.UntypedAPIFuture:
    # Protobuf body (docs/tinker-protocol-notes.md, "Protobuf bodies"); forward() is the same call with
    # forward_only set. Older SDKs (0.16 .. 0.24 without proto_write_fwdbwd) send the JSON
    # ForwardBackwardRequest instead.
    call = await _decode_call(request, rt, tenant, forward_only=False)
    return await training.forward_backward(rt, tenant, call, fp)


@router.post("/forward", response_model_exclude_none=True)
async def forward(request: Request, rt: Rt, tenant: TenantId, fp: Fingerprint) -> api.UntypedAPIFuture:
    """Older SDKs' forward(): a JSON ForwardRequest (``forward_input``); a protobuf body is read as
    forward_backward's. Either way it runs forward only, on the same model queue."""
    call = await _decode_call(request, rt, tenant, forward_only=True)
    return await training.forward_backward(rt, tenant, call, fp)


async def _decode_call(request: Request, rt: Rt, tenant: str, *, forward_only: bool) -> ForwardBackwardCall:
    body = await request.body()
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    encoding = request.headers.get("content-encoding")
    try:  # decompressing and decoding up to max_request_mb: off the event loop
        limit = rt.settings.max_datums_per_request
        if content_type != "application/json":
            call = await asyncio.to_thread(decode_forward_backward_request, body, encoding, max_datums=limit)
            return dataclasses.replace(call, forward_only=True) if forward_only else call
        return await asyncio.to_thread(legacy.decode_forward_backward_json, body, forward_only=forward_only,
                                       max_datums=limit)
    except WireError:
        # Refused before it was queued: the model's queue must not wait for its seq_id.
        named = legacy.model_and_seq_of if content_type == "application/json" else wire.model_and_seq_of
        await training.release_seq(rt, tenant, *await asyncio.to_thread(named, body, encoding))
        raise


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


@router.post("/save_weights_external", response_model_exclude_none=True)
async def save_weights_external(req: SaveExternalBody, rt: Rt, tenant: TenantId, fp: Fingerprint) -> api.UntypedAPIFuture:
    return await training.save_weights_external(rt, tenant, req, fp)


@router.post("/unload_model", response_model_exclude_none=True)
async def unload_model(req: api.UnloadModelRequest, rt: Rt, tenant: TenantId, fp: Fingerprint) -> api.UntypedAPIFuture:
    return await training.unload_model(rt, tenant, req, fp)
