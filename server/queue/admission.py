"""Admission of sample requests: a bound on those admitted and not yet finished, in all and per
tenant (a tenant's share of the queue), so one tenant's flood cannot make every other tenant's
samples fail with 429."""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field


def tenant_places(limit: int, share: float) -> int:
    """The most places one tenant may hold: its share of the queue, at least one."""
    return max(1, math.ceil(limit * share))


@dataclass
class Admission:
    """Places for `limit` requests at once, at most `tenant_limit` of them one tenant's. `take` and
    `release` never await, so concurrent requests cannot together slip past a limit."""

    limit: int
    tenant_limit: int
    pending: int = 0
    by_tenant: Counter[str] = field(default_factory=Counter)

    def take(self, tenant: str) -> str | None:
        """Take a place; None when one was taken, else which limit is full ("queue" or "tenant")."""
        if self.pending >= self.limit:
            return "queue"
        if self.by_tenant[tenant] >= self.tenant_limit:
            return "tenant"
        self.pending += 1
        self.by_tenant[tenant] += 1
        return None

    def release(self, tenant: str) -> None:
        self.pending = max(0, self.pending - 1)
        if self.by_tenant[tenant] <= 1:
            self.by_tenant.pop(tenant, None)  # no entry is kept for a tenant with nothing queued
        else:
            self.by_tenant[tenant] -= 1
