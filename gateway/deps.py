"""FastAPI dependencies: the runtime, the calling tenant, the submission fingerprint."""

from __future__ import annotations

import hashlib
from typing import Annotated

from fastapi import Depends, Header, Request

from server.runtime import Runtime
from server.tenants import tenant_for_key


def get_runtime(request: Request) -> Runtime:
    return request.app.state.runtime


async def get_tenant(
    request: Request, x_api_key: Annotated[str | None, Header(alias="X-API-Key")] = None
) -> str:
    return await tenant_for_key(get_runtime(request), x_api_key)


async def get_fingerprint(request: Request) -> str:
    """Hash of the raw body: an HTTP-level retry of a submission sends the same bytes."""
    return hashlib.sha256(await request.body()).hexdigest()


Rt = Annotated[Runtime, Depends(get_runtime)]
TenantId = Annotated[str, Depends(get_tenant)]
Fingerprint = Annotated[str, Depends(get_fingerprint)]
