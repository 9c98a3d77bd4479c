"""server.queue.scheduler: per-key seq_id order, round-robin across keys, failures become future errors.

The fairness bound tested here: once a key has an op queued, it waits for at most the op already
running when it arrived plus one op per other busy key before its own op runs. With everything
queued before the scheduler starts there is no running op, so with keys A (5 ops) then B (1 op),
B's op runs second.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator

import pytest

from server.errors import OperationFailed
from server.kinds import FutureState, Lane, OpKind
from server.queue.futures import FutureHub, FutureView
from server.queue.scheduler import Batch, Pack, Scheduler
from server.store.database import Database
from server.store.tables import Tenant
from tests.support.aio import arun

Trace = list[tuple[str, int]]


@pytest.fixture(scope="module")
def db(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Database]:
    database = Database(f"sqlite:///{tmp_path_factory.mktemp('sched') / 'twinkle.db'}", threads=2)
    database.migrate()
    yield database
    database.close()


@pytest.fixture
def tenant(db: Database) -> str:
    tenant_id = f"ten-{uuid.uuid4().hex[:12]}"
    db.call(lambda s: s.add(Tenant(id=tenant_id, name=tenant_id)))
    return tenant_id


class Harness:
    """A scheduler over a real FutureHub; every op records (key, seq_id) when it starts."""

    def __init__(self, db: Database, tenant: str) -> None:
        self.hub = FutureHub(db)
        self.scheduler = Scheduler(self.hub)
        self.tenant = tenant
        self.trace: Trace = []
        self.request_ids: list[str] = []

    async def submit(
        self, key: str, seq_id: int, body: Callable[[], Awaitable[None]] | None = None, kind: str = "forward",
        tenant: str = "", cost: int = 0,
    ) -> str:
        sub = await self.hub.submit(tenant_id=self.tenant, kind=kind, scope=key, seq_id=seq_id, fingerprint="fp")

        async def run() -> tuple[bytes, str]:
            self.trace.append((key, seq_id))
            if body is not None:
                await body()
            return f"{key}#{seq_id}".encode(), "json"

        self.scheduler.submit(key, seq_id=seq_id, request_id=sub.request_id, kind=kind, run=run, tenant=tenant,
                              cost=cost)
        self.request_ids.append(sub.request_id)
        return sub.request_id

    async def result(self, request_id: str, timeout: float = 5) -> FutureView:
        view = await self.hub.wait(self.tenant, request_id, timeout)
        assert view is not None
        assert view.state != "pending", f"{request_id} still pending after {timeout} s"
        return view

    async def drain(self) -> list[FutureView]:
        return [await self.result(rid) for rid in self.request_ids]


def assert_round_robin_bound(trace: Trace, busy_keys: set[str]) -> None:
    """Between two consecutive ops of a key (or before its first op), no other key ran twice."""
    for key in busy_keys:
        positions = [i for i, (k, _) in enumerate(trace) if k == key]
        starts = [-1, *positions[:-1]]
        for start, end in zip(starts, positions):
            between = [k for k, _ in trace[start + 1 : end]]
            assert len(between) == len(set(between)), f"{key} waited for {between} in {trace}"
            assert len(between) <= len(busy_keys) - 1


# --------------------------------------------------------------------------------------------
# Order within a key, fairness across keys


def test_one_key_runs_in_seq_id_order_whatever_the_arrival_order(db: Database, tenant: str) -> None:
    async def scenario() -> None:
        h = Harness(db, tenant)
        for seq in (5, 3, 1, 4, 2, 7, 6):
            await h.submit("model:a", seq)
        assert h.scheduler.depth("model:a") == 7 and h.scheduler.depth("model:other") == 0
        h.scheduler.start()
        views = await h.drain()
        await h.scheduler.stop()
        assert h.trace == [("model:a", s) for s in range(1, 8)]
        assert all(v.state == "done" for v in views)
        # Each future got its own op's result.
        assert [v.result for v in views] == [f"model:a#{s}".encode() for s in (5, 3, 1, 4, 2, 7, 6)]
        assert h.scheduler.depth("model:a") == 0

    arun(scenario)


def test_late_lower_seq_id_goes_before_queued_higher_ones(db: Database, tenant: str) -> None:
    """SDK chunking posts chunk 1 last (seq 2, 3, 1): while op 0 runs, 2 and 3 queue, then 1 arrives."""

    async def scenario() -> None:
        h = Harness(db, tenant)
        gate = asyncio.Event()
        await h.submit("model:a", 0, body=gate.wait)
        h.scheduler.start()
        while not h.trace:
            await asyncio.sleep(0.001)
        for seq in (2, 3, 1):
            await h.submit("model:a", seq)
        gate.set()
        await h.drain()
        await h.scheduler.stop()
        assert [s for _, s in h.trace] == [0, 1, 2, 3]

    arun(scenario)


def test_short_queue_is_not_stuck_behind_a_long_one(db: Database, tenant: str) -> None:
    async def scenario() -> None:
        h = Harness(db, tenant)
        for seq in range(1, 6):
            await h.submit("model:A", seq)
        await h.submit("model:B", 1)
        h.scheduler.start()
        await h.drain()
        await h.scheduler.stop()
        assert h.trace == [("model:A", 1), ("model:B", 1), *(("model:A", s) for s in range(2, 6))]

    arun(scenario)


def test_round_robin_bound_with_three_keys(db: Database, tenant: str) -> None:
    async def scenario() -> None:
        h = Harness(db, tenant)
        for key, n in (("A", 5), ("B", 3), ("C", 1)):
            for seq in range(n, 0, -1):  # each key's ops arrive in reverse
                await h.submit(key, seq)
        h.scheduler.start()
        await h.drain()
        await h.scheduler.stop()
        assert h.trace == [("A", 1), ("B", 1), ("C", 1), ("A", 2), ("B", 2), ("A", 3), ("B", 3), ("A", 4), ("A", 5)]
        assert_round_robin_bound(h.trace, {"A", "B", "C"})

    arun(scenario)


def test_key_arriving_while_another_runs_waits_at_most_one_more_op_per_busy_key(db: Database, tenant: str) -> None:
    async def scenario() -> None:
        h = Harness(db, tenant)
        gate = asyncio.Event()
        for seq in range(1, 7):
            await h.submit("A", seq, body=gate.wait)
        h.scheduler.start()
        while not h.trace:  # A1 is running
            await asyncio.sleep(0.001)
        await h.submit("B", 1, body=gate.wait)
        await h.submit("C", 1, body=gate.wait)
        gate.set()
        await h.drain()
        await h.scheduler.stop()
        assert h.trace[0] == ("A", 1)
        after_arrival = [k for k, _ in h.trace[1:]]
        # B and C each wait for at most one more A op and each other's single op.
        assert after_arrival.index("B") <= 1 and after_arrival.index("C") <= 2
        assert after_arrival[:3].count("A") <= 1
        assert [s for k, s in h.trace if k == "A"] == list(range(1, 7))

    arun(scenario)


def test_key_that_emptied_rejoins_the_rotation(db: Database, tenant: str) -> None:
    async def scenario() -> None:
        h = Harness(db, tenant)
        await h.submit("A", 1)
        h.scheduler.start()
        await h.drain()
        await h.submit("A", 2)
        await h.submit("B", 1)
        await h.drain()
        await h.scheduler.stop()
        assert h.trace == [("A", 1), ("A", 2), ("B", 1)]

    arun(scenario)


# --------------------------------------------------------------------------------------------
# Failures


@pytest.mark.parametrize("category", ["user", "server"])
def test_operation_failed_becomes_the_futures_error(db: Database, tenant: str, category: str) -> None:
    async def scenario() -> None:
        h = Harness(db, tenant)

        async def refuse() -> None:
            raise OperationFailed("loss_fn 'foo' is not supported; use one of: cross_entropy", category)

        bad = await h.submit("A", 1, body=refuse)
        good = await h.submit("A", 2)
        h.scheduler.start()
        bad_view, good_view = await h.result(bad), await h.result(good)
        await h.scheduler.stop()
        assert (bad_view.state, bad_view.error_category) == ("failed", category)
        assert bad_view.error == "loss_fn 'foo' is not supported; use one of: cross_entropy"
        assert bad_view.result is None
        assert good_view.state == "done"

    arun(scenario)


def test_operation_failed_defaults_to_user_category(db: Database, tenant: str) -> None:
    async def scenario() -> None:
        h = Harness(db, tenant)

        async def refuse() -> None:
            raise OperationFailed("no such checkpoint")

        rid = await h.submit("A", 1, body=refuse)
        h.scheduler.start()
        view = await h.result(rid)
        await h.scheduler.stop()
        assert (view.error, view.error_category) == ("no such checkpoint", "user")

    arun(scenario)


def test_crash_is_a_server_error_without_internals_and_the_scheduler_goes_on(
    db: Database, tenant: str, caplog: pytest.LogCaptureFixture
) -> None:
    secret = "SECRET-path=/srv/data/tenant-x/adapter.bin"

    async def scenario() -> None:
        h = Harness(db, tenant)

        async def crash() -> None:
            raise KeyError(secret)

        async def crash_differently() -> None:
            raise ZeroDivisionError("division by zero")

        first = await h.submit("A", 1, body=crash, kind="forward_backward")
        await h.submit("B", 1, body=crash_differently, kind="optim_step")
        after = [await h.submit("A", 2), await h.submit("B", 2), await h.submit("C", 1)]
        with caplog.at_level(logging.ERROR, logger="server.queue.scheduler"):
            h.scheduler.start()
            views = await h.drain()
        await h.scheduler.stop()

        crashed = views[:2]
        for view, kind, rid in zip(crashed, ("forward_backward", "optim_step"), h.request_ids[:2]):
            assert (view.state, view.error_category) == ("failed", "server")
            assert kind in view.error and rid in view.error  # something a person can quote
            for leak in (secret, "SECRET", "KeyError", "ZeroDivisionError", "division by zero", "Traceback", 'File "'):
                assert leak not in view.error
        assert first in crashed[0].error
        assert all(v.state == "done" for v in views[2:]), "the scheduler stopped after a crash"
        assert [v.request_id for v in views[2:]] == after

    arun(scenario)
    # The details go to the server log instead.
    crash_records = [r for r in caplog.records if r.exc_info]
    assert crash_records and any(secret in str(r.exc_info[1]) for r in crash_records)


def test_scheduler_survives_a_store_failure_while_recording_a_result(db: Database, tenant: str) -> None:
    async def scenario() -> None:
        h = Harness(db, tenant)
        original = h.hub.finish_many
        first_id = None

        async def flaky_finish(outcomes) -> None:  # noqa: ANN001 - a list of futures.Outcome
            if any(o.request_id == first_id and o.state == "done" for o in outcomes):
                raise RuntimeError("database connection lost")  # this result can never be stored
            await original(outcomes)

        h.hub.finish_many = flaky_finish  # type: ignore[method-assign]
        first = first_id = await h.submit("A", 1)
        second = await h.submit("A", 2)
        h.scheduler.start()
        second_view = await h.result(second)
        first_view = await h.hub.get(tenant, first)
        await h.scheduler.stop()
        assert second_view.state == "done", "the scheduler died when a result could not be stored"
        # The first op's outcome could not be stored; it must not look like it is still running.
        assert (first_view.state, first_view.error_category) == ("failed", "server")
        assert "database connection lost" not in first_view.error

    arun(scenario)


# --------------------------------------------------------------------------------------------
# stop()


def test_stop_cancels_a_running_op_promptly(db: Database, tenant: str) -> None:
    async def scenario() -> None:
        h = Harness(db, tenant)
        never = asyncio.Event()
        cancelled = asyncio.Event()

        async def hang() -> None:
            try:
                await never.wait()
            except asyncio.CancelledError:
                cancelled.set()
                raise

        rid = await h.submit("A", 1, body=hang)
        await h.submit("A", 2)
        h.scheduler.start()
        while not h.trace:
            await asyncio.sleep(0.001)
        started = time.monotonic()
        await asyncio.wait_for(h.scheduler.stop(), timeout=2)
        assert time.monotonic() - started < 1.0
        assert cancelled.is_set()
        assert h.trace == [("A", 1)]  # nothing ran after stop
        # The interrupted op stays pending in the store; the runtime fails it as it stops (Instances.retire).
        assert (await h.hub.get(tenant, rid)).state == "pending"
        await asyncio.sleep(0.05)
        assert h.trace == [("A", 1)]

    arun(scenario)


def test_stop_when_idle_and_before_start(db: Database, tenant: str) -> None:
    async def scenario() -> None:
        never_started = Scheduler(FutureHub(db))
        await never_started.stop()  # no error

        h = Harness(db, tenant)
        h.scheduler.start()
        await asyncio.sleep(0.01)  # idle: waiting for work
        await asyncio.wait_for(h.scheduler.stop(), timeout=2)
        await h.scheduler.stop()  # twice is fine

    arun(scenario)


def test_idle_scheduler_wakes_for_new_work(db: Database, tenant: str) -> None:
    async def scenario() -> None:
        h = Harness(db, tenant)
        h.scheduler.start()
        await asyncio.sleep(0.05)
        started = time.monotonic()
        view = await h.result(await h.submit("A", 1))
        assert view.state == "done" and time.monotonic() - started < 1.0
        await h.scheduler.stop()

    arun(scenario)


# --------------------------------------------------------------------------------------------
# Ordered queues (a model's): waiting for a missing seq_id, skip, grace; batching of neighbours


class OrderedHarness(Harness):
    """Ops on ordered queues; ops with a batch key merge when they are neighbours in seq order."""

    def __init__(self, db: Database, tenant: str, gap_grace: float = 5.0) -> None:
        super().__init__(db, tenant)
        self.scheduler = Scheduler(self.hub, gap_grace=gap_grace)
        self.calls: list[list[int]] = []  # seq_ids of each engine call

    async def submit_op(self, key: str, seq_id: int, batch_key: str | None = None, size: int = 1) -> str:
        sub = await self.hub.submit(tenant_id=self.tenant, kind="forward_backward", scope=key, seq_id=seq_id,
                                    fingerprint="fp")

        async def run_many(seqs: list[int]) -> list[tuple[bytes, str]]:
            self.calls.append(list(seqs))
            self.trace.extend((key, s) for s in seqs)
            return [(f"{key}#{s}".encode(), "json") for s in seqs]

        async def run() -> tuple[bytes, str]:
            return (await run_many([seq_id]))[0]

        batch = None if batch_key is None else Batch(key=batch_key, size=size, budget=4, payload=seq_id, run=run_many)
        self.scheduler.submit(key, seq_id=seq_id, request_id=sub.request_id, kind="forward_backward", run=run,
                              batch=batch, ordered=True)
        self.request_ids.append(sub.request_id)
        return sub.request_id


def test_ordered_queue_holds_later_chunks_until_the_first_arrives(db: Database, tenant: str) -> None:
    """The SDK posts chunks 2..n first and chunk 1 last: nothing may run before chunk 1."""

    async def scenario() -> None:
        h = OrderedHarness(db, tenant)
        h.scheduler.start()
        await h.submit_op("model:m", 2, "fb")
        await h.submit_op("model:m", 3, "fb")
        await asyncio.sleep(0.3)
        assert h.calls == []  # waiting for seq_id 1
        await h.submit_op("model:m", 1, "fb")
        await h.submit_op("model:m", 4)  # an optim_step: not batchable
        await h.drain()
        await h.scheduler.stop()
        assert h.calls == [[1, 2, 3], [4]]  # the three chunks ran as one engine call, then the step

    arun(scenario)


def test_batches_respect_key_contiguity_and_budget(db: Database, tenant: str) -> None:
    async def scenario() -> None:
        h = OrderedHarness(db, tenant)
        for seq, key, size in [(1, "ce", 1), (2, "ce", 2), (3, "ppo", 1), (4, "ppo", 3), (5, "ppo", 1), (6, "ce", 1)]:
            await h.submit_op("model:m", seq, key, size)
        h.scheduler.start()
        await h.drain()
        await h.scheduler.stop()
        # ce(1,2) merge; ppo 3+4 fit the budget of 4, 5 would not; 6 is ce again.
        assert h.calls == [[1, 2], [3, 4], [5], [6]]

    arun(scenario)


def test_skip_releases_a_refused_seq_id_at_once(db: Database, tenant: str) -> None:
    async def scenario() -> None:
        h = OrderedHarness(db, tenant, gap_grace=30)
        h.scheduler.start()
        await h.submit_op("model:m", 1)
        await h.result(h.request_ids[-1])
        await h.submit_op("model:m", 3)
        await asyncio.sleep(0.2)
        assert h.calls == [[1]]  # seq_id 2 is missing
        started = time.monotonic()
        h.scheduler.skip("model:m", 2, "")  # ...because its POST was refused
        await h.drain()
        await h.scheduler.stop()
        assert h.calls == [[1], [3]] and time.monotonic() - started < 5

    arun(scenario)


def test_a_missing_seq_id_is_waited_for_only_gap_grace_seconds(db: Database, tenant: str, caplog) -> None:
    async def scenario() -> None:
        h = OrderedHarness(db, tenant, gap_grace=0.5)
        h.scheduler.start()
        started = time.monotonic()
        await h.submit_op("model:m", 2)  # seq_id 1 never comes
        await h.submit_op("model:other", 1)  # another model is not held up meanwhile
        await h.result(h.request_ids[1], timeout=0.4)
        await h.drain()
        waited = time.monotonic() - started
        await h.scheduler.stop()
        assert h.calls == [[1], [2]] and 0.45 <= waited < 3

    with caplog.at_level(logging.WARNING, logger="server.queue.scheduler"):
        arun(scenario)
    assert any(r.getMessage() == "seq_gap_skipped" for r in caplog.records)


def test_cancel_takes_a_queued_op_out_and_releases_its_seq_id(db: Database, tenant: str) -> None:
    async def scenario() -> None:
        h = OrderedHarness(db, tenant, gap_grace=30)
        for seq in (1, 2, 3):
            await h.submit_op("model:m", seq)
        cancelled = h.scheduler.cancel(h.request_ids[1])
        assert cancelled is not None and cancelled.seq_id == 2
        assert h.scheduler.cancel(h.request_ids[1]) is None  # not queued any more
        h.scheduler.start()
        await h.result(h.request_ids[0])
        await h.result(h.request_ids[2])
        await h.scheduler.stop()
        assert h.calls == [[1], [3]]

    arun(scenario)



# --------------------------------------------------------------------------------------------
# Fairness across tenants, cross-tenant batches, why an operation waits


def test_a_flooding_tenant_delays_a_light_one_by_at_most_one_call_per_busy_tenant(db: Database, tenant: str) -> None:
    """Tenant A floods 3 models with 6 ops each; tenant B's one op, arriving while A's first op
    runs, waits for that op plus at most one more call (one per other busy tenant), no matter how
    many models or ops A has queued."""

    async def scenario() -> None:
        h = Harness(db, tenant)
        gate = asyncio.Event()

        async def slow() -> None:
            await gate.wait()

        for seq in range(1, 7):
            for model in ("a1", "a2", "a3"):
                await h.submit(f"model:{model}", seq, slow if (model, seq) == ("a1", 1) else None, tenant="A")
        h.scheduler.start()
        await asyncio.sleep(0.05)
        assert h.trace == [("model:a1", 1)]  # A's first op is running
        light = await h.submit("model:b", 1, tenant="B")
        gate.set()
        await h.result(light)
        position = h.trace.index(("model:b", 1))
        await h.drain()
        await h.scheduler.stop()
        assert position <= 2, h.trace  # the running op, then at most one op of the one other busy tenant

    arun(scenario)


def test_two_tenants_alternate_whatever_their_queue_lengths(db: Database, tenant: str) -> None:
    async def scenario() -> None:
        h = Harness(db, tenant)
        for seq in range(1, 5):
            await h.submit("model:x1", seq, tenant="X")
            await h.submit("model:x2", seq, tenant="X")
        await h.submit("model:y", 1, tenant="Y")
        await h.submit("model:y", 2, tenant="Y")
        h.scheduler.start()
        await h.drain()
        await h.scheduler.stop()
        owners = ["Y" if key == "model:y" else "X" for key, _ in h.trace]
        assert owners[:4] == ["X", "Y", "X", "Y"], h.trace

    arun(scenario)


def test_samples_of_several_tenants_on_one_checkpoint_share_a_call(db: Database, tenant: str) -> None:
    async def scenario() -> None:
        h = OrderedHarness(db, tenant)
        calls: list[list[str]] = []

        async def submit(owner: str, n: int) -> None:
            sub = await h.hub.submit(tenant_id=tenant, kind="sample", scope=f"s:{owner}", seq_id=n, fingerprint="fp")

            async def run_many(names: list[str]) -> list[tuple[bytes, str]]:
                calls.append(list(names))
                return [(name.encode(), "proto") for name in names]

            async def run() -> tuple[bytes, str]:
                return (await run_many([f"{owner}{n}"]))[0]

            batch = Batch(key="sample:ckpt-1", size=1, budget=8, payload=f"{owner}{n}", run=run_many)
            h.scheduler.submit(f"sample:{owner}:ckpt-1", seq_id=n, request_id=sub.request_id, kind="sample",
                               run=run, tenant=owner, batch=batch)
            h.request_ids.append(sub.request_id)

        for n in range(3):
            await submit("A", n)
        await submit("B", 0)
        h.scheduler.start()
        await h.drain()
        await h.scheduler.stop()
        assert calls == [["A0", "A1", "A2", "B0"]]  # one pass serves both tenants

    arun(scenario)


def test_a_packed_call_runs_once_for_several_models_and_a_failing_model_fails_alone(db: Database, tenant: str) -> None:
    async def scenario() -> None:
        h = OrderedHarness(db, tenant)
        calls: list[list[tuple[str, list[str]]]] = []

        async def run_packed(parts: list) -> list:
            calls.append(parts)
            return [OperationFailed(f"{model} refused") if model == "bad" else [(p.encode(), "proto") for p in payloads]
                    for model, payloads in parts]

        async def submit(model: str, seq: int) -> None:
            sub = await h.hub.submit(tenant_id=tenant, kind="forward_backward", scope=model, seq_id=seq,
                                     fingerprint="fp")
            pack = Pack(key="base", budget=100, max_queues=8, item=model, run=run_packed)
            batch = Batch(key="ce", size=1, budget=8, payload=f"{model}#{seq}", run=_unused_batch, pack=pack)
            h.scheduler.submit(model, seq_id=seq, request_id=sub.request_id, kind="forward_backward", run=_unused,
                               tenant=model, batch=batch, ordered=True)
            h.request_ids.append(sub.request_id)

        for model, seq in [("a", 1), ("a", 2), ("bad", 1), ("c", 1)]:
            await submit(model, seq)
        recorded, finish_many = [], h.hub.finish_many

        async def counted(outcomes: list) -> None:
            recorded.append(len(outcomes))
            await finish_many(outcomes)

        h.hub.finish_many = counted  # type: ignore[method-assign]
        h.scheduler.start()
        views = await h.drain()
        await h.scheduler.stop()
        assert calls == [[("a", ["a#1", "a#2"]), ("bad", ["bad#1"]), ("c", ["c#1"])]]  # one engine call
        assert recorded == [4]  # and one store transaction for its four outcomes
        assert [v.state for v in views] == ["done", "done", "failed", "done"]
        assert "bad refused" in (views[2].error or "")

    arun(scenario)


async def _unused() -> tuple[bytes, str]:
    raise AssertionError("a packed op ran alone")


async def _unused_batch(payloads: list) -> list[tuple[bytes, str]]:
    raise AssertionError("a packed op ran as a plain batch")


class _OneTokenBudget:
    """Tenant "slow" may run one op per token it has not spent; "fast" is never throttled."""

    def __init__(self) -> None:
        self.spent = 0

    def ready_at(self, tenant: str, cost: int, now: float) -> float:
        return now + 3600 if tenant == "slow" and self.spent >= 1 else now

    def charge(self, tenant: str, cost: int, now: float) -> None:
        if tenant == "slow":
            self.spent += cost

    def reason(self, tenant: str, cost: int, now: float) -> str:
        return "over its tokens/s" if self.ready_at(tenant, cost, now) > now else ""


def test_a_throttled_tenant_waits_with_a_reason_and_others_run(db: Database, tenant: str) -> None:
    async def scenario() -> None:
        h = Harness(db, tenant)
        h.scheduler = Scheduler(h.hub, throttle=_OneTokenBudget())
        first = await h.submit("model:s", 1, tenant="slow", cost=1)
        second = await h.submit("model:s", 2, tenant="slow", cost=1)
        other = await h.submit("model:f", 1, tenant="fast", cost=1)
        h.scheduler.start()
        await h.result(first)
        await h.result(other)
        await asyncio.sleep(0.1)
        assert h.scheduler.state_of(second, "slow") == ("paused_rate_limit", "over its tokens/s")
        assert h.scheduler.state_of(other, "fast") == ("active", None)
        await h.scheduler.stop()
        assert ("model:s", 2) not in h.trace

    arun(scenario)


def test_a_queue_first_touched_by_a_refusal_belongs_to_the_tenant_that_submits(db: Database, tenant: str) -> None:
    """skip() (a refused seq_id) may create a model's queue before any submission; the queue is
    its owner's from the start, so it counts, and is throttled, as the owner's."""

    async def scenario() -> None:
        h = Harness(db, tenant)
        h.scheduler = Scheduler(h.hub, throttle=_OneTokenBudget())
        h.scheduler.skip("model:s", 1, "slow")  # the model's first request was refused
        first = await h.submit("model:s", 2, tenant="slow", cost=1)
        second = await h.submit("model:s", 3, tenant="slow", cost=1)
        assert h.scheduler.tenant_depth("slow") == 2
        h.scheduler.start()
        await h.result(first)
        await asyncio.sleep(0.1)
        assert h.scheduler.state_of(second, "slow") == ("paused_rate_limit", "over its tokens/s")
        await h.scheduler.stop()
        assert ("model:s", 3) not in h.trace

    arun(scenario)


def test_a_throttled_tenants_samples_do_not_ride_along_in_another_tenants_batch(db: Database, tenant: str) -> None:
    async def scenario() -> None:
        h = Harness(db, tenant)
        h.scheduler = Scheduler(h.hub, throttle=_OneTokenBudget())
        calls: list[list[str]] = []

        async def run_many(names: list[str]) -> list[tuple[bytes, str]]:
            calls.append(list(names))
            return [(name.encode(), "proto") for name in names]

        async def submit(owner: str, n: int) -> str:
            sub = await h.hub.submit(tenant_id=tenant, kind="sample", scope=f"s:{owner}", seq_id=n, fingerprint="fp")
            batch = Batch(key="sample:base", size=1, budget=8, payload=f"{owner}{n}", run=run_many)
            h.scheduler.submit(f"sample:{owner}:base", seq_id=n, request_id=sub.request_id, kind="sample",
                               run=lambda: run_many([f"{owner}{n}"]), tenant=owner, batch=batch, cost=1)
            return sub.request_id

        first = await submit("slow", 0)
        h.scheduler.start()
        await h.result(first)  # "slow" has now spent its budget
        held = [await submit("slow", n) for n in (1, 2)]
        fast = await submit("fast", 0)
        await h.result(fast)
        await asyncio.sleep(0.1)
        await h.scheduler.stop()
        assert calls == [["slow0"], ["fast0"]]
        assert h.scheduler.state_of(held[0], "slow") == ("paused_rate_limit", "over its tokens/s")

    arun(scenario)


# --------------------------------------------------------------------------------------------
# Lanes (what pick chooses is tested without a database in tests/unit/test_pick.py)


def test_a_sample_completes_while_a_long_training_op_runs(db: Database, tenant: str) -> None:
    """The engine declares a training lane and a sampling lane: tenant B's sample is not queued
    behind tenant A's training step."""

    async def scenario() -> None:
        h = Harness(db, tenant)
        h.scheduler = Scheduler(h.hub, lanes={Lane.TRAINING: 1, Lane.SAMPLING: 1})
        gate = asyncio.Event()
        step = await h.submit("model:a", 1, body=gate.wait, kind=OpKind.FORWARD_BACKWARD, tenant="A")
        later = await h.submit("model:a", 2, kind=OpKind.OPTIM_STEP, tenant="A")
        h.scheduler.start()
        while not h.trace:
            await asyncio.sleep(0.001)
        sample = await h.submit("sample:B:base", 1, kind=OpKind.SAMPLE, tenant="B")
        view = await h.result(sample, timeout=2)
        assert view.state == FutureState.DONE
        assert (await h.hub.get(tenant, step)).state == FutureState.PENDING  # still running
        assert h.scheduler.state_of(step, "A") == ("active", None)
        assert h.scheduler.state_of(later, "A")[0] == "paused_capacity"  # behind its own model's step
        gate.set()
        await h.drain()
        await h.scheduler.stop()
        assert h.trace == [("model:a", 1), ("sample:B:base", 1), ("model:a", 2)]

    arun(scenario)


def test_with_two_training_slots_models_overlap_but_one_models_ops_never_do(db: Database, tenant: str) -> None:
    async def scenario() -> None:
        h = Harness(db, tenant)
        h.scheduler = Scheduler(h.hub, lanes={Lane.TRAINING: 2, Lane.SAMPLING: 1})
        gates = {key: asyncio.Event() for key in ("a", "b")}
        running: set[str] = set()
        overlapped: list[set[str]] = []

        def body(key: str) -> Callable[[], Awaitable[None]]:
            async def run() -> None:
                assert key not in running, f"two ops of model {key} at once"
                running.add(key)
                overlapped.append(set(running))
                await gates[key].wait()
                running.discard(key)

            return run

        for seq in (1, 2):
            for key in ("a", "b"):
                await h.submit(key, seq, body=body(key), tenant=key.upper())
        h.scheduler.start()
        while len(running) < 2:
            await asyncio.sleep(0.001)
        await asyncio.sleep(0.05)
        assert h.trace == [("a", 1), ("b", 1)]  # both models run; neither's second op has started
        for gate in gates.values():
            gate.set()
        views = await h.drain()
        await h.scheduler.stop()
        assert all(v.state == FutureState.DONE for v in views)
        assert [s for k, s in h.trace if k == "a"] == [1, 2] and {"a", "b"} in overlapped

    arun(scenario)


def test_an_engine_must_allow_a_call_in_every_lane(db: Database) -> None:
    with pytest.raises(ValueError, match="every lane"):
        Scheduler(FutureHub(db), lanes={Lane.TRAINING: 1})
