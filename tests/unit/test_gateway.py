"""The HTTP surface in-process (FastAPI TestClient, real runtime on tiny-qwen3, SQLite): status
codes and JSON error bodies for bad input; the SDK-driven tests cover the happy paths."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from gateway.app import create_app
from server import ids
from server.boot import build_runtime
from server.config import Settings
from tests.support.http import local_client

KEY = {"X-API-Key": "tml-gateway-test"}
OTHER = {"X-API-Key": "tml-gateway-other"}


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[TestClient]:
    data_dir = tmp_path_factory.mktemp("gateway")
    (data_dir / "models").symlink_to(tiny_model_dir.parent)
    settings = Settings(data_dir=data_dir, base_model="tiny-qwen3", torch_threads=1, long_poll_seconds=2)
    with local_client(create_app(build_runtime(settings))) as c:
        yield c


def error(response, status: int) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) >= {"error", "category"} and body["category"] in ("user", "server")
    assert "Traceback" not in response.text
    return body


def session(client: TestClient, headers: dict = KEY) -> str:
    r = client.post("/api/v1/create_session", json={"sdk_version": "0.38.0", "tags": [], "user_metadata": {}}, headers=headers)
    assert r.status_code == 200
    return r.json()["session_id"]


def test_client_config_turns_on_what_the_server_implements(client: TestClient) -> None:
    body = client.post("/api/v1/client/config", json={"sdk_version": "0.38.0"}).json()
    assert body["parallel_fwdbwd_chunks"] is True and body["proto_compress_fwdbwd"] is True
    assert body["sample_use_retrieve_futures"] is True and body["custom_loss_server_side"] is True
    assert body["pjwt_auth_enabled"] is False and body["sample_join_sampling_session"] is False
    dynamic = client.post("/api/v1/client/dynamic_config", json={"sdk_version": "0.38.0"}).json()
    assert dynamic["sample_cancel_enabled"] is True
    assert client.get("/api/v1/healthz").json() == {"status": "ok"}


def test_missing_or_malformed_key_is_401(client: TestClient) -> None:
    assert "X-API-Key" in error(client.post("/api/v1/create_session", json={"sdk_version": "x"}), 401)["error"]
    body = error(client.post("/api/v1/create_session", json={"sdk_version": "x"}, headers={"X-API-Key": "abc"}), 401)
    assert "tml-" in body["error"]


def test_unknown_route_and_bad_json_are_json_errors(client: TestClient) -> None:
    error(client.get("/api/v1/nope", headers=KEY), 404)
    body = error(client.post("/api/v1/create_model", content=b"{not json", headers=KEY), 422)
    assert body["field"].startswith("body")
    body = error(client.post("/api/v1/create_model", json={"session_id": "s"}, headers=KEY), 422)
    assert "model_seq_id" in body["error"] and "base_model" in body["error"]


def test_heartbeat_unknown_finished_and_foreign_sessions(client: TestClient) -> None:
    sid = session(client)
    assert client.post("/api/v1/session_heartbeat", json={"session_id": sid}, headers=KEY).status_code == 200
    error(client.post("/api/v1/session_heartbeat", json={"session_id": sid}, headers=OTHER), 404)
    error(client.post("/api/v1/session_heartbeat", json={"session_id": "sess-nope"}, headers=KEY), 404)
    finish = client.post(f"/api/v1/sessions/{sid}/finish", json={"reason": {"type": "success"}, "detail": None}, headers=KEY)
    assert finish.status_code == 200
    assert "finished" in error(client.post("/api/v1/session_heartbeat", json={"session_id": sid}, headers=KEY), 410)["error"]


def test_create_model_checks_base_model_and_rank(client: TestClient) -> None:
    sid = session(client)
    body = {"session_id": sid, "model_seq_id": 0, "base_model": "other/model", "lora_config": {"rank": 8}}
    assert error(client.post("/api/v1/create_model", json=body, headers=KEY), 400)["field"] == "base_model"
    body.update(base_model="tiny-qwen3", lora_config={"rank": 100_000})
    assert error(client.post("/api/v1/create_model", json=body, headers=KEY), 400)["field"] == "lora_config.rank"
    body.update(lora_config={"rank": 0})
    assert "rank" in error(client.post("/api/v1/create_model", json=body, headers=KEY), 422)["field"]


def test_unknown_objects_are_404(client: TestClient) -> None:
    error(client.post("/api/v1/get_info", json={"model_id": "sess-x:train:0"}, headers=KEY), 404)
    error(client.post("/api/v1/retrieve_future", json={"request_id": "req-nope"}, headers=KEY), 404)
    error(client.get("/api/v1/samplers/sess-x:sample:0", headers=KEY), 404)
    error(client.get("/api/v1/training_runs/sess-x:train:0/checkpoints", headers=KEY), 404)
    sid = session(client)
    body = {"session_id": sid, "sampling_session_seq_id": 0, "model_path": "tinker://sess-x:train:0/sampler_weights/a"}
    error(client.post("/api/v1/create_sampling_session", json=body, headers=KEY), 404)
    body["model_path"] = "http://elsewhere/x"
    assert error(client.post("/api/v1/create_sampling_session", json=body, headers=KEY), 400)["field"] == "model_path"


def test_sample_rejects_bad_options_and_oversized_requests(client: TestClient) -> None:
    sid = session(client)
    r = client.post("/api/v1/create_sampling_session",
                    json={"session_id": sid, "sampling_session_seq_id": 0, "base_model": "tiny-qwen3"}, headers=KEY)
    sampler = r.json()["sampling_session_id"]
    base = {"sampling_session_id": sampler, "seq_id": 1, "num_samples": 1,
            "prompt": {"chunks": [{"type": "encoded_text", "tokens": [5, 6, 7]}]}, "sampling_params": {"max_tokens": 4}}
    assert client.post("/api/v1/asample", json=base, headers=KEY).status_code == 200
    topk = error(client.post("/api/v1/asample", json={**base, "topk_prompt_logprobs": 5000}, headers=KEY), 400)
    assert topk["field"] == "topk_prompt_logprobs"
    last_n = {**base, "prompt_logprobs": True, "prompt_logprobs_last_n": 3}  # the prompt has 3 tokens
    body = error(client.post("/api/v1/asample", json=last_n, headers=KEY), 400)
    assert body["field"] == "prompt_logprobs_last_n" and "2" in body["error"]
    too_long = {**base, "sampling_params": {"max_tokens": 10_000}}
    assert error(client.post("/api/v1/asample", json=too_long, headers=KEY), 400)["field"] == "sampling_params.max_tokens"
    bad_token = {**base, "prompt": {"chunks": [{"type": "encoded_text", "tokens": [5, 99_999]}]}}
    assert "99999" in error(client.post("/api/v1/asample", json=bad_token, headers=KEY), 400)["error"]
    image = {**base, "prompt": {"chunks": [{"type": "image", "data": "aGk=", "format": "png", "expected_tokens": 1}]}}
    assert error(client.post("/api/v1/asample", json=image, headers=KEY), 400)["field"] == "prompt.chunks[0]"
    error(client.post("/api/v1/asample", json=base, headers=OTHER), 404)


def test_failed_future_is_a_user_error_with_lower_case_category(client: TestClient) -> None:
    sid = session(client)
    body = {"session_id": sid, "model_seq_id": 0, "base_model": "tiny-qwen3", "lora_config": {"rank": 2}}
    first = client.post("/api/v1/create_model", json=body, headers=KEY).json()["request_id"]
    assert client.post("/api/v1/retrieve_future", json={"request_id": first}, headers=KEY).json()["model_id"]
    again = client.post("/api/v1/create_model", json={**body, "user_metadata": {"x": "y"}}, headers=KEY).json()
    result = client.post("/api/v1/retrieve_future", json={"request_id": again["request_id"]}, headers=KEY).json()
    assert result["category"] == "user" and "already exists" in result["error"]
    retry = client.post("/api/v1/create_model", json=body, headers=KEY).json()
    assert retry["request_id"] == first  # an identical resubmission is the same future


def test_sample_admissions_are_given_back(client: TestClient) -> None:
    """The 429 limit counts admitted, unfinished samples: finished, retried and refused requests
    must all leave the count where it was."""
    rt = client.app.state.runtime
    sid = session(client)
    r = client.post("/api/v1/create_sampling_session",
                    json={"session_id": sid, "sampling_session_seq_id": 0, "base_model": "tiny-qwen3"}, headers=KEY)
    body = {"sampling_session_id": r.json()["sampling_session_id"], "seq_id": 7, "num_samples": 2,
            "prompt": {"chunks": [{"type": "encoded_text", "tokens": [5, 6, 7]}]}, "sampling_params": {"max_tokens": 2}}
    first = client.post("/api/v1/asample", json=body, headers=KEY).json()["request_id"]
    retry = client.post("/api/v1/asample", json=body, headers=KEY).json()["request_id"]
    assert retry == first
    error(client.post("/api/v1/asample", json={**body, "num_samples": 1000}, headers=KEY), 400)
    result = client.post("/api/v1/retrieve_future", json={"request_id": first}, headers=KEY)
    assert result.headers["content-type"].startswith("application/x-protobuf")
    assert rt.sample_admission.pending == 0


def test_a_refused_protobuf_body_releases_its_seq_id_so_the_next_step_runs(client: TestClient) -> None:
    """optim_step never runs past a missing seq_id, so a forward_backward refused at decoding must
    give its seq_id up, or the model would wait for it forever."""
    from tests.support.data import fwdbwd_proto

    sid = session(client)
    made = client.post("/api/v1/create_model", headers=KEY, json={
        "session_id": sid, "model_seq_id": 0, "base_model": "tiny-qwen3", "lora_config": {"rank": 2}}).json()
    model_id = client.post("/api/v1/retrieve_future", json={"request_id": made["request_id"]},
                           headers=KEY).json()["model_id"]
    no_data = fwdbwd_proto(model_id, [], seq_id=1)  # decodes as far as its envelope, then refused
    refused = client.post("/api/v1/forward_backward", content=no_data,
                          headers={**KEY, "Content-Type": "application/x-protobuf"})
    assert error(refused, 400)["field"] == "data"
    step = client.post("/api/v1/optim_step", headers=KEY, json={
        "model_id": model_id, "seq_id": 2, "adam_params": {"learning_rate": 1e-3}}).json()
    done = client.post("/api/v1/retrieve_future", json={"request_id": step["request_id"]}, headers=KEY)
    assert done.status_code == 200 and done.json()["metrics"]["learning_rate:mean"] == 1e-3  # ran, no wait


def test_a_result_past_its_retention_answers_that_it_expired(client: TestClient) -> None:
    """Results do not stay in the database forever: past future_retention_seconds the reaper drops
    them; the row stays, so retrieving says why, and a retry of the same submission runs nothing."""
    import asyncio
    from datetime import timedelta

    from server.ops.reaper import reap_expired
    from server.store.tables import Future, utcnow

    rt = client.app.state.runtime
    body = {"session_id": session(client), "model_seq_id": 0, "base_model": "tiny-qwen3", "lora_config": {"rank": 2}}
    request_id = client.post("/api/v1/create_model", json=body, headers=KEY).json()["request_id"]
    assert client.post("/api/v1/retrieve_future", json={"request_id": request_id}, headers=KEY).json()["model_id"]

    def age(s) -> None:  # noqa: ANN001
        s.get(Future, request_id).finished_at = utcnow() - timedelta(seconds=rt.settings.future_retention_seconds + 1)

    asyncio.run(rt.db.run(age))
    client.portal.call(reap_expired, rt)
    row = asyncio.run(rt.db.run(lambda s: s.get(Future, request_id)))
    assert row.result is None
    expired = error(client.post("/api/v1/retrieve_future", json={"request_id": request_id}, headers=KEY), 200)
    assert expired["category"] == "user" and "expired" in expired["error"] and "future_retention_seconds" in expired["error"]
    assert client.post("/api/v1/create_model", json=body, headers=KEY).json()["request_id"] == request_id


def test_an_ended_sessions_model_queues_are_dropped(client: TestClient) -> None:
    rt = client.app.state.runtime
    sid = session(client)
    body = {"session_id": sid, "model_seq_id": 0, "base_model": "tiny-qwen3", "lora_config": {"rank": 2}}
    made = client.post("/api/v1/create_model", json=body, headers=KEY).json()
    model_id = client.post("/api/v1/retrieve_future", json={"request_id": made["request_id"]}, headers=KEY).json()["model_id"]
    step = client.post("/api/v1/optim_step", headers=KEY, json={
        "model_id": model_id, "seq_id": 1, "adam_params": {"learning_rate": 1e-3}}).json()
    client.post("/api/v1/retrieve_future", json={"request_id": step["request_id"]}, headers=KEY)
    assert f"model:{model_id}" in rt.scheduler._board.queues
    finished = client.post(f"/api/v1/sessions/{sid}/finish", json={"reason": {"type": "success"}}, headers=KEY)
    assert finished.status_code == 200
    assert f"model:{model_id}" not in rt.scheduler._board.queues


def test_a_run_admitted_from_memory_is_gone_the_moment_its_session_finishes(client: TestClient) -> None:
    """An operation on a run that passed lately is admitted without a read (tenancy/runs.py); the
    session's end forgets it, so the next one gets the 410 at once, not after the cache's TTL."""
    sid = session(client)
    made = client.post("/api/v1/create_model", headers=KEY, json={
        "session_id": sid, "model_seq_id": 0, "base_model": "tiny-qwen3", "lora_config": {"rank": 2}}).json()
    model_id = client.post("/api/v1/retrieve_future", json={"request_id": made["request_id"]},
                           headers=KEY).json()["model_id"]
    step = {"model_id": model_id, "adam_params": {"learning_rate": 1e-3}}
    assert client.post("/api/v1/optim_step", json={**step, "seq_id": 1}, headers=KEY).status_code == 200
    rt = client.app.state.runtime
    assert rt.runs.get(rt.keys.get(ids.hash_key(KEY["X-API-Key"]), time.monotonic()).tenant_id, model_id) is not None
    finished = client.post(f"/api/v1/sessions/{sid}/finish", json={"reason": {"type": "success"}}, headers=KEY)
    assert finished.status_code == 200, finished.text
    gone = client.post("/api/v1/optim_step", json={**step, "seq_id": 2}, headers=KEY)
    assert gone.status_code == 410, gone.text


def test_a_server_process_freezes_what_its_start_made(tmp_path: Path) -> None:
    """`twinkle serve` (create_app_from_env) takes its startup objects out of full collections,
    which otherwise stall every request for hundreds of ms (server/boot.py freeze_startup_objects)."""
    import gc

    from tests.support.engines import IdleEngine

    config = Settings(data_dir=tmp_path, base_model="tiny-qwen3")
    assert gc.get_freeze_count() == 0
    try:
        with local_client(create_app(build_runtime(config, engine=IdleEngine()), freeze_startup_objects=True)):
            assert gc.get_freeze_count() > 10_000
    finally:
        gc.unfreeze()
    with local_client(create_app(build_runtime(config, engine=IdleEngine()))):  # an app of a test process
        assert gc.get_freeze_count() == 0
