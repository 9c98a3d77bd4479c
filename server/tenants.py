"""Who is calling: tenants, their API keys and quota overrides.

Two auth modes (`--auth`, TWINKLE_AUTH):
* keys: only keys registered with `twinkle keys create` (or the admin API) get in, each to its
  tenant. An unknown and a revoked key get the same 401.
* open: a key seen for the first time becomes a tenant of its own ("open-…"), for local play; a
  registered key still means its tenant, and a revoked one is still refused.

A key is "tml-" and 32 random bytes; only its sha256 is stored, logged (never), or compared (by
looking the hash up). Successful lookups are cached for CACHE_SECONDS, so a key revoked through
the admin API stops working at once in this process, and one revoked elsewhere (the CLI, another
gateway) within CACHE_SECONDS.

The store functions take a SQLAlchemy session: the CLI runs them with `Database.call`, the admin
API with `Database.run`."""

from __future__ import annotations

import logging
import re
import secrets
import time
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING, Annotated, Any

from pydantic import TypeAdapter, ValidationError
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from schemas import admin as api
from server import ids
from server.config import Settings
from server.errors import Conflict, InvalidRequest, NotFound, Unauthorized
from server.quotas import LIMIT_NAMES
from server.store.tables import ApiKey, Tenant, utcnow

if TYPE_CHECKING:
    from server.runtime import Runtime

log = logging.getLogger(__name__)
MAX_KEY_LENGTH = 4096
KEY_PREFIXES = ("tml-", "eyJ")  # static keys, and JWTs as the SDK sends them
NEW_KEY_BYTES = 32
SHOWN_PREFIX = 12  # "tml-" and 8 characters: 48 of a new key's 256 random bits
MIN_KEY_FOR_PREFIX = 36  # shorter keys (hand-made ones in open mode) show no prefix at all
CACHE_SECONDS = 5.0
CACHE_MAX_ENTRIES = 10_000
LAST_USED_RESOLUTION = timedelta(minutes=1)  # last_used_at is written at most this often per key
UNKNOWN_OR_REVOKED = "unknown or revoked API key"


# ----- keys ------------------------------------------------------------------------------------
def new_key() -> str:
    return "tml-" + secrets.token_urlsafe(NEW_KEY_BYTES)


def shown_prefix(api_key: str) -> str | None:
    """The part of a key that may be shown in listings to tell keys apart, or None."""
    return api_key[:SHOWN_PREFIX] if len(api_key) >= MIN_KEY_FOR_PREFIX else None


@dataclass(frozen=True)
class KeyHit:
    tenant_id: str
    key_id: str


@dataclass
class KeyCache:
    """Recently resolved keys of one server process: key hash -> (tenant, key id, expiry)."""

    seconds: float = CACHE_SECONDS
    _entries: dict[str, tuple[KeyHit, float]] = field(default_factory=dict)
    generation: int = 0  # bumped by forget_key

    def get(self, key_hash: str, now: float) -> KeyHit | None:
        entry = self._entries.get(key_hash)
        if entry is None or entry[1] <= now:
            return None
        return entry[0]

    def put(self, key_hash: str, hit: KeyHit, now: float, generation: int | None = None) -> None:
        """Cache a lookup; one that began (at `generation`) before a key was forgotten is dropped,
        since it may have read the key before its revocation."""
        if generation is not None and generation != self.generation:
            return
        if len(self._entries) >= CACHE_MAX_ENTRIES:
            self._entries = {h: e for h, e in self._entries.items() if e[1] > now}
            if len(self._entries) >= CACHE_MAX_ENTRIES:
                self._entries.clear()
        self._entries[key_hash] = (hit, now + self.seconds)

    def forget_key(self, key_id: str) -> None:
        self._entries = {h: e for h, e in self._entries.items() if e[0].key_id != key_id}
        self.generation += 1


async def tenant_for_key(rt: Runtime, api_key: str | None) -> str:
    """The tenant id the key belongs to, or Unauthorized. The key goes no further than here."""
    open_mode = rt.settings.auth == "open"
    if not api_key:
        hint = "any 'tml-…' value works here" if open_mode else "ask this server's operator for one"
        raise Unauthorized(f"missing API key: send it in the X-API-Key header ({hint})")
    if len(api_key) > MAX_KEY_LENGTH:
        raise Unauthorized("API key too long")
    if not api_key.startswith(KEY_PREFIXES):
        raise Unauthorized("API keys start with 'tml-' (the tinker SDK refuses any other)")
    key_hash = ids.hash_key(api_key)
    cache = rt.key_cache
    if (hit := cache.get(key_hash, time.monotonic())) is not None:
        return hit.tenant_id
    prefix, generation = shown_prefix(api_key), cache.generation
    hit = await rt.db.run(lambda s: resolve_key(s, key_hash, register=open_mode, prefix=prefix))
    if hit is None:
        raise Unauthorized(
            UNKNOWN_OR_REVOKED if open_mode else f"{UNKNOWN_OR_REVOKED}: this server accepts registered keys only"
        )
    cache.put(key_hash, hit, time.monotonic(), generation)
    return hit.tenant_id


def resolve_key(s: Session, key_hash: str, *, register: bool = False, prefix: str | None = None) -> KeyHit | None:
    """The usable key with this hash, or None. With `register` (open mode) an unknown key becomes
    a new tenant's, listed with `prefix`."""
    row = s.scalar(select(ApiKey).where(ApiKey.key_hash == key_hash))
    if row is None:
        if not register:
            return None
        row = _register_open_key(s, key_hash, prefix)
    if row.revoked_at is not None:
        return None
    now = utcnow()
    if row.last_used_at is None or now - row.last_used_at >= LAST_USED_RESOLUTION:
        row.last_used_at = now
    return KeyHit(tenant_id=row.tenant_id, key_id=row.id)


def _register_open_key(s: Session, key_hash: str, prefix: str | None) -> ApiKey:
    tenant_id = ids.new_id("tn", 8)
    key = ApiKey(id=ids.new_id("key", 8), tenant_id=tenant_id, key_hash=key_hash, prefix=prefix, label="open mode")
    try:
        with s.begin_nested():
            s.add(Tenant(id=tenant_id, name=f"open-{tenant_id.removeprefix('tn-')}", limits={}))
            s.flush()
            s.add(key)
    except IntegrityError:  # another request registered the same key at the same moment
        return s.scalars(select(ApiKey).where(ApiKey.key_hash == key_hash)).one()
    log.info("tenant_created", extra={"tenant_id": tenant_id, "key_id": key.id, "auth": "open"})
    return key


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


def _tenant_by_name(s: Session, name: str) -> Tenant:
    tenant = s.scalar(select(Tenant).where(Tenant.name == name))
    if tenant is None:
        raise NotFound(f"no tenant named {name!r}", field="tenant")
    return tenant


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
