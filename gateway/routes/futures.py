"""retrieve_future: the long-poll every SDK future goes through (protocol §4.2)."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response

from gateway.deps import Rt, TenantId
from gateway.errors import error_body
from schemas import tinker as api
from server.errors import NotFound

router = APIRouter()
MEDIA = {"proto": "application/x-protobuf", "json": "application/json"}


@router.post("/retrieve_future")
async def retrieve_future(req: api.FutureRetrieveRequest, rt: Rt, tenant: TenantId) -> Response:
    # Held until the result is ready or long_poll_seconds pass: an immediate try_again would
    # make the SDK re-poll in a tight loop.
    view = await rt.hub.wait(tenant, req.request_id, rt.settings.long_poll_seconds)
    if view is None:
        raise NotFound(f"request {req.request_id!r} not found", field="request_id")
    if view.state == "pending":
        body = api.TryAgainResponse(request_id=view.request_id, queue_state="active")
        return JSONResponse(body.model_dump(mode="json", exclude_none=True))
    if view.state == "failed":
        return JSONResponse(error_body(view.error or "failed", category=view.error_category or "unknown"))
    return Response(view.result, media_type=MEDIA[view.result_format or "json"])
