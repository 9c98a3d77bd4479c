"""The native Twinkle API's service and management routes in-process (FastAPI TestClient, SQLite,
an engine that only reports its base model): keys in either header, twinkle_client's shapes with
status exactly 200, {"detail", "field"} errors, and tenant isolation. The real client drives the
same routes in tests/integration/test_twinkle_client.py."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from gateway.app import create_app
from server import ids
from server.boot import build_runtime
from server.config import Settings
from server.ops.native_service import NATIVE_SDK, NATIVE_TAG
from server.runtime import Runtime
from server.store.tables import ApiKey, Checkpoint, Model
from server.store.tables import Session as SessionRow
from tests.support.engines import IdleEngine
from tests.support.http import local_client

KEY = "tml-native-service"
OTHER = "tml-native-service-other"
API = "/api/v1/twinkle"


def auth(key: str = KEY) -> dict[str, str]:
    """As twinkle_client sends it: both headers."""
    return {"Twinkle-Authorization": f"Bearer {key}", "Authorization": f"Bearer {key}"}


H, H2 = auth(), auth(OTHER)


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    settings = Settings(data_dir=tmp_path_factory.mktemp("native-service"), base_model="tiny-qwen3")
    with local_client(create_app(build_runtime(settings, engine=IdleEngine()))) as c:
        yield c


def runtime(client: TestClient) -> Runtime:
    return client.app.state.runtime


def ok(response) -> dict:
    assert response.status_code == 200, response.text  # TwinkleClient accepts exactly 200
    return response.json()


def detail(response, status: int) -> dict:
    """A native error: {"detail": <message>, "field": ...}, no traceback."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"detail", "field"} and isinstance(body["detail"], str) and body["detail"]
    assert "Traceback" not in response.text
    return body


def new_session(client: TestClient, headers: dict = H, metadata: dict | None = None) -> str:
    return ok(client.post(f"{API}/create_session", json={"metadata": metadata}, headers=headers))["session_id"]


def tenant_of(client: TestClient, key: str) -> str:
    query = select(ApiKey.tenant_id).where(ApiKey.key_hash == ids.hash_key(key))
    return runtime(client).db.call(lambda s: s.scalar(query))


def new_run(client: TestClient, adapter: str = "A", headers: dict = H, key: str = KEY) -> tuple[str, str]:
    """A native session and its adapter's training run (rows only): (session_id, run_id)."""
    session_id = new_session(client, headers)
    run_id, tenant = ids.native_model_id(session_id, adapter), tenant_of(client, key)
    spec = {"rank": 8, "seed": 0, "alpha": 16.0, "train_attn": True, "train_mlp": True, "train_unembed": False}
    runtime(client).db.call(lambda s: s.add(Model(
        id=run_id, tenant_id=tenant, session_id=session_id, model_seq_id=0, base_model="tiny-qwen3", lora_rank=8,
        lora_spec=spec,
    )))
    return session_id, run_id


def add_checkpoint(client: TestClient, run_id: str, name: str, kind: str = "training", key: str = KEY,
                   size_bytes: int | None = 1234) -> str:
    """A checkpoint row (no folder: nothing here reads one); returns its twinkle:// path."""
    tenant, ckpt = tenant_of(client, key), ids.new_id("ckpt")
    runtime(client).db.call(lambda s: s.add(Checkpoint(
        id=ckpt, tenant_id=tenant, model_id=run_id, kind=kind, name=name, storage_dir=f"checkpoints/{tenant}/{ckpt}",
        size_bytes=size_bytes,
    )))
    return ids.TinkerPath(run_id, kind, name).twinkle


# ----- keys --------------------------------------------------------------------------------------
def test_the_key_goes_in_twinkle_authorization_or_authorization(client: TestClient) -> None:
    url = f"{API}/get_server_capabilities"
    ok(client.get(url, headers={"Twinkle-Authorization": f"Bearer {KEY}"}))
    ok(client.get(url, headers={"Authorization": f"Bearer {KEY}"}))
    # Twinkle-Authorization wins, as on Twinkle's server: a wrong Authorization beside it is not read.
    ok(client.get(url, headers={"Twinkle-Authorization": f"Bearer {KEY}", "Authorization": "Bearer junk"}))


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Basic dG1sLXg6"}, {"Twinkle-Authorization": "Bearer"},
                                     auth("EMPTY_TOKEN"), auth("not-a-tml-key")])
def test_a_missing_or_bad_key_is_401_with_a_detail(client: TestClient, headers: dict) -> None:
    detail(client.get(f"{API}/get_server_capabilities", headers=headers), 401)
    detail(client.post(f"{API}/create_session", json={}, headers=headers), 401)
    detail(client.post("/api/v1/sampler/tiny-qwen3/twinkle/create", json={}, headers=headers), 401)


# ----- sessions and the server -------------------------------------------------------------------
def test_a_session_is_a_session_row_tagged_native_with_the_metadata(client: TestClient) -> None:
    session_id = new_session(client, metadata={"experiment": "e1", "n": 3})
    row = runtime(client).db.call(lambda s: s.get(SessionRow, session_id))
    assert row.tags == [NATIVE_TAG] and row.sdk_version == NATIVE_SDK
    assert row.user_metadata == {"experiment": "e1", "n": 3}
    assert ok(client.post(f"{API}/create_session", headers=H))["session_id"]  # no body at all: no metadata


def test_heartbeats_keep_a_session_and_unknown_or_ended_ones_are_404(client: TestClient) -> None:
    session_id = new_session(client)
    assert ok(client.post(f"{API}/session_heartbeat", json={"session_id": session_id}, headers=H)) == {}
    assert detail(client.post(f"{API}/session_heartbeat", json={"session_id": "sess-nope"}, headers=H), 404)["field"] \
        == "session_id"
    detail(client.post(f"{API}/session_heartbeat", json={"session_id": session_id}, headers=H2), 404)  # not theirs
    finish = client.post(f"/api/v1/sessions/{session_id}/finish", json={"reason": {"type": "success"}},
                         headers={"X-API-Key": KEY})
    assert finish.status_code == 200, finish.text
    # Ended: 404, never 410 (which twinkle_client turns into StopIteration).
    assert "finished" in detail(client.post(f"{API}/session_heartbeat", json={"session_id": session_id}, headers=H),
                                404)["detail"]
    detail(client.post(f"{API}/session_heartbeat", json={}, headers=H), 422)


def test_capabilities_health_and_capacity(client: TestClient) -> None:
    capabilities = ok(client.get(f"{API}/get_server_capabilities", headers=H))
    assert capabilities == {"supported_models": [{"model_name": "tiny-qwen3"}]}
    assert ok(client.get(f"{API}/healthz")) == {"status": "ok"}  # no key needed, as on Twinkle
    capacity = ok(client.get(f"{API}/capacity_info", headers=H))
    limit = runtime(client).settings.max_live_models
    assert capacity == {"max_loras": limit, "used_loras": 0, "free_loras": limit}


# ----- training runs and checkpoints -------------------------------------------------------------
def test_runs_and_checkpoints_in_twinkle_clients_shapes(client: TestClient) -> None:
    session_id, run_id = new_run(client, "my adapter!")
    assert run_id == f"{session_id}-my_adapter_"
    first = add_checkpoint(client, run_id, "final", size_bytes=None)
    last = add_checkpoint(client, run_id, "20240101_000000", kind="sampler")
    runs = ok(client.get(f"{API}/training_runs", params={"limit": 100}, headers=H))
    run = next(r for r in runs["training_runs"] if r["training_run_id"] == run_id)
    assert run["base_model"] == "tiny-qwen3" and run["lora_rank"] == 8 and run["model_owner"]
    assert run["last_checkpoint"]["twinkle_path"] == first
    assert run["last_sampler_checkpoint"]["twinkle_path"] == last
    assert set(runs["cursor"]) == {"limit", "offset", "total_count"}
    assert ok(client.get(f"{API}/training_runs/{run_id}", headers=H))["training_run_id"] == run_id
    checkpoints = ok(client.get(f"{API}/training_runs/{run_id}/checkpoints", headers=H))["checkpoints"]
    assert [c["twinkle_path"] for c in checkpoints] == [first, last]  # oldest first: the client takes [-1]
    assert [c["checkpoint_id"] for c in checkpoints] == ["weights/final", "sampler_weights/20240101_000000"]
    assert all(type(c["size_bytes"]) is int for c in checkpoints) and checkpoints[0]["size_bytes"] == 0
    assert checkpoints[1]["checkpoint_type"] == "sampler" and checkpoints[1]["base_model"] == "tiny-qwen3"


def test_checkpoint_path_names_the_checkpoint_never_a_server_path(client: TestClient) -> None:
    _, run_id = new_run(client)
    path = add_checkpoint(client, run_id, "step-1")
    answer = ok(client.get(f"{API}/checkpoint_path/{run_id}/weights/step-1", headers=H))
    assert answer == {"path": "", "twinkle_path": path}
    missing = client.get(f"{API}/checkpoint_path/{run_id}/weights/nope", headers=H)
    assert detail(missing, 404)["field"] == "checkpoint_id"
    assert detail(client.get(f"{API}/checkpoint_path/{run_id}/step-1", headers=H), 400)["field"] == "checkpoint_id"
    detail(client.get(f"{API}/checkpoint_path/{run_id}/weights/step-1", headers=H2), 404)


def test_delete_a_checkpoint(client: TestClient) -> None:
    _, run_id = new_run(client)
    add_checkpoint(client, run_id, "gone-soon")
    url = f"{API}/training_runs/{run_id}/checkpoints/weights/gone-soon"
    detail(client.delete(url, headers=H2), 404)  # another tenant's: not found, and not deleted
    answer = ok(client.delete(url, headers=H))
    assert answer["success"] is True and "weights/gone-soon" in answer["message"]
    detail(client.delete(url, headers=H), 404)
    assert ok(client.get(f"{API}/training_runs/{run_id}/checkpoints", headers=H))["checkpoints"] == []


def test_weights_info_in_both_shapes_the_client_knows(client: TestClient) -> None:
    _, run_id = new_run(client)
    path = add_checkpoint(client, run_id, "w")
    info = ok(client.post(f"{API}/weights_info", json={"twinkle_path": path}, headers=H))
    assert info["training_run_id"] == run_id and info["base_model"] == "tiny-qwen3" and info["lora_rank"] == 8
    assert info["is_lora"] is True and info["train_unembed"] is False and info["model_owner"]
    assert info["weights_info"] == {k: v for k, v in info.items() if k != "weights_info"}
    tinker = path.replace("twinkle://", "tinker://")  # the same checkpoint
    assert ok(client.post(f"{API}/weights_info", json={"twinkle_path": tinker}, headers=H))["training_run_id"] == run_id
    assert detail(client.post(f"{API}/weights_info", json={"twinkle_path": path}, headers=H2), 404)["field"] \
        == "twinkle_path"
    assert detail(client.post(f"{API}/weights_info", json={"twinkle_path": "/etc/passwd"}, headers=H), 400)["field"] \
        == "twinkle_path"


def test_another_tenants_runs_are_not_listed_or_found(client: TestClient) -> None:
    _, run_id = new_run(client)
    listed = ok(client.get(f"{API}/training_runs", params={"limit": 1000}, headers=H2))["training_runs"]
    assert run_id not in {r["training_run_id"] for r in listed}
    assert detail(client.get(f"{API}/training_runs/{run_id}", headers=H2), 404)["detail"]
    detail(client.get(f"{API}/training_runs/{run_id}/checkpoints", headers=H2), 404)
    detail(client.get(f"{API}/training_runs", params={"limit": -1}, headers=H), 422)


# ----- the OpenAI bridge and unknown paths -------------------------------------------------------
def test_the_openai_bridge_is_mounted_at_api_v1_without_shadowing_unknown_paths(client: TestClient) -> None:
    models = ok(client.get("/api/v1/models", headers={"Authorization": f"Bearer {KEY}"}))
    assert models["object"] == "list" and models["data"][0]["id"] == "tiny-qwen3"
    # The Tinker API's own answer to an unknown path, not the OpenAI API's catch-all.
    unknown = client.get("/api/v1/no-such-endpoint", headers={"X-API-Key": KEY})
    assert unknown.status_code == 404 and "category" in unknown.json()
    assert client.get("/v1/no-such-endpoint").json()["error"]["code"] == "unknown_url"


def test_no_answer_holds_nan(client: TestClient) -> None:
    _, run_id = new_run(client)
    add_checkpoint(client, run_id, "x")
    for url in (f"{API}/training_runs", f"{API}/training_runs/{run_id}", f"{API}/training_runs/{run_id}/checkpoints",
                f"{API}/capacity_info"):
        answer = client.get(url, headers=H)
        ok(answer)
        json.loads(answer.text, parse_constant=lambda c, url=url: pytest.fail(f"{url} sent {c}"))
