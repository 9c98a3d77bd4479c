"""The native Twinkle API's processor app: `POST /api/v1/processor/twinkle/{create,call}`
(twinkle_client's Dataset, LazyDataset, DataLoader and InputProcessor). Errors leave as {"detail",
"field"} (gateway/errors.py NativeRoute); the logic is server/ops/native_data.py.

A data loader's end is the one 410 of this API: the client turns it into StopIteration."""

from __future__ import annotations

import json
from typing import Any

from fastapi import APIRouter, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from gateway.deps import NativeTenantId, Rt
from gateway.errors import NativeRoute
from gateway.routes.native import SessionId, parse
from schemas import native as nt
from server.ops import native_data

router = APIRouter(route_class=NativeRoute)


def _constant(name: str) -> Any:
    raise ValueError(name)


async def strict_body(request: Request) -> dict[str, Any]:
    """The JSON object sent; NaN and Infinity are refused (rows come back to a client whose
    simplejson refuses them)."""
    try:
        body = json.loads(await request.body() or b"{}", parse_constant=_constant)
    except ValueError:
        problem = {"loc": ("body",), "msg": "body is not valid JSON (NaN and Infinity are not JSON)",
                   "type": "json_invalid"}
        raise RequestValidationError([problem]) from None
    if not isinstance(body, dict):
        raise RequestValidationError([{"loc": ("body",), "msg": "must be a JSON object", "type": "dict_type"}])
    return body


@router.post("/processor/twinkle/create")
async def create(request: Request, rt: Rt, tenant: NativeTenantId, session_id: SessionId = None) -> JSONResponse:
    req = parse(nt.ProcessorCreateRequest, await strict_body(request))
    pid = await native_data.create(rt, tenant, session_id, req.processor_type, req.class_type,
                                   dict(req.model_extra or {}))
    return JSONResponse(nt.ProcessorCreateResponse(processor_id=pid).model_dump())


@router.post("/processor/twinkle/call")
async def call(request: Request, rt: Rt, tenant: NativeTenantId, session_id: SessionId = None) -> JSONResponse:
    req = parse(nt.ProcessorCallRequest, await strict_body(request))
    try:
        result = await native_data.call(rt, tenant, session_id, req.processor_id, req.function,
                                        dict(req.model_extra or {}))
    except native_data.Exhausted as end:
        return JSONResponse({"detail": str(end), "field": None}, 410)
    return JSONResponse({"result": result})
