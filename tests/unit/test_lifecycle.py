"""What ending a session frees (server/lifecycle.py), around a recording engine: a finished
session's adapters are unloaded at once, an expired one's paged out and unloaded after the
retention; every model's quota slot and every queued request is released even when a step fails."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace

import pytest

from server.config import Settings
from server.lifecycle import Ended, free_retired, release
from server.quotas import Quotas


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

    return SimpleNamespace(settings=config, engine=engine, quotas=Quotas(config), retired={},
                           fail_queued=fail_queued, failed=failed)


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
    assert live(rt) == 0 and rt.retired == {} and rt.failed == ["req-1"]


def test_an_expired_session_pages_out_then_frees_after_the_retention(tmp_path) -> None:
    rt = runtime(tmp_path, RecordingEngine(), expired_adapter_retention_seconds=60)
    loaded(rt, ["m1", "m2"])
    asyncio.run(release(rt, ended("expired", ["m1", "m2"]), "expired"))
    assert rt.engine.calls == [("page_out", "m1"), ("page_out", "m2")] and live(rt) == 0
    assert set(rt.retired) == {"m1", "m2"}
    assert asyncio.run(free_retired(rt)) == []  # not yet
    rt.retired["m1"] = time.monotonic() - 61
    assert asyncio.run(free_retired(rt)) == ["m1"]
    assert rt.engine.calls[-1] == ("unload", "m1") and set(rt.retired) == {"m2"}


def test_with_no_retention_an_expired_session_is_unloaded_at_once(tmp_path) -> None:
    rt = runtime(tmp_path, RecordingEngine(), expired_adapter_retention_seconds=0)
    loaded(rt, ["m1"])
    asyncio.run(release(rt, ended("expired", ["m1"]), "expired"))
    assert rt.engine.calls == [("unload", "m1")] and rt.retired == {}


def test_one_failure_does_not_stop_the_rest(tmp_path) -> None:
    rt = runtime(tmp_path, RecordingEngine(fail_on="m1"))
    loaded(rt, ["m1", "m2"])
    asyncio.run(release(rt, ended("expired", ["m1", "m2"], ["req-broken", "req-2"]), "expired"))
    assert rt.failed == ["req-broken", "req-2"]
    assert rt.engine.calls == [("page_out", "m1"), ("page_out", "m2")]
    # m1's slot is free even though its page-out failed, and it is still freed after the retention
    assert live(rt) == 0 and set(rt.retired) == {"m1", "m2"}
