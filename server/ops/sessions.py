"""Client sessions: created by every sessionful SDK client, kept alive by heartbeats, finished on close."""

from __future__ import annotations

import logging

from sqlalchemy.orm import Session

from schemas.tinker import CreateSessionRequest, SessionFinishRequest
from server import ids
from server.errors import Gone
from server.ops.lifecycle import Ended, end_session, release
from server.runtime import Runtime
from server.store.queries import owned
from server.store.tables import Session as SessionRow
from server.store.tables import utcnow

log = logging.getLogger(__name__)


async def create_session(rt: Runtime, tenant_id: str, req: CreateSessionRequest) -> str:
    session_id = ids.new_id("sess")

    def insert(s: Session) -> None:
        s.add(
            SessionRow(
                id=session_id,
                tenant_id=tenant_id,
                sdk_version=req.sdk_version,
                tags=list(req.tags or []),
                user_metadata=dict(req.user_metadata or {}),
                project_id=req.project_id,
                display_name=req.display_name,
            )
        )

    await rt.db.run(insert)
    log.info("session_created", extra={"session_id": session_id, "tenant_id": tenant_id, "sdk": req.sdk_version})
    return session_id


def live_session(s: Session, tenant_id: str, session_id: str, *, field: str = "session_id") -> SessionRow:
    row = owned(s, SessionRow, tenant_id, session_id, field=field)
    if row.finished_at is not None:
        how = "expired (no heartbeat)" if row.finish_reason == "expired" else "finished"
        raise Gone(f"session {session_id!r} has {how}; start a new ServiceClient (checkpoints are kept)", field=field)
    return row


async def heartbeat(rt: Runtime, tenant_id: str, session_id: str) -> None:
    def touch(s: Session) -> None:
        live_session(s, tenant_id, session_id).last_heartbeat_at = utcnow()

    await rt.db.run(touch)


async def finish(rt: Runtime, tenant_id: str, session_id: str, req: SessionFinishRequest) -> None:
    """End the session (the first reason wins): its queued work fails and its models are freed."""

    def close(s: Session) -> Ended | None:
        row = owned(s, SessionRow, tenant_id, session_id)
        return end_session(s, row, req.reason.type if req.reason else None) if row.finished_at is None else None

    ended = await rt.db.run(close)
    if ended is None:
        return
    await release(rt, ended, f"session {session_id} was finished by its client before this request ran",
                  wait_for_engine=False)
    log.info("session_finished", extra={"session_id": session_id, "tenant_id": tenant_id,
                                        "models": len(ended.model_ids), "cancelled": len(ended.pending)})
