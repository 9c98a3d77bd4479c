"""The native Twinkle API's model app: `POST /api/v1/model/{base}/twinkle/{op}` (twinkle_client's
MultiLoraTransformersModel). Errors leave as {"detail", "field"} (gateway/errors.py NativeRoute);
the logic is server/ops/native_models.py."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Body
from fastapi.responses import JSONResponse

from gateway.deps import NativeTenantId, Rt
from gateway.errors import NativeRoute
from gateway.routes.native import SessionId
from server.ops import native_models

router = APIRouter(route_class=NativeRoute)


@router.post("/model/{base:path}/twinkle/{op}")
async def model_op(
    base: str,
    op: str,
    rt: Rt,
    tenant: NativeTenantId,
    body: Annotated[dict[str, Any], Body()] = None,  # noqa: RUF013 - a call without arguments sends {}
    session_id: SessionId = None,
) -> JSONResponse:
    result = await native_models.call(rt, tenant, session_id, base, op, dict(body or {}))
    # Twinkle answers void calls with null, results as {"result": ...}; add_adapter and save with objects.
    if op in ("create", "add_adapter_to_model", "save") or result is None:
        return JSONResponse(result)
    return JSONResponse({"result": result})
