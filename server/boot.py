"""The composition root: builds a Runtime from settings and starts and stops it with the
background tasks of the operations (checkpoint reaper, session reaper).

The only module that knows every part: runtime.py knows the parts but no operation, and the
operations (server/ops) know the Runtime but not how it is built."""

from __future__ import annotations

from server.config import Settings
from server.engine.local import LocalEngine
from server.engine.protocol import Engine
from server.ops.lifecycle import run_session_reaper
from server.ops.reaper import run_reaper
from server.queue.admission import Admission
from server.queue.bus import RedisBus
from server.queue.futures import FutureHub
from server.queue.instances import Instances
from server.queue.scheduler import Scheduler
from server.runtime import Runtime
from server.store.database import Database
from server.tenancy.quotas import Quotas
from workers.base_models import resolve_base_model
from workers.storage import FolderStore
from workers.types import ComputeOptions


def local_engine(settings: Settings, model: str) -> LocalEngine:
    data_dir = settings.data_dir.resolve()
    options = ComputeOptions(
        torch_threads=settings.torch_threads,
        device=settings.device,
        dtype=settings.dtype,
        pass_memory_bytes=None if settings.pass_memory_mb is None else settings.pass_memory_mb * 2**20,
        max_tokens_per_pass=settings.max_tokens_per_pass,
        custom_loss_seconds=settings.custom_loss_seconds,
        max_resident_adapters=settings.max_resident_adapters,
        host_budget_bytes=settings.host_adapter_budget_mb * 2**20,
        spill_dir=data_dir / "lora-spill",
    )
    return LocalEngine(
        lambda: resolve_base_model(model, data_dir, allow_download=settings.allow_download), model, options,
        FolderStore(data_dir),
    )


def build_runtime(settings: Settings, engine: Engine | None = None) -> Runtime:
    """A runtime on the settings' database, with a local engine for each base model (`engine`
    instead for the default one). The scheduler takes the default engine's lanes: the local
    engines share the machine's cores, so one call at a time in all is what they can run."""
    db = Database(settings.resolved_database_url)
    instances = Instances(db, timeout=settings.instance_timeout_seconds)
    bus = RedisBus(settings.redis_url, settings.redis_prefix) if settings.redis_url else None
    hub = FutureHub(db, owner=instances.id, announce=bus.announce if bus else None)
    quotas = Quotas(settings)
    engines: dict[str, Engine] = {name: local_engine(settings, name) for name in settings.base_models[1:]}
    default = engine or local_engine(settings, settings.base_models[0])
    engines = {settings.base_models[0]: default, **engines}
    scheduler = Scheduler(hub, lanes=default.lanes, max_calls=default.max_calls,
                          gap_grace=settings.seq_gap_grace_seconds, throttle=quotas)
    return Runtime(
        settings=settings,
        db=db,
        hub=hub,
        scheduler=scheduler,
        engines=engines,
        quotas=quotas,
        sample_admission=Admission(settings.sample_queue_limit),
        instances=instances,
        bus=bus,
    )


async def start(rt: Runtime) -> None:
    await rt.start()
    rt.spawn(run_reaper(rt), name="reaper")
    rt.spawn(run_session_reaper(rt), name="session-reaper")
    rt.log_started()


async def stop(rt: Runtime) -> None:
    await rt.stop()
