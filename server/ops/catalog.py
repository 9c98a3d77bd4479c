"""REST views: training runs, checkpoint listings, sessions (list, get, search, project) and
session trace exports.

A tenant sees its own runs and sessions; access_scope="accessible" adds other tenants' runs that
hold a published checkpoint (showing only those checkpoints). Expired checkpoints are never shown."""

from __future__ import annotations

import asyncio
import json
import os
import uuid
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import and_, func, or_, select
from sqlalchemy.orm import Session

from schemas import tinker as api
from server import ids
from server.ops import signing
from server.ops.checkpoints import TRACES_DIR, link_expiry
from server.queue.scopes import session_scopes
from server.runtime import Runtime
from server.store.queries import (
    futures_in_scopes,
    list_checkpoints,
    list_models,
    list_sessions,
    list_tenant_checkpoints,
    listed,
    owned,
    published,
    session_models,
    session_samplers,
)
from server.store.tables import Checkpoint, Model, Tenant, utcnow
from server.store.tables import Session as SessionRow

MAX_PAGE = 1000
MAX_OFFSET = 2**62  # a page's offset: any larger is past every row, and past a 64-bit SQL integer
NO_PROJECT = "default"  # what a session outside any project reports as its project_id
FINISH_REASONS = ("success", "errored", "interrupted")


def checkpoint_view(row: Checkpoint) -> api.Checkpoint:
    path = ids.TinkerPath(row.model_id, row.kind, row.name)
    return api.Checkpoint(
        checkpoint_id=path.checkpoint_id,
        checkpoint_type=row.kind,
        time=row.created_at,
        tinker_path=str(path),
        size_bytes=row.size_bytes,
        public=row.public,
        user_metadata={str(k): str(v) for k, v in row.user_metadata.items()} or None,
        expires_at=row.expires_at,
    )


def _strings(meta: dict[str, Any] | None) -> dict[str, str] | None:
    return {str(k): str(v) for k, v in (meta or {}).items()} or None


def _cursor(offset: int, limit: int, total: int) -> api.Cursor:
    return api.Cursor(offset=offset, limit=limit, total_count=total)


# ----- training runs -----------------------------------------------------------------------------
class _Owners:
    """Tenant names by id, read once per request."""

    def __init__(self, s: Session) -> None:
        self.s, self.names = s, {}

    def __call__(self, tenant_id: str) -> str:
        if tenant_id not in self.names:
            self.names[tenant_id] = self.s.get(Tenant, tenant_id).name
        return self.names[tenant_id]


def _run_view(s: Session, model: Model, viewer: str, owners: _Owners) -> api.TrainingRun:
    checkpoints = list_checkpoints(s, model.tenant_id, model.id, public_only=model.tenant_id != viewer)
    last = {kind: max((c for c in checkpoints if c.kind == kind), key=lambda c: c.created_at, default=None)
            for kind in ("training", "sampler")}
    return api.TrainingRun(
        training_run_id=model.id,
        base_model=model.base_model,
        model_owner=owners(model.tenant_id),
        is_lora=True,
        lora_rank=model.lora_rank,
        last_request_time=model.last_request_at,
        last_checkpoint=checkpoint_view(last["training"]) if last["training"] else None,
        last_sampler_checkpoint=checkpoint_view(last["sampler"]) if last["sampler"] else None,
        user_metadata=_strings(model.user_metadata),
    )


def _readable_run(s: Session, tenant_id: str, model_id: str, *, accessible: bool = True) -> Model:
    """The tenant's run, or (accessible) another tenant's run that holds a published checkpoint."""
    model = s.get(Model, model_id)
    if model is not None and model.tenant_id != tenant_id and accessible:
        if s.scalar(select(func.count()).select_from(Checkpoint).where(Checkpoint.model_id == model_id, published())):
            return model
    return owned(s, Model, tenant_id, model_id)


async def list_training_runs(
    rt: Runtime, tenant_id: str, limit: int, offset: int, *, access_scope: str = "owned", project_id: str | None = None
) -> api.TrainingRunsResponse:
    limit, offset = max(0, min(limit, MAX_PAGE)), max(offset, 0)

    def read(s: Session) -> api.TrainingRunsResponse:
        rows, total = list_models(
            s, tenant_id, limit, offset, project_id=project_id, with_published=access_scope == "accessible"
        )
        owners = _Owners(s)
        return api.TrainingRunsResponse(
            training_runs=[_run_view(s, m, tenant_id, owners) for m in rows], cursor=_cursor(offset, limit, total)
        )

    return await rt.db.run(read)


async def get_training_run(rt: Runtime, tenant_id: str, model_id: str, access_scope: str = "owned") -> api.TrainingRun:
    def read(s: Session) -> api.TrainingRun:
        model = _readable_run(s, tenant_id, model_id, accessible=access_scope == "accessible")
        return _run_view(s, model, tenant_id, _Owners(s))

    return await rt.db.run(read)


async def training_run_checkpoints(
    rt: Runtime, tenant_id: str, model_id: str, limit: int | None = None, offset: int = 0
) -> api.CheckpointsListResponse:
    """A run's checkpoints, oldest first; another tenant's run shows its published ones."""

    def read(s: Session) -> api.CheckpointsListResponse:
        model = _readable_run(s, tenant_id, model_id)
        rows = list_checkpoints(s, model.tenant_id, model_id, public_only=model.tenant_id != tenant_id)
        page_limit = len(rows) if limit is None else max(0, min(limit, MAX_PAGE))
        page = rows[max(offset, 0):][:page_limit]
        return api.CheckpointsListResponse(
            checkpoints=[checkpoint_view(c) for c in page], cursor=_cursor(max(offset, 0), page_limit, len(rows))
        )

    return await rt.db.run(read)


async def list_user_checkpoints(rt: Runtime, tenant_id: str, limit: int, offset: int) -> api.CheckpointsListResponse:
    limit, offset = max(0, min(limit, MAX_PAGE)), max(offset, 0)

    def read(s: Session) -> api.CheckpointsListResponse:
        rows, total = list_tenant_checkpoints(s, tenant_id, limit, offset)
        return api.CheckpointsListResponse(checkpoints=[checkpoint_view(c) for c in rows], cursor=_cursor(offset, limit, total))

    return await rt.db.run(read)


# ----- sessions ----------------------------------------------------------------------------------
async def list_user_sessions(rt: Runtime, tenant_id: str, limit: int, offset: int) -> api.ListSessionsResponse:
    limit, offset = max(0, min(limit, MAX_PAGE)), max(offset, 0)
    rows, _ = await rt.db.run(lambda s: list_sessions(s, tenant_id, limit, offset))
    return api.ListSessionsResponse(sessions=[r.id for r in rows])


async def get_session(rt: Runtime, tenant_id: str, session_id: str) -> api.GetSessionResponse:
    def read(s: Session) -> api.GetSessionResponse:
        row = owned(s, SessionRow, tenant_id, session_id)
        return api.GetSessionResponse(
            training_run_ids=[m.id for m in session_models(s, tenant_id, session_id)],
            sampler_ids=[x.id for x in session_samplers(s, tenant_id, session_id)],
            user_metadata=_strings(row.user_metadata),
            display_name=row.display_name,
        )

    return await rt.db.run(read)


async def assign_project(rt: Runtime, tenant_id: str, session_id: str, project_id: str) -> None:
    """Moves the session, and so its training runs and samplers, into the project."""

    def update(s: Session) -> None:
        owned(s, SessionRow, tenant_id, session_id).project_id = project_id

    await rt.db.run(update)


def _status(row: SessionRow) -> api.SessionStatus | None:
    if row.finished_at is None:
        return api.SessionStatus(type="active")
    if row.finish_reason in FINISH_REASONS:
        return api.SessionStatus(type="client_finished", reason=api.ClientFinishReason(type=row.finish_reason))
    return None


def _search_match(row: SessionRow, req: api.SessionSearchRequest) -> bool:
    if req.session_id is not None or req.display_name is not None:
        by_id = req.session_id is not None and row.id == req.session_id
        name = (row.display_name or "").lower()
        by_name = req.display_name is not None and bool(name) and all(
            word in name for word in req.display_name.lower().split()
        )
        if not (by_id or by_name):
            return False
    meta = _strings(row.user_metadata) or {}
    if any(meta.get(k) != v for k, v in req.user_metadata.items()):
        return False
    if req.statuses is not None:

        def holds(q: api.SessionStatusQuery) -> bool:
            if q.type == "active":
                return row.finished_at is None
            if q.type == "client_finished":
                return row.finished_at is not None and (q.reasons is None or row.finish_reason in q.reasons)
            return False  # this server neither cancels nor fails sessions

        if not any(holds(q) for q in req.statuses):
            return False
    return True


def _summary(s: Session, row: SessionRow, owner: str) -> api.SessionSummary:
    count, size = s.execute(
        select(func.count(Checkpoint.id), func.coalesce(func.sum(Checkpoint.size_bytes), 0))
        .join(Model, Model.id == Checkpoint.model_id)
        .where(Model.session_id == row.id, Checkpoint.tenant_id == row.tenant_id, listed())
    ).one()
    return api.SessionSummary(
        session_id=row.id,
        created_at=row.created_at,
        owner=owner,
        project_id=row.project_id or NO_PROJECT,
        status=_status(row),
        checkpoints_count=count,
        display_name=row.display_name,
        user_metadata=_strings(row.user_metadata),
        checkpoint_storage_bytes=size,
    )


async def search_sessions(rt: Runtime, tenant_id: str, req: api.SessionSearchRequest) -> api.SessionSearchResponse:
    """The tenant's sessions, newest first, one page at a time. Every owner scope means the
    caller's own sessions here (there are no organisations); a 'user' owner matches when it names
    the caller (its model_owner name)."""

    def read(s: Session) -> api.SessionSearchResponse:
        owner = s.get(Tenant, tenant_id).name
        if req.owner.type == "user" and owner not in (req.owner.owner_urns or []):
            return api.SessionSearchResponse(sessions=[])
        query = select(SessionRow).where(SessionRow.tenant_id == tenant_id)
        if req.cursor is not None:
            at = req.cursor.last_created_at
            query = query.where(or_(
                SessionRow.created_at < at,
                and_(SessionRow.created_at == at, SessionRow.id < req.cursor.last_session_id),
            ))
        if req.project_ids is not None:
            named = [p for p in req.project_ids if p != NO_PROJECT]
            in_project = SessionRow.project_id.in_(named)
            query = query.where(or_(in_project, SessionRow.project_id.is_(None)) if NO_PROJECT in req.project_ids else in_project)
        query = query.order_by(SessionRow.created_at.desc(), SessionRow.id.desc()).execution_options(yield_per=256)
        found: list[SessionRow] = []
        for row in s.scalars(query):
            if _search_match(row, req):
                found.append(row)
                if len(found) > req.limit:
                    break
        page = found[: req.limit]
        more = len(found) > req.limit
        return api.SessionSearchResponse(
            sessions=[_summary(s, row, owner) for row in page],
            next_cursor=api.SessionSearchCursor(last_created_at=page[-1].created_at, last_session_id=page[-1].id)
            if more else None,
        )

    return await rt.db.run(read)


# ----- trace export ------------------------------------------------------------------------------
def _micros(t: datetime) -> float:
    return t.timestamp() * 1e6


def build_trace(s: Session, tenant_id: str, session_id: str) -> dict[str, Any]:
    """The session's operations as a Chrome/Perfetto JSON trace (opens in ui.perfetto.dev): one
    track per scope (the session, its custom-loss uploads, each training run, each sampler), one
    slice per operation from submission to completion, its args holding request_id, seq_id, state
    and any error."""
    row = owned(s, SessionRow, tenant_id, session_id)
    models = session_models(s, tenant_id, session_id)
    samplers = session_samplers(s, tenant_id, session_id)
    scopes = session_scopes(session_id, [m.id for m in models], [x.id for x in samplers])
    now = utcnow()
    events: list[dict[str, Any]] = [{"ph": "M", "name": "process_name", "pid": 1, "tid": 0, "args": {"name": f"session {session_id}"}}]
    events += [{"ph": "M", "name": "thread_name", "pid": 1, "tid": i, "args": {"name": scope}} for i, scope in enumerate(scopes)]
    track = {scope: i for i, scope in enumerate(scopes)}
    futures = futures_in_scopes(s, tenant_id, scopes)
    for f in futures:
        end = f.finished_at or now
        events.append({
            "ph": "X", "name": f.kind, "cat": f.scope.split(":", 1)[0], "pid": 1, "tid": track[f.scope],
            "ts": _micros(f.created_at), "dur": max(_micros(end) - _micros(f.created_at), 0.0),
            "args": {
                "request_id": f.request_id, "seq_id": f.seq_id, "state": f.state, "scope": f.scope,
                "submitted_at": f.created_at.isoformat(),
                "finished_at": f.finished_at.isoformat() if f.finished_at else None,
                "error": f.error, "error_category": f.error_category,
            },
        })
    return {
        "traceEvents": events,
        "displayTimeUnit": "ms",
        "otherData": {
            "format": "twinkle-session-trace/1",
            "session_id": session_id,
            "display_name": row.display_name or "",
            "created_at": row.created_at.isoformat(),
            "finished_at": row.finished_at.isoformat() if row.finished_at else "",
            "exported_at": now.isoformat(),
            "operations": str(len(futures)),
        },
    }


def _write_atomically(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".tmp-{path.name}-{uuid.uuid4().hex[:8]}"
    tmp.write_bytes(data)
    os.replace(tmp, path)


async def export_trace(rt: Runtime, tenant_id: str, session_id: str, base_url: str) -> api.TraceExportResponse:
    """Build the trace now (it is small) and answer "ready" with a signed link to it."""
    trace = await rt.db.run(lambda s: build_trace(s, tenant_id, session_id))
    relative = f"{tenant_id}/{session_id}.json"
    await asyncio.to_thread(_write_atomically, rt.data_dir / TRACES_DIR / relative, json.dumps(trace).encode())
    url = signing.signed_url(signing.secret_for(rt.data_dir), base_url, f"traces/{relative}", link_expiry(rt))
    return api.TraceExportResponse(status="ready", url=url)
