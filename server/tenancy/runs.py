"""Training runs this process has admitted lately, so that the next operation on one is admitted
without a database transaction.

An operation on a run checks, in one transaction, that the run is the tenant's, trainable, in a
live session, on a served base model and run by this process, and records its last request time
(ops/training.owned_model). A client steps a run many times a second; the answer does not change
between steps unless its session ends. So a run that passed is remembered for TTL seconds; its
session's end here forgets it at once (ops/lifecycle.release), an end in another process within
the TTL, and its last request times are written in one transaction per heartbeat (Runtime._heartbeats)."""

from __future__ import annotations

import time
from datetime import datetime

from sqlalchemy import update
from sqlalchemy.orm import Session

from server.store.tables import Model, utcnow


class RunCache:
    TTL = 5.0

    def __init__(self) -> None:
        self._runs: dict[str, tuple[Model, float]] = {}  # model id -> (its row, detached; when admitted)
        self._touched: dict[str, datetime] = {}  # model id -> last request time not yet written

    def get(self, tenant_id: str, model_id: str, now: float | None = None) -> Model | None:
        """The run, if it passed every check within TTL seconds (and is the tenant's); touched."""
        entry = self._runs.get(model_id)
        if entry is None or entry[0].tenant_id != tenant_id:
            return None
        if entry[1] < (time.monotonic() if now is None else now) - self.TTL:
            del self._runs[model_id]
            return None
        self._touched[model_id] = utcnow()
        return entry[0]

    def put(self, model: Model, now: float | None = None) -> None:
        self._runs[model.id] = (model, time.monotonic() if now is None else now)

    def forget(self, model_ids: list[str]) -> None:
        for model_id in model_ids:
            self._runs.pop(model_id, None)

    def clear(self) -> None:
        """This process was taken for gone (its runs may have been adopted): check everything again."""
        self._runs.clear()

    def take_touched(self) -> dict[str, datetime]:
        """The last request times gathered since the last call (for write_touched); runs past their
        TTL are dropped meanwhile."""
        touched, self._touched = self._touched, {}
        stale = time.monotonic() - self.TTL
        for model_id in [m for m, (_, at) in self._runs.items() if at < stale]:
            del self._runs[model_id]
        return touched

    def __len__(self) -> int:
        return len(self._runs)


def write_touched(s: Session, touched: dict[str, datetime]) -> None:
    for model_id, at in touched.items():
        s.execute(update(Model).where(Model.id == model_id, Model.last_request_at < at).values(last_request_at=at))
