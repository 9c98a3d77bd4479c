"""The admin API and key auth over HTTP, in-process (FastAPI TestClient, SQLite, an engine that
never computes): every admin endpoint's happy path and bad input, the admin key check, keys
mode (registered keys only; unknown and revoked keys get the same 401), open mode, and
revocation taking effect at once (admin API) or within the cache TTL (CLI)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from gateway.app import create_app
from server.boot import build_runtime
from server.config import Settings
from server.runtime import Runtime
from server.tenancy import tenants
from tests.support.admin import ADMIN, ADMIN_API, ADMIN_KEY, new_key, new_tenant
from tests.support.engines import IdleEngine
from tests.support.http import error, local_client

A = ADMIN_API
SESSION = {"sdk_version": "0.38.0", "tags": [], "user_metadata": {}}


def make_client(data_dir: Path, **settings) -> TestClient:
    config = Settings(data_dir=data_dir, base_model="tiny-qwen3", long_poll_seconds=1, **settings)
    return local_client(create_app(build_runtime(config, engine=IdleEngine())))


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    with make_client(tmp_path_factory.mktemp("admin"), auth="keys", admin_key=ADMIN_KEY) as c:
        yield c


@pytest.fixture(scope="module")
def holder_key(client: TestClient) -> str:
    """A key of the tenant "holders"."""
    new_tenant(client, "holders")
    return new_key(client, "holders")["key"]


@pytest.fixture(scope="module")
def open_client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    with make_client(tmp_path_factory.mktemp("open")) as c:  # open auth, no admin key
        yield c


def create_session(client: TestClient, key: str):
    return client.post("/api/v1/create_session", json=SESSION, headers={"X-API-Key": key})


ROUTES = [
    ("POST", "/tenants", {"name": "t"}),
    ("GET", "/tenants", None),
    ("GET", "/tenants/t", None),
    ("GET", "/tenants/t/limits", None),
    ("PUT", "/tenants/t/limits", {}),
    ("POST", "/keys", {"tenant": "t"}),
    ("GET", "/keys", None),
    ("POST", "/keys/key-1/revoke", None),
]


# ----- the admin key -----------------------------------------------------------------------------
@pytest.mark.parametrize(("method", "path", "body"), ROUTES)
def test_every_admin_route_wants_the_admin_key(
    client: TestClient, holder_key: str, method: str, path: str, body
) -> None:
    assert "X-Admin-Key" in error(client.request(method, A + path, json=body), 401)["error"]
    wrong = error(client.request(method, A + path, json=body, headers={"X-Admin-Key": ADMIN_KEY + "x"}), 401)
    assert wrong["error"] == "wrong admin key" and ADMIN_KEY not in str(wrong)
    # A tenant's key is not an admin key, in either header.
    error(client.request(method, A + path, json=body, headers={"X-Admin-Key": holder_key}), 401)
    error(client.request(method, A + path, json=body, headers={"X-API-Key": holder_key}), 401)


@pytest.mark.parametrize(("method", "path", "body"), ROUTES)
def test_without_an_admin_key_configured_the_admin_api_is_off(open_client: TestClient, method, path, body) -> None:
    body = error(open_client.request(method, A + path, json=body, headers=ADMIN), 404)
    assert "admin API disabled" in body["error"] and "TWINKLE_ADMIN_KEY" in body["error"]


# ----- tenants -----------------------------------------------------------------------------------
def test_create_list_and_get_tenants(client: TestClient) -> None:
    made = new_tenant(client, "acme", limits={"max_live_models": 3, "requests_per_second": 5})
    assert made["name"] == "acme" and made["id"].startswith("tn-") and made["active_keys"] == 0
    assert made["limits"] == {"max_live_models": 3, "requests_per_second": 5.0}
    listed = client.get(f"{A}/tenants", headers=ADMIN).json()["tenants"]
    assert made in listed
    assert client.get(f"{A}/tenants/acme", headers=ADMIN).json() == made


@pytest.mark.parametrize(
    ("body", "status", "field"),
    [({}, 422, "body.name"), ({"name": ""}, 422, "body.name"), ({"name": "a b"}, 422, "body.name"),
     ({"name": "x" * 65}, 422, "body.name"), ({"name": "ok", "extra": 1}, 422, "body.extra"),
     ({"name": "ok", "limits": {"max_live_models": "3"}}, 422, "body.limits.max_live_models.int"),
     ({"name": "ok", "limits": {"nope": 1}}, 400, "limits.nope"),
     ({"name": "ok", "limits": {"max_live_models": 0}}, 400, "limits.max_live_models"),
     ({"name": "ok", "limits": []}, 422, "body.limits")],
)
def test_create_tenant_bad_input(client: TestClient, body: dict, status: int, field: str) -> None:
    assert error(client.post(f"{A}/tenants", json=body, headers=ADMIN), status)["field"] == field
    assert "ok" not in [t["name"] for t in client.get(f"{A}/tenants", headers=ADMIN).json()["tenants"]]


def test_duplicate_and_unknown_tenants(client: TestClient) -> None:
    new_tenant(client, "twice")
    assert "exists already" in error(client.post(f"{A}/tenants", json={"name": "twice"}, headers=ADMIN), 409)["error"]
    error(client.post(f"{A}/tenants", content=b"{not json", headers=ADMIN), 422)
    for path in ("/tenants/nobody", "/tenants/nobody/limits"):
        assert "no tenant named 'nobody'" in error(client.get(A + path, headers=ADMIN), 404)["error"]


def test_get_and_replace_limits(client: TestClient) -> None:
    new_tenant(client, "limited", limits={"max_live_models": 2})
    assert client.get(f"{A}/tenants/limited/limits", headers=ADMIN).json() == {"max_live_models": 2}
    r = client.put(f"{A}/tenants/limited/limits", json={"max_lora_rank": 16, "tokens_per_second": 1000}, headers=ADMIN)
    assert r.status_code == 200 and r.json() == {"max_lora_rank": 16, "tokens_per_second": 1000.0}
    assert client.get(f"{A}/tenants/limited", headers=ADMIN).json()["limits"] == r.json()
    assert client.put(f"{A}/tenants/limited/limits", json={}, headers=ADMIN).json() == {}


@pytest.mark.parametrize(
    ("body", "status", "field"),
    [({"max_lora_rank": 0}, 400, "limits.max_lora_rank"), ({"max_lora_rank": 1.5}, 400, "limits.max_lora_rank"),
     ({"bogus": 1}, 400, "limits.bogus"), ({"max_lora_rank": None}, 422, "body.max_lora_rank.int"),
     ([1, 2], 422, "body"), ("3", 422, "body")],
)
def test_set_limits_bad_input(client: TestClient, body, status: int, field: str) -> None:
    if client.get(f"{A}/tenants/strict", headers=ADMIN).status_code == 404:
        new_tenant(client, "strict")
    assert error(client.put(f"{A}/tenants/strict/limits", json=body, headers=ADMIN), status)["field"] == field
    assert client.get(f"{A}/tenants/strict/limits", headers=ADMIN).json() == {}
    error(client.put(f"{A}/tenants/nobody/limits", json={"max_lora_rank": 4}, headers=ADMIN), 404)


# ----- keys --------------------------------------------------------------------------------------
def test_a_created_key_works_is_listed_without_its_secret_and_revocation_is_immediate(client: TestClient) -> None:
    new_tenant(client, "keyed")
    made = new_key(client, "keyed", label="ci")
    key = made["key"]
    assert key.startswith("tml-") and made["prefix"] == key[:12] and made["tenant"] == "keyed"
    assert made["label"] == "ci" and made["revoked_at"] is None and made["last_used_at"] is None

    assert create_session(client, key).status_code == 200  # and now it is in the key cache
    listed = client.get(f"{A}/keys", params={"tenant": "keyed"}, headers=ADMIN)
    assert key not in listed.text
    [row] = listed.json()["keys"]
    assert row["id"] == made["id"] and row["last_used_at"] is not None and "key" not in row
    assert client.get(f"{A}/tenants/keyed", headers=ADMIN).json()["active_keys"] == 1

    revoked = client.post(f"{A}/keys/{made['id']}/revoke", headers=ADMIN)
    assert revoked.status_code == 200 and revoked.json()["revoked_at"] is not None and key not in revoked.text
    body = error(create_session(client, key), 401)
    assert body["error"].startswith("unknown or revoked API key") and key not in str(body)
    again = client.post(f"{A}/keys/{made['id']}/revoke", headers=ADMIN).json()
    assert again["revoked_at"] == revoked.json()["revoked_at"]
    active = client.get(f"{A}/keys", params={"tenant": "keyed", "include_revoked": False}, headers=ADMIN)
    assert active.json() == {"keys": []}
    assert client.get(f"{A}/tenants/keyed", headers=ADMIN).json()["active_keys"] == 0


def test_a_tenant_may_hold_several_keys_and_they_share_its_runs(client: TestClient, holder_key: str) -> None:
    new_tenant(client, "multi")
    k1, k2 = new_key(client, "multi")["key"], new_key(client, "multi")["key"]
    assert k1 != k2
    session = create_session(client, k1).json()["session_id"]
    assert client.get(f"/api/v1/sessions/{session}", headers={"X-API-Key": k2}).status_code == 200
    error(client.get(f"/api/v1/sessions/{session}", headers={"X-API-Key": holder_key}), 404)  # another tenant


@pytest.mark.parametrize(
    ("body", "status", "field"),
    [({}, 422, "body.tenant"), ({"tenant": ""}, 422, "body.tenant"), ({"tenant": "nobody"}, 404, "tenant"),
     ({"tenant": "acme", "label": "x" * 201}, 422, "body.label"), ({"tenant": "acme", "key": "tml-mine"}, 422, "body.key")],
)
def test_create_key_bad_input(client: TestClient, body: dict, status: int, field: str) -> None:
    if client.get(f"{A}/tenants/acme", headers=ADMIN).status_code == 404:
        new_tenant(client, "acme")
    assert error(client.post(f"{A}/keys", json=body, headers=ADMIN), status)["field"] == field


def test_list_and_revoke_keys_bad_input(client: TestClient) -> None:
    assert error(client.get(f"{A}/keys", params={"tenant": "nobody"}, headers=ADMIN), 404)["field"] == "tenant"
    assert error(client.get(f"{A}/keys", params={"tenant": ""}, headers=ADMIN), 422)["field"] == "query.tenant"
    assert error(client.get(f"{A}/keys", params={"include_revoked": "maybe"}, headers=ADMIN), 422)["field"] == (
        "query.include_revoked"
    )
    assert error(client.post(f"{A}/keys/key-nope/revoke", headers=ADMIN), 404)["field"] == "key_id"


# ----- keys mode ---------------------------------------------------------------------------------
def test_keys_mode_refuses_unknown_keys_like_revoked_ones(client: TestClient) -> None:
    unknown = "tml-" + "u" * 43
    body = error(create_session(client, unknown), 401)
    assert body["error"] == "unknown or revoked API key: this server accepts registered keys only"
    assert unknown not in str(body)
    names = [t["name"] for t in client.get(f"{A}/tenants", headers=ADMIN).json()["tenants"]]
    assert not any(n.startswith("open-") for n in names)  # nobody was registered on the fly
    missing = error(client.post("/api/v1/create_session", json=SESSION), 401)["error"]
    assert "X-API-Key" in missing and "operator" in missing
    assert "tml-" in error(create_session(client, "not-a-key"), 401)["error"]


def test_a_key_revoked_outside_this_process_stops_within_the_cache_ttl(client: TestClient) -> None:
    rt: Runtime = client.app.state.runtime
    new_tenant(client, "cli-revoked")
    made = new_key(client, "cli-revoked")
    cache = rt.keys
    cache.seconds, saved = 0.5, cache.seconds
    try:
        assert create_session(client, made["key"]).status_code == 200
        rt.db.call(lambda s: tenants.revoke_key(s, made["id"]))  # what `twinkle keys revoke` does
        assert create_session(client, made["key"]).status_code == 200  # still cached
        time.sleep(0.6)
        error(create_session(client, made["key"]), 401)
    finally:
        cache.seconds = saved


# ----- open mode ---------------------------------------------------------------------------------
def test_open_mode_makes_a_tenant_per_key_and_honours_revocation(open_client: TestClient) -> None:
    rt: Runtime = open_client.app.state.runtime
    short, long = "tml-open-short", "tml-" + "L" * 40
    s1 = create_session(open_client, short).json()["session_id"]
    create_session(open_client, long)
    error(open_client.get(f"/api/v1/sessions/{s1}", headers={"X-API-Key": long}), 404)  # another tenant
    keys = {k.prefix: k for k in rt.db.call(lambda s: tenants.list_keys(s))}
    assert set(keys) == {None, long[:12]}  # a short key shows nothing of itself
    assert all(k.tenant.startswith("open-") for k in keys.values())
    rt.db.call(lambda s: tenants.revoke_key(s, keys[None].id))
    rt.keys.forget_key(keys[None].id)
    assert error(create_session(open_client, short), 401)["error"] == "unknown or revoked API key"
    missing = error(open_client.post("/api/v1/create_session", json=SESSION), 401)["error"]
    assert "any 'tml-…' value works here" in missing
