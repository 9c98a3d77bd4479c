"""The dashboard's page and JSON API in-process (TestClient, SQLite, an engine that never computes),
and the run-metrics recorder behind its curves: who sees what (a tenant key its own, the admin
key all), bad input answered 4xx naming the field, the page's assets and headers, and points
numbered per run across flushes and processes, pruned to the newest, kept when a flush fails."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from gateway.app import create_app
from server.boot import build_runtime
from server.config import Settings
from server.kinds import OpKind
from server.store.database import Database
from server.store.tables import Model, RunMetric, Session
from server.tenancy.run_metrics import RunMetrics
from tests.support.admin import ADMIN_KEY, new_key, new_tenant
from tests.support.engines import IdleEngine
from tests.support.http import error, local_client

API = "/twinkle/v1/dashboard"


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    config = Settings(data_dir=tmp_path_factory.mktemp("dash"), base_model="tiny-qwen3", auth="keys",
                      admin_key=ADMIN_KEY, long_poll_seconds=1)
    with local_client(create_app(build_runtime(config, engine=IdleEngine()))) as c:
        yield c


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def add_run(client: TestClient, tenant_id: str, model_id: str) -> None:
    def write(s) -> None:  # noqa: ANN001 - a SQLAlchemy session
        s.add(Session(id=f"sess-{model_id}", tenant_id=tenant_id))
        s.flush()  # the session before the run that points at it
        s.add(Model(id=model_id, tenant_id=tenant_id, session_id=f"sess-{model_id}", model_seq_id=0,
                    base_model="tiny-qwen3", lora_rank=4))
    client.portal.call(client.app.state.runtime.db.run, write)


@pytest.fixture(scope="module")
def tenants(client: TestClient) -> dict[str, dict]:
    """Two tenants, each with a key and a run of three points (forward_backward, optim_step, forward_backward)."""
    out = {}
    for name in ("alice", "bob"):
        tenant = new_tenant(client, name)
        out[name] = {"id": tenant["id"], "key": new_key(client, name)["key"], "run": f"run-{name}"}
        add_run(client, tenant["id"], f"run-{name}")
        metrics = client.app.state.runtime.run_metrics
        metrics.record(tenant["id"], f"run-{name}", OpKind.FORWARD_BACKWARD, 8, {"loss:sum": 16.0})
        metrics.record(tenant["id"], f"run-{name}", OpKind.OPTIM_STEP, 0, {})
        metrics.record(tenant["id"], f"run-{name}", OpKind.FORWARD_BACKWARD, 8, {"loss:sum": 12.0})
        client.portal.call(metrics.flush)
    return out


def test_the_page_and_its_assets_are_served_with_a_strict_policy(client: TestClient) -> None:
    page = client.get("/dashboard")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    policy = page.headers["content-security-policy"]
    assert "script-src 'self'" in policy and "connect-src 'self'" in policy and "default-src 'none'" in policy
    assert 'src="dashboard/dashboard.js"' in page.text and "http" not in page.text  # nothing from elsewhere
    for asset, kind in (("dashboard.js", "text/javascript"), ("dashboard.css", "text/css")):
        answer = client.get(f"/dashboard/{asset}")
        assert answer.status_code == 200 and answer.headers["content-type"].startswith(kind)
    assert error(client.get("/dashboard/secrets.txt"), 404)["field"] == "asset"
    assert error(client.get("/dashboard/..%2Fapp.py"), 404)["error"]


@pytest.mark.parametrize("headers", [{}, bearer("tml-not-a-registered-key"), {"Authorization": "Basic abc"}])
def test_the_api_wants_a_good_key(client: TestClient, headers: dict) -> None:
    assert client.get(f"{API}/overview", headers=headers).status_code == 401


def test_a_tenant_sees_its_own_runs_and_the_admin_all(client: TestClient, tenants: dict) -> None:
    alice = client.get(f"{API}/overview", headers=bearer(tenants["alice"]["key"])).json()
    assert alice["viewer"] == {"admin": False, "tenant": tenants["alice"]["id"]}
    assert [r["model_id"] for r in alice["runs"]] == ["run-alice"]
    assert [t["name"] for t in alice["tenants"]] == ["alice"]
    run = alice["runs"][0]
    assert (run["steps"], run["points"], run["last_metrics"]) == (1, 3, {"loss:sum": 12.0})
    admin = client.get(f"{API}/overview", headers=bearer(ADMIN_KEY)).json()
    assert admin["viewer"]["admin"] is True
    assert {r["model_id"] for r in admin["runs"]} >= {"run-alice", "run-bob"}
    assert {t["name"] for t in admin["tenants"]} >= {"alice", "bob"}


def test_a_curve_comes_in_order_from_a_cursor(client: TestClient, tenants: dict) -> None:
    key = bearer(tenants["alice"]["key"])
    curve = client.get(f"{API}/runs/run-alice/curve", headers=key).json()
    assert [(p["idx"], p["kind"], p["step"]) for p in curve["points"]] == [
        (0, "forward_backward", 0), (1, "optim_step", 1), (2, "forward_backward", 1)]
    assert curve["next_after"] == 2
    rest = client.get(f"{API}/runs/run-alice/curve", params={"after": 1}, headers=key).json()
    assert [p["metrics"] for p in rest["points"]] == [{"loss:sum": 12.0}]
    assert client.get(f"{API}/runs/run-alice/curve", params={"after": 2}, headers=key).json()["points"] == []
    assert len(client.get(f"{API}/runs/run-bob/curve", headers=bearer(ADMIN_KEY)).json()["points"]) == 3


@pytest.mark.parametrize(("path", "status", "field"), [
    ("/runs/run-bob/curve", 404, "model_id"),  # another tenant's run: not found, as everywhere
    ("/runs/no-such-run/curve", 404, "model_id"),
    ("/runs/run-alice/curve?after=soon", 422, "query.after"),
    ("/runs/run-alice/curve?after=-2", 422, "query.after"),
    ("/checkpoint_link", 422, "query.path"),
    ("/checkpoint_link?path=not-a-path", 400, "path"),
    ("/checkpoint_link?path=tinker://run-alice/secret/x", 400, "path"),
    ("/checkpoint_link?path=tinker://run-alice/weights/none", 404, "path"),
    ("/checkpoint_link?path=tinker://run-bob/weights/none", 404, "path"),
])
def test_bad_input_is_refused_naming_the_field(client: TestClient, tenants: dict, path: str, status: int,
                                               field: str) -> None:
    assert error(client.get(API + path, headers=bearer(tenants["alice"]["key"])), status)["field"] == field


def test_the_admin_gets_no_link_to_a_checkpoint_that_is_not_there(client: TestClient, tenants: dict) -> None:
    answer = client.get(f"{API}/checkpoint_link", params={"path": "tinker://run-bob/weights/none"},
                        headers=bearer(ADMIN_KEY))
    assert error(answer, 404)["field"] == "path"


# ----- the recorder ---------------------------------------------------------------------------
@pytest.fixture
def db(tmp_path: Path) -> Iterator[Database]:
    database = Database(f"sqlite:///{tmp_path / 'metrics.db'}")
    database.ensure_schema(upgrade=True)
    yield database
    database.close()


def stored(db: Database, model_id: str) -> list[tuple[int, int]]:
    return asyncio.run(db.run(lambda s: [(r.idx, r.step) for r in s.query(RunMetric).filter_by(model_id=model_id)
                                         .order_by(RunMetric.idx)]))


def tenant_row(db: Database) -> str:
    from server.store.tables import Tenant

    asyncio.run(db.run(lambda s: s.add(Tenant(id="t1", name="t1"))))
    return "t1"


def test_points_are_numbered_on_across_flushes_and_processes(db: Database) -> None:
    tenant = tenant_row(db)
    first = RunMetrics(db)
    for kind in (OpKind.FORWARD_BACKWARD, OpKind.OPTIM_STEP):
        first.record(tenant, "m", kind, 4, {"loss:sum": 1.0})
    assert asyncio.run(first.flush()) == 2 and asyncio.run(first.flush()) == 0
    second = RunMetrics(db)  # another process, or this one restarted: it numbers on from the store
    second.record(tenant, "m", OpKind.FORWARD_BACKWARD, 4, {"loss:sum": 0.5})
    second.record(tenant, "m", OpKind.OPTIM_STEP, 0, {})
    asyncio.run(second.flush())
    assert stored(db, "m") == [(0, 0), (1, 1), (2, 1), (3, 2)]


def test_a_run_keeps_its_newest_points(db: Database) -> None:
    tenant = tenant_row(db)
    metrics = RunMetrics(db, per_run=10)
    for _ in range(3):
        for _ in range(7):
            metrics.record(tenant, "m", OpKind.FORWARD_BACKWARD, 1, {"loss:sum": 1.0})
        asyncio.run(metrics.flush())
    assert [idx for idx, _ in stored(db, "m")] == list(range(11, 21))


def test_a_failed_flush_keeps_its_points() -> None:
    broken = RunMetrics(Database("sqlite:////nonexistent-dir/x.db"))
    broken.record("t", "m", OpKind.FORWARD_BACKWARD, 1, {})
    with pytest.raises(Exception):  # noqa: B017 - whatever the store raises
        asyncio.run(broken.flush())
    assert len(broken._pending) == 1  # kept for the next try
