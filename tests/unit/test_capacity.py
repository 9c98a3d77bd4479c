"""GET /twinkle/v1/capacity and /twinkle/v1/status, in-process (TestClient, SQLite, an engine that
never computes): the pool as the engine reports it, the caller's own usage and limits (with its
overrides, applied at once when set through the admin API), and refusals of unknown keys."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from gateway.app import create_app
from server.boot import build_runtime
from server.config import Settings
from tests.support.admin import ADMIN, ADMIN_KEY, new_key, new_tenant
from tests.support.engines import IdleEngine
from tests.support.http import error, local_client
from workers.types import PoolStatus

A = "/twinkle/v1/admin"
POOL = PoolStatus(max_resident=2, resident=("m1", "m2"), pinned=1, paged_in_host=3, paged_on_disk=1,
                  host_bytes=4096, page_ins=7, page_outs=5, spills=1)


class PoolEngine(IdleEngine):
    def __init__(self) -> None:
        self.pool: PoolStatus | None = None

    def pool_status(self) -> PoolStatus | None:
        return self.pool


@pytest.fixture(scope="module")
def engine() -> PoolEngine:
    return PoolEngine()


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory, engine: PoolEngine) -> Iterator[TestClient]:
    config = Settings(data_dir=Path(tmp_path_factory.mktemp("capacity")), base_model="tiny-qwen3", auth="keys",
                      admin_key=ADMIN_KEY, max_live_models=16, sample_queue_limit=64)
    with local_client(create_app(build_runtime(config, engine=engine))) as c:
        yield c


def key_of(client: TestClient, tenant: str, **limits) -> dict[str, str]:
    new_tenant(client, tenant, limits=limits)
    return {"X-API-Key": new_key(client, tenant)["key"]}


def test_capacity_shows_the_pool_and_the_callers_own_usage(client: TestClient, engine: PoolEngine) -> None:
    key = key_of(client, "cap-a", max_live_models=3)
    engine.pool = None
    body = client.get("/twinkle/v1/capacity", headers=key).json()
    assert "pool" not in body  # nothing has run yet
    assert body["samples_pending"] == 0 and body["sample_queue_limit"] == 64
    assert body["tenant"]["queue_depth"] == 0 and body["tenant"]["inflight_requests"] == 0
    assert body["tenant"]["live_models"] == 0
    assert body["tenant"]["limits"]["max_live_models"] == 3  # the override, not the default 16

    engine.pool = POOL
    pool = client.get("/twinkle/v1/capacity", headers=key).json()["pool"]
    assert pool == {"max_resident_adapters": 2, "resident_adapters": 2, "pinned_adapters": 1, "paged_in_host": 3,
                    "paged_on_disk": 1, "host_bytes": 4096, "page_ins": 7, "page_outs": 5}


def test_limits_set_through_the_admin_api_apply_at_once(client: TestClient) -> None:
    key = key_of(client, "cap-b")
    assert client.get("/twinkle/v1/capacity", headers=key).json()["tenant"]["limits"]["max_live_models"] == 16
    r = client.put(f"{A}/tenants/cap-b/limits", json={"max_live_models": 5}, headers=ADMIN)
    assert r.status_code == 200, r.text
    assert client.get("/twinkle/v1/capacity", headers=key).json()["tenant"]["limits"]["max_live_models"] == 5


def test_status_names_the_model_and_includes_capacity(client: TestClient) -> None:
    body = client.get("/twinkle/v1/status", headers=key_of(client, "cap-c")).json()
    assert body["status"] == "ok" and body["base_model"] == "tiny-qwen3" and body["uptime_seconds"] >= 0
    assert body["capacity"]["tenant"]["queue_depth"] == 0


@pytest.mark.parametrize("path", ["/twinkle/v1/capacity", "/twinkle/v1/status"])
def test_unknown_or_missing_keys_are_refused(client: TestClient, path: str) -> None:
    missing = error(client.get(path), 401)
    assert "API key" in missing["error"]
    unknown = "tml-" + "z" * 43
    body = error(client.get(path, headers={"X-API-Key": unknown}), 401)
    assert body["error"].startswith("unknown or revoked API key") and unknown not in str(body)
    wrong_method = client.post(path, headers=ADMIN)
    assert wrong_method.status_code == 405 and "Traceback" not in wrong_method.text
