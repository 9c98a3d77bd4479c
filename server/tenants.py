"""Who is calling. In this server's open mode every distinct API key is its own tenant, created on
first use. Keys are hashed on arrival; only the hash is stored, logged or compared."""

from __future__ import annotations

import logging

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from server import ids
from server.errors import Unauthorized
from server.runtime import Runtime
from server.store.tables import Tenant

log = logging.getLogger(__name__)
MAX_KEY_LENGTH = 4096
KEY_PREFIXES = ("tml-", "eyJ")  # static keys, and JWTs as the SDK sends them


async def tenant_for_key(rt: Runtime, api_key: str | None) -> str:
    if not api_key:
        raise Unauthorized("missing API key: send it in the X-API-Key header (any 'tml-…' value works here)")
    if len(api_key) > MAX_KEY_LENGTH:
        raise Unauthorized("API key too long")
    if not api_key.startswith(KEY_PREFIXES):
        raise Unauthorized("API keys start with 'tml-' (the tinker SDK refuses any other)")
    key_hash = ids.hash_key(api_key)
    if (tenant_id := rt.tenant_cache.get(key_hash)) is not None:
        return tenant_id
    tenant_id = await rt.db.run(lambda s: _find_or_create(s, key_hash))
    rt.tenant_cache[key_hash] = tenant_id
    return tenant_id


def _find_or_create(s: Session, key_hash: str) -> str:
    found = s.scalar(select(Tenant.id).where(Tenant.key_hash == key_hash))
    if found is not None:
        return found
    tenant = Tenant(id=ids.new_id("tn", 8), name=f"tenant-{key_hash[:8]}", key_hash=key_hash)
    try:
        with s.begin_nested():
            s.add(tenant)
    except IntegrityError:  # another request registered the same key at the same moment
        return s.scalar(select(Tenant.id).where(Tenant.key_hash == key_hash))
    log.info("tenant_created", extra={"tenant_id": tenant.id})
    return tenant.id


async def tenant_name(rt: Runtime, tenant_id: str) -> str:
    return await rt.db.run(lambda s: s.get(Tenant, tenant_id).name)
