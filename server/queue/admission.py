"""Admission of sample requests: a bound on those admitted and not yet finished."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Admission:
    """Places for `limit` requests at once. `take` and `release` never await, so concurrent
    requests cannot together slip past the limit."""

    limit: int
    pending: int = 0

    def take(self) -> bool:
        """Take a place; False (and nothing taken) when all are taken."""
        if self.pending >= self.limit:
            return False
        self.pending += 1
        return True

    def release(self) -> None:
        self.pending = max(0, self.pending - 1)
