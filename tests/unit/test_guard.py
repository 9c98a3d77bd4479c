"""Limits that hold (gateway/guard.py, server/tenancy/keys.py, quotas, sample admission): every route
authenticates before it reads a byte of its body; bodies are counted as they arrive against their
route's limit (chunked ones too); unknown keys are cached and failed tries rate-limited per client
address; a refused submission writes nothing; a tenant holds at most its share of the sample
queue; open mode serves loopback callers only, however it was started."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient

from gateway.app import create_app
from gateway.guard import BULK_ROUTES, GuardedRoute
from server import ids
from server.boot import build_runtime
from server.config import Settings
from server.errors import Busy
from server.store.tables import Model
from server.tenancy import keys
from tests.support.admin import ADMIN_KEY, new_key, new_tenant
from tests.support.http import error, local_client

BODY_METHODS = {"POST", "PUT", "PATCH", "DELETE"}
KEY = {"X-API-Key": "tml-guard"}


def make_app(data_dir: Path, **settings):  # noqa: ANN201
    return create_app(build_runtime(Settings(data_dir=data_dir, base_model="tiny-qwen3", torch_threads=1,
                                             long_poll_seconds=1, **settings)))


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[TestClient]:
    data_dir = tmp_path_factory.mktemp("guard")
    (data_dir / "models").symlink_to(tiny_model_dir.parent)
    app = make_app(data_dir, max_json_mb=1, max_request_mb=2, sample_queue_limit=4, sample_queue_tenant_share=0.5)
    with local_client(app) as c:
        yield c


@pytest.fixture(scope="module")
def keys_client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    app = make_app(tmp_path_factory.mktemp("guard-keys"), auth="keys", admin_key=ADMIN_KEY, auth_failures_per_minute=5)
    with local_client(app) as c:
        yield c


class Body:
    """A request body the test client hands over only when the app reads it."""

    def __init__(self, size: int = 1, chunk: int = 64 << 10) -> None:
        self.consumed, self.size, self.chunk = False, size, chunk

    def __iter__(self) -> Iterator[bytes]:
        self.consumed = True
        for start in range(0, self.size, self.chunk):
            yield b"x" * min(self.chunk, self.size - start)


def body_routes(app) -> list[tuple[str, str]]:  # noqa: ANN001
    return sorted((method, route.path) for route in app.routes if isinstance(route, GuardedRoute)
                  for method in route.methods & BODY_METHODS)


def filled(path: str) -> str:
    """A concrete path for a route's template ({x} and {x:path} become x)."""
    return re.sub(r"\{[^}]+\}", "x", path)


# ----- authentication before the body --------------------------------------------------------------
def test_every_route_is_guarded(client: TestClient) -> None:
    plain = [r.path for r in client.app.routes if isinstance(r, APIRoute) and not isinstance(r, GuardedRoute)]
    assert plain == []


def test_no_route_reads_a_body_before_it_knows_the_caller(client: TestClient) -> None:
    unauthenticated = {"/api/v1/client/config", "/api/v1/client/dynamic_config", "/api/v1/telemetry"}
    checked = 0
    for method, path in body_routes(client.app):
        if path in unauthenticated:
            continue
        body = Body()
        answer = client.request(method, filled(path), content=body,
                                headers={"Authorization": "Bearer not-a-key", "X-API-Key": "not-a-key"})
        # 401 (a bad key), or 404 from the admin routes here (no admin key configured)
        assert answer.status_code in (401, 404), (method, path, answer.status_code, answer.text)
        assert not body.consumed, (method, path)
        checked += 1
    assert checked >= 40


# ----- body limits ---------------------------------------------------------------------------------
def test_a_control_route_takes_json_up_to_max_json_mb(client: TestClient) -> None:
    over = Body((1 << 20) + 1)
    answer = client.post("/api/v1/optim_step", content=over, headers={**KEY, "Content-Type": "application/json"})
    assert "limit of 1048576 bytes" in error(answer, 413)["error"] and error(answer, 413)["field"] == "body"


def test_a_bulk_route_takes_more_and_refuses_past_max_request_mb(client: TestClient) -> None:
    assert "/api/v1/forward_backward" in BULK_ROUTES
    headers = {**KEY, "Content-Type": "application/x-protobuf"}
    bigger = client.post("/api/v1/forward_backward", content=Body((1 << 20) + 10), headers=headers)
    assert bigger.status_code == 400  # read whole (over the JSON limit) and refused as not protobuf
    over = client.post("/api/v1/forward_backward", content=Body((2 << 20) + 1), headers=headers)
    assert error(over, 413)["field"] == "body"


def test_a_chunked_body_is_counted_as_it_arrives(client: TestClient) -> None:
    body = Body(3 << 20)  # a generator: sent chunked, with no Content-Length
    answer = client.post("/api/v1/forward_backward", content=body, headers={**KEY, "Content-Type": "application/x-protobuf"})
    assert error(answer, 413)["field"] == "body" and body.consumed


def test_a_declared_length_over_the_limit_is_refused_unread(client: TestClient) -> None:
    body = Body(10)
    answer = client.post("/api/v1/optim_step", content=body, headers={**KEY, "Content-Length": str(5 << 20)})
    assert "5242880 bytes" in error(answer, 413)["error"] and not body.consumed


def test_each_api_refuses_in_its_own_shape(client: TestClient) -> None:
    openai = client.post("/v1/chat/completions", content=Body(2 << 20), headers={"Authorization": "Bearer tml-guard"})
    assert openai.status_code == 413 and openai.json()["error"]["param"] == "body"
    native = client.post("/api/v1/twinkle/session_heartbeat", content=Body(2 << 20),
                         headers={"Authorization": "Bearer tml-guard"})
    assert native.status_code == 413 and native.json()["field"] == "body" and "detail" in native.json()


# ----- keys: cached misses, failed tries per address ----------------------------------------------
def test_an_unknown_key_is_looked_up_once_then_cached(keys_client: TestClient, monkeypatch) -> None:
    lookups = []
    real = keys.resolve_key

    def counting(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        lookups.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(keys, "resolve_key", counting)
    bad = {"X-API-Key": "tml-never-issued"}
    for _ in range(3):
        error(keys_client.post("/api/v1/create_session", json={}, headers=bad), 401)
    assert len(lookups) == 1
    new_tenant(keys_client, "guarded")
    key = new_key(keys_client, "guarded")["key"]  # made here: the cached misses are forgotten
    assert keys_client.post("/api/v1/create_session", json={"sdk_version": "x"},
                            headers={"X-API-Key": key}).status_code == 200


def test_failed_tries_from_one_address_get_a_429_before_any_lookup(keys_client: TestClient) -> None:
    far = TestClient(keys_client.app, client=("127.0.0.9", 1))
    for i in range(5):
        error(far.get("/api/v1/training_runs", headers={"X-API-Key": f"tml-guess-{i}"}), 401)
    refused = far.get("/api/v1/training_runs", headers={"X-API-Key": "tml-guess-5"})
    assert refused.status_code == 429 and float(refused.headers["retry-after"]) >= 1
    assert "failed authentications" in refused.json()["error"]
    admin = far.get("/twinkle/v1/admin/tenants", headers={"X-Admin-Key": ADMIN_KEY})
    assert admin.status_code == 429  # the admin key is guessed from the same address
    other = TestClient(keys_client.app, client=("127.0.0.10", 1))
    assert other.get("/api/v1/training_runs", headers={"X-API-Key": "tml-guess-6"}).status_code == 401


# ----- admission before the database ---------------------------------------------------------------
def test_a_refused_submission_writes_nothing(client: TestClient) -> None:
    rt = client.app.state.runtime
    sid = client.post("/api/v1/create_session", json={"sdk_version": "x"}, headers=KEY).json()["session_id"]
    made = client.post("/api/v1/create_model", headers=KEY, json={
        "session_id": sid, "model_seq_id": 0, "base_model": "tiny-qwen3", "lora_config": {"rank": 2}}).json()
    model_id = client.post("/api/v1/retrieve_future", json={"request_id": made["request_id"]},
                           headers=KEY).json()["model_id"]
    before = asyncio.run(rt.db.run(lambda s: s.get(Model, model_id).last_request_at))
    state = rt.quotas.state(rt.keys.get(ids.hash_key("tml-guard"), time.monotonic()).tenant_id)
    state.inflight = state.limits.max_inflight_requests  # the tenant is at its in-flight quota
    try:
        answer = client.post("/api/v1/optim_step", headers=KEY,
                             json={"model_id": model_id, "seq_id": 1, "adam_params": {"learning_rate": 1e-3}})
        assert answer.status_code == 429
    finally:
        state.inflight = 0
    assert asyncio.run(rt.db.run(lambda s: s.get(Model, model_id).last_request_at)) == before


# ----- the sample queue: a share per tenant --------------------------------------------------------
def test_a_tenant_holds_at_most_its_share_of_the_sample_queue(client: TestClient) -> None:
    rt = client.app.state.runtime

    async def take(tenant: str):  # noqa: ANN202
        return await rt.admit_sample(tenant)

    flood = [client.portal.call(take, "flood") for _ in range(2)]  # 4 places, a share of 0.5
    with pytest.raises(Busy, match="its share of the sampler queue"):
        client.portal.call(take, "flood")
    light = [client.portal.call(take, "light") for _ in range(2)]
    with pytest.raises(Busy, match="the sampler queue is full"):
        client.portal.call(take, "third")
    for release in flood + light:
        release()
    assert rt.sample_admission.pending == 0 and not rt.sample_admission.by_tenant


# ----- open mode: loopback callers only -----------------------------------------------------------
def test_open_mode_serves_loopback_callers_only(client: TestClient) -> None:
    remote = TestClient(client.app, client=("10.1.2.3", 40000))
    answer = remote.post("/api/v1/create_session", json={}, headers=KEY)
    assert answer.status_code == 403 and "--auth keys" in answer.json()["error"]
    v6 = TestClient(client.app, client=("::1", 40000))
    assert v6.post("/api/v1/create_session", json={"sdk_version": "x"}, headers=KEY).status_code == 200


def test_keys_mode_serves_any_address(keys_client: TestClient) -> None:
    remote = TestClient(keys_client.app, client=("10.1.2.4", 40000))
    assert remote.get("/api/v1/healthz").status_code == 200


def test_the_app_factory_refuses_open_mode_on_a_public_address(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="--auth open"):
        make_app(tmp_path, host="0.0.0.0")


def test_every_answer_carries_the_security_headers_and_no_cors(client: TestClient) -> None:
    for answer in (client.get("/api/v1/healthz"), client.get("/api/v1/training_runs", headers=KEY),
                   client.post("/api/v1/optim_step", json={}, headers={"Origin": "https://evil.example", **KEY})):
        assert answer.headers["x-content-type-options"] == "nosniff" and answer.headers["x-frame-options"] == "DENY"
        assert answer.headers["referrer-policy"] == "no-referrer"
        assert "access-control-allow-origin" not in answer.headers

