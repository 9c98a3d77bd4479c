"""server.queue.futures.FutureHub against a real store: idempotent submit, long-poll wait, restart cleanup."""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections.abc import Callable, Iterator

import pytest
from sqlalchemy import func, select

from server.queue.futures import FutureHub, FutureView
from server.store.database import Database
from server.store.tables import Future, Tenant
from tests.support.aio import arun


@pytest.fixture(scope="module")
def sqlite_db(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Database]:
    database = Database(f"sqlite:///{tmp_path_factory.mktemp('futures') / 'twinkle.db'}", threads=4)
    database.migrate()
    yield database
    database.close()


@pytest.fixture(scope="module")
def pg_db(make_pg_database: Callable[[], str]) -> Iterator[Database]:
    database = Database(make_pg_database(), threads=4)
    database.migrate()
    yield database
    database.close()


def new_tenant(db: Database) -> str:
    tenant_id = f"ten-{uuid.uuid4().hex[:12]}"
    db.call(lambda s: s.add(Tenant(id=tenant_id, name=tenant_id)))
    return tenant_id


def count_rows(db: Database, tenant_id: str) -> int:
    return db.call(lambda s: s.scalar(select(func.count()).select_from(Future).where(Future.tenant_id == tenant_id))) or 0


async def submit(hub: FutureHub, tenant_id: str, seq_id: int = 1, fingerprint: str = "fp", scope: str = "model:m"):
    return await hub.submit(tenant_id=tenant_id, kind="forward_backward", scope=scope, seq_id=seq_id, fingerprint=fingerprint)


# --------------------------------------------------------------------------------------------
# submit


def test_submit_is_idempotent_per_tenant_scope_seq_and_fingerprint(sqlite_db: Database) -> None:
    tenant, other_tenant = new_tenant(sqlite_db), new_tenant(sqlite_db)

    async def scenario() -> None:
        hub = FutureHub(sqlite_db)
        first = await submit(hub, tenant)
        assert first.is_new and first.request_id.startswith("req-")
        retry = await submit(hub, tenant)
        assert retry.request_id == first.request_id and retry.is_new is False

        variants = [
            await submit(hub, tenant, fingerprint="other"),
            await submit(hub, other_tenant),
            await submit(hub, tenant, seq_id=2),
            await submit(hub, tenant, scope="model:other"),
        ]
        assert all(v.is_new for v in variants)
        assert len({first.request_id, *(v.request_id for v in variants)}) == 5

        view = await hub.get(tenant, first.request_id)
        assert view == FutureView(first.request_id, "forward_backward", "pending", None, None, None, None)

    arun(scenario)
    assert count_rows(sqlite_db, tenant) == 4 and count_rows(sqlite_db, other_tenant) == 1


def _concurrent_identical_submits(db: Database, rounds: int, width: int) -> None:
    tenant = new_tenant(db)

    async def scenario() -> None:
        hub = FutureHub(db)
        for seq_id in range(rounds):
            subs = await asyncio.gather(*(submit(hub, tenant, seq_id=seq_id) for _ in range(width)))
            assert len({s.request_id for s in subs}) == 1
            assert sum(s.is_new for s in subs) == 1

    arun(scenario)
    assert count_rows(db, tenant) == rounds


def test_concurrent_identical_submits_make_one_row_sqlite(sqlite_db: Database) -> None:
    _concurrent_identical_submits(sqlite_db, rounds=15, width=6)


def test_submit_dedupe_postgresql(pg_db: Database) -> None:
    tenant, other = new_tenant(pg_db), new_tenant(pg_db)

    async def sequential() -> None:
        hub = FutureHub(pg_db)
        a = await submit(hub, tenant)
        b = await submit(hub, tenant)
        c = await submit(hub, tenant, fingerprint="x")
        d = await submit(hub, other)
        assert (a.is_new, b.is_new, c.is_new, d.is_new) == (True, False, True, True)
        assert a.request_id == b.request_id and len({a.request_id, c.request_id, d.request_id}) == 3

    arun(sequential)
    _concurrent_identical_submits(pg_db, rounds=15, width=6)


# --------------------------------------------------------------------------------------------
# wait


def test_wait_returns_at_once_for_finished_futures(sqlite_db: Database) -> None:
    tenant = new_tenant(sqlite_db)

    async def scenario() -> None:
        hub = FutureHub(sqlite_db)
        done = (await submit(hub, tenant, seq_id=1)).request_id
        failed = (await submit(hub, tenant, seq_id=2)).request_id
        await hub.resolve(done, b'{"ok": true}', "json")
        await hub.fail(failed, "bad input: x", "user")

        started = time.monotonic()
        done_view = await hub.wait(tenant, done, timeout=10)
        failed_view = await hub.wait(tenant, failed, timeout=10)
        assert time.monotonic() - started < 1.0
        assert done_view == FutureView(done, "forward_backward", "done", b'{"ok": true}', "json", None, None)
        assert failed_view == FutureView(failed, "forward_backward", "failed", None, None, "bad input: x", "user")

    arun(scenario)


def test_wait_returns_pending_view_after_timeout(sqlite_db: Database) -> None:
    tenant = new_tenant(sqlite_db)

    async def scenario() -> None:
        hub = FutureHub(sqlite_db)
        rid = (await submit(hub, tenant)).request_id
        started = time.monotonic()
        view = await hub.wait(tenant, rid, timeout=0.3)
        elapsed = time.monotonic() - started
        assert view is not None and view.state == "pending" and view.request_id == rid
        assert 0.3 <= elapsed < 2.0

    arun(scenario)


@pytest.mark.parametrize("outcome", ["resolve", "fail"])
def test_wait_wakes_promptly_when_the_future_ends(sqlite_db: Database, outcome: str) -> None:
    tenant = new_tenant(sqlite_db)

    async def scenario() -> None:
        hub = FutureHub(sqlite_db)
        rid = (await submit(hub, tenant)).request_id
        started = time.monotonic()
        waiters = [asyncio.create_task(hub.wait(tenant, rid, timeout=10)) for _ in range(3)]
        await asyncio.sleep(0.1)
        assert not any(w.done() for w in waiters)
        if outcome == "resolve":
            await hub.resolve(rid, b"\x01\x02", "proto")
        else:
            await hub.fail(rid, "it broke", "server")
        views = await asyncio.wait_for(asyncio.gather(*waiters), timeout=5)
        assert time.monotonic() - started < 1.5  # nowhere near the 10 s timeout
        for view in views:
            if outcome == "resolve":
                assert (view.state, view.result, view.result_format) == ("done", b"\x01\x02", "proto")
            else:
                assert (view.state, view.error, view.error_category) == ("failed", "it broke", "server")

    arun(scenario)


def test_resolve_between_read_and_wait_is_not_lost(sqlite_db: Database) -> None:
    """Deterministic: the row is read as pending, then the future is resolved, then wait() waits."""
    tenant = new_tenant(sqlite_db)

    async def scenario() -> None:
        # Submitted and resolved by another process's hub (a future pending here is known to be
        # pending without a read); its end reaches this hub as a wake-up, as over the bus.
        hub, other = FutureHub(sqlite_db), FutureHub(sqlite_db, announce=None)
        rid = (await submit(other, tenant)).request_id
        original_get = hub.get
        calls = 0

        async def get_then_resolve(tenant_id: str, request_id: str) -> FutureView | None:
            nonlocal calls
            calls += 1
            view = await original_get(tenant_id, request_id)
            if calls == 1:
                assert view is not None and view.state == "pending"
                await other.resolve(rid, b"r", "json")
                hub.wake([rid])
            return view

        hub.get = get_then_resolve  # type: ignore[method-assign]
        started = time.monotonic()
        view = await hub.wait(tenant, rid, timeout=5)
        assert time.monotonic() - started < 1.0
        assert view is not None and view.state == "done" and view.result == b"r"

    arun(scenario)


def test_resolve_racing_wait_is_never_lost_stress(sqlite_db: Database) -> None:
    tenant = new_tenant(sqlite_db)
    rng = random.Random(1234)

    async def scenario() -> None:
        hub = FutureHub(sqlite_db)
        rids = [(await submit(hub, tenant, seq_id=i)).request_id for i in range(120)]

        async def resolve_soon(rid: str, yields: int) -> None:
            for _ in range(yields):
                await asyncio.sleep(0)
            await hub.resolve(rid, rid.encode(), "json")

        started = time.monotonic()
        for rid in rids:
            view, _ = await asyncio.gather(hub.wait(tenant, rid, timeout=3), resolve_soon(rid, rng.randrange(6)))
            assert view is not None and view.state == "done" and view.result == rid.encode(), rid
        # A lost wake-up costs the full 3 s timeout; 120 rounds must not have hit one.
        assert time.monotonic() - started < 2.9

    arun(scenario)


def test_other_tenant_sees_nothing(sqlite_db: Database) -> None:
    owner, stranger = new_tenant(sqlite_db), new_tenant(sqlite_db)

    async def scenario() -> None:
        hub = FutureHub(sqlite_db)
        pending = (await submit(hub, owner, seq_id=1)).request_id
        done = (await submit(hub, owner, seq_id=2)).request_id
        await hub.resolve(done, b"secret", "json")
        started = time.monotonic()
        for rid in (pending, done, "req-does-not-exist"):
            assert await hub.get(stranger, rid) is None
            assert await hub.wait(stranger, rid, timeout=5) is None
        assert time.monotonic() - started < 1.0  # "not found" is answered at once, not after the timeout
        assert (await hub.get(owner, done)).result == b"secret"

    arun(scenario)


def test_stranger_polling_does_not_steal_the_owners_wakeup(sqlite_db: Database) -> None:
    owner, stranger = new_tenant(sqlite_db), new_tenant(sqlite_db)

    async def scenario() -> None:
        hub = FutureHub(sqlite_db)
        rid = (await submit(hub, owner)).request_id
        owner_wait = asyncio.create_task(hub.wait(owner, rid, timeout=5))
        await asyncio.sleep(0.05)
        assert await hub.wait(stranger, rid, timeout=5) is None
        started = time.monotonic()
        await hub.resolve(rid, b"x", "json")
        view = await asyncio.wait_for(owner_wait, timeout=6)
        assert view.state == "done" and time.monotonic() - started < 1.0

    arun(scenario)


def test_waits_leave_no_per_request_state_behind(sqlite_db: Database) -> None:
    """Every retrieve_future is a wait(); the hub must not keep an entry per polled request_id."""
    owner, stranger = new_tenant(sqlite_db), new_tenant(sqlite_db)

    async def scenario() -> None:
        hub = FutureHub(sqlite_db)
        done = (await submit(hub, owner, seq_id=1)).request_id
        pending = (await submit(hub, owner, seq_id=2)).request_id
        await hub.resolve(done, b"x", "json")
        await hub.wait(owner, done, timeout=1)  # already finished
        await hub.wait(stranger, done, timeout=1)  # not this tenant's
        await hub.wait(owner, "req-missing", timeout=1)  # does not exist
        await hub.wait(owner, pending, timeout=0.05)  # timed out
        assert not hub._events  # noqa: SLF001

    arun(scenario)




# --------------------------------------------------------------------------------------------
# the round trip from memory: what ended here is answered without a read


class CountingDb:
    """The hub's database, counting the transactions the hub runs."""

    def __init__(self, db: Database) -> None:
        self.db, self.runs = db, 0

    async def run(self, fn):  # noqa: ANN001, ANN201
        self.runs += 1
        return await self.db.run(fn)


def test_a_submission_is_one_write_and_its_retrieval_no_read(sqlite_db: Database) -> None:
    tenant = new_tenant(sqlite_db)

    async def scenario() -> None:
        db = CountingDb(sqlite_db)
        hub = FutureHub(db)  # type: ignore[arg-type]
        rid = (await submit(hub, tenant, seq_id=41)).request_id
        assert db.runs == 1  # the insert; no read before it
        waiting = asyncio.create_task(hub.wait(tenant, rid, timeout=5))
        await asyncio.sleep(0.01)
        assert db.runs == 1  # pending here: known without a read
        await hub.resolve(rid, b"result", "json")
        view = await waiting
        assert view is not None and view.state == "done" and view.result == b"result"
        assert db.runs == 2  # the resolve's write; the waiter read nothing
        assert (await hub.wait(tenant, rid, timeout=5)).result == b"result" and db.runs == 2  # a re-poll: memory
        assert await hub.get(new_tenant(sqlite_db), rid) is None  # another tenant: not from memory either
        retry = await submit(hub, tenant, seq_id=41)
        assert retry.request_id == rid and not retry.is_new  # the unique key answers a retry

    arun(scenario)


def test_results_dropped_from_the_store_are_not_answered_from_memory(sqlite_db: Database) -> None:
    tenant = new_tenant(sqlite_db)

    async def scenario() -> None:
        hub = FutureHub(sqlite_db)
        rid = (await submit(hub, tenant, seq_id=42)).request_id
        await hub.resolve(rid, b"result", "json")
        hub.forget_results([rid])
        sqlite_db.call(lambda s: setattr(s.get(Future, rid), "result", None))
        assert (await hub.get(tenant, rid)).result is None  # read from the store

    arun(scenario)


def test_recent_results_are_bounded_by_count_bytes_and_age(monkeypatch: pytest.MonkeyPatch) -> None:
    from server.queue.futures import RecentResults

    monkeypatch.setattr(RecentResults, "RECENT_COUNT", 3)
    monkeypatch.setattr(RecentResults, "RECENT_BYTES", 10)
    recent = RecentResults()

    def view(i: int, size: int = 1) -> FutureView:
        return FutureView(f"req-{i}", "optim_step", "done", b"x" * size, "json", None, None)

    for i in range(5):
        recent.put("t", view(i))
    assert len(recent) == 3 and recent.get("t", "req-0") is None and recent.get("t", "req-4") is not None
    recent.put("t", view(9, size=9))  # 1 + 1 + 9 > 10 bytes: the oldest go
    assert recent.get("t", "req-3") is None and recent.get("t", "req-9") is not None
    clock = time.monotonic()
    monkeypatch.setattr(time, "monotonic", lambda: clock + RecentResults.RECENT_SECONDS + 1)
    assert recent.get("t", "req-9") is None  # older than RECENT_SECONDS
