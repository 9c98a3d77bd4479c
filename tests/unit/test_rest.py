"""The REST surface in-process (FastAPI TestClient, SQLite, an engine that only reports its base
model: no weights are needed to manage checkpoint rows and files). Bad input, isolation, expiry,
signed links, the reaper; tests/integration/test_sdk_rest.py drives the happy paths with the SDK."""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from urllib.parse import urlsplit

import pydantic
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select
from tinker import types

from gateway.app import create_app
from schemas import tinker as s
from server import ids
from server.boot import build_runtime
from server.config import Settings
from server.errors import InvalidRequest, NotFound
from server.ops import signing
from server.ops.checkpoints import resolve_checkpoint
from server.ops.reaper import reap_expired
from server.runtime import Runtime
from server.store.tables import ApiKey, Checkpoint, Model, SamplingSession, utcnow
from server.store.tables import Session as SessionRow
from tests.support.engines import IdleEngine
from tests.support.http import error, local_client

KEY = {"X-API-Key": "tml-rest-test"}
OTHER = {"X-API-Key": "tml-rest-other"}
API = "/api/v1"


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    settings = Settings(data_dir=tmp_path_factory.mktemp("rest"), base_model="tiny-qwen3", long_poll_seconds=1)
    with local_client(create_app(build_runtime(settings, engine=IdleEngine()))) as c:
        yield c


def runtime(client: TestClient) -> Runtime:
    return client.app.state.runtime


def new_session(client: TestClient, headers: dict = KEY, **fields) -> str:
    body = {"sdk_version": "0.38.0", "tags": [], "user_metadata": {}, **fields}
    r = client.post(f"{API}/create_session", json=body, headers=headers)
    assert r.status_code == 200, r.text
    return r.json()["session_id"]


def tenant_of(client: TestClient, headers: dict) -> str:
    key_hash = ids.hash_key(headers["X-API-Key"])
    return runtime(client).db.call(lambda s: s.scalar(select(ApiKey.tenant_id).where(ApiKey.key_hash == key_hash)))


def new_run(client: TestClient, headers: dict = KEY) -> tuple[str, str]:
    """A session and a training run in it (rows only); returns (session_id, model_id)."""
    session_id = new_session(client, headers)
    tenant = tenant_of(client, headers)
    model_id = ids.model_id(session_id, 0)
    spec = {"rank": 4, "seed": 0, "alpha": 32.0, "train_attn": True, "train_mlp": True, "train_unembed": False}
    runtime(client).db.call(lambda s: s.add(Model(
        id=model_id, tenant_id=tenant, session_id=session_id, model_seq_id=0, base_model="tiny-qwen3",
        lora_rank=4, lora_spec=spec,
    )))
    return session_id, model_id


def add_checkpoint(
    client: TestClient, model_id: str, name: str, *, headers: dict = KEY, kind: str = "training", **fields
) -> tuple[str, Path]:
    """A checkpoint row and its folder (two small files); returns (tinker path, folder)."""
    rt, tenant = runtime(client), tenant_of(client, headers)
    ckpt_id = ids.new_id("ckpt")
    relative = f"checkpoints/{tenant}/{ckpt_id}"
    folder = rt.data_dir / relative
    folder.mkdir(parents=True)
    (folder / "adapter_model.safetensors").write_bytes(os.urandom(64))
    (folder / "adapter_config.json").write_text(json.dumps({"r": 4}))
    rt.db.call(lambda s: s.add(Checkpoint(
        id=ckpt_id, tenant_id=tenant, model_id=model_id, kind=kind, name=name, storage_dir=relative, size_bytes=74,
        **fields,
    )))
    return str(ids.TinkerPath(model_id, kind, name)), folder


def ckpt_url(path: str, action: str = "") -> str:
    parsed = ids.parse_tinker_path(path)
    return f"{API}/training_runs/{parsed.model_id}/checkpoints/{parsed.checkpoint_id}" + (f"/{action}" if action else "")


def local(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.path}?{parts.query}"


# ----- the wire shapes -----------------------------------------------------------------------------
NOW = utcnow()
RESPONSES = {
    "external_urls": (s.ExternalWeightsUrlsResponse(urls={"a.json": "http://x/a"}, expires=NOW),
                      types.ExternalWeightsUrlsResponse),
    "copy": (s.CopyWeightsResponse(tinker_path="tinker://m/weights/c"), types.CopyWeightsResponse),
    "sessions": (s.ListSessionsResponse(sessions=["sess-1"]), types.ListSessionsResponse),
    "session": (s.GetSessionResponse(training_run_ids=["m"], sampler_ids=["m:sample:0"], user_metadata={"a": "b"},
                                     display_name="d"), types.GetSessionResponse),
    "search": (s.SessionSearchResponse(
        sessions=[s.SessionSummary(session_id="sess-1", created_at=NOW, owner="o", project_id="p", checkpoints_count=2,
                                   status=s.SessionStatus(type="client_finished",
                                                          reason=s.ClientFinishReason(type="success"))),
                  s.SessionSummary(session_id="sess-2", created_at=NOW, owner="o", project_id="p", checkpoints_count=0,
                                   status=s.SessionStatus(type="active"))],
        next_cursor=s.SessionSearchCursor(last_created_at=NOW, last_session_id="sess-2")), types.SessionSearchResponse),
}


@pytest.mark.parametrize("ours,sdk_type", RESPONSES.values(), ids=RESPONSES.keys())
def test_new_responses_validate_with_sdk_types(ours: pydantic.BaseModel, sdk_type: type) -> None:
    sdk_type.model_validate(json.loads(ours.model_dump_json(exclude_none=True)))


def test_sdk_search_request_parses() -> None:
    request = types.SessionSearchRequest(display_name="night", owner=types.AccessibleSearchOwner(),
                                         statuses=[types.ClientFinishedSessionStatusQuery(reasons=["success"])])
    parsed = s.SessionSearchRequest.model_validate(request.model_dump(mode="json", exclude_none=True))
    assert parsed.owner.type == "accessible" and parsed.statuses[0].reasons == ["success"] and parsed.limit == 50


# ----- signed links ------------------------------------------------------------------------------
def test_signing_secret_is_created_once_private(tmp_path: Path) -> None:
    secret = signing.secret_for(tmp_path)
    path = tmp_path / signing.SECRET_FILE
    assert path.stat().st_mode & 0o777 == 0o600 and len(secret) >= 32
    signing.secret_for.cache_clear()
    assert signing.secret_for(tmp_path) == secret  # read back, not recreated
    assert list(tmp_path.iterdir()) == [path]  # no temp file left behind


def test_download_links_serve_the_files(client: TestClient) -> None:
    _, model_id = new_run(client)
    path, folder = add_checkpoint(client, model_id, "dl")
    body = client.get(ckpt_url(path, "external_weights_urls"), headers=KEY).json()
    assert sorted(body["urls"]) == ["adapter_config.json", "adapter_model.safetensors"]
    for name, url in body["urls"].items():
        r = client.get(local(url))  # no API key: the signature is the permission
        assert r.status_code == 200 and r.content == (folder / name).read_bytes()
    error(client.get(ckpt_url(path, "external_weights_urls"), headers=OTHER), 404)


def test_expired_signed_url_is_403(client: TestClient) -> None:
    _, model_id = new_run(client)
    path, _ = add_checkpoint(client, model_id, "old-link")
    row_id = runtime(client).db.call(lambda ss: resolve_checkpoint(ss, tenant_of(client, KEY), path).id)
    secret = signing.secret_for(runtime(client).data_dir)
    url = signing.signed_url(secret, "http://t/api/v1/signed/", f"checkpoints/{row_id}/adapter_config.json",
                             int(time.time()) - 1)
    assert "expired" in error(client.get(local(url)), 403)["error"]


def test_tampered_signed_url_is_403(client: TestClient) -> None:
    _, model_id = new_run(client)
    path, _ = add_checkpoint(client, model_id, "tamper")
    url = local(client.get(ckpt_url(path, "external_weights_urls"), headers=KEY).json()["urls"]["adapter_config.json"])
    good = client.get(url)
    assert good.status_code == 200
    target, query = url.split("?")
    sig = query.split("signature=")[1]
    flipped = sig[:-1] + ("A" if sig[-1] != "A" else "B")
    assert "signature" in error(client.get(f"{target}?{query.replace(sig, flipped)}"), 403)["error"]
    later = int(query.split("expires=")[1].split("&")[0]) + 3600
    error(client.get(f"{target}?expires={later}&signature={sig}"), 403)  # a longer life is a bad signature
    other_file = target.replace("adapter_config.json", "adapter_model.safetensors")
    error(client.get(f"{other_file}?{query}"), 403)
    error(client.get(target + "?expires=soon&signature=x"), 422)
    error(client.get(target), 422)


def test_validly_signed_path_outside_its_folder_is_404(client: TestClient) -> None:
    secret = signing.secret_for(runtime(client).data_dir)
    url = signing.signed_url(secret, "http://t/api/v1/signed/", "traces/../../url-signing.key", int(time.time()) + 60)
    error(client.get(local(url)), 404)


# ----- checkpoint management ---------------------------------------------------------------------
def test_delete_twice_is_404_the_second_time_and_removes_the_folder(client: TestClient) -> None:
    _, model_id = new_run(client)
    path, folder = add_checkpoint(client, model_id, "gone")
    error(client.delete(ckpt_url(path), headers=OTHER), 404)  # not theirs
    assert folder.exists()
    assert client.delete(ckpt_url(path), headers=KEY).status_code == 200
    assert not folder.exists()
    assert "not found" in error(client.delete(ckpt_url(path), headers=KEY), 404)["error"]
    listed = client.get(f"{API}/training_runs/{model_id}/checkpoints", headers=KEY).json()["checkpoints"]
    assert listed == []


def test_deleting_a_sampled_checkpoint_keeps_its_sampler_pointing_at_the_path(client: TestClient) -> None:
    session_id, model_id = new_run(client)
    path, _ = add_checkpoint(client, model_id, "sampled", kind="sampler")
    r = client.post(f"{API}/create_sampling_session",
                    json={"session_id": session_id, "sampling_session_seq_id": 0, "model_path": path}, headers=KEY)
    sampler_id = r.json()["sampling_session_id"]
    assert client.delete(ckpt_url(path), headers=KEY).status_code == 200
    row = runtime(client).db.call(lambda ss: ss.get(SamplingSession, sampler_id))
    assert row.checkpoint_id is None and row.model_path == path


def test_ttl_rejects_negative_zero_and_huge_values(client: TestClient) -> None:
    _, model_id = new_run(client)
    path, _ = add_checkpoint(client, model_id, "ttl")
    for bad in (-5, 0, 11 * 365 * 24 * 3600):
        body = error(client.put(ckpt_url(path, "ttl"), json={"ttl_seconds": bad}, headers=KEY), 400)
        assert body["field"] == "ttl_seconds" and str(bad) in body["error"]
    error(client.put(ckpt_url(path, "ttl"), json={"ttl_seconds": "soon"}, headers=KEY), 422)
    error(client.put(ckpt_url(path, "ttl"), json={}, headers=KEY), 422)
    assert client.put(ckpt_url(path, "ttl"), json={"ttl_seconds": 7200}, headers=KEY).status_code == 200
    (shown,) = client.get(f"{API}/training_runs/{model_id}/checkpoints", headers=KEY).json()["checkpoints"]
    assert shown["expires_at"] is not None
    assert client.put(ckpt_url(path, "ttl"), json={"ttl_seconds": None}, headers=KEY).status_code == 200
    (shown,) = client.get(f"{API}/training_runs/{model_id}/checkpoints", headers=KEY).json()["checkpoints"]
    assert "expires_at" not in shown
    error(client.put(ckpt_url(path, "ttl"), json={"ttl_seconds": 7200}, headers=OTHER), 404)


def test_publish_of_another_tenants_checkpoint_is_not_found(client: TestClient) -> None:
    _, model_id = new_run(client)
    path, _ = add_checkpoint(client, model_id, "mine")
    for method in ("post", "delete"):
        body = error(getattr(client, method)(ckpt_url(path, "publish"), headers=OTHER), 404)
        assert "not found" in body["error"] and body["field"] == "checkpoint_id"
    assert client.post(ckpt_url(path, "publish"), headers=KEY).status_code == 200
    error(client.post(ckpt_url(path, "publish"), headers=OTHER), 404)  # readable by them, still not theirs
    error(client.delete(ckpt_url(path), headers=OTHER), 404)


def test_published_checkpoint_is_readable_by_others_until_unpublished(client: TestClient) -> None:
    _, model_id = new_run(client)
    path, _ = add_checkpoint(client, model_id, "shared")
    info = lambda headers: client.post(f"{API}/weights_info", json={"tinker_path": path}, headers=headers)  # noqa: E731
    assert info(KEY).json()["lora_rank"] == 4
    assert error(info(OTHER), 404)["field"] == "tinker_path"
    assert client.post(ckpt_url(path, "publish"), headers=KEY).status_code == 200
    assert client.post(ckpt_url(path, "publish"), headers=KEY).status_code == 200  # idempotent
    assert info(OTHER).json() == {"base_model": "tiny-qwen3", "is_lora": True, "lora_rank": 4, "train_unembed": False,
                                  "train_mlp": True, "train_attn": True}
    theirs = client.get(f"{API}/training_runs/{model_id}/checkpoints", headers=OTHER).json()["checkpoints"]
    assert [c["tinker_path"] for c in theirs] == [path] and theirs[0]["public"] is True
    error(client.get(f"{API}/training_runs/{model_id}", headers=OTHER), 404)  # owned scope
    run = client.get(f"{API}/training_runs/{model_id}", params={"access_scope": "accessible"}, headers=OTHER).json()
    assert run["last_checkpoint"]["tinker_path"] == path
    accessible = client.get(f"{API}/training_runs", params={"access_scope": "accessible", "limit": 1000},
                            headers=OTHER).json()
    assert model_id in [r["training_run_id"] for r in accessible["training_runs"]]
    assert client.delete(ckpt_url(path, "publish"), headers=KEY).status_code == 200
    error(info(OTHER), 404)
    error(client.get(f"{API}/training_runs/{model_id}/checkpoints", headers=OTHER), 404)


@pytest.mark.parametrize("checkpoint_id", ["weights", "bogus/name", "weights/a/b"])
def test_malformed_checkpoint_id_is_400(client: TestClient, checkpoint_id: str) -> None:
    _, model_id = new_run(client)
    body = error(client.delete(f"{API}/training_runs/{model_id}/checkpoints/{checkpoint_id}", headers=KEY),
                 400 if checkpoint_id != "weights/a/b" else 404)
    if checkpoint_id != "weights/a/b":
        assert body["field"] == "checkpoint_id" and "weights/" in body["error"]
    if checkpoint_id == "bogus/name":  # ("weights/ttl" would be the checkpoint named "ttl")
        error(client.put(f"{API}/training_runs/{model_id}/checkpoints/{checkpoint_id}/ttl", json={"ttl_seconds": 9},
                         headers=KEY), 400)
    body = error(client.post(f"{API}/weights_info", json={"tinker_path": f"tinker://{model_id}/{checkpoint_id}"},
                             headers=KEY), 400)
    assert body["field"] == "tinker_path"


def test_expired_checkpoints_vanish_at_once_and_the_reaper_removes_them(client: TestClient) -> None:
    session_id, model_id = new_run(client)
    past = utcnow() - timedelta(seconds=1)
    path, folder = add_checkpoint(client, model_id, "expired", expires_at=past, public=True)
    kept, kept_folder = add_checkpoint(client, model_id, "kept", expires_at=utcnow() + timedelta(hours=1))
    shown = lambda: [c["tinker_path"] for c in client.get(f"{API}/checkpoints", headers=KEY).json()["checkpoints"]]  # noqa: E731
    assert path not in shown() and kept in shown()
    run_list = client.get(f"{API}/training_runs/{model_id}/checkpoints", headers=KEY).json()["checkpoints"]
    assert [c["tinker_path"] for c in run_list] == [kept]
    for headers in (KEY, OTHER):
        error(client.post(f"{API}/weights_info", json={"tinker_path": path}, headers=headers), 404)
    error(client.delete(ckpt_url(path), headers=KEY), 404)
    error(client.put(ckpt_url(path, "ttl"), json={"ttl_seconds": None}, headers=KEY), 404)  # no resurrection
    r = client.post(f"{API}/create_sampling_session",
                    json={"session_id": session_id, "sampling_session_seq_id": 1, "model_path": kept}, headers=KEY)
    assert r.status_code == 200
    rt = runtime(client)
    rt.db.call(lambda ss: setattr(ss.get(Checkpoint, ss.scalar(select(Checkpoint.id).where(
        Checkpoint.model_id == model_id, Checkpoint.name == "kept"))), "expires_at", past))
    assert asyncio.run(reap_expired(rt)) >= 2
    assert not folder.exists() and not kept_folder.exists()
    assert rt.db.call(lambda ss: ss.scalars(select(Checkpoint).where(Checkpoint.model_id == model_id)).all()) == []
    sampler = rt.db.call(lambda ss: ss.get(SamplingSession, ids.sampling_session_id(session_id, 1)))
    assert sampler.checkpoint_id is None and sampler.model_path == kept
    assert asyncio.run(reap_expired(rt)) == 0


def test_the_reaper_removes_an_older_servers_ephemeral_folders_once_their_session_ended(client: TestClient) -> None:
    """Before in-memory versions, save_weights_and_get_sampling_client wrote a folder per call."""
    session_id, model_id = new_run(client)
    _, live_folder = add_checkpoint(client, model_id, "ephemeral-1", kind="sampler", ephemeral=True)
    _, named_folder = add_checkpoint(client, model_id, "named", kind="sampler")
    rt = runtime(client)
    asyncio.run(reap_expired(rt))
    assert live_folder.exists()  # its session still runs: a sampling client may still use it
    rt.db.call(lambda ss: setattr(ss.get(SessionRow, session_id), "finished_at", utcnow()))
    assert asyncio.run(reap_expired(rt)) == 1
    assert not live_folder.exists() and named_folder.exists()


def test_resolve_checkpoint_names_its_field(client: TestClient) -> None:
    _, model_id = new_run(client)
    path, _ = add_checkpoint(client, model_id, "resolve")
    rt, mine, theirs = runtime(client), tenant_of(client, KEY), tenant_of(client, OTHER)
    assert rt.db.call(lambda ss: resolve_checkpoint(ss, mine, path)).name == "resolve"
    with pytest.raises(NotFound) as nf:
        rt.db.call(lambda ss: resolve_checkpoint(ss, theirs, path, field="model_path"))
    assert nf.value.field == "model_path"
    with pytest.raises(InvalidRequest) as bad:
        rt.db.call(lambda ss: resolve_checkpoint(ss, mine, "tinker://x/y", field="source_path"))
    assert bad.value.field == "source_path"


# ----- copies ------------------------------------------------------------------------------------
def test_copy_weights_bad_input(client: TestClient) -> None:
    _, model_id = new_run(client)
    path, _ = add_checkpoint(client, model_id, "src")
    copy = lambda body, headers=KEY: client.post(f"{API}/copy_weights", json=body, headers=headers)  # noqa: E731
    assert error(copy({"source_path": path}), 400)["field"] == "destination_project_id"
    assert error(copy({"source_path": path, "session_id": "sess-x"}), 400)["field"] == "model_seq_id"
    assert error(copy({"source_path": path, "destination_project_id": "p", "ttl_seconds": -1}), 400)["field"] == "ttl_seconds"
    assert error(copy({"source_path": path, "destination_project_id": "p"}, OTHER), 404)["field"] == "source_path"
    assert error(copy({"source_path": "nope", "destination_project_id": "p"}), 400)["field"] == "source_path"
    error(copy({"destination_project_id": "p"}), 422)


def test_copy_is_idempotent_per_key_and_shares_bytes(client: TestClient) -> None:
    _, model_id = new_run(client)
    path, folder = add_checkpoint(client, model_id, "src", user_metadata={"step": "3"})
    headers = {**KEY, "X-Idempotency-Key": "copy-1"}
    body = {"source_path": path, "destination_project_id": "archive", "ttl_seconds": 3600}
    first = client.post(f"{API}/copy_weights", json=body, headers=headers).json()["tinker_path"]
    assert client.post(f"{API}/copy_weights", json=body, headers=headers).json()["tinker_path"] == first
    assert first.endswith("/weights/src") and not first.startswith(f"tinker://{model_id}/")
    copy_run = ids.parse_tinker_path(first).model_id
    (listed,) = client.get(f"{API}/training_runs/{copy_run}/checkpoints", headers=KEY).json()["checkpoints"]
    assert listed["expires_at"] is not None and listed["user_metadata"] == {"step": "3"}
    url = local(client.get(ckpt_url(first, "external_weights_urls"), headers=KEY).json()["urls"]["adapter_model.safetensors"])
    assert client.get(url).content == (folder / "adapter_model.safetensors").read_bytes()
    assert (folder / "adapter_model.safetensors").stat().st_nlink == 2  # a hard link, not a second copy
    assert client.delete(ckpt_url(path), headers=KEY).status_code == 200
    assert client.get(url).status_code == 200  # the copy outlives its source
    projects = client.get(f"{API}/training_runs", params={"project_id": "archive", "limit": 1000}, headers=KEY).json()
    assert copy_run in [r["training_run_id"] for r in projects["training_runs"]]
    assert runtime(client).db.call(lambda ss: ss.get(Model, copy_run).copied_from) == path


# ----- sessions ----------------------------------------------------------------------------------
def test_sessions_are_tenant_scoped(client: TestClient) -> None:
    session_id, model_id = new_run(client)
    error(client.get(f"{API}/sessions/{session_id}", headers=OTHER), 404)
    error(client.put(f"{API}/sessions/{session_id}/project", json={"project_id": "p"}, headers=OTHER), 404)
    error(client.get(f"{API}/sessions/{session_id}/trace_export", headers=OTHER), 404)
    assert session_id not in client.get(f"{API}/sessions", params={"limit": 1000}, headers=OTHER).json()["sessions"]
    found = client.post(f"{API}/sessions/search", json={"session_id": session_id}, headers=OTHER).json()
    assert found == {"sessions": []}
    got = client.get(f"{API}/sessions/{session_id}", headers=KEY).json()
    assert got["training_run_ids"] == [model_id] and got["sampler_ids"] == []


def test_session_bad_input(client: TestClient) -> None:
    session_id = new_session(client)
    assert "project_id" in error(client.put(f"{API}/sessions/{session_id}/project", json={"project_id": ""},
                                            headers=KEY), 422)["field"]
    error(client.put(f"{API}/sessions/{session_id}/project", json={}, headers=KEY), 422)
    error(client.get(f"{API}/sessions", params={"access_scope": "everyone"}, headers=KEY), 422)
    error(client.get(f"{API}/sessions", params={"limit": -1}, headers=KEY), 422)
    error(client.post(f"{API}/sessions/search", json={"limit": 0}, headers=KEY), 422)
    error(client.post(f"{API}/sessions/search", json={"owner": {"type": "user"}}, headers=KEY), 422)


def test_session_search_filters_and_pages(client: TestClient) -> None:
    made = [new_session(client, display_name=f"Nightly run {i}", user_metadata={"batch": "b7"}) for i in range(3)]
    search = lambda **body: client.post(f"{API}/sessions/search", json=body, headers=KEY).json()  # noqa: E731
    first = search(display_name="nightly RUN", user_metadata={"batch": "b7"}, limit=2)
    assert [x["session_id"] for x in first["sessions"]] == made[::-1][:2]
    assert first["sessions"][0]["status"] == {"type": "active"} and first["sessions"][0]["project_id"] == "default"
    rest = search(display_name="nightly", user_metadata={"batch": "b7"}, limit=2, cursor=first["next_cursor"])
    assert [x["session_id"] for x in rest["sessions"]] == [made[0]] and "next_cursor" not in rest
    client.post(f"{API}/sessions/{made[1]}/finish", json={"reason": {"type": "success"}}, headers=KEY)
    done = search(user_metadata={"batch": "b7"}, statuses=[{"type": "client_finished", "reasons": ["success"]}])
    assert [x["session_id"] for x in done["sessions"]] == [made[1]]
    assert done["sessions"][0]["status"] == {"type": "client_finished", "reason": {"type": "success"}}
    client.put(f"{API}/sessions/{made[2]}/project", json={"project_id": "p9"}, headers=KEY)
    assert [x["session_id"] for x in search(project_ids=["p9"])["sessions"]] == [made[2]]


def test_trace_export_lists_the_sessions_operations(client: TestClient) -> None:
    session_id = new_session(client)
    r = client.post(f"{API}/create_sampling_session",
                    json={"session_id": session_id, "sampling_session_seq_id": 0, "base_model": "tiny-qwen3"}, headers=KEY)
    sampler_id = r.json()["sampling_session_id"]
    client.post(f"{API}/asample", headers=KEY, json={
        "sampling_session_id": sampler_id, "seq_id": 1, "num_samples": 1,
        "prompt": {"chunks": [{"type": "encoded_text", "tokens": [5, 6]}]}, "sampling_params": {"max_tokens": 2}})
    export = client.get(f"{API}/sessions/{session_id}/trace_export", headers=KEY).json()
    assert export["status"] == "ready"
    trace = client.get(local(export["url"])).json()
    (op,) = [e for e in trace["traceEvents"] if e["ph"] == "X"]
    assert op["name"] == "sample" and op["args"]["seq_id"] == 1 and op["args"]["request_id"].startswith("req")
    assert op["args"]["state"] in ("pending", "done", "failed") and op["dur"] >= 0
    assert trace["otherData"]["session_id"] == session_id


def test_trace_export_includes_the_sessions_custom_loss_uploads(client: TestClient) -> None:
    # Uploads have a scope of their own (their seq_ids would collide with model_seq_ids), which
    # the export once left out.
    from tinker.lib.public_interfaces.custom_loss import encode_graph, trace_loss

    def neg_ll(logprobs, weights):
        return -(logprobs * weights).sum(), {}

    session_id = new_session(client)
    handle = trace_loss(neg_ll, {"logprobs": 1, "weights": 1}, session_id)
    r = client.post(f"{API}/create_custom_loss", headers=KEY, json={
        "session_id": session_id, "custom_loss_seq_id": 0, "name": "neg_ll",
        "inputs": [i.model_dump() for i in handle.inputs], "graph": encode_graph(handle).model_dump(mode="json")})
    assert r.status_code == 200, r.text
    request_id = r.json()["request_id"]
    done = client.post(f"{API}/retrieve_future", json={"request_id": request_id}, headers=KEY)
    assert done.status_code == 200 and "loss_id" in done.json(), done.text
    export = client.get(f"{API}/sessions/{session_id}/trace_export", headers=KEY).json()
    trace = client.get(local(export["url"])).json()
    (op,) = [e for e in trace["traceEvents"] if e["ph"] == "X"]
    assert (op["name"], op["args"]["request_id"], op["args"]["state"]) == ("create_custom_loss", request_id, "done")
    assert op["args"]["scope"] == f"session:{session_id}:custom_loss"


# ----- the hosted service's endpoints ------------------------------------------------------------
@pytest.mark.parametrize("method,path", [("GET", "/audit"), ("GET", "/billing/usage/events"),
                                         ("GET", "/billing/usage/checkpoints/current"), ("GET", "/auth/apikey/me"),
                                         ("DELETE", "/auth/apikey/me")])
def test_hosted_only_endpoints_are_a_clear_404(client: TestClient, method: str, path: str) -> None:
    body = error(client.request(method, f"{API}{path}", headers=KEY), 404)
    assert body["error"] == f"{method} /api/v1{path} is a hosted-service endpoint this server does not offer"


# ----- the schema change -------------------------------------------------------------------------
def test_migration_0002_upgrades_a_0001_database_with_rows(tmp_path: Path) -> None:
    from alembic import command
    from alembic.config import Config as AlembicConfig
    from sqlalchemy import inspect, text

    from server.store.database import MIGRATIONS_DIR, make_engine, migrate

    engine = make_engine(f"sqlite:///{tmp_path / 'old.db'}")
    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "0001")
        conn.execute(text("INSERT INTO tenants (id, name, key_hash, created_at) VALUES ('t', 't', 'h', '2025-01-01')"))
        conn.execute(text("INSERT INTO sessions (id, tenant_id, tags, user_metadata, created_at, last_heartbeat_at) "
                          "VALUES ('s', 't', '[]', '{}', '2025-01-01', '2025-01-01')"))
        conn.execute(text("INSERT INTO models (id, tenant_id, session_id, model_seq_id, base_model, lora_rank, lora_spec, "
                          "user_metadata, created_at, last_request_at) "
                          "VALUES ('s:train:0', 't', 's', 0, 'b', 4, '{}', '{}', '2025-01-01', '2025-01-01')"))
    migrate(engine)
    with engine.connect() as conn:
        assert conn.execute(text("SELECT id, copied_from FROM models")).all() == [("s:train:0", None)]
    assert "ix_checkpoints_expires_at" in {i["name"] for i in inspect(engine).get_indexes("checkpoints")}
    engine.dispose()


@pytest.mark.parametrize("path", ["/training_runs", "/sessions", "/checkpoints", "/twinkle/training_runs"])
def test_an_offset_past_64_bits_is_a_4xx_naming_it(client: TestClient, path: str) -> None:
    """Found by schemathesis: SQLite (and PostgreSQL) take no integer past 64 bits."""
    answer = client.get(f"{API}{path}?offset={2**64}", headers={**KEY, "Authorization": "Bearer tml-rest-test"})
    assert answer.status_code == 422 and "query.offset" in answer.text and "Traceback" not in answer.text
