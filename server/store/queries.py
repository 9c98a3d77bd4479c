"""Tenant-scoped lookups. A row of another tenant is reported exactly like a missing one."""

from __future__ import annotations

from typing import TypeVar

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from server.errors import NotFound
from server.store.tables import Base, Checkpoint, Model, SamplingSession
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


def list_models(s: Session, tenant_id: str, limit: int, offset: int) -> tuple[list[Model], int]:
    total = s.scalar(select(func.count()).select_from(Model).where(Model.tenant_id == tenant_id)) or 0
    rows = s.scalars(
        select(Model).where(Model.tenant_id == tenant_id).order_by(Model.created_at.desc(), Model.id).limit(limit).offset(offset)
    ).all()
    return list(rows), total


def list_checkpoints(s: Session, tenant_id: str, model_id: str) -> list[Checkpoint]:
    rows = s.scalars(
        select(Checkpoint)
        .where(Checkpoint.tenant_id == tenant_id, Checkpoint.model_id == model_id, Checkpoint.ephemeral.is_(False))
        .order_by(Checkpoint.created_at, Checkpoint.id)
    ).all()
    return list(rows)
