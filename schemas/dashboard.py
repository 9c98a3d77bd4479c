"""Bodies of the dashboard's JSON API (/twinkle/v1/dashboard), which the page at /dashboard polls."""

from __future__ import annotations

from datetime import datetime

from schemas.tinker import ResponseModel
from schemas.twinkle import PoolView


class Viewer(ResponseModel):
    admin: bool  # the admin key: every tenant's objects
    tenant: str | None = None  # a tenant key: its own objects only


class TenantRow(ResponseModel):
    tenant: str
    name: str
    queue_depth: int
    inflight_requests: int
    live_models: int
    # Its limits (the server's defaults with its overrides) and what it holds of them now.
    limits: dict[str, float]


class RunRow(ResponseModel):
    model_id: str
    tenant: str
    session_id: str
    base_model: str
    lora_rank: int
    created_at: datetime
    last_request_at: datetime
    steps: int  # optimizer steps recorded
    points: int  # points on its curve
    last_metrics: dict[str, float]  # of its newest forward(_backward)
    queue_depth: int


class CheckpointRow(ResponseModel):
    tinker_path: str
    model_id: str
    tenant: str
    kind: str  # training | sampler
    name: str
    size_bytes: int
    created_at: datetime
    expires_at: datetime | None = None


class SessionRow(ResponseModel):
    session_id: str
    tenant: str
    created_at: datetime
    last_heartbeat_at: datetime
    finished_at: datetime | None = None
    sdk_version: str | None = None


class SamplerRow(ResponseModel):
    sampler_id: str
    tenant: str
    base_model: str
    model_path: str | None = None  # a checkpoint's tinker path, or None for the base model / a version
    model_id: str | None = None
    version: str | None = None  # an in-memory adapter version (save_weights_and_get_sampling_client)
    created_at: datetime


class VersionRow(ResponseModel):
    """An in-memory adapter version this server process holds for the samplers."""

    model_id: str
    tenant: str
    step: int
    nbytes: int
    in_flight: int


class Overview(ResponseModel):
    viewer: Viewer
    base_models: list[str]
    uptime_seconds: float
    pools: dict[str, PoolView]  # per base model: adapters resident and paged out
    queue_depth: int  # operations queued here, the viewer's (every tenant's for the admin)
    samples_pending: int
    tenants: list[TenantRow]
    runs: list[RunRow]
    checkpoints: list[CheckpointRow]
    sessions: list[SessionRow]
    samplers: list[SamplerRow]
    versions: list[VersionRow]


class MetricPoint(ResponseModel):
    idx: int
    kind: str
    step: int
    tokens: int
    metrics: dict[str, float]
    at: datetime


class RunCurve(ResponseModel):
    model_id: str
    points: list[MetricPoint]
    next_after: int  # pass as `after` to get only newer points


class DownloadLink(ResponseModel):
    url: str
    expires: datetime
