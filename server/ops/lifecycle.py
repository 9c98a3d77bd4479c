"""How sessions end, and what ending frees.

A session ends when its client finishes it (`POST /sessions/{id}/finish`, from SDK 0.30's
`close`) or when it stops heartbeating. The SDK heartbeats every 10 s; SDKs before 0.30 never call
`finish`, and a crashed client never does, so a session silent for `session_timeout_seconds` is
finished as "expired".

Either way its queued work fails with a `user` error that says why, its models stop counting
against the tenant's live-model quota, further requests on it get 410, and its in-memory adapter
versions are released; its checkpoints stay, and a new client loads them with
create_training_client_from_state. A finished session's adapters are freed at once (its client
said it is done). An expired session's adapters are paged out of the compute device, not deleted,
and freed for good after `expired_adapter_retention_seconds`, so that neither host memory nor the
spill folder grows with every client that disappears.

With several server processes, a session may end on one that does not hold its models (a local
engine's adapters live in the process that owns the model). The owner notices at its next reaper
round (`free_ended_elsewhere`) and frees them the same way.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import delete, or_, select
from sqlalchemy.orm import Session

from server.kinds import FutureState
from server.ops import native_store, versions
from server.queue.scopes import model_scope, session_scopes
from server.runtime import Runtime
from server.store.tables import Checkpoint, CustomLossRow, Future, Model, SamplingSession, utcnow
from server.store.tables import Session as SessionRow
from server.tenancy import run_metrics

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Ended:
    session_id: str
    tenant_id: str
    reason: str | None
    model_ids: list[str]
    pending: list[str]  # request ids of its unfinished futures


def end_session(s: Session, row: SessionRow, reason: str | None) -> Ended:
    """Mark the session finished and list what it leaves behind (in the same transaction)."""
    row.finished_at, row.finish_reason = utcnow(), reason
    models = list(s.scalars(select(Model.id).where(Model.session_id == row.id)))
    samplers = list(s.scalars(select(SamplingSession.id).where(SamplingSession.session_id == row.id)))
    scopes = session_scopes(row.id, models, samplers)
    pending = list(s.scalars(
        select(Future.request_id).where(Future.state == FutureState.PENDING, Future.scope.in_(scopes))))
    return Ended(row.id, row.tenant_id, reason, models, pending)


FORGET_BATCH = 200


def forget_ended_sessions(s: Session, ended_before: datetime) -> int:
    """What sessions ended before `ended_before` leave in the database, deleted: their samplers,
    custom losses and the training runs with no checkpoint (nothing can resume them), then each
    session with no training run left. Runs with checkpoints stay listed (and their session with
    them) until their checkpoints are deleted or expire. How many sessions were pruned."""
    has_checkpoint = select(Checkpoint.id).where(Checkpoint.model_id == Model.id).exists()
    with_runs = select(Model.id).where(Model.session_id == SessionRow.id).exists()
    # Only sessions with something left to forget: the kept ones must not fill every batch.
    left = or_(
        select(SamplingSession.id).where(SamplingSession.session_id == SessionRow.id).exists(),
        select(CustomLossRow.id).where(CustomLossRow.session_id == SessionRow.id).exists(),
        select(Model.id).where(Model.session_id == SessionRow.id, ~has_checkpoint).exists(),
        ~with_runs,
    )
    sessions = list(s.scalars(
        select(SessionRow.id).where(SessionRow.finished_at < ended_before, left).limit(FORGET_BATCH)))
    if not sessions:
        return 0
    s.execute(delete(SamplingSession).where(SamplingSession.session_id.in_(sessions)))
    s.execute(delete(CustomLossRow).where(CustomLossRow.session_id.in_(sessions)))
    run_metrics.delete_runs(s, select(Model.id).where(Model.session_id.in_(sessions), ~has_checkpoint))
    s.execute(delete(Model).where(Model.session_id.in_(sessions), ~has_checkpoint))
    s.execute(delete(SessionRow).where(SessionRow.id.in_(sessions), ~with_runs))
    return len(sessions)


async def release(rt: Runtime, ended: Ended, message: str, *, wait_for_engine: bool = True) -> None:
    """Fail the ended session's queued work and free its models (see the module docstring). One
    failure does not stop the rest: each slot and admission is released whatever happens. Without
    `wait_for_engine` the adapters are freed in the background (the engine may be busy for a while
    with other tenants' work, and a client closing its session need not wait for that)."""
    for request_id in ended.pending:
        try:
            await rt.fail_queued(request_id, message)
        except Exception:
            log.exception("cancel_failed", extra={"request_id": request_id, "session_id": ended.session_id})
    rt.runs.forget(ended.model_ids)  # their next operation reads the session's end (410)
    for model_id in ended.model_ids:  # each model's queue and its next seq_id: not needed any more
        rt.scheduler.forget(model_scope(model_id))
    versions.release(rt, rt.versions.take_session(ended.session_id), "session ended")
    native_store.drop_session(ended.session_id)  # the native processor app's datasets and data loaders
    keep = ended.reason == "expired" and rt.settings.expired_adapter_retention_seconds > 0
    for model_id in ended.model_ids:
        await rt.release_model(ended.tenant_id, model_id)
        if keep:
            rt.retention.retire(model_id, time.monotonic())  # freed after the retention, even if the page-out fails
    freeing = _free_adapters(rt, ended, keep)
    if wait_for_engine:
        await freeing
    else:
        rt.spawn(freeing, name=f"release-{ended.session_id}")


async def _free_adapters(rt: Runtime, ended: Ended, keep: bool) -> None:
    for model_id in ended.model_ids:
        try:
            for engine in rt.engines.values():  # only the model's own engine holds it; the rest do nothing
                await (engine.page_out(model_id) if keep else engine.unload(model_id))
        except Exception:
            log.exception("model_release_failed", extra={"model_id": model_id, "session_id": ended.session_id})


def _expire(s: Session, timeout: float) -> list[Ended]:
    cutoff = utcnow() - timedelta(seconds=timeout)
    rows = s.scalars(
        select(SessionRow).where(SessionRow.finished_at.is_(None), SessionRow.last_heartbeat_at < cutoff)
    ).all()
    return [end_session(s, row, "expired") for row in rows]


async def expire_sessions(rt: Runtime) -> list[Ended]:
    timeout = rt.settings.session_timeout_seconds
    expired = await rt.db.run(lambda s: _expire(s, timeout))
    for session in expired:
        message = (f"session {session.session_id} expired: no heartbeat for {timeout:g} s, so its queued "
                   "work was cancelled; start a new client (its checkpoints are kept)")
        await release(rt, session, message)
        log.info("session_expired", extra={"session_id": session.session_id, "tenant_id": session.tenant_id,
                                           "models": len(session.model_ids), "cancelled": len(session.pending)})
    return expired


async def free_retired(rt: Runtime) -> list[str]:
    """Unload the paged-out adapters of expired sessions that have been kept long enough."""
    cutoff = time.monotonic() - rt.settings.expired_adapter_retention_seconds
    freed = rt.retention.take_due(cutoff)
    for model_id in freed:
        try:
            for engine in rt.engines.values():  # only the model's own engine holds it
                await engine.unload(model_id)
        except Exception:
            log.exception("model_release_failed", extra={"model_id": model_id})
    if freed:
        log.info("retired_adapters_freed", extra={"count": len(freed)})
    return freed


def _ended_among(s: Session, held: dict[str, str]) -> list[Ended]:
    rows = s.execute(
        select(Model.id, SessionRow.id, SessionRow.tenant_id, SessionRow.finish_reason)
        .join(SessionRow, Model.session_id == SessionRow.id)
        .where(Model.id.in_(list(held)), SessionRow.finished_at.is_not(None))
    ).all()
    by_session: dict[str, Ended] = {}
    for model_id, session_id, tenant_id, reason in rows:
        ended = by_session.setdefault(session_id, Ended(session_id, tenant_id, reason, [], []))
        ended.model_ids.append(model_id)
    return list(by_session.values())


async def free_ended_elsewhere(rt: Runtime) -> list[Ended]:
    """Free the adapters this process holds for sessions that ended on another process."""
    held = rt.quotas.held_models()
    if not held:
        return []
    ended = await rt.db.run(lambda s: _ended_among(s, held))
    for session in ended:
        await release(rt, session, "the session ended")
        log.info("session_ended_elsewhere_freed", extra={"session_id": session.session_id,
                                                        "models": len(session.model_ids)})
    return ended


async def free_versions_ended_elsewhere(rt: Runtime) -> int:
    """Release the in-memory versions this process holds for sessions that ended on another
    process (one whose models this process no longer holds is not found by free_ended_elsewhere)."""
    sessions = {v.session_id for v in rt.versions.held()}
    if not sessions:
        return 0
    ended = await rt.db.run(lambda s: list(s.scalars(
        select(SessionRow.id).where(SessionRow.id.in_(list(sessions)), SessionRow.finished_at.is_not(None)))))
    freed = [v for session_id in ended for v in rt.versions.take_session(session_id)]
    versions.release(rt, freed, "session ended")
    return len(freed)


async def run_session_reaper(rt: Runtime, interval: float | None = None) -> None:
    """Expire sessions and free retired adapters forever (cancel the task to stop); a failed round
    is logged and retried."""
    interval = interval or min(rt.settings.session_timeout_seconds / 4, 30.0)
    while True:
        await asyncio.sleep(interval)
        try:
            await expire_sessions(rt)
            await free_ended_elsewhere(rt)
            await free_versions_ended_elsewhere(rt)
            versions.release_idle(rt)
            await free_retired(rt)
        except Exception:
            log.exception("session_reap_failed")
