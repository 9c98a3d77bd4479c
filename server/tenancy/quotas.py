"""Per-tenant quotas and rate limits.

Defaults come from the settings; a tenant's row may override any of them (`tenants.limits`, set
with `twinkle tenants` or the admin API). What happens over a limit:

* requests/s (submissions, sliding window), in-flight requests, live models: the submission gets a
  429 whose body says which limit and until when, with Retry-After; the SDK backs off and resends.
* tokens/s (sliding window): the work is accepted and waits in the queue; retrieve_future answers
  `try_again` with `queue_state: paused_rate_limit` and the reason, which the SDK shows its user.
* LoRA rank, tokens per request: a 400 naming the field (waiting would not help).
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass, fields, replace
from typing import Any

from server.config import Settings
from server.errors import Busy, InvalidRequest

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Limits:
    max_live_models: int
    max_lora_rank: int
    max_tokens_per_request: int
    max_inflight_requests: int
    max_files: int
    max_file_storage_mb: int
    requests_per_second: float
    tokens_per_second: float


LIMIT_NAMES = tuple(f.name for f in fields(Limits))


def default_limits(settings: Settings) -> Limits:
    return Limits(**{name: getattr(settings, name) for name in LIMIT_NAMES})


def with_overrides(base: Limits, overrides: dict[str, Any] | None) -> Limits:
    known = {k: v for k, v in (overrides or {}).items() if k in LIMIT_NAMES}
    return replace(base, **known)


class SlidingWindow:
    """Amounts (requests or tokens) spent over the last `seconds`."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self._spent: deque[tuple[float, float]] = deque()
        self._total = 0.0

    def _expire(self, now: float) -> None:
        while self._spent and self._spent[0][0] <= now - self.seconds:
            self._total -= self._spent.popleft()[1]

    def used(self, now: float) -> float:
        self._expire(now)
        return self._total

    def add(self, now: float, amount: float) -> None:
        self._expire(now)
        self._spent.append((now, amount))
        self._total += amount

    def free_at(self, now: float, budget: float, amount: float) -> float:
        """When `amount` more fits in `budget` (now if it does already). An amount larger than the
        whole budget fits once the window is empty, so a big request is slowed, never refused."""
        self._expire(now)
        if self._total + amount <= budget or not self._spent:
            return now
        need, freed = self._total + amount - budget, 0.0
        for at, spent in self._spent:
            freed += spent
            if freed >= need:
                return at + self.seconds
        return self._spent[-1][0] + self.seconds


@dataclass
class _TenantState:
    limits: Limits
    loaded_at: float
    requests: SlidingWindow
    tokens: SlidingWindow
    inflight: int = 0
    live_models: set[str] | None = None


class Quotas:
    """In-process accounting of each tenant's usage (one server process; a multi-gateway
    deployment would keep the windows in Redis)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.window = settings.rate_window_seconds
        self._tenants: dict[str, _TenantState] = {}

    # ----- limits --------------------------------------------------------------------------------
    def state(self, tenant: str) -> _TenantState:
        if (st := self._tenants.get(tenant)) is None:
            st = self._tenants[tenant] = _TenantState(
                default_limits(self.settings), 0.0, SlidingWindow(self.window), SlidingWindow(self.window),
                live_models=set(),
            )
        return st

    def set_limits(self, tenant: str, overrides: dict[str, Any] | None, now: float | None = None) -> Limits:
        """Apply the tenant's overrides as read at `now` (default: just now). A read older than the
        limits held is dropped: a refresh that raced an admin change must not undo it."""
        st = self.state(tenant)
        now = time.monotonic() if now is None else now
        if now < st.loaded_at:
            return st.limits
        st.limits = with_overrides(default_limits(self.settings), overrides)
        st.loaded_at = now
        return st.limits

    def limits_stale(self, tenant: str, now: float, max_age: float = 5.0) -> bool:
        return now - self.state(tenant).loaded_at > max_age

    def limits(self, tenant: str) -> Limits:
        return self.state(tenant).limits

    # ----- admission of a submission -------------------------------------------------------------
    def admit(self, tenant: str, now: float, *, rate: bool = True) -> None:
        """Count one submission against requests/s (unless `rate` is False: counted in Redis, see
        server/tenancy/shared.py) and in-flight, or refuse it with a 429."""
        self.check(tenant, now, rate=rate)
        st = self.state(tenant)
        if rate:
            st.requests.add(now, 1)
        st.inflight += 1

    def check(self, tenant: str, now: float, *, rate: bool = True) -> None:
        """The 429 `admit` would give now, counting nothing: a submission checks this before it
        touches the database, so a refused one costs no write."""
        st = self.state(tenant)
        budget = st.limits.requests_per_second * self.window
        at = st.requests.free_at(now, budget, 1) if rate else now
        if at > now:
            log.info("submission_refused", extra={"tenant_id": tenant, "limit": "requests_per_second"})
            raise Busy(
                f"rate limit: this tenant may submit {st.limits.requests_per_second:g} requests/s "
                f"(over {self.window:g} s); retry in {at - now:.1f} s", retry_after=at - now,
            )
        if st.inflight >= st.limits.max_inflight_requests:
            log.info("submission_refused", extra={"tenant_id": tenant, "limit": "max_inflight_requests"})
            raise Busy(
                f"quota: at most {st.limits.max_inflight_requests} requests of this tenant may be in flight; "
                "wait for some to finish", retry_after=1.0,
            )

    def finished(self, tenant: str) -> None:
        st = self.state(tenant)
        st.inflight = max(st.inflight - 1, 0)

    # ----- request size, models ------------------------------------------------------------------
    def check_tokens(self, tenant: str, tokens: int, field: str) -> None:
        cap = self.limits(tenant).max_tokens_per_request
        if tokens > cap:
            raise InvalidRequest(f"{tokens} tokens exceed this tenant's limit of {cap} tokens per request", field=field)

    def check_rank(self, tenant: str, rank: int) -> None:
        cap = self.limits(tenant).max_lora_rank
        if rank > cap:
            raise InvalidRequest(f"rank {rank} exceeds this tenant's max_lora_rank {cap}", field="lora_config.rank")

    def check_new_model(self, tenant: str) -> None:
        st = self.state(tenant)
        if len(st.live_models) >= st.limits.max_live_models:
            log.info("submission_refused", extra={"tenant_id": tenant, "limit": "max_live_models"})
            raise Busy(
                f"quota: this tenant already has {len(st.live_models)} live models (limit "
                f"{st.limits.max_live_models}); unload one (or let its session end) first", retryable=False,
            )

    def model_loaded(self, tenant: str, model_id: str) -> None:
        self.state(tenant).live_models.add(model_id)

    def model_unloaded(self, tenant: str, model_id: str) -> None:
        self.state(tenant).live_models.discard(model_id)

    def held_models(self) -> dict[str, str]:
        """Every live model this process counts, with its tenant."""
        return {model: tenant for tenant, st in self._tenants.items() for model in st.live_models or ()}

    def live_models(self, tenant: str) -> int:
        return len(self.state(tenant).live_models)

    def inflight(self, tenant: str) -> int:
        return self.state(tenant).inflight

    # ----- tokens/s: the scheduler's Throttle ---------------------------------------------------
    def ready_at(self, tenant: str, cost: int, now: float) -> float:
        st = self.state(tenant)
        return st.tokens.free_at(now, st.limits.tokens_per_second * self.window, cost)

    def charge(self, tenant: str, cost: int, now: float) -> None:
        if cost:
            self.state(tenant).tokens.add(now, cost)

    def reason(self, tenant: str, cost: int, now: float) -> str:
        at = self.ready_at(tenant, cost, now)
        if at <= now:
            return ""
        rate = self.state(tenant).limits.tokens_per_second
        return (f"this tenant is over its rate limit of {rate:g} tokens/s (over {self.window:g} s); "
                f"its next operation ({cost} tokens) starts in {at - now:.1f} s")
