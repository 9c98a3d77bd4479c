"""What the dashboard shows: one overview of runs, checkpoints, sessions, samplers, queues and
adapters, and each run's curve. A tenant sees its own; the admin (`tenant_id` None) sees all.

Read-only and bounded: every list is the newest `LIST_LIMIT` rows, read in one transaction."""

from __future__ import annotations

import time
from collections.abc import Callable

from sqlalchemy import Select, and_, func, select
from sqlalchemy.orm import Session

from schemas import dashboard as db_api
from server import ids
from server.errors import NotFound
from server.kinds import OpKind
from server.ops import checkpoints
from server.ops.capacity import limits_view, pools
from server.queue.scopes import model_scope
from server.runtime import Runtime
from server.store.tables import Checkpoint, Model, RunMetric, SamplingSession, Tenant
from server.store.tables import Session as SessionRow
from server.tenancy import run_metrics

LIST_LIMIT = 100
CURVE_LIMIT = 2000  # points per answer; the page asks again from `next_after`
PASSES = (OpKind.FORWARD_BACKWARD, OpKind.FORWARD)


def _mine(query: Select, column: object, tenant_id: str | None) -> Select:
    return query if tenant_id is None else query.where(column == tenant_id)


async def overview(rt: Runtime, tenant_id: str | None) -> db_api.Overview:
    read_at = time.monotonic()
    rows = await rt.db.run(lambda s: _rows(s, tenant_id))
    tenants = [await _tenant_row(rt, t, read_at) for t in rows["tenants"]]
    depth = rt.scheduler.depth
    versions = [v for v in rt.versions.held() if tenant_id in (None, v.tenant_id)]
    return db_api.Overview(
        viewer=db_api.Viewer(admin=tenant_id is None, tenant=tenant_id),
        base_models=[b.name for b in rt.bases], uptime_seconds=round(rt.uptime(), 1),
        pools=pools(rt),
        queue_depth=sum(t.queue_depth for t in tenants), samples_pending=rt.sample_admission.pending,
        tenants=tenants,
        runs=[_run_row(m, rows["curves"].get(m.id), rows["last"].get(m.id, {}), depth) for m in rows["runs"]],
        checkpoints=[db_api.CheckpointRow(
            tinker_path=str(ids.TinkerPath(c.model_id, c.kind, c.name)), model_id=c.model_id, tenant=c.tenant_id,
            kind=c.kind, name=c.name, size_bytes=c.size_bytes, created_at=c.created_at, expires_at=c.expires_at)
            for c in rows["checkpoints"]],
        sessions=[db_api.SessionRow(session_id=x.id, tenant=x.tenant_id, created_at=x.created_at,
                                    last_heartbeat_at=x.last_heartbeat_at, finished_at=x.finished_at,
                                    sdk_version=x.sdk_version) for x in rows["sessions"]],
        samplers=[db_api.SamplerRow(sampler_id=x.id, tenant=x.tenant_id, base_model=x.base_model,
                                    model_path=x.model_path, model_id=x.model_id, version=x.version,
                                    created_at=x.created_at) for x in rows["samplers"]],
        versions=[db_api.VersionRow(model_id=v.model_id, tenant=v.tenant_id, step=v.step, nbytes=v.nbytes,
                                    in_flight=v.in_flight) for v in versions],
    )


def _rows(s: Session, tenant_id: str | None) -> dict:
    runs = list(s.scalars(_mine(select(Model), Model.tenant_id, tenant_id)
                          .order_by(Model.last_request_at.desc()).limit(LIST_LIMIT)))
    run_ids = [m.id for m in runs]
    return {
        "tenants": list(s.scalars(_mine(select(Tenant), Tenant.id, tenant_id).order_by(Tenant.name).limit(LIST_LIMIT))),
        "runs": runs,
        "curves": {model_id: (points, steps) for model_id, points, steps in s.execute(
            select(RunMetric.model_id, func.count(), func.max(RunMetric.step))
            .where(RunMetric.model_id.in_(run_ids)).group_by(RunMetric.model_id))},
        "last": _last_metrics(s, run_ids),
        "checkpoints": list(s.scalars(_mine(select(Checkpoint), Checkpoint.tenant_id, tenant_id)
                                      .where(~Checkpoint.ephemeral)
                                      .order_by(Checkpoint.created_at.desc()).limit(LIST_LIMIT))),
        "sessions": list(s.scalars(_mine(select(SessionRow), SessionRow.tenant_id, tenant_id)
                                   .order_by(SessionRow.created_at.desc()).limit(LIST_LIMIT))),
        "samplers": list(s.scalars(_mine(select(SamplingSession), SamplingSession.tenant_id, tenant_id)
                                   .order_by(SamplingSession.created_at.desc()).limit(LIST_LIMIT))),
    }


def _last_metrics(s: Session, run_ids: list[str]) -> dict[str, dict[str, float]]:
    """Each run's newest forward(_backward) metrics."""
    newest = (select(RunMetric.model_id, func.max(RunMetric.idx).label("idx"))
              .where(RunMetric.model_id.in_(run_ids), RunMetric.kind.in_(PASSES))
              .group_by(RunMetric.model_id).subquery())
    found = s.execute(select(RunMetric.model_id, RunMetric.metrics).join(
        newest, and_(RunMetric.model_id == newest.c.model_id, RunMetric.idx == newest.c.idx)))
    return {model_id: metrics for model_id, metrics in found}


def _run_row(m: Model, curve: tuple[int, int] | None, last: dict[str, float],
             depth: Callable[[str], int]) -> db_api.RunRow:
    points, steps = curve or (0, 0)
    return db_api.RunRow(model_id=m.id, tenant=m.tenant_id, session_id=m.session_id, base_model=m.base_model,
                         lora_rank=m.lora_rank, created_at=m.created_at, last_request_at=m.last_request_at,
                         steps=steps or 0, points=points, last_metrics=last, queue_depth=depth(model_scope(m.id)))


async def _tenant_row(rt: Runtime, tenant: Tenant, read_at: float) -> db_api.TenantRow:
    # Its limits from the row just read (no transaction per tenant; the quotas keep the fresher read).
    limits = rt.quotas.set_limits(tenant.id, tenant.limits, now=read_at)
    return db_api.TenantRow(tenant=tenant.id, name=tenant.name, queue_depth=rt.scheduler.tenant_depth(tenant.id),
                            inflight_requests=rt.quotas.inflight(tenant.id), live_models=await rt.live_models(tenant.id),
                            limits=limits_view(limits))


async def curve(rt: Runtime, tenant_id: str | None, model_id: str, after: int) -> db_api.RunCurve:
    """A run's points after idx `after` (at most CURVE_LIMIT); another tenant's run is not found."""
    def read(s: Session) -> list[RunMetric]:
        run = s.get(Model, model_id)
        if run is None or tenant_id not in (None, run.tenant_id):
            raise NotFound(f"training run {model_id!r} not found", field="model_id")
        return run_metrics.points(s, model_id, after=after, limit=CURVE_LIMIT, tenant_id=tenant_id)

    found = await rt.db.run(read)
    points = [db_api.MetricPoint(idx=p.idx, kind=p.kind, step=p.step, tokens=p.tokens, metrics=p.metrics,
                                 at=p.created_at) for p in found]
    return db_api.RunCurve(model_id=model_id, points=points, next_after=points[-1].idx if points else after)


async def checkpoint_link(rt: Runtime, tenant_id: str | None, path: str, base_url: str) -> db_api.DownloadLink:
    """A signed link to a tar of a checkpoint the viewer may read (the admin: any listed one)."""
    where = ids.parse_tinker_path(path)

    def reader(s: Session) -> str:
        if tenant_id is None:  # the admin reads as the checkpoint's own tenant
            return _owner_of(s, where, path)
        checkpoints.resolve_checkpoint(s, tenant_id, path, field="path")  # NotFound naming `path`
        return tenant_id

    link = await checkpoints.archive_url(rt, await rt.db.run(reader), where.model_id, where.checkpoint_id, base_url)
    return db_api.DownloadLink(url=link.url, expires=link.expires)


def _owner_of(s: Session, where: ids.TinkerPath, path: str) -> str:
    owner = s.scalar(select(Checkpoint.tenant_id).where(
        Checkpoint.model_id == where.model_id, Checkpoint.kind == where.kind, Checkpoint.name == where.name))
    if owner is None:
        raise NotFound(f"checkpoint {path} not found", field="path")
    return owner
