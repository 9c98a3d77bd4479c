"""What ending a session frees (server/ops/lifecycle.py), around engines that record or wait: a
finished session's adapters are unloaded at once, an expired one's paged out and unloaded after
the retention; every model's quota slot and every queued request is released even when a step
fails, and a model whose creation was running when its session ended is released too."""

from __future__ import annotations

import asyncio
import threading
import time
from types import SimpleNamespace

import pytest

from gateway.app import create_app
from server.boot import build_runtime
from server.config import Settings
from server.engine.retention import Retention
from server.engine.versions import Versions
from server.ops import training
from server.ops.lifecycle import Ended, end_session, free_ended_elsewhere, free_retired, release
from server.store.database import Database
from server.store.tables import Model, Tenant, utcnow
from server.store.tables import Session as SessionRow
from server.tenancy.quotas import Quotas
from server.tenancy.runs import RunCache
from tests.support.engines import IdleEngine
from tests.support.http import local_client
from workers.types import LoraSpec


class RecordingEngine:
    def __init__(self, fail_on: str | None = None) -> None:
        self.calls: list[tuple[str, str]] = []
        self.fail_on = fail_on

    async def _record(self, what: str, model_id: str) -> None:
        self.calls.append((what, model_id))
        if model_id == self.fail_on:
            raise OSError("disk full")

    async def page_out(self, model_id: str) -> None:
        await self._record("page_out", model_id)

    async def unload(self, model_id: str) -> None:
        await self._record("unload", model_id)


def runtime(tmp_path, engine: RecordingEngine, **settings) -> SimpleNamespace:
    config = Settings(data_dir=tmp_path, base_model="tiny-qwen3", **settings)
    failed: list[str] = []

    async def fail_queued(request_id: str, message: str) -> bool:
        failed.append(request_id)
        if request_id == "req-broken":
            raise RuntimeError("database gone")
        return True

    spawned: list[asyncio.Task] = []

    def spawn(work, name: str) -> None:
        spawned.append(asyncio.get_running_loop().create_task(work, name=name))

    quotas = Quotas(config)

    async def release_model(tenant_id: str, model_id: str) -> None:
        quotas.model_unloaded(tenant_id, model_id)

    forgotten: list[str] = []
    scheduler = SimpleNamespace(forget=forgotten.append)  # the model queues dropped
    return SimpleNamespace(settings=config, engine=engine, engines={"tiny-qwen3": engine}, quotas=quotas,
                           retention=Retention(), fail_queued=fail_queued, failed=failed, spawn=spawn, spawned=spawned,
                           release_model=release_model, versions=Versions(4, 60.0), scheduler=scheduler,
                           forgotten=forgotten, runs=RunCache())


def ended(reason: str | None, models: list[str], pending: list[str] = ()) -> Ended:
    return Ended("sess-1", "tenant-a", reason, models, list(pending))


def loaded(rt: SimpleNamespace, models: list[str]) -> None:
    for model_id in models:
        rt.quotas.model_loaded("tenant-a", model_id)


def live(rt: SimpleNamespace) -> int:
    return len(rt.quotas.state("tenant-a").live_models)


@pytest.mark.parametrize("reason", ["success", "errored", None])
def test_a_finished_session_unloads_its_adapters_and_frees_its_slots(tmp_path, reason) -> None:
    rt = runtime(tmp_path, RecordingEngine())
    loaded(rt, ["m1", "m2"])
    asyncio.run(release(rt, ended(reason, ["m1", "m2"], ["req-1"]), "finished"))
    assert rt.engine.calls == [("unload", "m1"), ("unload", "m2")]
    assert live(rt) == 0 and rt.retention.held() == {} and rt.failed == ["req-1"]
    assert rt.forgotten == ["model:m1", "model:m2"]  # their queues go too


def test_a_closing_client_does_not_wait_for_the_engine(tmp_path) -> None:
    rt = runtime(tmp_path, RecordingEngine())
    loaded(rt, ["m1"])

    async def scenario() -> None:
        await release(rt, ended("success", ["m1"]), "finished", wait_for_engine=False)
        assert live(rt) == 0 and rt.engine.calls == []  # the slot at once, the adapter in the background
        await asyncio.gather(*rt.spawned)
        assert rt.engine.calls == [("unload", "m1")]

    asyncio.run(scenario())


def test_an_expired_session_pages_out_then_frees_after_the_retention(tmp_path) -> None:
    rt = runtime(tmp_path, RecordingEngine(), expired_adapter_retention_seconds=60)
    loaded(rt, ["m1", "m2"])
    asyncio.run(release(rt, ended("expired", ["m1", "m2"]), "expired"))
    assert rt.engine.calls == [("page_out", "m1"), ("page_out", "m2")] and live(rt) == 0
    assert set(rt.retention.held()) == {"m1", "m2"}
    assert asyncio.run(free_retired(rt)) == []  # not yet
    rt.retention.retire("m1", time.monotonic() - 61)
    assert asyncio.run(free_retired(rt)) == ["m1"]
    assert rt.engine.calls[-1] == ("unload", "m1") and set(rt.retention.held()) == {"m2"}


def test_with_no_retention_an_expired_session_is_unloaded_at_once(tmp_path) -> None:
    rt = runtime(tmp_path, RecordingEngine(), expired_adapter_retention_seconds=0)
    loaded(rt, ["m1"])
    asyncio.run(release(rt, ended("expired", ["m1"]), "expired"))
    assert rt.engine.calls == [("unload", "m1")] and rt.retention.held() == {}


def test_one_failure_does_not_stop_the_rest(tmp_path) -> None:
    rt = runtime(tmp_path, RecordingEngine(fail_on="m1"))
    loaded(rt, ["m1", "m2"])
    asyncio.run(release(rt, ended("expired", ["m1", "m2"], ["req-broken", "req-2"]), "expired"))
    assert rt.failed == ["req-broken", "req-2"]
    assert rt.engine.calls == [("page_out", "m1"), ("page_out", "m2")]
    # m1's slot is free even though its page-out failed, and it is still freed after the retention
    assert live(rt) == 0 and set(rt.retention.held()) == {"m1", "m2"}


class GatedEngine(IdleEngine):
    """create_adapter waits for the test to open the gate (from the test's thread)."""

    def __init__(self) -> None:
        self.entered, self.gate = threading.Event(), threading.Event()
        self.unloaded: list[str] = []

    async def create_adapter(self, model_id: str, spec) -> None:
        self.entered.set()
        while not self.gate.is_set():
            await asyncio.sleep(0.01)

    async def unload(self, model_id: str) -> None:
        self.unloaded.append(model_id)

    def pool_status(self) -> None:
        return None


def test_a_model_created_while_its_session_ends_is_released(tmp_path) -> None:
    engine = GatedEngine()
    config = Settings(data_dir=tmp_path, base_model="tiny-qwen3", long_poll_seconds=1)
    with local_client(create_app(build_runtime(config, engine=engine))) as client:
        headers = {"X-API-Key": "tml-lifecycle-race"}

        def post(path: str, **body) -> dict:
            return client.post(f"/api/v1/{path}", json=body, headers=headers).json()

        session = post("create_session", sdk_version="raw", tags=[], user_metadata={})["session_id"]
        made = post("create_model", session_id=session, model_seq_id=0, base_model="tiny-qwen3",
                    lora_config={"rank": 2})
        assert engine.entered.wait(5)
        assert post(f"sessions/{session}/finish", reason={"type": "success"}) == {"status": "finished"}
        engine.gate.set()
        failed = post("retrieve_future", request_id=made["request_id"])
        assert "ended while the model was being created" in failed["error"], failed
        assert engine.unloaded == [made["model_id"]]
        usage = client.get("/twinkle/v1/capacity", headers=headers).json()
        assert usage["tenant"]["live_models"] == 0


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_a_session_ending_during_the_model_insert_still_lists_the_model(tmp_path, request, backend) -> None:
    """The interleaving the gated test cannot reach: the session ends between the insert's
    session check and its INSERT. The end must wait for the insert and then list the model, on
    both databases (SQLite's SELECT ... FOR UPDATE would lock nothing)."""
    url = f"sqlite:///{tmp_path / 'twinkle.db'}" if backend == "sqlite" else request.getfixturevalue("make_pg_database")()
    db = Database(url, threads=1)
    db.migrate()
    db.call(lambda s: (s.add(Tenant(id="t1", name="t1")), s.flush(), s.add(SessionRow(id="sess-1", tenant_id="t1"))))
    ended: dict[str, object] = {}

    def end_it() -> None:
        ended["what"] = db.call(lambda s: end_session(s, s.get(SessionRow, "sess-1"), "success"))

    real_model = training.Model

    def model_between_check_and_insert(**columns):  # the ending runs (and must block) right here
        ender = threading.Thread(target=end_it)
        ender.start()
        ender.join(1.0)
        ended["blocked"], ended["thread"] = ender.is_alive(), ender
        return real_model(**columns)

    training.Model = model_between_check_and_insert
    try:
        db.call(lambda s: training.insert_model(s, "t1", "sess-1", 0, "tiny-qwen3", LoraSpec(4, 0), None, "inst-1"))
    finally:
        training.Model = real_model
    ended["thread"].join(10)
    assert ended["blocked"] and ended["what"].model_ids == ["sess-1:train:0"]
    db.close()


def test_adapters_of_a_session_ended_on_another_process_are_freed_by_their_holder(tmp_path) -> None:
    rt = runtime(tmp_path, RecordingEngine())
    rt.db = Database(f"sqlite:///{tmp_path / 'shared.db'}", threads=1)
    rt.db.migrate()

    def write(s) -> None:
        s.add(Tenant(id="tenant-a", name="tenant-a"))
        s.flush()
        s.add(SessionRow(id="s-ended", tenant_id="tenant-a", finished_at=utcnow(), finish_reason="success"))
        s.add(SessionRow(id="s-live", tenant_id="tenant-a"))
        s.flush()
        for model_id, session in (("m-ended", "s-ended"), ("m-live", "s-live")):
            s.add(Model(id=model_id, tenant_id="tenant-a", session_id=session, model_seq_id=0,
                        base_model="tiny-qwen3", lora_rank=2))

    rt.db.call(write)
    loaded(rt, ["m-ended", "m-live"])  # both held here; the first's session was ended elsewhere
    freed = asyncio.run(free_ended_elsewhere(rt))
    assert [(e.session_id, e.model_ids, e.reason) for e in freed] == [("s-ended", ["m-ended"], "success")]
    assert rt.engine.calls == [("unload", "m-ended")] and live(rt) == 1
    assert asyncio.run(free_ended_elsewhere(rt)) == []  # freed once
    rt.db.close()
