"""The composition root: one Runtime holds the parts of a running server and starts and stops them."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from server import ids
from server.config import Settings
from server.engine import Engine
from server.feeds import CompletionFeeds
from server.futures import FutureHub, Submission
from server.lifecycle import run_session_reaper
from server.local_engine import LocalEngine
from server.quotas import Limits, Quotas
from server.reaper import run_reaper
from server.scheduler import Batch, Notify, OpRunner, Scheduler
from server.store.database import Database
from server.store.tables import Tenant
from server.tenants import KeyCache
from workers.base_models import resolve_base_model
from workers.types import BaseModelInfo

log = logging.getLogger(__name__)


@dataclass
class Runtime:
    settings: Settings
    db: Database
    hub: FutureHub
    scheduler: Scheduler
    engine: Engine
    quotas: Quotas
    feeds: CompletionFeeds = field(default_factory=CompletionFeeds)
    samples_pending: int = 0  # sample requests admitted and not finished (the 429 limit counts these)
    _base: BaseModelInfo | None = None
    _background: list[asyncio.Task] = field(default_factory=list)
    _started_at: float = field(default_factory=time.monotonic)
    key_cache: KeyCache = field(default_factory=KeyCache)  # key hash -> tenant, for a few seconds
    # Models of expired sessions whose adapters are paged out, with when: unloaded after the retention.
    retired: dict[str, float] = field(default_factory=dict)

    @classmethod
    def build(cls, settings: Settings, engine: Engine | None = None) -> Runtime:
        db = Database(settings.resolved_database_url)
        hub = FutureHub(db)
        engine = engine or LocalEngine(
            lambda: resolve_base_model(
                settings.base_model, settings.data_dir.resolve(), allow_download=settings.allow_download
            ),
            settings.base_model,
            torch_threads=settings.torch_threads,
            max_resident_adapters=settings.max_resident_adapters,
            host_budget_bytes=settings.host_adapter_budget_mb * 2**20,
            spill_dir=settings.data_dir.resolve() / "lora-spill",
        )
        quotas = Quotas(settings)
        scheduler = Scheduler(hub, gap_grace=settings.seq_gap_grace_seconds, throttle=quotas)
        return cls(settings=settings, db=db, hub=hub, scheduler=scheduler, engine=engine, quotas=quotas)

    @property
    def base(self) -> BaseModelInfo:
        assert self._base is not None, "runtime not started"
        return self._base

    def uptime(self) -> float:
        return time.monotonic() - self._started_at

    @property
    def data_dir(self) -> Path:
        return self.settings.data_dir.resolve()

    async def enqueue(
        self,
        tenant_id: str,
        *,
        kind: str,
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
        await self.refresh_limits(tenant_id)
        self.quotas.admit(tenant_id, time.monotonic())
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

    async def fail_queued(self, request_id: str, message: str) -> bool:
        """Take a queued (not yet running) operation out of its queue and fail its future with a
        `user` error; False if it is not queued. Its admission is released even if recording fails."""
        op = self.scheduler.cancel(request_id)
        if op is None:
            return False
        try:
            await self.hub.fail(request_id, message, "user")
        finally:
            if op.notify is not None:
                op.notify(request_id, "failed", None)
        return True

    async def refresh_limits(self, tenant_id: str) -> Limits:
        """The tenant's limits: the settings' defaults with its row's overrides (re-read every few
        seconds, so a change through the admin API or the CLI takes effect in a running server)."""
        if self.quotas.limits_stale(tenant_id, read_at := time.monotonic()):
            overrides = await self.db.run(lambda s: getattr(s.get(Tenant, tenant_id), "limits", None))
            return self.quotas.set_limits(tenant_id, overrides, now=read_at)
        return self.quotas.limits(tenant_id)

    async def start(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        await asyncio.to_thread(self.db.migrate)
        if failed := await asyncio.to_thread(self.hub.fail_leftovers):
            log.warning("futures_failed_on_restart", extra={"count": failed})
        self._base = await self.engine.start()
        self.scheduler.start()
        self._background.append(asyncio.create_task(run_reaper(self), name="reaper"))
        self._background.append(asyncio.create_task(run_session_reaper(self), name="session-reaper"))
        log.info("runtime_started", extra={"base_model": self._base.name, "data_dir": str(self.data_dir)})

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
        await self.engine.stop()
        self.db.close()
