"""RunCache (server/tenancy/runs.py): a run admitted lately is admitted again from memory, for its
tenant only, for TTL seconds; its session's end forgets it; its last request times are written in
one batch."""

from __future__ import annotations

import uuid
from datetime import timedelta
from pathlib import Path

from server.store.database import Database
from server.store.tables import Model, Tenant, utcnow
from server.store.tables import Session as SessionRow
from server.tenancy.runs import RunCache, write_touched


def run(tenant: str = "t1", model_id: str = "m1") -> Model:
    return Model(id=model_id, tenant_id=tenant, session_id="s1", model_seq_id=0, base_model="b", lora_rank=2)


def test_a_run_is_admitted_from_memory_for_its_tenant_within_the_ttl() -> None:
    cache = RunCache()
    cache.put(run(), now=100.0)
    assert cache.get("t1", "m1", now=100.0 + RunCache.TTL - 0.1) is not None
    assert cache.get("t2", "m1", now=100.0) is None  # another tenant: checked in the database
    assert cache.get("t1", "m1", now=100.0 + RunCache.TTL + 0.1) is None  # past the TTL: checked again
    assert len(cache) == 0
    cache.put(run(), now=200.0)
    cache.forget(["m1"])  # its session ended here
    assert cache.get("t1", "m1", now=200.0) is None
    cache.put(run(), now=300.0)
    cache.clear()  # this process was taken for gone
    assert cache.get("t1", "m1", now=300.0) is None


def test_last_request_times_are_written_in_one_batch_and_never_backwards(tmp_path: Path) -> None:
    db = Database(f"sqlite:///{tmp_path / 'runs.db'}", threads=1)
    db.migrate()
    tenant, session = f"ten-{uuid.uuid4().hex[:8]}", f"sess-{uuid.uuid4().hex[:8]}"
    later = utcnow() + timedelta(hours=1)

    def rows(s) -> None:  # noqa: ANN001
        s.add(Tenant(id=tenant, name=tenant))
        s.flush()
        s.add(SessionRow(id=session, tenant_id=tenant))
        s.flush()
        s.add_all([Model(id=f"{session}:train:{i}", tenant_id=tenant, session_id=session, model_seq_id=i,
                         base_model="b", lora_rank=2, last_request_at=later if i == 1 else utcnow() - timedelta(days=1))
                   for i in range(2)])

    db.call(rows)
    cache = RunCache()
    for i in range(2):
        cache.put(db.call(lambda s, i=i: s.get(Model, f"{session}:train:{i}")))
        assert cache.get(tenant, f"{session}:train:{i}") is not None  # a request: touched
    touched = cache.take_touched()
    assert set(touched) == {f"{session}:train:0", f"{session}:train:1"} and cache.take_touched() == {}
    db.call(lambda s: write_touched(s, touched))
    stamps = db.call(lambda s: {m.id: m.last_request_at for m in s.query(Model).filter(Model.session_id == session)})
    assert stamps[f"{session}:train:0"] == touched[f"{session}:train:0"]
    assert stamps[f"{session}:train:1"] == later  # a newer time written by another process stays
    db.close()
