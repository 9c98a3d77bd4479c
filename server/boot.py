"""The composition root: builds a Runtime from settings and starts and stops it with the
background tasks of the operations (checkpoint reaper, session reaper).

The only module that knows every part: runtime.py knows the parts but no operation, and the
operations (server/ops) know the Runtime but not how it is built."""

from __future__ import annotations

import gc
import logging
from collections.abc import Mapping

from server.config import Settings
from server.engine.local import LocalEngine
from server.engine.protocol import Engine
from server.engine.versions import Versions
from server.kinds import Lane
from server.metrics import Metrics
from server.ops.lifecycle import run_session_reaper
from server.ops.reaper import run_reaper
from server.queue.admission import Admission, tenant_places
from server.queue.bus import RedisBus
from server.queue.futures import FutureHub
from server.queue.instances import Instances
from server.queue.scheduler import Scheduler
from server.runtime import Runtime
from server.store.database import Database
from server.tenancy.quotas import Quotas
from server.tenancy.run_metrics import RunMetrics
from server.tenancy.shared import SharedQuotas
from server.tracing import Tracing

log = logging.getLogger(__name__)


def build_engines(settings: Settings) -> dict[str, Engine]:
    """An engine per served base model, the default first: in this process (local), or Ray Serve
    deployments of one shared cluster connection (ray)."""
    if settings.engine == "ray":
        from server.engine.ray_engine import RayCluster, RayEngine  # imports Ray only when asked for

        cluster = RayCluster(settings)
        return {name: RayEngine(cluster, settings, name) for name in settings.base_models}
    return {name: LocalEngine.from_settings(settings, name) for name in settings.base_models}


def scheduler_lanes(engines: Mapping[str, Engine]) -> tuple[dict[Lane, int], int | None]:
    """What the scheduler may start at once. Local engines share the machine's cores (one call at
    a time in all: the default engine's lanes); engines in their own processes add up."""
    first = next(iter(engines.values()))
    if first.max_calls is not None:
        return dict(first.lanes), first.max_calls
    return {lane: sum(e.lanes.get(lane, 0) for e in engines.values()) for lane in Lane}, None


def build_runtime(settings: Settings, engine: Engine | None = None) -> Runtime:
    """A runtime on the settings' database with the settings' engines (`engine`: instead of the
    default base model's, for tests)."""
    db = Database(settings.resolved_database_url)
    instances = Instances(db, timeout=settings.instance_timeout_seconds, url=settings.instance_url)
    bus = RedisBus(settings.redis_url, settings.redis_prefix) if settings.redis_url else None
    hub = FutureHub(db, owner=instances.id, announce=bus.announce if bus else None)
    quotas = Quotas(settings)
    engines = build_engines(settings) if engine is None else {
        settings.base_models[0]: engine,
        **{name: LocalEngine.from_settings(settings, name) for name in settings.base_models[1:]},
    }
    lanes, max_calls = scheduler_lanes(engines)
    metrics, tracing = Metrics(), Tracing.from_settings(settings, instances.id)
    scheduler = Scheduler(hub, lanes=lanes, max_calls=max_calls, gap_grace=settings.seq_gap_grace_seconds,
                          throttle=quotas, metrics=metrics, tracing=tracing)
    return Runtime(
        settings=settings,
        db=db,
        hub=hub,
        scheduler=scheduler,
        engines=engines,
        quotas=quotas,
        sample_admission=Admission(settings.sample_queue_limit,
                                   tenant_places(settings.sample_queue_limit, settings.sample_queue_tenant_share)),
        instances=instances,
        versions=Versions(settings.sampler_versions_per_model, settings.sampler_version_idle_seconds),
        run_metrics=RunMetrics(db, settings.run_metrics_per_run),
        metrics=metrics,
        tracing=tracing,
        bus=bus,
        shared=SharedQuotas(settings.redis_url, settings.redis_prefix) if settings.redis_url else None,
    )


async def start(rt: Runtime) -> None:
    await rt.start()
    rt.spawn(run_reaper(rt), name="reaper")
    rt.spawn(run_session_reaper(rt), name="session-reaper")
    rt.log_started()


def freeze_startup_objects() -> None:
    """Take what the start made (modules, the base model, the app: ~550k objects with tiny-qwen3)
    out of the garbage collector's full collections. One such collection walked them all in 300-390 ms
    holding the GIL, so every request of the moment waited that long (a 64 MiB-body test saw a
    200 ms healthz); they live as long as the process anyway."""
    gc.collect()
    gc.freeze()
    log.info("startup_objects_frozen", extra={"objects": gc.get_freeze_count()})


async def stop(rt: Runtime) -> None:
    await rt.stop()
