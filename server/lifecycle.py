"""Sessions that stop heartbeating are ended.

The SDK heartbeats every 10 s; SDKs before 0.30 never call `finish`, and a crashed client never
does. A session silent for `session_timeout_seconds` is finished ("expired"): its queued work
fails with a `user` error that says why, its models' adapters are paged out of the compute device
(not deleted) and stop counting against the tenant's live-model quota, and further requests on
it get 410. Its checkpoints stay: a new client loads them with create_training_client_from_state.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING

from sqlalchemy import select
from sqlalchemy.orm import Session

from server.store.tables import Future, Model, SamplingSession, utcnow
from server.store.tables import Session as SessionRow

if TYPE_CHECKING:  # runtime.py starts the session reaper
    from server.runtime import Runtime

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Expired:
    session_id: str
    tenant_id: str
    model_ids: list[str]
    pending: list[str]  # request ids of its unfinished futures


def _expire(s: Session, timeout: float) -> list[Expired]:
    cutoff = utcnow() - timedelta(seconds=timeout)
    rows = s.scalars(
        select(SessionRow).where(SessionRow.finished_at.is_(None), SessionRow.last_heartbeat_at < cutoff)
    ).all()
    expired = []
    for row in rows:
        row.finished_at, row.finish_reason = utcnow(), "expired"
        models = list(s.scalars(select(Model.id).where(Model.session_id == row.id)))
        samplers = list(s.scalars(select(SamplingSession.id).where(SamplingSession.session_id == row.id)))
        scopes = [f"model:{m}" for m in models] + [f"sampler:{x}" for x in samplers] + [
            f"session:{row.id}", f"session:{row.id}:custom_loss"]
        pending = list(s.scalars(select(Future.request_id).where(Future.state == "pending", Future.scope.in_(scopes))))
        expired.append(Expired(row.id, row.tenant_id, models, pending))
    return expired


async def expire_sessions(rt: Runtime) -> list[Expired]:
    timeout = rt.settings.session_timeout_seconds
    expired = await rt.db.run(lambda s: _expire(s, timeout))
    for session in expired:
        message = (f"session {session.session_id} expired: no heartbeat for {timeout:g} s, so its queued "
                   "work was cancelled; start a new client (its checkpoints are kept)")
        for request_id in session.pending:
            if (op := rt.scheduler.cancel(request_id)) is not None:
                await rt.hub.fail(request_id, message, "user")
                if op.notify is not None:
                    op.notify(request_id, "failed", None)
        for model_id in session.model_ids:
            await rt.engine.page_out(model_id)
            rt.quotas.model_unloaded(session.tenant_id, model_id)
        log.info("session_expired", extra={"session_id": session.session_id, "tenant_id": session.tenant_id,
                                           "models": len(session.model_ids), "cancelled": len(session.pending)})
    return expired


async def run_session_reaper(rt: Runtime, interval: float | None = None) -> None:
    """Expire sessions forever (cancel the task to stop); a failed round is logged and retried."""
    interval = interval or min(rt.settings.session_timeout_seconds / 4, 30.0)
    while True:
        await asyncio.sleep(interval)
        try:
            await expire_sessions(rt)
        except Exception:
            log.exception("session_reap_failed")
