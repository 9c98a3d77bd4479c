"""Durability across a restart, and the same server on PostgreSQL instead of SQLite."""

from __future__ import annotations

import multiprocessing
import pickle
import time
import uuid
from pathlib import Path

import httpx
import pytest
import tinker
from tinker import types

from server.cli import main
from server.process import running_server
from server.store.database import Database
from server.store.tables import Future
from tests.support.child import sample_in_child
from tests.support.data import fwdbwd_proto, make_data

pytestmark = pytest.mark.slow
BASE = "tiny-qwen3"


FILE_ROWS = b'{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}\n'


def step(tc, data) -> float:
    fb = tc.forward_backward(data, "cross_entropy")
    tc.optim_step(types.AdamParams(learning_rate=3e-3)).result()
    return fb.result().metrics["loss:sum"]


def raw_model(base_url: str, key: dict[str, str]) -> str:
    """A training run in a new session, made over raw HTTP (no SDK client left heartbeating)."""
    api = f"{base_url}/api/v1"
    session = httpx.post(f"{api}/create_session", json={"sdk_version": "raw"}, headers=key).json()["session_id"]
    created = httpx.post(f"{api}/create_model", headers=key, json={
        "session_id": session, "model_seq_id": 0, "base_model": BASE, "lora_config": {"rank": 2}}).json()
    return httpx.post(f"{api}/retrieve_future", json={"request_id": created["request_id"]}, headers=key,
                      timeout=30).json()["model_id"]


def fresh_data_dir(tmp_path: Path, tiny_model_dir: Path) -> Path:
    (tmp_path / "models").mkdir(parents=True)
    (tmp_path / "models" / "tiny-qwen3").symlink_to(tiny_model_dir)
    return tmp_path


def test_runs_and_checkpoints_survive_a_restart(tmp_path, tiny_model_dir, token_rows) -> None:
    data_dir, data = fresh_data_dir(tmp_path, tiny_model_dir), make_data(token_rows)
    key = {"X-API-Key": "tml-restart"}
    with running_server(data_dir) as server:
        with tinker.ServiceClient(base_url=server.base_url, api_key="tml-restart") as sc:
            tc = sc.create_lora_training_client(BASE, rank=4, seed=3).result()
            step(tc, data)
            path = tc.save_state("before-restart").result().path
            expected_next = step(tc, data)
            model_id = tc.model_id
        file_id = upload_and_check(server.base_url, "tml-restart")
        # A client still running when the server stops: its session stays open (raw HTTP, so no
        # SDK is left heartbeating a server that is gone).
        live_model = raw_model(server.base_url, key)
    with running_server(data_dir) as server:
        rest = tinker.RestClient(base_url=server.base_url, api_key="tml-restart")
        assert {r.training_run_id for r in rest.list_training_runs().result().training_runs} == {model_id, live_model}
        assert [c.tinker_path for c in rest.list_checkpoints(model_id).result().checkpoints] == [path]
        check_file(server.base_url, "tml-restart", file_id)  # uploaded files are kept
        with tinker.ServiceClient(base_url=server.base_url, api_key="tml-restart") as sc:
            resumed = sc.create_training_client_from_state_with_optimizer(path).result()
            assert step(resumed, data) == pytest.approx(expected_next, abs=1e-5)
        api = f"{server.base_url}/api/v1"
        headers = {**key, "Content-Type": "application/x-protobuf"}
        # The closed session's model: 410, its session has finished.
        closed = httpx.post(f"{api}/forward_backward", content=fwdbwd_proto(model_id, data), headers=headers)
        assert closed.status_code == 410 and "finished" in closed.json()["error"]
        # The open session's model: its weights lived in the old process, so its next step fails
        # with a user error that says what to do, instead of silently training a fresh adapter.
        submitted = httpx.post(f"{api}/forward_backward", content=fwdbwd_proto(live_model, data, seq_id=1),
                               headers=headers)
        result = httpx.post(f"{api}/retrieve_future", headers=key, json={"request_id": submitted.json()["request_id"]},
                            timeout=30).json()
        assert result["category"] == "user" and "checkpoint" in result["error"]


def test_server_on_postgresql(tmp_path, tiny_model_dir, token_rows, make_pg_database) -> None:
    postgres_url = make_pg_database()
    data_dir, data = fresh_data_dir(tmp_path, tiny_model_dir), make_data(token_rows)
    assert main(["db", "upgrade", "--database-url", postgres_url]) == 0  # a shared schema changes deliberately
    with running_server(data_dir, extra_args=["--database-url", postgres_url]) as server:
        with tinker.ServiceClient(base_url=server.base_url, api_key="tml-postgres") as sc:
            tc = sc.create_lora_training_client(BASE, rank=4, seed=4).result()
            losses = [step(tc, data) for _ in range(3)]
            assert losses[-1] < losses[0]
            sampler = tc.save_weights_and_get_sampling_client().result()
            assert len(sampler.sample(types.ModelInput.from_ints(token_rows[0][:4]), 2,
                                      types.SamplingParams(max_tokens=4)).result().sequences) == 2
            # A pickled SamplingClient in a child process numbers its requests from 10^9 x a random
            # clone id (up to 10^18): 64-bit seq ids in the database.
            with multiprocessing.get_context("spawn").Pool(1) as pool:
                rows = pool.apply(sample_in_child, (pickle.dumps(sampler), token_rows[0][:4], 2))
            assert len(rows) == 2 and all(len(r) == 4 for r in rows)
            path = tc.save_state("pg").result().path
            listed = tinker.RestClient(base_url=server.base_url, api_key="tml-postgres").list_checkpoints(tc.model_id)
            assert [c.tinker_path for c in listed.result().checkpoints] == [path]
        file_id = upload_and_check(server.base_url, "tml-postgres")
        assert httpx.delete(f"{server.base_url}/v1/files/{file_id}", headers=bearer("tml-postgres")).json()["deleted"]
    assert not (data_dir / "twinkle.db").exists()  # nothing went to SQLite


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def upload_and_check(base_url: str, key: str) -> str:
    """Upload a dataset file (POST /v1/files); it is listed and reads back as sent. Its id."""
    made = httpx.post(f"{base_url}/v1/files", files={"file": ("rows.jsonl", FILE_ROWS)}, data={"purpose": "fine-tune"},
                      headers=bearer(key))
    assert made.status_code == 200, made.text
    return check_file(base_url, key, made.json()["id"])


def check_file(base_url: str, key: str, file_id: str) -> str:
    assert [f["id"] for f in httpx.get(f"{base_url}/v1/files", headers=bearer(key)).json()["data"]] == [file_id]
    assert httpx.get(f"{base_url}/v1/files/{file_id}/content", headers=bearer(key)).content == FILE_ROWS
    return file_id


def future_state(url: str, request_id: str) -> str:
    db = Database(url, threads=1)
    try:
        return db.call(lambda s: s.get(Future, request_id).state)
    finally:
        db.close()


def test_two_servers_on_one_database_fail_only_a_dead_ones_work(tmp_path, tiny_model_dir, token_rows,
                                                                 make_pg_database) -> None:
    """A second server starting on the same PostgreSQL leaves the first one's queued work alone;
    once the first is killed (-9), the second fails that work, and a client waiting on the second
    learns it at once."""
    url = make_pg_database()
    assert main(["db", "upgrade", "--database-url", url]) == 0
    env = {"TWINKLE_INSTANCE_TIMEOUT_SECONDS": "3", "TWINKLE_SEQ_GAP_GRACE_SECONDS": "600"}
    args, key = ["--database-url", url], {"X-API-Key": "tml-two-servers"}
    with running_server(fresh_data_dir(tmp_path / "a", tiny_model_dir), extra_args=args, env=env) as first:
        # Raw HTTP, not the SDK: an SDK client would go on heartbeating the server killed below.
        model_id = raw_model(first.base_url, key)
        # seq_id 50 waits (for 600 s) for the seq_ids before it: queued in the first server.
        body = fwdbwd_proto(model_id, make_data(token_rows), seq_id=50)
        headers = {**key, "Content-Type": "application/x-protobuf"}
        request_id = httpx.post(f"{first.base_url}/api/v1/forward_backward", headers=headers, content=body).json()[
            "request_id"]
        with running_server(fresh_data_dir(tmp_path / "b", tiny_model_dir), extra_args=args, env=env) as second:
            assert future_state(url, request_id) == "pending"  # the first server is alive: its work stays queued
            first.process.kill()
            retrieve = f"{second.base_url}/api/v1/retrieve_future"
            started = time.monotonic()
            answer = httpx.post(retrieve, json={"request_id": request_id}, headers=key, timeout=60).json()
            assert answer.get("category") == "server" and "stopped before completing" in answer["error"], answer
            assert time.monotonic() - started < 15  # woken by the sweep, not at the end of the long-poll


def test_a_future_run_by_one_server_wakes_a_poll_on_another_through_redis(tmp_path, tiny_model_dir, token_rows,
                                                                           make_pg_database) -> None:
    url = make_pg_database()
    assert main(["db", "upgrade", "--database-url", url]) == 0
    prefix = f"test-{uuid.uuid4().hex[:12]}"  # this run's own channel on the machine's Redis
    args = ["--database-url", url, "--redis-url", "redis://127.0.0.1:6379/0"]
    env = {"TWINKLE_REDIS_PREFIX": prefix, "TWINKLE_SEQ_GAP_GRACE_SECONDS": "3"}
    key = {"X-API-Key": "tml-redis"}
    with running_server(fresh_data_dir(tmp_path / "a", tiny_model_dir), extra_args=args, env=env) as first, \
            running_server(fresh_data_dir(tmp_path / "b", tiny_model_dir), extra_args=args, env=env) as second:
        with tinker.ServiceClient(base_url=first.base_url, api_key="tml-redis") as sc:
            tc = sc.create_lora_training_client(BASE, rank=2, seed=0).result()
            # seq_id 5 runs on the first server once its gap's grace (3 s) is over.
            body = fwdbwd_proto(tc.model_id, make_data(token_rows), seq_id=5)
            headers = {**key, "Content-Type": "application/x-protobuf"}
            request_id = httpx.post(f"{first.base_url}/api/v1/forward_backward", headers=headers,
                                    content=body).json()["request_id"]
            started = time.monotonic()
            answer = httpx.post(f"{second.base_url}/api/v1/retrieve_future", json={"request_id": request_id},
                                headers=key, timeout=60)
            assert answer.headers["content-type"].startswith("application/x-protobuf"), answer.text  # the result
            assert time.monotonic() - started < 15  # woken when it ended, not at the end of the 25 s long-poll
