"""Handshake and session endpoints every SDK client uses."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Body

from gateway.deps import Rt, TenantId
from gateway.guard import GuardedRoute
from schemas import tinker as api
from server.ops import sessions
from server.runtime import Runtime

router = APIRouter(route_class=GuardedRoute)

def client_config(rt: Runtime) -> api.ClientConfigResponse:
    """How the SDK should talk to this server (docs/tinker-protocol-notes.md, "client/config flags"): chunks
    of a large forward_backward are sent concurrently and zstd-compressed (the model's queue puts
    them back in order and runs them as one pass); samplers learn of finished requests from the
    session completion feed;
    custom losses run here, from an uploaded graph. The last three flags steer SDKs 0.22 .. 0.30
    onto the protocol of 0.38 (which ignores them): protobuf forward_backward, forward() as
    forward_backward with forward_only, create-from-state as one load_weights."""
    return api.ClientConfigResponse(
        pjwt_auth_enabled=False,
        proto_compress_fwdbwd=True,
        parallel_fwdbwd_chunks=True,
        sample_use_retrieve_futures=True,
        custom_loss_server_side=rt.settings.custom_loss_server_side,
        sample_join_sampling_session=False,
        use_pyqwest_transport=True,
        proto_write_fwdbwd=True,
        fwd_via_fwdbwd=True,
        create_model_via_load_weights=True,
    )


@router.get("/healthz")
async def healthz() -> api.HealthResponse:
    return api.HealthResponse(status="ok")


@router.post("/client/config", response_model_exclude_none=True)
async def get_client_config(rt: Rt, _: dict[str, Any] | None = Body(None)) -> api.ClientConfigResponse:
    return client_config(rt)


@router.post("/client/dynamic_config", response_model_exclude_none=True)
async def dynamic_config(_: dict[str, Any] | None = Body(None)) -> api.ClientDynamicConfigResponse:
    # Samplers may cancel requests they stopped waiting for (cancel_future).
    return api.ClientDynamicConfigResponse(sample_cancel_enabled=True)


@router.post("/telemetry")
async def telemetry(_tenant: TenantId, _: dict[str, Any] | None = Body(None)) -> api.TelemetryResponse:
    # Accepted and dropped: client telemetry is the SDK's business; the server logs its own events.
    return api.TelemetryResponse()


@router.get("/get_server_capabilities", response_model_exclude_none=True)
async def capabilities(rt: Rt, _tenant: TenantId) -> api.GetServerCapabilitiesResponse:
    models = [
        api.SupportedModel(model_name=b.name, max_context_length=b.max_context_length, trainable=True, sampleable=True)
        for b in rt.bases
    ]
    return api.GetServerCapabilitiesResponse(supported_models=models)


@router.post("/create_session", response_model_exclude_none=True)
async def create_session(req: api.CreateSessionRequest, rt: Rt, tenant: TenantId) -> api.CreateSessionResponse:
    return api.CreateSessionResponse(session_id=await sessions.create_session(rt, tenant, req))


@router.post("/session_heartbeat")
async def heartbeat(req: api.SessionHeartbeatRequest, rt: Rt, tenant: TenantId) -> api.HeartbeatResponse:
    await sessions.heartbeat(rt, tenant, req.session_id)
    return api.HeartbeatResponse()


@router.post("/sessions/{session_id}/finish")
async def finish(session_id: str, req: api.SessionFinishRequest, rt: Rt, tenant: TenantId) -> dict[str, str]:
    await sessions.finish(rt, tenant, session_id, req)
    return {"status": "finished"}
