"""retrieve_future: the long-poll every SDK future goes through
(docs/tinker-protocol-notes.md, "Long-poll of retrieve_future")."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from gateway.deps import Rt, TenantId
from gateway.errors import error_body
from gateway.guard import GuardedRoute
from schemas import futures, legacy
from schemas import tinker as api
from server.errors import NotFound
from server.kinds import FutureState, ResultFormat
from server.ops import sampling

router = APIRouter(route_class=GuardedRoute)
MEDIA = {ResultFormat.PROTO: "application/x-protobuf", ResultFormat.JSON: "application/json"}


def accepts_protobuf(accept: str | None) -> bool:
    """Whether the client reads protobuf results. SDK 0.16 sends ``Accept: application/json`` and
    can only read JSON; 0.18 .. 0.24 list both, 0.25+ only protobuf. No header, or a wildcard,
    accepts anything."""
    if not accept:
        return True
    types = {part.split(";")[0].strip().lower() for part in accept.split(",")}
    return bool(types & {"application/x-protobuf", "application/*", "*/*", ""})


@router.post("/retrieve_future")
async def retrieve_future(req: api.FutureRetrieveRequest, request: Request, rt: Rt, tenant: TenantId) -> Response:
    # Held until the result is ready or long_poll_seconds pass: an immediate try_again would
    # make the SDK re-poll in a tight loop.
    view = await rt.hub.wait(tenant, req.request_id, rt.settings.long_poll_seconds)
    if view is None:
        raise NotFound(f"request {req.request_id!r} not found", field="request_id")
    if view.state == FutureState.PENDING:
        # Why it waits, so the SDK can tell its user (a rate limit, or other tenants' work).
        state, reason = rt.scheduler.state_of(view.request_id, tenant)
        body = api.TryAgainResponse(request_id=view.request_id, queue_state=state, queue_state_reason=reason)
        return JSONResponse(body.model_dump(mode="json", exclude_none=True))
    if view.state == FutureState.FAILED:
        return JSONResponse(error_body(view.error or "failed", category=view.error_category or "unknown"))
    result, result_format = view.result or b"", view.result_format or ResultFormat.JSON
    if result_format == ResultFormat.PROTO and not accepts_protobuf(request.headers.get("accept")):
        # An old SDK: the same result in the JSON shape it validates (never through JSONResponse,
        # which refuses NaN; legacy writes it as the SDK reads it).
        transcoded = legacy.result_to_json(view.kind, result)
        if transcoded is not None:
            result, result_format = transcoded, ResultFormat.JSON
    size = len(result)
    if req.allow_metadata_only and size > rt.settings.metadata_only_bytes:
        # The SDK reserves room in its in-flight budget, then asks again for the payload.
        return JSONResponse(futures.CompleteMetadataResponse(response_payload_size=size).model_dump())
    return Response(result, media_type=MEDIA[result_format], headers={"Vary": "Accept"})


@router.post("/retrieve_futures", response_model_exclude_none=True)
async def retrieve_futures(req: futures.FuturesRetrieveRequest, rt: Rt, tenant: TenantId) -> futures.FuturesRetrieveResponse:
    """The completion feed of one sampling session (clone), long-polled unless timeout is 0."""
    timeout = rt.settings.long_poll_seconds if req.timeout is None else min(req.timeout, rt.settings.long_poll_seconds)
    completions, cursor = await sampling.poll_completions(rt, tenant, req.target, req.prev_cursor, timeout)
    return futures.FuturesRetrieveResponse(completions=completions, cursor=cursor)


@router.post("/cancel_future")
async def cancel_future(req: futures.CancelFutureRequest, rt: Rt, tenant: TenantId) -> dict[str, bool]:
    return {"cancelled": await sampling.cancel(rt, tenant, req.request_id)}
