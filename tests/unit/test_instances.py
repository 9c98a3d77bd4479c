"""Server processes sharing one database (server/queue/instances.py): each fails only the pending
futures of processes that are gone, never another live one's; a clean stop fails its own."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import select, update

from server.queue.futures import STOP_MESSAGE, FutureHub
from server.queue.instances import GONE_MESSAGE, Instances
from server.store.database import Database
from server.store.tables import Future, Instance, Model, Tenant, utcnow
from server.store.tables import Session as SessionRow


@pytest.fixture(params=["sqlite", "postgresql"])
def db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Database]:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'shared.db'}"
    else:
        url = request.getfixturevalue("make_pg_database")()
    database = Database(url, threads=2)
    database.migrate()
    yield database
    database.close()


def pending(db: Database, owner: Instances, n: int, tenant: str, fingerprint: str = "fp") -> list[str]:
    hub = FutureHub(db, owner=owner.id)

    async def submit() -> list[str]:
        return [(await hub.submit(tenant_id=tenant, kind="forward_backward", scope=f"model:{owner.id}", seq_id=i,
                                  fingerprint=fingerprint)).request_id for i in range(n)]

    return asyncio.run(submit())


def set_pid(db: Database, instance: Instances, pid: int) -> None:
    db.call(lambda s: s.execute(update(Instance).where(Instance.id == instance.id).values(pid=pid)))


def states(db: Database) -> dict[str, tuple[str, str | None]]:
    return {f.request_id: (f.state, f.error) for f in db.call(lambda s: s.scalars(select(Future)).all())}


def test_a_starting_process_fails_only_the_work_of_gone_ones(db: Database) -> None:
    tenant = f"ten-{uuid.uuid4().hex[:8]}"
    db.call(lambda s: s.add(Tenant(id=tenant, name=tenant)))
    live, crashed, starting = Instances(db), Instances(db), Instances(db)
    live.register()
    crashed.register()
    theirs, lost = pending(db, live, 2, tenant), pending(db, crashed, 2, tenant)
    # All three live in this test's process; as rows they are other processes of this host: the
    # live one's pid exists (our parent's), the crashed one's is gone.
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    set_pid(db, live, os.getppid())
    set_pid(db, crashed, int(dead.stdout))

    starting.register()
    assert sorted(starting.sweep()) == sorted(lost)
    now = states(db)
    assert all(now[r] == ("pending", None) for r in theirs)  # a live process's work is left alone
    assert all(now[r] == ("failed", GONE_MESSAGE) for r in lost)
    assert {i.id for i in db.call(lambda s: s.scalars(select(Instance)).all())} == {live.id, starting.id}

    # A live process that stops heartbeating (another host, or a hang) is gone after the timeout.
    stale = utcnow() - timedelta(seconds=live.timeout + 1)
    db.call(lambda s: s.execute(update(Instance).where(Instance.id == live.id).values(heartbeat_at=stale)))
    assert sorted(starting.sweep()) == sorted(theirs) and all(states(db)[r] == ("failed", GONE_MESSAGE) for r in theirs)
    live.heartbeat()  # it comes back: registered again, and its new work is safe
    set_pid(db, live, os.getppid())
    new = pending(db, live, 1, tenant, fingerprint="after")
    assert starting.sweep() == [] and states(db)[new[0]] == ("pending", None)


def test_a_clean_stop_fails_its_own_pending_work_at_once(db: Database) -> None:
    tenant = f"ten-{uuid.uuid4().hex[:8]}"
    db.call(lambda s: s.add(Tenant(id=tenant, name=tenant)))
    stopping, other = Instances(db), Instances(db)
    stopping.register()
    other.register()
    mine, theirs = pending(db, stopping, 2, tenant), pending(db, other, 1, tenant)
    assert sorted(stopping.retire(STOP_MESSAGE)) == sorted(mine)
    now = states(db)
    assert all(now[r] == ("failed", STOP_MESSAGE) for r in mine) and now[theirs[0]] == ("pending", None)
    assert all("reload that checkpoint" in m and "submit it again" in m for m in (STOP_MESSAGE, GONE_MESSAGE))


def test_futures_from_before_owners_were_recorded_are_failed_by_the_next_start(db: Database) -> None:
    tenant = f"ten-{uuid.uuid4().hex[:8]}"
    db.call(lambda s: s.add(Tenant(id=tenant, name=tenant)))

    async def legacy() -> str:
        return (await FutureHub(db).submit(tenant_id=tenant, kind="sample", scope="sampler:x", seq_id=1,
                                           fingerprint="fp")).request_id

    old = asyncio.run(legacy())
    starting = Instances(db)
    starting.register()
    assert starting.sweep() == [old] and states(db)[old] == ("failed", GONE_MESSAGE)


# ----- model owners ------------------------------------------------------------------------------
def a_model(db: Database, owner: str | None) -> str:
    suffix = uuid.uuid4().hex[:8]
    tenant, session, model = f"ten-{suffix}", f"sess-{suffix}", f"sess-{suffix}:train:0"

    def write(s) -> None:
        s.add(Tenant(id=tenant, name=tenant))
        s.flush()
        s.add(SessionRow(id=session, tenant_id=tenant))
        s.flush()
        s.add(Model(id=model, tenant_id=tenant, session_id=session, model_seq_id=0, base_model="tiny-qwen3",
                    lora_rank=2, owner=owner))

    db.call(write)
    return model


def claim(db: Database, instance: Instances, model_id: str) -> str | None:
    return db.call(lambda s: instance.claim(s, s.get(Model, model_id)))


def owner_of(db: Database, model_id: str) -> str | None:
    return db.call(lambda s: s.get(Model, model_id).owner)


def test_a_model_runs_where_its_live_owner_is(db: Database) -> None:
    here, there = Instances(db, url="http://here:1"), Instances(db, url="http://there:2")
    here.register()
    there.register()
    set_pid(db, there, 1)  # another live process of this host (this one's own pid would read as a restart)
    mine, theirs = a_model(db, here.id), a_model(db, there.id)
    assert claim(db, here, mine) is None
    assert claim(db, here, theirs) == "http://there:2"
    assert owner_of(db, theirs) == there.id


def test_a_model_without_a_live_owner_is_adopted(db: Database) -> None:
    here, gone = Instances(db, url="http://here:1", timeout=30), Instances(db, url="http://gone:2")
    here.register()
    gone.register()
    set_pid(db, gone, 2**22 + 12345)  # a pid of this host that does not exist
    orphan, unowned = a_model(db, gone.id), a_model(db, None)
    assert claim(db, here, orphan) is None and owner_of(db, orphan) == here.id
    assert claim(db, here, unowned) is None and owner_of(db, unowned) == here.id
    stale = Instances(db, url="http://stale:3", timeout=30)
    stale.register()
    stale_model = a_model(db, stale.id)
    db.call(lambda s: s.execute(update(Instance).where(Instance.id == stale.id)
                                .values(heartbeat_at=utcnow() - timedelta(seconds=60), host="elsewhere")))
    assert claim(db, here, stale_model) is None and owner_of(db, stale_model) == here.id


def test_two_processes_adopting_at_once_agree_on_one_owner(db: Database) -> None:
    first, second = Instances(db, url="http://first:1"), Instances(db, url="http://second:2")
    first.register()
    second.register()
    set_pid(db, first, 1)  # alive, from the second's point of view
    model_id = a_model(db, None)

    def race(s) -> str | None:
        row = s.get(Model, model_id)  # read before the other adopts
        assert claim(db, first, model_id) is None  # the other process wins meanwhile
        return second.claim(s, row)

    assert db.call(race) == "http://first:1" and owner_of(db, model_id) == first.id
