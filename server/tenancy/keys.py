"""API keys: how a request's key becomes a tenant id.

A key is "tml-" and 32 random bytes; only its sha256 is stored, logged (never), or compared (by
looking the hash up). Successful lookups are cached for CACHE_SECONDS, so a key revoked through
the admin API stops working at once in this process, and one revoked elsewhere (the CLI, another
gateway) within CACHE_SECONDS. Failed lookups (keys mode) are cached for MISS_SECONDS, so a
stream of bad keys costs no database query each; a key made in this process (the admin API) works
at once, one made elsewhere (the CLI) within MISS_SECONDS of a failed try."""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TypeVar

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from server import ids
from server.errors import Unauthorized
from server.store.database import Database
from server.store.tables import ApiKey, Tenant, utcnow

log = logging.getLogger(__name__)
V = TypeVar("V")
MAX_KEY_LENGTH = 4096
KEY_PREFIXES = ("tml-", "eyJ")  # static keys, and JWTs as the SDK sends them
NEW_KEY_BYTES = 32
SHOWN_PREFIX = 12  # "tml-" and 8 characters: 48 of a new key's 256 random bits
MIN_KEY_FOR_PREFIX = 36  # shorter keys (hand-made ones in open mode) show no prefix at all
CACHE_SECONDS = 5.0
MISS_SECONDS = 5.0
CACHE_MAX_ENTRIES = 10_000
LAST_USED_RESOLUTION = timedelta(minutes=1)  # last_used_at is written at most this often per key
UNKNOWN_OR_REVOKED = "unknown or revoked API key"


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
    miss_seconds: float = MISS_SECONDS
    _entries: dict[str, tuple[KeyHit, float]] = field(default_factory=dict)
    _misses: dict[str, float] = field(default_factory=dict)  # key hash -> until when it is known bad
    generation: int = 0  # bumped by forget_key

    def get(self, key_hash: str, now: float) -> KeyHit | None:
        entry = self._entries.get(key_hash)
        if entry is None or entry[1] <= now:
            return None
        return entry[0]

    def missed(self, key_hash: str, now: float) -> bool:
        """Whether the key failed a lookup within the last miss_seconds."""
        until = self._misses.get(key_hash)
        return until is not None and until > now

    def put_miss(self, key_hash: str, now: float) -> None:
        self._misses = _room(self._misses, now, lambda until: until)
        self._misses[key_hash] = now + self.miss_seconds

    def forget_misses(self) -> None:
        """A key was made: any key may be good now."""
        self._misses.clear()

    def put(self, key_hash: str, hit: KeyHit, now: float, generation: int | None = None) -> None:
        """Cache a lookup; one that began (at `generation`) before a key was forgotten is dropped,
        since it may have read the key before its revocation."""
        if generation is not None and generation != self.generation:
            return
        self._entries = _room(self._entries, now, lambda entry: entry[1])
        self._entries[key_hash] = (hit, now + self.seconds)

    def forget_key(self, key_id: str) -> None:
        self._entries = {h: e for h, e in self._entries.items() if e[0].key_id != key_id}
        self.generation += 1


def _room(entries: dict[str, V], now: float, expiry: Callable[[V], float]) -> dict[str, V]:
    """`entries` with room for one more: expired ones dropped when full, all of them if still full."""
    if len(entries) < CACHE_MAX_ENTRIES:
        return entries
    live = {h: e for h, e in entries.items() if expiry(e) > now}
    return live if len(live) < CACHE_MAX_ENTRIES else {}


async def tenant_for_key(cache: KeyCache, db: Database, api_key: str | None, *, open_mode: bool) -> str:
    """The tenant id the key belongs to, or Unauthorized. The key goes no further than here.
    `open_mode`: an unknown key becomes a new tenant's (--auth open)."""
    if not api_key:
        hint = "any 'tml-…' value works here" if open_mode else "ask this server's operator for one"
        raise Unauthorized(f"missing API key: send it in the X-API-Key header ({hint})")
    if len(api_key) > MAX_KEY_LENGTH:
        raise Unauthorized("API key too long")
    if not api_key.startswith(KEY_PREFIXES):
        raise Unauthorized("API keys start with 'tml-' (the tinker SDK refuses any other)")
    key_hash, now = ids.hash_key(api_key), time.monotonic()
    if (hit := cache.get(key_hash, now)) is not None:
        return hit.tenant_id
    refusal = UNKNOWN_OR_REVOKED if open_mode else f"{UNKNOWN_OR_REVOKED}: this server accepts registered keys only"
    if cache.missed(key_hash, now):
        raise Unauthorized(refusal)
    prefix, generation = shown_prefix(api_key), cache.generation
    hit = await db.run(lambda s: resolve_key(s, key_hash, register=open_mode, prefix=prefix))
    if hit is None:
        cache.put_miss(key_hash, time.monotonic())
        raise Unauthorized(refusal)
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
