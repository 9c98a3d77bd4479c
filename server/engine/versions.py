"""In-memory adapter versions: which exist in this process, and when each is released.

save_weights_and_get_sampling_client makes a version of the model's adapter that lives in the
engine's memory only (never on disk). An RL loop makes one per step, so versions must go away on
their own, and never while someone still samples them. The rule, per model:

- the newest version of a model is kept while its session lives;
- an older (superseded) one is released once nothing of it is in flight and it has been idle for
  `idle_seconds`, or sooner when its model holds more than `per_model` versions (oldest idle
  first): a sampling client that goes on sampling keeps its version alive, training never
  changes it;
- all of a session's versions go when the session ends.

A sample on a released version gets a clear "released" error, never other weights. This table
decides; the engine holds the weights (Engine.snapshot / Engine.release). Not thread-safe: the
event loop uses it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass
class Version:
    key: str
    tenant_id: str
    model_id: str
    session_id: str
    base_model: str
    step: int
    nbytes: int
    created: float
    last_used: float
    in_flight: int = 0


class Versions:
    def __init__(self, per_model: int, idle_seconds: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.per_model = per_model
        self.idle_seconds = idle_seconds
        self._clock = clock
        self._by_key: dict[str, Version] = {}
        self._by_model: dict[str, list[Version]] = {}  # oldest first

    def now(self) -> float:
        return self._clock()

    def add(self, version: Version) -> list[Version]:
        """Record a new version; returns the versions of its model now due for release."""
        self._by_key[version.key] = version
        self._by_model.setdefault(version.model_id, []).append(version)
        return self._take_due(version.model_id)

    def get(self, key: str) -> Version | None:
        return self._by_key.get(key)

    def begin(self, key: str) -> Version | None:
        """A sample on `key` starts: it is pinned until `end`. None if it is not held."""
        version = self._by_key.get(key)
        if version is not None:
            version.in_flight += 1
            version.last_used = self._clock()
        return version

    def end(self, key: str) -> list[Version]:
        """A sample on `key` is over; returns the versions of its model now due for release."""
        version = self._by_key.get(key)
        if version is None:
            return []
        version.in_flight = max(0, version.in_flight - 1)
        version.last_used = self._clock()
        return self._take_due(version.model_id)

    def take_due(self) -> list[Version]:
        """Every version now due for release (they leave the table)."""
        return [v for model_id in list(self._by_model) for v in self._take_due(model_id)]

    def take_session(self, session_id: str) -> list[Version]:
        """Every version of the session's models (the session ended); they leave the table."""
        gone = [v for v in self._by_key.values() if v.session_id == session_id]
        for version in gone:
            self._remove(version)
        return gone

    def held(self) -> list[Version]:
        return list(self._by_key.values())

    def _take_due(self, model_id: str) -> list[Version]:
        versions = self._by_model.get(model_id, [])
        idle = [v for v in versions[:-1] if v.in_flight == 0]  # the newest is never due
        now = self._clock()
        over = len(versions) - self.per_model
        due = []
        for version in idle:  # oldest first
            if over > 0 or now - version.last_used >= self.idle_seconds:
                due.append(version)
                over -= 1
        for version in due:
            self._remove(version)
        return due

    def _remove(self, version: Version) -> None:
        self._by_key.pop(version.key, None)
        versions = self._by_model.get(version.model_id, [])
        versions[:] = [v for v in versions if v is not version]
        if not versions:
            self._by_model.pop(version.model_id, None)
