"""Quotas shared over Redis (server/tenancy/shared.py), on the machine's real Redis, each test under
its own key prefix."""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest

from server.errors import Busy, Unavailable
from server.tenancy.shared import SharedQuotas

REDIS = "redis://127.0.0.1:6379/0"


def run(coro):
    return asyncio.run(coro)


async def _with(fn, url: str = REDIS):
    a = SharedQuotas(url, f"test-{uuid.uuid4().hex[:12]}")
    try:
        return await fn(a)
    finally:
        await a.close()


def test_requests_per_second_hold_across_processes() -> None:
    async def go(shared: SharedQuotas):
        # A second client on the same prefix is another server process.
        other = SharedQuotas(REDIS, shared._prefix.removesuffix(":quota"))
        try:
            for quota in (shared, other, shared):
                await quota.admit_request("t1", per_second=1.0, window_s=3.0)  # 3 in the window
            with pytest.raises(Busy) as refused:
                await other.admit_request("t1", per_second=1.0, window_s=3.0)
            assert 0 < refused.value.retry_after <= 3.0 and "on all servers" in refused.value.message
            await other.admit_request("t2", per_second=1.0, window_s=3.0)  # another tenant: its own window
        finally:
            await other.close()

    run(_with(go))


def test_a_window_frees_as_it_slides() -> None:
    async def go(shared: SharedQuotas):
        await shared.admit_request("t", per_second=1.0, window_s=0.3)
        with pytest.raises(Busy):
            await shared.admit_request("t", per_second=1.0, window_s=0.3)
        await asyncio.sleep(0.35)
        await shared.admit_request("t", per_second=1.0, window_s=0.3)

    run(_with(go))


def test_live_models_are_claimed_in_one_step_and_released() -> None:
    async def go(shared: SharedQuotas):
        await shared.claim_model("t", "m1", limit=2)
        await shared.claim_model("t", "m1", limit=2)  # held already: no second place
        await shared.claim_model("t", "m2", limit=2)
        with pytest.raises(Busy) as full:
            await shared.claim_model("t", "m3", limit=2)
        assert not full.value.retryable and "2 live models" in full.value.message
        with pytest.raises(Busy):
            await shared.check_model_room("t", limit=2)
        await shared.release_model("t", "m1")
        await shared.check_model_room("t", limit=2)
        await shared.claim_model("t", "m3", limit=2)
        assert await shared.live_models("t") == 2

    run(_with(go))


def test_concurrent_claims_cannot_pass_the_limit_together() -> None:
    async def go(shared: SharedQuotas):
        outcomes = await asyncio.gather(*(shared.claim_model("t", f"m{i}", limit=3) for i in range(10)),
                                        return_exceptions=True)
        assert sum(o is None for o in outcomes) == 3 and await shared.live_models("t") == 3

    run(_with(go))


def test_sample_places_are_leased_and_given_back() -> None:
    async def go(shared: SharedQuotas):
        (first, _), (second, _) = [await shared.take_sample_place(t, 2, 2) for t in ("a", "b")]
        assert first and second and await shared.take_sample_place("c", 2, 2) == (None, "queue")
        await shared.release_sample_place("a", first)
        assert (await shared.take_sample_place("c", 2, 2))[0] is not None

    run(_with(go))


def test_a_tenant_holds_at_most_its_share_of_the_sample_places() -> None:
    async def go(shared: SharedQuotas):
        taken = [(await shared.take_sample_place("flood", 4, 2))[0] for _ in range(2)]
        assert all(taken) and await shared.take_sample_place("flood", 4, 2) == (None, "tenant")
        assert (await shared.take_sample_place("light", 4, 2))[0] is not None  # room for the others
        await shared.release_sample_place("flood", taken[0])
        assert (await shared.take_sample_place("flood", 4, 2))[0] is not None

    run(_with(go))


def test_redis_down_is_unavailable_at_once() -> None:
    async def go(shared: SharedQuotas):
        started = time.monotonic()
        with pytest.raises(Unavailable) as down:
            await shared.admit_request("t", per_second=1.0, window_s=1.0)
        assert time.monotonic() - started < 3 and "Redis" in down.value.message
        with pytest.raises(Unavailable):
            await shared.take_sample_place("t", 1, 1)

    run(_with(go, "redis://127.0.0.1:1/0"))  # nothing listens on port 1
