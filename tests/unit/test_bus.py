"""Messages between server processes over the machine's real Redis (server/queue/bus.py): a waiter
on one process's hub wakes when another process ends the future; a key revoked anywhere leaves
every key cache at once; Redis down costs only the long-poll, never an error."""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path

import pytest

from server.cli import main
from server.queue.bus import RedisBus, publish_revocation
from server.queue.futures import FutureHub
from server.store.database import Database
from server.store.tables import Tenant

REDIS = "redis://127.0.0.1:6379/0"


@pytest.fixture
def db(tmp_path: Path):
    database = Database(f"sqlite:///{tmp_path / 'shared.db'}", threads=4)
    database.migrate()
    database.call(lambda s: s.add(Tenant(id="t", name="t")))
    yield database
    database.close()


async def two_processes(db: Database, url: str, prefix: str, revoked: list[str] | None = None
                        ) -> tuple[FutureHub, FutureHub, list[RedisBus]]:
    wakeups = [RedisBus(url, prefix), RedisBus(url, prefix)]
    hubs = [FutureHub(db, owner=f"p{i}", announce=w.announce) for i, w in enumerate(wakeups)]
    for hub, w in zip(hubs, wakeups):
        await w.start(hub.wake, (revoked if revoked is not None else []).append)
    await asyncio.sleep(0.3)  # both subscribed
    return hubs[0], hubs[1], wakeups


def test_a_waiter_on_another_process_wakes_when_the_future_ends(db: Database) -> None:
    async def scenario() -> None:
        runner, other, wakeups = await two_processes(db, REDIS, f"test-{uuid.uuid4().hex}")
        try:
            sub = await runner.submit(tenant_id="t", kind="sample", scope="sampler:x", seq_id=1, fingerprint="f")
            waiting = asyncio.create_task(other.wait("t", sub.request_id, timeout=20))
            await asyncio.sleep(0.2)
            started = time.monotonic()
            await runner.resolve(sub.request_id, b"done", "json")
            view = await waiting
            assert view.state == "done" and view.result == b"done"
            assert time.monotonic() - started < 2  # woken, not at the end of its 20 s long-poll
        finally:
            for w in wakeups:
                await w.stop()

    asyncio.run(scenario())


def test_redis_down_costs_the_long_poll_not_an_error(db: Database) -> None:
    async def scenario() -> None:
        runner, other, wakeups = await two_processes(db, "redis://127.0.0.1:1/0", "down")  # nothing listens there
        try:
            sub = await runner.submit(tenant_id="t", kind="sample", scope="sampler:x", seq_id=1, fingerprint="f")
            waiting = asyncio.create_task(other.wait("t", sub.request_id, timeout=1))
            await asyncio.sleep(0.1)
            started = time.monotonic()
            await runner.resolve(sub.request_id, b"done", "json")  # does not wait for Redis
            assert time.monotonic() - started < 0.5
            assert (await waiting).state == "pending"  # not woken: it reads the result at its next poll
            assert (await other.get("t", sub.request_id)).state == "done"
        finally:
            for w in wakeups:
                await w.stop()

    asyncio.run(scenario())


def test_a_key_revoked_in_one_process_or_the_cli_reaches_every_other(db: Database) -> None:
    prefix = f"test-{uuid.uuid4().hex}"

    async def scenario() -> None:
        heard: list[str] = []
        _, _, buses = await two_processes(db, REDIS, prefix, heard)
        try:
            await buses[0].revoked("key-1")
            assert await asyncio.to_thread(publish_revocation, REDIS, prefix, "key-2")  # as `twinkle keys revoke`
            for _ in range(50):
                if len(heard) == 4:
                    break
                await asyncio.sleep(0.05)
            assert sorted(heard) == ["key-1", "key-1", "key-2", "key-2"]  # both processes heard both
        finally:
            for bus in buses:
                await bus.stop()

    asyncio.run(scenario())
    assert not publish_revocation("redis://127.0.0.1:1/0", prefix, "key-3")  # Redis down: said, not raised


def test_twinkle_keys_revoke_tells_the_servers(tmp_path: Path, monkeypatch, capsys) -> None:
    prefix = f"test-{uuid.uuid4().hex}"
    monkeypatch.setenv("TWINKLE_REDIS_PREFIX", prefix)
    where = ["--database-url", f"sqlite:///{tmp_path / 'cli.db'}", "--redis-url", REDIS]
    assert main(["tenants", "create", "acme", *where]) == 0
    assert main(["keys", "create", "--tenant", "acme", *where]) == 0
    key_id = capsys.readouterr().err.split("created ", 1)[1].split()[0]

    async def scenario() -> list[str]:
        heard: list[str] = []
        bus = RedisBus(REDIS, prefix)
        await bus.start(lambda ids: None, heard.append)
        await asyncio.sleep(0.3)
        try:
            assert await asyncio.to_thread(main, ["keys", "revoke", key_id, *where]) == 0
            for _ in range(50):
                if heard:
                    break
                await asyncio.sleep(0.05)
        finally:
            await bus.stop()
        return heard

    assert asyncio.run(scenario()) == [key_id]
