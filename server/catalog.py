"""Read-only REST views: training runs and their checkpoints."""

from __future__ import annotations

from sqlalchemy.orm import Session

from schemas import tinker as api
from server import ids
from server.runtime import Runtime
from server.store.queries import list_checkpoints, list_models, owned
from server.store.tables import Checkpoint, Model, Tenant

MAX_PAGE = 1000


def checkpoint_view(row: Checkpoint) -> api.Checkpoint:
    path = ids.TinkerPath(row.model_id, row.kind, row.name)
    return api.Checkpoint(
        checkpoint_id=path.checkpoint_id,
        checkpoint_type=row.kind,
        time=row.created_at,
        tinker_path=str(path),
        size_bytes=row.size_bytes,
        public=row.public,
        user_metadata=row.user_metadata or None,
        expires_at=row.expires_at,
    )


def _run_view(s: Session, model: Model, owner: str) -> api.TrainingRun:
    checkpoints = list_checkpoints(s, model.tenant_id, model.id)
    last = {kind: max((c for c in checkpoints if c.kind == kind), key=lambda c: c.created_at, default=None)
            for kind in ("training", "sampler")}
    return api.TrainingRun(
        training_run_id=model.id,
        base_model=model.base_model,
        model_owner=owner,
        is_lora=True,
        lora_rank=model.lora_rank,
        last_request_time=model.last_request_at,
        last_checkpoint=checkpoint_view(last["training"]) if last["training"] else None,
        last_sampler_checkpoint=checkpoint_view(last["sampler"]) if last["sampler"] else None,
        user_metadata={str(k): str(v) for k, v in model.user_metadata.items()} or None,
    )


async def list_training_runs(rt: Runtime, tenant_id: str, limit: int, offset: int) -> api.TrainingRunsResponse:
    limit = max(0, min(limit, MAX_PAGE))

    def read(s: Session) -> api.TrainingRunsResponse:
        rows, total = list_models(s, tenant_id, limit, max(offset, 0))
        owner = s.get(Tenant, tenant_id).name
        return api.TrainingRunsResponse(
            training_runs=[_run_view(s, m, owner) for m in rows],
            cursor=api.Cursor(offset=offset, limit=limit, total_count=total),
        )

    return await rt.db.run(read)


async def get_training_run(rt: Runtime, tenant_id: str, model_id: str) -> api.TrainingRun:
    def read(s: Session) -> api.TrainingRun:
        model = owned(s, Model, tenant_id, model_id)
        return _run_view(s, model, s.get(Tenant, tenant_id).name)

    return await rt.db.run(read)


async def training_run_checkpoints(rt: Runtime, tenant_id: str, model_id: str) -> api.CheckpointsListResponse:
    def read(s: Session) -> api.CheckpointsListResponse:
        owned(s, Model, tenant_id, model_id)
        rows = list_checkpoints(s, tenant_id, model_id)
        return api.CheckpointsListResponse(
            checkpoints=[checkpoint_view(c) for c in rows],
            cursor=api.Cursor(offset=0, limit=len(rows), total_count=len(rows)),
        )

    return await rt.db.run(read)
