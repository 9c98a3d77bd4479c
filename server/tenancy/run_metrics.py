"""Each run's training curve: the metrics of its forward(_backward)s and optim_steps, for the dashboard.

Recording must cost an operation nothing it can feel (a no-op round trip is a few milliseconds,
docs/overhead.md), so `record` only appends to a list; `flush`, run every second by the runtime
and at stop, writes what piled up in one transaction, numbering each run's points. Points are for
looking at, not a promise: a crash loses at most the last second of them, never a result.

A run keeps its newest `per_run` points; the session reaper deletes a forgotten run's points with it."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from server.kinds import OpKind
from server.store.database import Database
from server.store.tables import RunMetric, utcnow

log = logging.getLogger(__name__)

MAX_PENDING = 100_000  # points waiting for a flush; past it (a store down for long) new ones are dropped


@dataclass(frozen=True)
class Point:
    tenant_id: str
    model_id: str
    kind: OpKind
    tokens: int
    metrics: dict[str, float]
    at: datetime


@dataclass
class RunMetrics:
    db: Database
    per_run: int = 10_000
    _pending: list[Point] = field(default_factory=list)
    _next: dict[str, tuple[int, int]] = field(default_factory=dict)  # run -> (its next idx, its optimizer steps)
    dropped: int = 0

    def record(self, tenant_id: str, model_id: str, kind: OpKind, tokens: int, metrics: dict[str, float]) -> None:
        if len(self._pending) >= MAX_PENDING:
            self.dropped += 1
            return
        self._pending.append(Point(tenant_id, model_id, kind, tokens, dict(metrics), utcnow()))

    async def flush(self) -> int:
        """Write the points recorded so far; how many. On failure they are kept for the next try."""
        points, self._pending = self._pending, []
        if not points:
            return 0
        try:
            await self.db.run(lambda s: self._write(s, points))
        except Exception:
            self._pending = points + self._pending
            self._next.clear()  # another process may have numbered a run meanwhile (it took the run over)
            raise
        return len(points)

    def _write(self, s: Session, points: list[Point]) -> None:
        numbering = {}  # this transaction's, kept only once it commits: a failed write numbers again
        for p in points:
            idx, steps = numbering.get(p.model_id) or self._next.get(p.model_id) or _newest(s, p.model_id)
            steps += p.kind == OpKind.OPTIM_STEP
            s.add(RunMetric(model_id=p.model_id, idx=idx, tenant_id=p.tenant_id, kind=p.kind, step=steps,
                            tokens=p.tokens, metrics=p.metrics, created_at=p.at))
            numbering[p.model_id] = (idx + 1, steps)
        for model_id, (next_idx, _) in numbering.items():
            if next_idx > self.per_run:
                s.execute(delete(RunMetric).where(RunMetric.model_id == model_id, RunMetric.idx < next_idx - self.per_run))
        s.flush()
        self._next.update(numbering)


def _newest(s: Session, model_id: str) -> tuple[int, int]:
    """A run's next idx and its optimizer steps, as the store has them (first point of it here)."""
    idx, step = s.execute(select(func.max(RunMetric.idx), func.max(RunMetric.step))
                          .where(RunMetric.model_id == model_id)).one()
    return (0 if idx is None else idx + 1), (step or 0)


def points(s: Session, model_id: str, *, after: int, limit: int, tenant_id: str | None) -> list[RunMetric]:
    """A run's points after idx `after`, oldest first (`tenant_id` None: any tenant's, for the admin)."""
    query = select(RunMetric).where(RunMetric.model_id == model_id, RunMetric.idx > after)
    if tenant_id is not None:
        query = query.where(RunMetric.tenant_id == tenant_id)
    return list(s.scalars(query.order_by(RunMetric.idx).limit(limit)))


def delete_runs(s: Session, model_ids: Any) -> None:
    """The points of runs being deleted (`model_ids`: a list or a select of ids)."""
    s.execute(delete(RunMetric).where(RunMetric.model_id.in_(model_ids)))
