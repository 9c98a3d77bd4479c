"""Who is calling: tenants, their API keys and quota overrides.

Two auth modes (`--auth`, TWINKLE_AUTH):
* keys: only keys registered with `twinkle keys create` (or the admin API) get in, each to its
  tenant. An unknown and a revoked key get the same 401.
* open: a key seen for the first time becomes a tenant of its own ("open-…"), for local play; a
  registered key still means its tenant, and a revoked one is still refused.

Keys themselves (their format, hashing and the lookup cache) are in server/tenancy/keys.py.

The store functions take a SQLAlchemy session: the CLI runs them with `Database.call`, the admin
API with `Database.run`."""

from __future__ import annotations

import logging
import re
from typing import Annotated, Any

from pydantic import TypeAdapter, ValidationError
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from schemas import admin as api
from server import ids
from server.config import Settings
from server.errors import Conflict, InvalidRequest, NotFound
from server.store.tables import ApiKey, Tenant, utcnow
from server.tenancy.keys import new_key, shown_prefix
from server.tenancy.quotas import LIMIT_NAMES

log = logging.getLogger(__name__)


# ----- tenants ---------------------------------------------------------------------------------
def validate_limits(limits: dict[str, Any]) -> dict[str, int | float]:
    """Quota overrides, checked against the quota names and the bounds of their server-wide
    settings (a limit takes the values its setting takes)."""
    checked: dict[str, int | float] = {}
    for name, value in limits.items():
        where = f"limits.{name}"
        if name not in LIMIT_NAMES:
            raise InvalidRequest(f"unknown limit {name!r}; the limits are: {', '.join(LIMIT_NAMES)}", field=where)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise InvalidRequest(f"limit {name} must be a number", field=where)
        info = Settings.model_fields[name]
        setting = Annotated[(info.annotation, *info.metadata)] if info.metadata else info.annotation
        try:
            checked[name] = TypeAdapter(setting).validate_python(value, strict=True)
        except ValidationError as exc:
            raise InvalidRequest(f"limit {name}: {exc.errors()[0]['msg']}", field=where) from None
    return checked


def _tenant_by_name(s: Session, name: str, *, or_id: bool = False) -> Tenant:
    """The tenant named `name`; with `or_id`, else the one whose id it is (open tenants are known by
    their ids). A name is matched first, so one tenant at most."""
    tenant = s.scalar(select(Tenant).where(Tenant.name == name))
    if tenant is None and or_id:
        tenant = s.get(Tenant, name)
    if tenant is None:
        raise NotFound(f"no tenant named {name!r}" + (" or with that id (see `twinkle tenants list`)" if or_id else ""),
                       field="tenant")
    return tenant


def tenant_id(s: Session, name_or_id: str) -> str:
    """The id of the tenant named `name_or_id`, else of the tenant with that id; NotFound if neither."""
    return _tenant_by_name(s, name_or_id, or_id=True).id


def _tenant_view(s: Session, tenant: Tenant) -> api.Tenant:
    active = s.scalar(
        select(func.count()).select_from(ApiKey).where(ApiKey.tenant_id == tenant.id, ApiKey.revoked_at.is_(None))
    )
    return api.Tenant(
        id=tenant.id, name=tenant.name, limits=dict(tenant.limits), created_at=tenant.created_at, active_keys=active or 0
    )


def create_tenant(s: Session, name: str, limits: dict[str, Any] | None = None) -> api.Tenant:
    if len(name) > api.TENANT_NAME_MAX_LEN or not re.fullmatch(api.TENANT_NAME_PATTERN, name):
        raise InvalidRequest(
            f"tenant names are 1 to {api.TENANT_NAME_MAX_LEN} letters, digits, '.', '_' or '-', "
            "starting with a letter or digit", field="name",
        )
    checked = validate_limits(limits or {})
    tenant = Tenant(id=ids.new_id("tn", 8), name=name, limits=checked)
    try:
        with s.begin_nested():
            s.add(tenant)
    except IntegrityError:
        raise Conflict(f"a tenant named {name!r} exists already", field="name") from None
    log.info("tenant_created", extra={"tenant_id": tenant.id, "auth": "registered"})
    return _tenant_view(s, tenant)


def list_tenants(s: Session) -> list[api.Tenant]:
    return [_tenant_view(s, t) for t in s.scalars(select(Tenant).order_by(Tenant.created_at, Tenant.name))]


def get_tenant(s: Session, name: str) -> api.Tenant:
    return _tenant_view(s, _tenant_by_name(s, name))


def set_limits(s: Session, name: str, limits: dict[str, Any]) -> api.Tenant:
    """Replace the tenant's overrides ({} = the server-wide defaults for everything)."""
    tenant = _tenant_by_name(s, name)
    tenant.limits = validate_limits(limits)
    log.info("tenant_limits_set", extra={"tenant_id": tenant.id, "limits": tenant.limits})
    return _tenant_view(s, tenant)


# ----- keys ------------------------------------------------------------------------------------
def _key_view(row: ApiKey, tenant_name: str) -> api.ApiKey:
    return api.ApiKey(
        id=row.id, tenant=tenant_name, prefix=row.prefix, label=row.label, created_at=row.created_at,
        last_used_at=row.last_used_at, revoked_at=row.revoked_at,
    )


def create_key(s: Session, tenant_name: str, label: str | None = None) -> api.CreatedApiKey:
    """A new key for the tenant. The answer is the only place the key ever appears."""
    tenant = _tenant_by_name(s, tenant_name)
    key = new_key()
    row = ApiKey(
        id=ids.new_id("key", 8), tenant_id=tenant.id, key_hash=ids.hash_key(key), prefix=shown_prefix(key), label=label
    )
    s.add(row)
    s.flush()
    log.info("api_key_created", extra={"tenant_id": tenant.id, "key_id": row.id})
    return api.CreatedApiKey(**_key_view(row, tenant.name).model_dump(), key=key)


def list_keys(s: Session, tenant_name: str | None = None, *, include_revoked: bool = True) -> list[api.ApiKey]:
    query = select(ApiKey, Tenant.name).join(Tenant, Tenant.id == ApiKey.tenant_id)
    if tenant_name is not None:
        query = query.where(ApiKey.tenant_id == _tenant_by_name(s, tenant_name).id)
    if not include_revoked:
        query = query.where(ApiKey.revoked_at.is_(None))
    rows = s.execute(query.order_by(ApiKey.created_at, ApiKey.id)).all()
    return [_key_view(row, name) for row, name in rows]


def revoke_key(s: Session, key_id: str) -> api.ApiKey:
    """Revoke a key for good (a second revoke changes nothing). The row stays, for the record."""
    found = s.execute(select(ApiKey, Tenant.name).join(Tenant, Tenant.id == ApiKey.tenant_id).where(ApiKey.id == key_id)).first()
    if found is None:
        raise NotFound(f"no API key with id {key_id!r} (ids look like 'key-…'; see `twinkle keys list`)", field="key_id")
    row, tenant_name = found
    if row.revoked_at is None:
        row.revoked_at = utcnow()
        log.info("api_key_revoked", extra={"tenant_id": row.tenant_id, "key_id": row.id})
    return _key_view(row, tenant_name)
