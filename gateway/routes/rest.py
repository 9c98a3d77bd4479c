"""RestClient endpoints: training runs and checkpoints."""

from __future__ import annotations

from fastapi import APIRouter, Query

from gateway.deps import Rt, TenantId
from schemas import tinker as api
from server import catalog

router = APIRouter()


@router.get("/training_runs", response_model_exclude_none=True)
async def list_training_runs(
    rt: Rt, tenant: TenantId, limit: int = Query(20, ge=0, le=1000), offset: int = Query(0, ge=0)
) -> api.TrainingRunsResponse:
    return await catalog.list_training_runs(rt, tenant, limit, offset)


@router.get("/training_runs/{model_id}", response_model_exclude_none=True)
async def get_training_run(model_id: str, rt: Rt, tenant: TenantId) -> api.TrainingRun:
    return await catalog.get_training_run(rt, tenant, model_id)


@router.get("/training_runs/{model_id}/checkpoints", response_model_exclude_none=True)
async def training_run_checkpoints(model_id: str, rt: Rt, tenant: TenantId) -> api.CheckpointsListResponse:
    return await catalog.training_run_checkpoints(rt, tenant, model_id)
