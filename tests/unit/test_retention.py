"""What the reaper deletes for good (server/ops/reaper.py): future rows past their retention,
what long-ended sessions leave behind (ops/lifecycle.forget_ended_sessions), and checkpoint
folders a crash orphaned (ops/orphans.py). And what it must keep."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from gateway.app import create_app
from server import ids
from server.boot import build_runtime
from server.config import Settings
from server.ops.orphans import sweep_orphans
from server.ops.reaper import reap_expired
from server.runtime import Runtime
from server.store.tables import Checkpoint, CustomLossRow, Future, Model, SamplingSession, utcnow
from server.store.tables import Session as SessionRow
from tests.support.engines import IdleEngine
from tests.support.http import error, local_client

KEY = {"X-API-Key": "tml-retention"}
DAY = timedelta(days=1)


@pytest.fixture
def client(tmp_path: Path) -> Iterator[TestClient]:
    # The server's own reaper (a round at start, then hourly) keeps everything; the tests reap
    # with a week's retention (reap()), when their rows are in place.
    settings = Settings(data_dir=tmp_path, base_model="tiny-qwen3", long_poll_seconds=1, reap_interval_seconds=3600,
                        future_row_retention_seconds=1e9, ended_session_retention_seconds=1e9)
    with local_client(create_app(build_runtime(settings, engine=IdleEngine()))) as c:
        yield c


def reap(client: TestClient) -> None:
    rt = rt_of(client)
    rt.settings = rt.settings.model_copy(update={"future_row_retention_seconds": 7 * 86400,
                                                 "ended_session_retention_seconds": 7 * 86400})
    asyncio.run(reap_expired(rt))


def rt_of(client: TestClient) -> Runtime:
    return client.app.state.runtime


def session(client: TestClient, ended_ago: timedelta | None) -> tuple[str, str]:
    """A session (ended `ended_ago`, or live); (its id, its tenant)."""
    made = client.post("/api/v1/create_session", json={"sdk_version": "0.38.0"}, headers=KEY)
    session_id = made.json()["session_id"]

    def end(s) -> str:  # noqa: ANN001
        row = s.get(SessionRow, session_id)
        if ended_ago is not None:
            row.finished_at, row.finish_reason = utcnow() - ended_ago, "finished"
        return row.tenant_id

    return session_id, rt_of(client).db.call(end)


def run(client: TestClient, session_id: str, tenant: str, seq: int, *, checkpoint: bool) -> str:
    """A training run in the session (with one checkpoint row and folder, if asked); its id."""
    model_id = ids.model_id(session_id, seq)
    rt = rt_of(client)
    rt.db.call(lambda s: s.add(Model(id=model_id, tenant_id=tenant, session_id=session_id, model_seq_id=seq,
                                     base_model="tiny-qwen3", lora_rank=4)))
    if checkpoint:
        ckpt_id = ids.new_id("ckpt")
        relative = f"checkpoints/{tenant}/{ckpt_id}"
        (rt.data_dir / relative).mkdir(parents=True)
        rt.db.call(lambda s: s.add(Checkpoint(id=ckpt_id, tenant_id=tenant, model_id=model_id, kind="training",
                                              name="kept", storage_dir=relative, size_bytes=0)))
    return model_id


def count(client: TestClient, table: type, *where: object) -> int:
    return rt_of(client).db.call(lambda s: s.scalar(select(func.count()).select_from(table).where(*where)))


def test_a_long_ended_session_keeps_only_its_runs_with_checkpoints(client: TestClient) -> None:
    old, tenant = session(client, ended_ago=8 * DAY)
    recent, _ = session(client, ended_ago=DAY)
    live, _ = session(client, ended_ago=None)
    kept = run(client, old, tenant, 0, checkpoint=True)
    run(client, old, tenant, 1, checkpoint=False)
    for session_id in (old, recent, live):
        run(client, session_id, tenant, 5, checkpoint=False)
        rt_of(client).db.call(lambda s, sid=session_id: s.add_all([
            SamplingSession(id=ids.sampling_session_id(sid, 0), tenant_id=tenant, session_id=sid, base_model="b"),
            CustomLossRow(id=ids.new_id("loss"), tenant_id=tenant, session_id=sid, seq=0, name="l", inputs=[],
                          graph={}),
        ]))
    reap(client)
    # The old session: only the run with a checkpoint (and the session, which it belongs to) stay.
    assert count(client, Model, Model.session_id == old) == 1 and count(client, Model, Model.id == kept) == 1
    assert count(client, SamplingSession, SamplingSession.session_id == old) == 0
    assert count(client, CustomLossRow, CustomLossRow.session_id == old) == 0
    assert count(client, SessionRow, SessionRow.id == old) == 1
    for session_id in (recent, live):  # within the retention, or still running: untouched
        assert count(client, Model, Model.session_id == session_id) == 1
        assert count(client, SamplingSession, SamplingSession.session_id == session_id) == 1
        assert count(client, CustomLossRow, CustomLossRow.session_id == session_id) == 1
    runs = client.get("/api/v1/training_runs", headers=KEY).json()["training_runs"]
    assert kept in {r["training_run_id"] for r in runs}
    # Once its last checkpoint is deleted, the run and then the session go too.
    deleted = client.delete(f"/api/v1/training_runs/{kept}/checkpoints/weights/kept", headers=KEY)
    assert deleted.status_code == 200, deleted.text
    reap(client)
    assert count(client, Model, Model.session_id == old) == 0 and count(client, SessionRow, SessionRow.id == old) == 0


def test_sessions_kept_for_their_checkpoints_never_starve_the_others(client: TestClient) -> None:
    for _ in range(205):  # more than one batch (FORGET_BATCH) of sessions with nothing to forget
        sid, tenant = session(client, ended_ago=8 * DAY)
        run(client, sid, tenant, 0, checkpoint=True)
    prunable, _ = session(client, ended_ago=8 * DAY)
    reap(client)
    assert count(client, SessionRow, SessionRow.id == prunable) == 0
    assert count(client, SessionRow) == 205


def test_future_rows_are_deleted_after_their_retention(client: TestClient) -> None:
    _, tenant = session(client, ended_ago=None)
    rt = rt_of(client)

    def future(request_id: str, state: str, finished_ago: timedelta | None) -> Future:
        return Future(request_id=request_id, tenant_id=tenant, kind="optim_step", scope="model:m", seq_id=hash(request_id),
                      fingerprint="f", state=state, result=b"{}", result_format="json",
                      finished_at=None if finished_ago is None else utcnow() - finished_ago)

    rt.db.call(lambda s: s.add_all([future("req-old", "done", 8 * DAY), future("req-recent", "done", DAY),
                                    future("req-pending", "pending", None)]))
    reap(client)
    assert {r for r in rt.db.call(lambda s: s.scalars(select(Future.request_id)).all())} == {"req-recent", "req-pending"}
    gone = client.post("/api/v1/retrieve_future", json={"request_id": "req-old"}, headers=KEY)
    assert error(gone, 404)["field"] == "request_id"
    expired = client.post("/api/v1/retrieve_future", json={"request_id": "req-recent"}, headers=KEY).json()
    assert expired["category"] == "user" and "expired" in expired["error"]  # its result went after 24 h


def test_orphaned_checkpoint_folders_are_swept_once_past_the_grace(client: TestClient) -> None:
    sid, tenant = session(client, ended_ago=None)
    rt = rt_of(client)
    recorded = run(client, sid, tenant, 0, checkpoint=True)
    row_id, relative = rt.db.call(lambda s: s.execute(
        select(Checkpoint.id, Checkpoint.storage_dir).where(Checkpoint.model_id == recorded)).one())
    kept, root, merged = rt.data_dir / relative, rt.data_dir / "checkpoints" / tenant, rt.data_dir / "exports" / "merged"
    temp, unrecorded = root / ".tmp-ckpt_x-1234abcd", root / ids.new_id("ckpt")
    merged_kept, merged_orphan = merged / row_id / "model", merged / ids.new_id("ckpt") / "model"
    for folder in (temp, unrecorded, merged_kept, merged_orphan):
        folder.mkdir(parents=True)
        (folder / "adapter_model.safetensors").write_bytes(os.urandom(16))
    assert asyncio.run(sweep_orphans(rt)) == 0  # younger than the grace (an hour): maybe a save in progress
    rt.settings = rt.settings.model_copy(update={"orphan_grace_seconds": 0})
    time.sleep(0.01)
    asyncio.run(sweep_orphans(rt))  # (the server's own reaper may sweep them first: the disk is what counts)
    assert kept.exists() and merged_kept.exists()
    assert not temp.exists() and not unrecorded.exists() and not merged_orphan.parent.exists()
