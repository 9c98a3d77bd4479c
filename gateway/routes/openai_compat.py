"""The OpenAI-compatible API, mounted at /v1 (and at /api/v1: the native Twinkle API's OpenAI
bridge): models, completions, chat completions (server-sent events with `stream: true`). Keys go
in `Authorization: Bearer`; errors leave in OpenAI's shape (gateway/errors.py `OpenAIRoute`),
those of a stream that has begun as a last `data: {"error": …}` event. The logic is
server/ops/openai_compat.py."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel

from gateway.deps import BearerTenantId, Rt
from gateway.errors import OpenAIRoute, openai_body, openai_error
from schemas import openai as oa
from server.ops import openai_compat as ops

log = logging.getLogger(__name__)
router = APIRouter(route_class=OpenAIRoute)
# /v1's answer to any other path. Apart from `router`, because the same endpoints are mounted at
# /api/v1 too (the native Twinkle API's OpenAI bridge), where the Tinker API answers unknown paths.
unknown = APIRouter(route_class=OpenAIRoute)


@router.get("/models")
async def list_models(rt: Rt, tenant: BearerTenantId) -> JSONResponse:
    return JSONResponse(oa.dump(await ops.list_models(rt, tenant)))


@router.get("/models/{model:path}")
async def get_model(model: str, rt: Rt, tenant: BearerTenantId) -> JSONResponse:
    return JSONResponse(oa.dump(await ops.get_model(rt, tenant, model)))


@router.post("/completions")
async def completions(req: oa.CompletionRequest, request: Request, rt: Rt, tenant: BearerTenantId) -> Response:
    plan = await ops.plan_completion(rt, tenant, req)
    if req.stream:
        return _sse(ops.stream_completion(plan, await ops.submit(rt, tenant, plan)), request.url.path)
    choices, usage = await ops.sample(rt, tenant, plan)
    return JSONResponse(oa.dump(ops.completion_response(plan, choices, usage)))


@router.post("/chat/completions")
async def chat_completions(req: oa.ChatCompletionRequest, request: Request, rt: Rt, tenant: BearerTenantId) -> Response:
    plan = await ops.plan_chat(rt, tenant, req)
    if req.stream:
        return _sse(ops.stream_chat(plan, await ops.submit(rt, tenant, plan)), request.url.path)
    choices, usage = await ops.sample(rt, tenant, plan)
    return JSONResponse(oa.dump(ops.chat_response(plan, choices, usage)))


@unknown.api_route("/{rest:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE"], include_in_schema=False)
async def not_an_endpoint(rest: str, request: Request) -> JSONResponse:
    message = f"{request.method} /v1/{rest} is not an endpoint of this server's OpenAI-compatible API"
    return JSONResponse(openai_body(message, 404, code="unknown_url"), 404)


def _sse(chunks: AsyncIterator[BaseModel], path: str) -> StreamingResponse:
    return StreamingResponse(_events(chunks, path), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def _events(chunks: AsyncIterator[BaseModel], path: str) -> AsyncIterator[str]:
    """`data: <chunk>` events, then `data: [DONE]`; an error ends the stream with its own event."""
    try:
        async for chunk in chunks:
            yield f"data: {json.dumps(oa.dump(chunk), separators=(',', ':'))}\n\n"
    except Exception as exc:
        body = json.loads(openai_error(exc, path).body)
        yield f"data: {json.dumps(body)}\n\n"
        return
    yield "data: [DONE]\n\n"
