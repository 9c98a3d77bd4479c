"""RestClient endpoints: training runs, checkpoints (list, delete, publish, TTL, weights info,
download links, copies), sessions (list, get, project, search, trace export), the signed download
route, and clear 404s for the hosted service's admin, billing and auth endpoints.

A checkpoint_id in a path is "<segment>/<name>" (it holds one '/'), so the checkpoint routes take
it as two path parameters; anything else under .../checkpoints/ is a malformed checkpoint_id."""

from __future__ import annotations

from email.utils import format_datetime
from typing import Annotated, Literal

from fastapi import APIRouter, Header, Query, Request
from fastapi.responses import FileResponse, JSONResponse
from starlette.exceptions import HTTPException

from gateway.deps import Offset, Rt, TenantId
from gateway.errors import error_body
from gateway.guard import GuardedRoute
from schemas import tinker as api
from server.errors import InvalidRequest
from server.ops import catalog, checkpoints, signing

router = APIRouter(route_class=GuardedRoute)

AccessScope = Annotated[Literal["owned", "accessible"], Query()]
RUN_CHECKPOINT = "/training_runs/{model_id}/checkpoints/{segment}/{name}"


def download_base(request: Request) -> str:
    """Absolute URL of the signed download route, ending in '/' (the object path follows)."""
    return str(request.url_for("signed_download", object_path="_"))[:-1]


# ----- training runs -----------------------------------------------------------------------------
@router.get("/training_runs", response_model_exclude_none=True)
async def list_training_runs(
    rt: Rt,
    tenant: TenantId,
    limit: int = Query(20, ge=0, le=catalog.MAX_PAGE),
    offset: Offset = 0,
    access_scope: AccessScope = "owned",
    project_id: str | None = Query(None, min_length=1, max_length=200),
) -> api.TrainingRunsResponse:
    return await catalog.list_training_runs(rt, tenant, limit, offset, access_scope=access_scope, project_id=project_id)


@router.get("/training_runs/{model_id}", response_model_exclude_none=True)
async def get_training_run(model_id: str, rt: Rt, tenant: TenantId, access_scope: AccessScope = "owned") -> api.TrainingRun:
    return await catalog.get_training_run(rt, tenant, model_id, access_scope)


@router.get("/training_runs/{model_id}/checkpoints", response_model_exclude_none=True)
async def training_run_checkpoints(
    model_id: str,
    rt: Rt,
    tenant: TenantId,
    limit: int | None = Query(None, ge=0, le=catalog.MAX_PAGE),
    offset: Offset = 0,
) -> api.CheckpointsListResponse:
    return await catalog.training_run_checkpoints(rt, tenant, model_id, limit, offset)


# ----- one checkpoint ----------------------------------------------------------------------------
@router.delete(RUN_CHECKPOINT)
async def delete_checkpoint(model_id: str, segment: str, name: str, rt: Rt, tenant: TenantId) -> dict[str, str]:
    await checkpoints.delete_checkpoint(rt, tenant, model_id, f"{segment}/{name}")
    return {"status": "deleted"}


@router.post(RUN_CHECKPOINT + "/publish")
async def publish_checkpoint(model_id: str, segment: str, name: str, rt: Rt, tenant: TenantId) -> dict[str, str]:
    await checkpoints.set_public(rt, tenant, model_id, f"{segment}/{name}", True)
    return {"status": "published"}


@router.delete(RUN_CHECKPOINT + "/publish")
async def unpublish_checkpoint(model_id: str, segment: str, name: str, rt: Rt, tenant: TenantId) -> dict[str, str]:
    await checkpoints.set_public(rt, tenant, model_id, f"{segment}/{name}", False)
    return {"status": "unpublished"}


@router.put(RUN_CHECKPOINT + "/ttl")
async def set_checkpoint_ttl(
    model_id: str, segment: str, name: str, req: api.SetCheckpointTtlRequest, rt: Rt, tenant: TenantId
) -> dict[str, str]:
    await checkpoints.set_ttl(rt, tenant, model_id, f"{segment}/{name}", req.ttl_seconds)
    return {"status": "ttl set" if req.ttl_seconds is not None else "ttl cleared"}


@router.get(RUN_CHECKPOINT + "/external_weights_urls", response_model_exclude_none=True)
async def external_weights_urls(
    model_id: str, segment: str, name: str, request: Request, rt: Rt, tenant: TenantId
) -> api.ExternalWeightsUrlsResponse:
    return await checkpoints.download_urls(rt, tenant, model_id, f"{segment}/{name}", download_base(request))


@router.get(RUN_CHECKPOINT + "/archive")
async def checkpoint_archive(
    model_id: str, segment: str, name: str, request: Request, rt: Rt, tenant: TenantId
) -> JSONResponse:
    """A signed link to a tar of the checkpoint, as SDKs before 0.38 download one: a 302 to it
    (0.16 accepts nothing else), with the link and its expiry in the body too."""
    link = await checkpoints.archive_url(rt, tenant, model_id, f"{segment}/{name}", download_base(request))
    headers = {"Location": link.url, "Expires": format_datetime(link.expires, usegmt=True)}
    return JSONResponse(link.model_dump(mode="json"), status_code=302, headers=headers)


@router.api_route("/training_runs/{model_id}/checkpoints/{rest:path}", methods=["GET", "POST", "PUT", "DELETE"])
async def malformed_checkpoint_route(model_id: str, rest: str, request: Request, _: TenantId) -> JSONResponse:
    """Whatever the routes above did not match: a checkpoint_id without its '/', with an unknown
    action after it, or an action the method does not offer."""
    segment, _, tail = rest.partition("/")
    name, _, action = tail.partition("/")
    checkpoint_id = f"{segment}/{name}" if tail else segment
    try:
        checkpoints.parse_checkpoint_id(checkpoint_id)
    except InvalidRequest as exc:
        return JSONResponse(error_body(exc.message, field="checkpoint_id"), 400)
    message = f"{request.method} .../checkpoints/{rest} is not an endpoint of this API"
    return JSONResponse(error_body(message), 404 if action not in ("", "publish", "ttl", "external_weights_urls", "archive") else 405)


@router.get("/checkpoints", response_model_exclude_none=True)
async def list_user_checkpoints(
    rt: Rt, tenant: TenantId, limit: int = Query(100, ge=0, le=catalog.MAX_PAGE), offset: Offset = 0
) -> api.CheckpointsListResponse:
    return await catalog.list_user_checkpoints(rt, tenant, limit, offset)


@router.post("/weights_info", response_model_exclude_none=True)
async def weights_info(req: api.WeightsInfoRequest, rt: Rt, tenant: TenantId) -> api.WeightsInfoResponse:
    return await checkpoints.weights_info(rt, tenant, req.tinker_path)


@router.post("/copy_weights", response_model_exclude_none=True)
async def copy_weights(
    req: api.CopyWeightsRequest,
    rt: Rt,
    tenant: TenantId,
    idempotency_key: Annotated[str | None, Header(alias="X-Idempotency-Key", max_length=200)] = None,
) -> api.CopyWeightsResponse:
    return await checkpoints.copy_weights(rt, tenant, req, idempotency_key)


@router.get("/signed/{object_path:path}", name="signed_download")
async def signed_download(
    object_path: str, rt: Rt, expires: int = Query(...), signature: str = Query(..., max_length=200)
) -> FileResponse:
    """No API key: the signature is the permission (see server/ops/signing.py)."""
    try:
        path = await checkpoints.signed_file(rt, object_path, expires, signature)
    except signing.SignatureRejected as exc:
        raise HTTPException(403, str(exc)) from None
    media = "application/json" if path.suffix == ".json" else "application/octet-stream"
    return FileResponse(path, media_type=media, filename=path.name)


# ----- sessions ----------------------------------------------------------------------------------
@router.get("/sessions", response_model_exclude_none=True)
async def list_sessions(
    rt: Rt,
    tenant: TenantId,
    limit: int = Query(20, ge=0, le=catalog.MAX_PAGE),
    offset: Offset = 0,
    access_scope: AccessScope = "owned",  # no organisations here: both scopes are the caller's own
) -> api.ListSessionsResponse:
    return await catalog.list_user_sessions(rt, tenant, limit, offset)


@router.post("/sessions/search", response_model_exclude_none=True)
async def search_sessions(req: api.SessionSearchRequest, rt: Rt, tenant: TenantId) -> api.SessionSearchResponse:
    return await catalog.search_sessions(rt, tenant, req)


@router.get("/sessions/{session_id}", response_model_exclude_none=True)
async def get_session(session_id: str, rt: Rt, tenant: TenantId, access_scope: AccessScope = "owned") -> api.GetSessionResponse:
    return await catalog.get_session(rt, tenant, session_id)


@router.put("/sessions/{session_id}/project")
async def assign_session_project(
    session_id: str, req: api.AssignSessionProjectRequest, rt: Rt, tenant: TenantId
) -> dict[str, str]:
    await catalog.assign_project(rt, tenant, session_id, req.project_id)
    return {"status": "moved", "project_id": req.project_id}


@router.get("/sessions/{session_id}/trace_export", response_model_exclude_none=True)
async def export_session_trace(session_id: str, request: Request, rt: Rt, tenant: TenantId) -> api.TraceExportResponse:
    return await catalog.export_trace(rt, tenant, session_id, download_base(request))


# ----- the hosted service's own endpoints --------------------------------------------------------
HOSTED_ONLY = [
    ("GET", "/audit"),
    ("GET", "/billing/usage/events"),
    ("GET", "/billing/usage/checkpoints/current"),
    ("GET", "/auth/apikey/me"),
    ("DELETE", "/auth/apikey/me"),
]


def _hosted_only(method: str, path: str):  # noqa: ANN202
    async def answer() -> JSONResponse:
        message = f"{method} /api/v1{path} is a hosted-service endpoint this server does not offer"
        return JSONResponse(error_body(message), 404)

    return answer


for _method, _path in HOSTED_ONLY:
    router.add_api_route(_path, _hosted_only(_method, _path), methods=[_method], include_in_schema=False)
