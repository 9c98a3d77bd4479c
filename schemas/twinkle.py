"""Bodies of Twinkle's own endpoints (beyond the Tinker API), under /twinkle/v1."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from schemas.tinker import ResponseModel


class PoolView(ResponseModel):
    max_resident_adapters: int | None  # None: no limit
    resident_adapters: int
    pinned_adapters: int  # the sampler's cached checkpoints, outside the pool
    paged_in_host: int
    paged_on_disk: int
    host_bytes: int
    page_ins: int
    page_outs: int


class TenantUsage(ResponseModel):
    """The calling tenant's own usage and limits (never another tenant's)."""

    queue_depth: int
    inflight_requests: int
    live_models: int
    limits: dict[str, float]
    # In-memory adapter versions (save_weights_and_get_sampling_client) this server process holds for
    # the tenant, and their bytes (server/engine/versions.py).
    adapter_versions: int = 0
    adapter_version_bytes: int = 0


class CapacityResponse(ResponseModel):
    pool: PoolView | None  # the default base model's; None until its engine has run something
    pools: dict[str, PoolView] = {}  # every base model's that has run something, by name
    samples_pending: int
    sample_queue_limit: int
    tenant: TenantUsage


class StatusResponse(ResponseModel):
    status: str
    base_model: str  # the default
    base_models: list[str] = []  # all served, the default first
    uptime_seconds: float
    capacity: CapacityResponse


class ExportResponse(ResponseModel):
    """``GET /twinkle/v1/export/{model_id}/{checkpoint_id}?format=peft|merged``: a signed download
    link per file of the exported folder (links need no API key and end at ``expires``)."""

    format: Literal["peft", "merged"]
    files: dict[str, str]  # file name -> signed URL
    expires: datetime
