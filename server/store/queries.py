"""Tenant-scoped lookups. A row of another tenant is reported exactly like a missing one."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import TypeVar

from sqlalchemy import ColumnElement, and_, exists, func, or_, select
from sqlalchemy.orm import Session

from server.errors import NotFound
from server.store.tables import Base, Checkpoint, Future, Model, SamplingSession, utcnow
from server.store.tables import Session as SessionRow

R = TypeVar("R", bound=Base)

_WHAT = {Model: "model", SessionRow: "session", SamplingSession: "sampling session", Checkpoint: "checkpoint"}


def owned(s: Session, table: type[R], tenant_id: str, object_id: str, *, field: str | None = None) -> R:
    row = s.get(table, object_id)
    if row is None or row.tenant_id != tenant_id:  # type: ignore[attr-defined]
        raise NotFound(f"{_WHAT.get(table, 'object')} {object_id!r} not found", field=field)
    return row


def checkpoint_by_name(s: Session, tenant_id: str, model_id: str, kind: str, name: str) -> Checkpoint | None:
    return s.scalar(
        select(Checkpoint).where(
            Checkpoint.tenant_id == tenant_id,
            Checkpoint.model_id == model_id,
            Checkpoint.kind == kind,
            Checkpoint.name == name,
        )
    )


def not_expired(now: datetime | None = None) -> ColumnElement[bool]:
    """Expired checkpoints vanish from every listing and lookup at once; the reaper removes them later."""
    return or_(Checkpoint.expires_at.is_(None), Checkpoint.expires_at > (now or utcnow()))


def listed(now: datetime | None = None) -> ColumnElement[bool]:
    """Checkpoints a listing shows: named (not behind save_weights_and_get_sampling_client), unexpired."""
    return and_(Checkpoint.ephemeral.is_(False), not_expired(now))


def published(now: datetime | None = None) -> ColumnElement[bool]:
    return and_(Checkpoint.public.is_(True), listed(now))


def list_models(
    s: Session,
    tenant_id: str,
    limit: int,
    offset: int,
    *,
    project_id: str | None = None,
    with_published: bool = False,
) -> tuple[list[Model], int]:
    """The tenant's runs, newest first; with_published adds other tenants' runs that hold a
    published checkpoint; project_id keeps the runs whose session is in that project."""
    who: ColumnElement[bool] = Model.tenant_id == tenant_id
    if with_published:
        who = or_(who, exists().where(Checkpoint.model_id == Model.id, published()))
    query = select(Model).where(who)
    if project_id is not None:
        query = query.join(SessionRow, SessionRow.id == Model.session_id).where(SessionRow.project_id == project_id)
    total = s.scalar(select(func.count()).select_from(query.subquery())) or 0
    rows = s.scalars(query.order_by(Model.created_at.desc(), Model.id).limit(limit).offset(offset)).all()
    return list(rows), total


def list_checkpoints(
    s: Session, tenant_id: str, model_id: str, *, public_only: bool = False
) -> list[Checkpoint]:
    """A run's listed checkpoints, oldest first (public_only: what other tenants may see)."""
    rows = s.scalars(
        select(Checkpoint)
        .where(Checkpoint.tenant_id == tenant_id, Checkpoint.model_id == model_id)
        .where(published() if public_only else listed())
        .order_by(Checkpoint.created_at, Checkpoint.id)
    ).all()
    return list(rows)


def list_tenant_checkpoints(s: Session, tenant_id: str, limit: int, offset: int) -> tuple[list[Checkpoint], int]:
    """Every listed checkpoint of the tenant, newest first."""
    where = and_(Checkpoint.tenant_id == tenant_id, listed())
    total = s.scalar(select(func.count()).select_from(Checkpoint).where(where)) or 0
    rows = s.scalars(
        select(Checkpoint).where(where).order_by(Checkpoint.created_at.desc(), Checkpoint.id).limit(limit).offset(offset)
    ).all()
    return list(rows), total


def expired_checkpoints(s: Session, now: datetime, limit: int) -> list[Checkpoint]:
    """Checkpoints of any tenant whose TTL has passed (the reaper's work list)."""
    rows = s.scalars(
        select(Checkpoint).where(Checkpoint.expires_at <= now).order_by(Checkpoint.expires_at).limit(limit)
    ).all()
    return list(rows)


def ended_ephemeral_checkpoints(s: Session, limit: int) -> list[Checkpoint]:
    """Folders of save_weights_and_get_sampling_client written before it made in-memory versions
    (schema 0008), whose session has ended: nothing can sample them any more."""
    rows = s.scalars(
        select(Checkpoint).join(Model, Checkpoint.model_id == Model.id).join(SessionRow, Model.session_id == SessionRow.id)
        .where(Checkpoint.ephemeral.is_(True), SessionRow.finished_at.is_not(None)).limit(limit)
    ).all()
    return list(rows)


def list_sessions(s: Session, tenant_id: str, limit: int, offset: int) -> tuple[list[SessionRow], int]:
    where = SessionRow.tenant_id == tenant_id
    total = s.scalar(select(func.count()).select_from(SessionRow).where(where)) or 0
    rows = s.scalars(
        select(SessionRow).where(where).order_by(SessionRow.created_at.desc(), SessionRow.id.desc()).limit(limit).offset(offset)
    ).all()
    return list(rows), total


def session_models(s: Session, tenant_id: str, session_id: str) -> list[Model]:
    rows = s.scalars(
        select(Model).where(Model.tenant_id == tenant_id, Model.session_id == session_id).order_by(Model.model_seq_id)
    ).all()
    return list(rows)


def session_samplers(s: Session, tenant_id: str, session_id: str) -> list[SamplingSession]:
    rows = s.scalars(
        select(SamplingSession)
        .where(SamplingSession.tenant_id == tenant_id, SamplingSession.session_id == session_id)
        .order_by(SamplingSession.created_at, SamplingSession.id)
    ).all()
    return list(rows)


def futures_in_scopes(s: Session, tenant_id: str, scopes: Sequence[str]) -> list[Future]:
    rows = s.scalars(
        select(Future)
        .where(Future.tenant_id == tenant_id, Future.scope.in_(list(scopes)))
        .order_by(Future.created_at, Future.seq_id, Future.request_id)
    ).all()
    return list(rows)
