"""FastAPI dependencies: the runtime, the calling tenant, the admin check, the submission fingerprint."""

from __future__ import annotations

import hashlib
import hmac
from typing import Annotated, Any, TypeVar

from fastapi import Depends, Header, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError

from server.errors import NotFound, Unauthorized
from server.ops.training import release_seq
from server.runtime import Runtime
from server.tenancy.keys import tenant_for_key

M = TypeVar("M", bound=BaseModel)


def get_runtime(request: Request) -> Runtime:
    return request.app.state.runtime


async def get_tenant(
    request: Request, x_api_key: Annotated[str | None, Header(alias="X-API-Key")] = None
) -> str:
    rt = get_runtime(request)
    return await tenant_for_key(rt.keys, rt.db, x_api_key, open_mode=rt.settings.auth == "open")


async def get_bearer_tenant(
    request: Request,
    authorization: Annotated[str | None, Header()] = None,
    x_api_key: Annotated[str | None, Header(alias="X-API-Key")] = None,
) -> str:
    """The OpenAI-compatible API's caller: the same keys, sent as OpenAI clients send them
    (`Authorization: Bearer tml-…`); X-API-Key works too."""
    key = _bearer(authorization)
    if not (key or x_api_key):
        raise Unauthorized("missing API key: send it as 'Authorization: Bearer tml-…' (the openai client's api_key)")
    rt = get_runtime(request)
    return await tenant_for_key(rt.keys, rt.db, key or x_api_key, open_mode=rt.settings.auth == "open")


async def get_native_tenant(
    request: Request,
    twinkle_authorization: Annotated[str | None, Header(alias="Twinkle-Authorization")] = None,
    authorization: Annotated[str | None, Header()] = None,
) -> str:
    """The native Twinkle API's caller: `Twinkle-Authorization: Bearer tml-…`, else `Authorization`
    (twinkle_client sends both), with the same keys and tenants as every other route."""
    key = _bearer(twinkle_authorization) or _bearer(authorization)
    if not key:
        raise Unauthorized("missing API key: send 'Twinkle-Authorization: Bearer tml-…' (twinkle_client's api_key)")
    rt = get_runtime(request)
    return await tenant_for_key(rt.keys, rt.db, key, open_mode=rt.settings.auth == "open")


def _bearer(header: str | None) -> str | None:
    scheme, _, token = (header or "").partition(" ")
    return token.strip() or None if scheme.lower() == "bearer" else None


async def require_admin(
    request: Request, x_admin_key: Annotated[str | None, Header(alias="X-Admin-Key")] = None
) -> None:
    """The admin API is for whoever holds the admin key (held here only as its sha256)."""
    expected = get_runtime(request).settings.admin_key
    if expected is None:
        raise NotFound("admin API disabled: start the server with an admin key (TWINKLE_ADMIN_KEY, --admin-key, "
                       "or admin_key in the config file) to enable it")
    if not x_admin_key:
        raise Unauthorized("missing admin key: send it in the X-Admin-Key header")
    given = "sha256:" + hashlib.sha256(x_admin_key.encode()).hexdigest()
    if not hmac.compare_digest(given, expected):
        raise Unauthorized("wrong admin key")


async def get_fingerprint(request: Request) -> str:
    """Hash of the raw body: an HTTP-level retry of a submission sends the same bytes."""
    return hashlib.sha256(await request.body()).hexdigest()


Rt = Annotated[Runtime, Depends(get_runtime)]
TenantId = Annotated[str, Depends(get_tenant)]
BearerTenantId = Annotated[str, Depends(get_bearer_tenant)]
NativeTenantId = Annotated[str, Depends(get_native_tenant)]
Fingerprint = Annotated[str, Depends(get_fingerprint)]


def sequenced_body(model: type[M]) -> Any:
    """Parse a JSON submission that carries a model's seq_id. If it is invalid, its seq_id is
    released first, so the model's queue does not wait for a request that will never come."""

    async def parse(request: Request, rt: Rt, tenant: TenantId) -> M:
        try:
            raw = await request.json()
        except ValueError:
            raise RequestValidationError([{"loc": ("body",), "msg": "body is not valid JSON", "type": "json_invalid"}]) from None
        try:
            return model.model_validate(raw)
        except ValidationError as exc:
            if isinstance(raw, dict):
                await release_seq(rt, tenant, raw.get("model_id"), raw.get("seq_id"))
            errors = [{**err, "loc": ("body", *err["loc"])} for err in exc.errors()]
            raise RequestValidationError(errors) from None

    return Depends(parse)
