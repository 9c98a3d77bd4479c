"""FastAPI dependencies: the runtime, the calling tenant, the admin check, the submission fingerprint."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
from collections.abc import Awaitable, Callable
from typing import Annotated, Any, TypeVar

from fastapi import Depends, Header, Query, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError

from server.errors import NotFound, Unauthorized
from server.ops import catalog
from server.ops.training import release_seq
from server.runtime import Runtime
from server.tenancy.keys import tenant_for_key

M = TypeVar("M", bound=BaseModel)
T = TypeVar("T")


def runtime_of(request: Request) -> Runtime:
    return request.app.state.runtime


async def get_runtime(request: Request) -> Runtime:
    # async: FastAPI runs a plain-def dependency in a worker thread, a hop on every request.
    return runtime_of(request)


# ----- the calling tenant -------------------------------------------------------------------------
# Each API sends the key its own way; `key_of` reads it from the headers, so that the route class
# (gateway/guard.py) can authenticate a request before its body is read, with no FastAPI in between.
def tinker_key(request: Request) -> str | None:
    return request.headers.get("x-api-key")


def bearer_key(request: Request) -> str | None:
    """The OpenAI-compatible API's: `Authorization: Bearer tml-…` (the openai client's api_key), or X-API-Key."""
    key = _bearer(request.headers.get("authorization")) or request.headers.get("x-api-key")
    if not key:
        raise Unauthorized("missing API key: send it as 'Authorization: Bearer tml-…' (the openai client's api_key)")
    return key


def native_key(request: Request) -> str | None:
    """The native Twinkle API's: `Twinkle-Authorization: Bearer tml-…`, else `Authorization`
    (twinkle_client sends both)."""
    key = _bearer(request.headers.get("twinkle-authorization")) or _bearer(request.headers.get("authorization"))
    if not key:
        raise Unauthorized("missing API key: send 'Twinkle-Authorization: Bearer tml-…' (twinkle_client's api_key)")
    return key


def _bearer(header: str | None) -> str | None:
    scheme, _, token = (header or "").partition(" ")
    return token.strip() or None if scheme.lower() == "bearer" else None


async def authenticated(request: Request, key_of: Callable[[Request], str | None]) -> str:
    """The caller's tenant id (once per request: the route class may have found it already)."""
    if (tenant := getattr(request.state, "tenant_id", None)) is not None:
        return tenant
    rt = runtime_of(request)
    tenant = await _counting_failures(
        request, lambda: tenant_for_key(rt.keys, rt.db, key_of(request), open_mode=rt.settings.auth == "open"))
    request.state.tenant_id = tenant
    return tenant


async def _counting_failures(request: Request, attempt: Callable[[], Awaitable[T]]) -> T:
    """Run an authentication; a client address with too many failed ones lately gets a 429
    before any lookup (gateway/guard.py AuthFailures)."""
    failures, address = request.app.state.auth_failures, request.client.host if request.client else ""
    failures.check(address)
    try:
        return await attempt()
    except Unauthorized:
        failures.failed(address)
        raise


async def get_tenant(
    request: Request, x_api_key: Annotated[str | None, Header(alias="X-API-Key")] = None
) -> str:
    return await authenticated(request, tinker_key)


async def get_bearer_tenant(
    request: Request,
    authorization: Annotated[str | None, Header()] = None,
    x_api_key: Annotated[str | None, Header(alias="X-API-Key")] = None,
) -> str:
    """The OpenAI-compatible API's caller: the same keys, sent as OpenAI clients send them."""
    return await authenticated(request, bearer_key)


async def get_native_tenant(
    request: Request,
    twinkle_authorization: Annotated[str | None, Header(alias="Twinkle-Authorization")] = None,
    authorization: Annotated[str | None, Header()] = None,
) -> str:
    """The native Twinkle API's caller, with the same keys and tenants as every other route."""
    return await authenticated(request, native_key)


async def require_admin(
    request: Request, x_admin_key: Annotated[str | None, Header(alias="X-Admin-Key")] = None
) -> None:
    """The admin API is for whoever holds the admin key (held here only as its sha256)."""
    await admin_of(request)


ADMIN_API = ("admin API", "send it in the X-Admin-Key header")


async def admin_of(request: Request, key: str | None = None, how: tuple[str, str] = ADMIN_API) -> None:
    """Whether the caller holds the admin key (`key`, else its X-Admin-Key header); `how`: the
    API's name and how to send the key, for the refusals."""
    if getattr(request.state, "admin", False):
        return
    given = key if key is not None else request.headers.get("x-admin-key")
    await _counting_failures(request, lambda: _check_admin(request, given, *how))
    request.state.admin = True


async def require_metrics_reader(request: Request) -> None:
    """GET /metrics shows every tenant's counters, so it is not for tenants: with --auth open (loopback
    callers only) it is open; with --auth keys it wants the admin key, as `Authorization: Bearer <admin
    key>` (a Prometheus scrape config's bearer auth) or in X-Admin-Key."""
    if runtime_of(request).settings.auth == "open":
        return
    key = _bearer(request.headers.get("authorization")) or request.headers.get("x-admin-key")
    await admin_of(request, key or "", ("GET /metrics under --auth keys",
                                        "send it as 'Authorization: Bearer <admin key>' (or in the X-Admin-Key header)"))


async def _check_admin(request: Request, x_admin_key: str | None, api: str, send: str) -> None:
    expected = runtime_of(request).settings.admin_key
    if expected is None:
        raise NotFound(f"{api} disabled: start the server with an admin key (TWINKLE_ADMIN_KEY, --admin-key, "
                       "or admin_key in the config file) to enable it")
    if not x_admin_key:
        raise Unauthorized(f"missing admin key: {send}")
    if not is_admin_key(request, x_admin_key):
        raise Unauthorized("wrong admin key")


def is_admin_key(request: Request, key: str) -> bool:
    """Whether `key` is the server's admin key (held only as its sha256; False when there is none)."""
    expected = runtime_of(request).settings.admin_key
    given = "sha256:" + hashlib.sha256(key.encode()).hexdigest()
    return expected is not None and hmac.compare_digest(given, expected)


OFFLOAD_BYTES = 1 << 20  # work on a body larger than this runs in a worker thread, off the event loop


async def get_fingerprint(request: Request) -> str:
    """Hash of the raw body: an HTTP-level retry of a submission sends the same bytes."""
    body = await request.body()
    if len(body) > OFFLOAD_BYTES:  # hashlib lets go of the GIL: the loop serves others meanwhile
        return (await asyncio.to_thread(hashlib.sha256, body)).hexdigest()
    return hashlib.sha256(body).hexdigest()


Rt = Annotated[Runtime, Depends(get_runtime)]
TenantId = Annotated[str, Depends(get_tenant)]
BearerTenantId = Annotated[str, Depends(get_bearer_tenant)]
NativeTenantId = Annotated[str, Depends(get_native_tenant)]
Fingerprint = Annotated[str, Depends(get_fingerprint)]
# A listing's offset: past 2**62 it is past every row, and past what a 64-bit SQL integer holds.
Offset = Annotated[int, Query(ge=0, le=catalog.MAX_OFFSET)]


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
