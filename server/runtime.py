"""The parts of a running server, shared by every operation: settings, store, queue, tenancy and
engine. Each part is a class of its own subpackage, which owns its state; a Runtime only holds
them and starts and stops them. server/boot.py builds one and starts its background tasks."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from server import ids
from server.config import Settings
from server.engine.protocol import Engine
from server.engine.retention import Retention
from server.engine.versions import Versions
from server.errors import Busy, InvalidRequest
from server.kinds import ErrorCategory, FutureState, OpKind
from server.metrics import Gauges, Metrics
from server.queue.admission import Admission
from server.queue.bus import RedisBus
from server.queue.feeds import CompletionFeeds
from server.queue.futures import STOP_MESSAGE, FutureHub, Submission
from server.queue.instances import Instances
from server.queue.scheduler import Batch, Notify, OpRunner, Scheduler
from server.store.database import Database
from server.store.tables import Tenant
from server.tenancy.keys import KeyCache
from server.tenancy.quotas import Limits, Quotas
from server.tenancy.run_metrics import RunMetrics
from server.tenancy.runs import RunCache, write_touched
from server.tenancy.shared import SharedQuotas
from server.tracing import Tracing
from workers.types import BaseModelInfo

log = logging.getLogger(__name__)


@dataclass
class Runtime:
    settings: Settings
    db: Database
    hub: FutureHub
    scheduler: Scheduler
    engines: dict[str, Engine]  # one per served base model, the default first
    quotas: Quotas
    sample_admission: Admission
    instances: Instances  # this process among those sharing the database
    versions: Versions  # in-memory adapter versions this process holds (the checkpoint engine)
    run_metrics: RunMetrics  # each run's curve for the dashboard, written in batches
    metrics: Metrics  # this process's Prometheus registry (GET /metrics)
    tracing: Tracing  # OpenTelemetry spans of operations (off by default)
    bus: RedisBus | None = None  # with --redis-url: messages from and to the other server processes
    shared: SharedQuotas | None = None  # with --redis-url: the limits that hold over every server process
    feeds: CompletionFeeds = field(default_factory=CompletionFeeds)
    keys: KeyCache = field(default_factory=KeyCache)  # key hash -> tenant, for a few seconds
    runs: RunCache = field(default_factory=RunCache)  # runs admitted here lately, for a few seconds
    retention: Retention = field(default_factory=Retention)  # expired sessions' adapters, freed later
    _bases: dict[str, BaseModelInfo] = field(default_factory=dict)
    _background: list[asyncio.Task] = field(default_factory=list)
    _started_at: float = field(default_factory=time.monotonic)

    def __post_init__(self) -> None:
        self.metrics.watch(self.gauges)

    def gauges(self) -> Gauges:
        """What GET /metrics reports as it is now: queues, engine calls, LoRA pools."""
        return Gauges(
            lanes=self.scheduler.load(), max_calls=self.scheduler.max_calls,
            queued_by_tenant=self.scheduler.queued_by_tenant(), futures_pending=self.hub.pending,
            pools={name: engine.pool_status() for name, engine in self.engines.items()},
        )

    @property
    def base(self) -> BaseModelInfo:
        """The default base model (the first served)."""
        return self.base_for(next(iter(self.engines)))

    @property
    def bases(self) -> list[BaseModelInfo]:
        assert self._bases, "runtime not started"
        return list(self._bases.values())

    def base_for(self, name: str) -> BaseModelInfo:
        assert self._bases, "runtime not started"
        return self._bases[name]

    def engine_for(self, name: str) -> Engine:
        """The engine of a served base model (a name the caller has checked with `served`)."""
        return self.engines[name]

    def served(self, name: str | None, field: str = "base_model") -> str:
        """The served base model a request names (None: the default), or InvalidRequest."""
        if name is None:
            return next(iter(self.engines))
        if name not in self.engines:
            raise InvalidRequest(
                f"base model {name!r} is not served here; this server serves {', '.join(map(repr, self.engines))}",
                field=field,
            )
        return name

    def uptime(self) -> float:
        return time.monotonic() - self._started_at

    @property
    def data_dir(self) -> Path:
        return self.settings.data_dir.resolve()

    async def enqueue(
        self,
        tenant_id: str,
        *,
        kind: OpKind,
        scope: str,
        seq_id: int | None,
        fingerprint: str,
        run: OpRunner,
        queue: str | None = None,
        ordered: bool = False,
        batch: Batch | None = None,
        notify: Notify | None = None,
        cost: int = 0,
    ) -> Submission:
        """Take a future for a submission and queue its work (under `queue`, default `scope`),
        unless this exact submission was seen before in `scope`: then the earlier future answers
        and nothing runs twice (SDK retries resend the same body with the same seq_id).
        Counts against the tenant's requests/s and in-flight quotas (429 when over); `cost` (tokens)
        against its tokens/s budget, which the scheduler enforces."""
        limits = await self.refresh_limits(tenant_id)
        if self.shared is not None:
            await self.shared.admit_request(tenant_id, limits.requests_per_second, self.quotas.window)
        self.quotas.admit(tenant_id, time.monotonic(), rate=self.shared is None)
        if seq_id is None:  # nothing to recognise a retry by: every such submission is new
            fingerprint = ids.new_id("fp")
        try:
            sub = await self.hub.submit(
                tenant_id=tenant_id, kind=kind, scope=scope, seq_id=-1 if seq_id is None else seq_id,
                fingerprint=fingerprint,
            )
        except BaseException:
            self.quotas.finished(tenant_id)
            raise
        if not sub.is_new:  # the original submission holds the in-flight place
            self.quotas.finished(tenant_id)
            return sub

        def done(request_id: str, state: str, result: bytes | None) -> None:
            self.quotas.finished(tenant_id)
            if notify is not None:
                notify(request_id, state, result)

        self.scheduler.submit(
            queue or scope, seq_id=seq_id, request_id=sub.request_id, kind=kind, run=run, tenant=tenant_id,
            batch=batch, ordered=ordered, notify=done, cost=cost,
        )
        return sub

    # ----- live models and sample places: this process's, or the deployment's (Redis) ---------
    async def check_model_room(self, tenant_id: str) -> None:
        """Busy (a 429 the SDK does not retry) when the tenant has all the live models it may."""
        if self.shared is not None:
            await self.shared.check_model_room(tenant_id, self.quotas.limits(tenant_id).max_live_models)
        else:
            self.quotas.check_new_model(tenant_id)

    async def claim_model(self, tenant_id: str, model_id: str) -> None:
        """Count a model being made as live, checked and taken in one step (Busy when full)."""
        if self.shared is not None:
            await self.shared.claim_model(tenant_id, model_id, self.quotas.limits(tenant_id).max_live_models)
        else:
            self.quotas.check_new_model(tenant_id)
        self.quotas.model_loaded(tenant_id, model_id)

    async def release_model(self, tenant_id: str, model_id: str) -> None:
        """The model no longer counts as live. Never raises: whatever freed the model goes on even
        with Redis down (its shared count then stays one too high until Redis forgets it)."""
        self.quotas.model_unloaded(tenant_id, model_id)
        if self.shared is not None:
            await _quietly(self.shared.release_model(tenant_id, model_id))

    async def live_models(self, tenant_id: str) -> int:
        if self.shared is not None:
            return await self.shared.live_models(tenant_id)
        return self.quotas.live_models(tenant_id)

    async def admit_sample(self, tenant_id: str) -> Callable[[], None]:
        """A place among the samples admitted and not finished (in the whole deployment, with
        Redis), or Busy: a 429 the SDK backs off from and resends (docs/tinker-protocol-notes.md,
        "429 and Retry-After"). Returns the place's release, callable from a completion callback."""
        admission = self.sample_admission
        token = None
        if self.shared is not None:
            token, full = await self.shared.take_sample_place(tenant_id, admission.limit, admission.tenant_limit)
            if token is None:
                raise _sampler_full(tenant_id, full, admission)

        def give_back_shared() -> None:
            if token is not None:
                self.spawn(_quietly(self.shared.release_sample_place(tenant_id, token)), name="sample-place")  # type: ignore[union-attr]

        if (full := admission.take(tenant_id)) is not None:  # checked and taken with no await in between
            give_back_shared()
            raise _sampler_full(tenant_id, full, admission)
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                admission.release(tenant_id)
                give_back_shared()

        return release

    async def fail_queued(self, request_id: str, message: str) -> bool:
        """Take a queued (not yet running) operation out of its queue and fail its future with a
        `user` error; False if it is not queued. Its admission is released even if recording fails."""
        op = self.scheduler.cancel(request_id)
        if op is None:
            return False
        try:
            await self.hub.fail(request_id, message, ErrorCategory.USER)
        finally:
            if op.notify is not None:
                op.notify(request_id, FutureState.FAILED, None)
        return True

    async def refresh_limits(self, tenant_id: str) -> Limits:
        """The tenant's limits: the settings' defaults with its row's overrides (re-read every few
        seconds, so a change through the admin API or the CLI takes effect in a running server)."""
        if self.quotas.limits_stale(tenant_id, read_at := time.monotonic()):
            overrides = await self.db.run(lambda s: getattr(s.get(Tenant, tenant_id), "limits", None))
            return self.quotas.set_limits(tenant_id, overrides, now=read_at)
        return self.quotas.limits(tenant_id)

    async def start(self) -> None:
        """Upgrade (or check) the store's schema, fail what an earlier process left in flight, load
        the engine and start the scheduler."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        await asyncio.to_thread(lambda: self.db.ensure_schema(upgrade=self.settings.upgrades_schema))
        await asyncio.to_thread(self.instances.register)
        if self.bus is not None:
            await self.bus.start(self.hub.wake, self.keys.forget_key)
        await self.hub.ended(await asyncio.to_thread(self.instances.sweep))  # what gone processes left pending
        self.spawn(self._heartbeats(), name="instance-heartbeat")
        self.spawn(self._flushing_run_metrics(), name="run-metrics")
        for name, engine in self.engines.items():  # one at a time: loading is the memory peak
            self._bases[name] = await engine.start()
        self.scheduler.start()

    async def _heartbeats(self) -> None:
        """Tell other processes on the database that this one is alive, and fail the work of those
        that are not, forever (cancel the task to stop); a failed round is logged and retried."""
        interval = self.instances.timeout / 3
        while True:
            await asyncio.sleep(interval)
            try:
                if not await asyncio.to_thread(self.instances.heartbeat):
                    self.runs.clear()  # taken for gone meanwhile: a peer may have adopted our runs
                if touched := self.runs.take_touched():
                    await self.db.run(lambda s: write_touched(s, touched))
                await self.hub.ended(await asyncio.to_thread(self.instances.sweep))
            except Exception:
                log.exception("instance_heartbeat_failed")

    async def _flushing_run_metrics(self) -> None:
        """The runs' recorded points into the store, every second, forever (cancel the task to stop)."""
        while True:
            await asyncio.sleep(1.0)
            await self._flush_run_metrics()

    async def _flush_run_metrics(self) -> None:
        try:
            await self.run_metrics.flush()
        except Exception:  # kept for the next flush; logged, never raised
            log.exception("run_metrics_flush_failed")

    async def forget_key(self, key_id: str) -> None:
        """A key was revoked: out of this process's key cache now, and every other's."""
        self.keys.forget_key(key_id)
        if self.bus is not None:
            await self.bus.revoked(key_id)

    def log_started(self) -> None:
        log.info("runtime_started", extra={"base_models": list(self._bases), "data_dir": str(self.data_dir)})

    def spawn(self, work: Coroutine[Any, Any, None], name: str) -> None:
        """Run `work` in the background, so that a request need not wait for it; stop() cancels it.
        It must log its own failures."""
        task = asyncio.create_task(work, name=name)
        self._background.append(task)
        task.add_done_callback(lambda done: self._background.remove(done) if done in self._background else None)

    async def stop(self) -> None:
        for task in list(self._background):
            task.cancel()
        await asyncio.gather(*list(self._background), return_exceptions=True)
        await self.scheduler.stop()
        for engine in self.engines.values():
            await engine.stop()
        await self._flush_run_metrics()
        try:  # what was queued here can no longer finish: say so now rather than at the next start
            if failed := await asyncio.to_thread(self.instances.retire, STOP_MESSAGE):
                log.warning("futures_failed_on_stop", extra={"count": len(failed)})
                await self.hub.ended(failed)
        except Exception:
            log.exception("instance_retire_failed")
        if self.bus is not None:
            await self.bus.stop()
        if self.shared is not None:
            await self.shared.close()
        await asyncio.to_thread(self.tracing.shutdown)  # the spans not exported yet
        self.db.close()


def _sampler_full(tenant_id: str, full: str, admission: Admission) -> Busy:
    log.info("sample_refused_busy", extra={"tenant_id": tenant_id, "full": full})
    if full == "tenant":
        return Busy(f"this tenant has {admission.tenant_limit} sample requests queued, its share of the sampler "
                    "queue; retry shortly")
    return Busy(f"the sampler queue is full ({admission.limit} requests); retry shortly")


async def _quietly(work: Coroutine[Any, Any, None]) -> None:
    """A give-back to Redis that may fail (Redis down): logged, never raised."""
    try:
        await work
    except Exception:
        log.warning("release_failed", exc_info=True)
