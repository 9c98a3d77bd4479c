"""The native Twinkle API's service, management and sampler routes, under /api/v1, as ModelScope's
twinkle_client (twinkle-kit 0.5.1) calls them (docs/twinkle-native.md). The model app
(/model/{base}/twinkle/{op}) is gateway/routes/native_model.py.

Keys go in `Twinkle-Authorization: Bearer` (or `Authorization`); errors leave as {"detail",
"field"} (gateway/errors.py `NativeRoute`), which the client shows; success is exactly 200, which
its TwinkleClient methods require. The logic is server/ops/native_service.py and native_sampling.py."""

from __future__ import annotations

import json
from typing import Annotated, Any, TypeVar

from fastapi import APIRouter, Header, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ValidationError

from gateway.deps import NativeTenantId, Offset, Rt
from gateway.errors import NativeRoute
from schemas import native as nt
from server.errors import InvalidRequest
from server.ops import catalog
from server.ops import native_sampling as sampler
from server.ops import native_service as service

M = TypeVar("M", bound=BaseModel)
router = APIRouter(route_class=NativeRoute)
# One session per client process, sent on every request once init_twinkle_client made it.
SessionId = Annotated[str | None, Header(alias="X-Twinkle-Session-Id", max_length=200)]


# ----- bodies ------------------------------------------------------------------------------------
async def json_body(request: Request) -> dict[str, Any]:
    """The JSON object sent; an empty body is {} (a constructor without kwargs sends none)."""
    raw = await request.body()
    if not raw.strip():
        return {}
    try:
        body = json.loads(raw)
    except ValueError:
        problem = {"loc": ("body",), "msg": "body is not valid JSON", "type": "json_invalid"}
        raise RequestValidationError([problem]) from None
    if not isinstance(body, dict):
        raise RequestValidationError([{"loc": ("body",), "msg": "must be a JSON object", "type": "dict_type"}])
    return body


def parse(model: type[M], data: Any, *loc: str) -> M:
    """`data` as `model`, or a 422 whose field is the path to the offending value."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise RequestValidationError([{**e, "loc": ("body", *loc, *e["loc"])} for e in exc.errors()]) from None


def parse_inputs(raw: list[dict[str, Any]] | dict[str, Any]) -> list[nt.InputFeature | nt.Trajectory]:
    """Each input as an InputFeature (it has input_ids) or a Trajectory (it has messages)."""
    items = raw if isinstance(raw, list) else [raw]
    if not items:
        raise InvalidRequest("is empty: send at least one InputFeature or Trajectory", field="inputs")
    parsed: list[nt.InputFeature | nt.Trajectory] = []
    for i, item in enumerate(items):
        if "input_ids" in item:
            parsed.append(parse(nt.InputFeature, item, f"inputs[{i}]"))
        elif "messages" in item:
            parsed.append(parse(nt.Trajectory, item, f"inputs[{i}]"))
        else:
            raise InvalidRequest("needs input_ids (an InputFeature) or messages (a Trajectory)", field=f"inputs[{i}]")
    return parsed


# ----- sessions and the server -------------------------------------------------------------------
@router.post("/twinkle/create_session")
async def create_session(rt: Rt, tenant: NativeTenantId, req: nt.CreateSessionRequest | None = None
                         ) -> nt.CreateSessionResponse:
    return await service.create_session(rt, tenant, req or nt.CreateSessionRequest())


@router.post("/twinkle/session_heartbeat")
async def session_heartbeat(req: nt.SessionHeartbeatRequest, rt: Rt, tenant: NativeTenantId) -> dict:
    await service.heartbeat(rt, tenant, req)
    return {}


@router.get("/twinkle/get_server_capabilities")
async def get_server_capabilities(rt: Rt, _tenant: NativeTenantId) -> nt.ServerCapabilities:
    return service.capabilities(rt)


@router.get("/twinkle/healthz")
async def healthz() -> nt.Health:
    return nt.Health()


@router.get("/twinkle/capacity_info")
async def capacity_info(rt: Rt, tenant: NativeTenantId) -> nt.CapacityInfo:
    return await service.capacity(rt, tenant)


# ----- training runs and checkpoints -------------------------------------------------------------
@router.get("/twinkle/training_runs")
async def list_training_runs(
    rt: Rt, tenant: NativeTenantId, limit: int = Query(20, ge=0, le=catalog.MAX_PAGE), offset: Offset = 0,
    all_users: bool = False,
) -> nt.TrainingRunsResponse:
    return await service.list_training_runs(rt, tenant, limit, offset, all_users=all_users)


@router.get("/twinkle/training_runs/{run_id}")
async def get_training_run(run_id: str, rt: Rt, tenant: NativeTenantId) -> nt.TrainingRun:
    return await service.get_training_run(rt, tenant, run_id)


@router.get("/twinkle/training_runs/{run_id}/checkpoints")
async def list_checkpoints(run_id: str, rt: Rt, tenant: NativeTenantId) -> nt.CheckpointsListResponse:
    return await service.list_checkpoints(rt, tenant, run_id)


@router.delete("/twinkle/training_runs/{run_id}/checkpoints/{checkpoint_id:path}")
async def delete_checkpoint(run_id: str, checkpoint_id: str, rt: Rt, tenant: NativeTenantId
                            ) -> nt.DeleteCheckpointResponse:
    return await service.delete_checkpoint(rt, tenant, run_id, checkpoint_id)


@router.get("/twinkle/checkpoint_path/{run_id}/{checkpoint_id:path}")
async def checkpoint_path(run_id: str, checkpoint_id: str, rt: Rt, tenant: NativeTenantId) -> nt.CheckpointPath:
    return await service.checkpoint_path(rt, tenant, run_id, checkpoint_id)


@router.post("/twinkle/weights_info")
async def weights_info(req: nt.WeightsInfoRequest, rt: Rt, tenant: NativeTenantId) -> nt.WeightsInfoResponse:
    return await service.weights_info(rt, tenant, req.twinkle_path)


# ----- the sampler app ---------------------------------------------------------------------------
@router.post("/sampler/{base:path}/twinkle/{op}")
async def sampler_op(base: str, op: str, request: Request, rt: Rt, tenant: NativeTenantId,
                     session_id: SessionId = None) -> JSONResponse:
    """`{base:path}` is greedy, so the path matches from the right: a base model id may hold '/'."""
    base = service.served_base(rt, base)
    sampler.check_op(op)
    body = await json_body(request)
    if op == "sample":
        req = parse(nt.SampleRequest, body)
        answer = await sampler.sample(rt, tenant, session_id, base, req, parse_inputs(req.inputs))
        return JSONResponse(answer.model_dump(mode="json"))
    if op == "sample_stream":
        req = parse(nt.SampleRequest, body)
        lines = await sampler.sample_stream(rt, tenant, session_id, base, req, parse_inputs(req.inputs))
        return StreamingResponse(lines, media_type="application/x-ndjson")
    if op == "set_template":
        await sampler.set_template(rt, tenant, session_id, parse(nt.SetTemplateRequest, body))
    return JSONResponse(nt.OkResponse().model_dump())  # create: the constructor's kwargs configure nothing here
