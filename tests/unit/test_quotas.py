"""server.tenancy.quotas: sliding windows, per-tenant overrides, admission, live models, the tokens/s throttle."""

from __future__ import annotations

import pytest

from server.config import Settings
from server.errors import Busy, InvalidRequest
from server.tenancy.quotas import LIMIT_NAMES, Quotas, SlidingWindow, default_limits, with_overrides


def settings(**values) -> Settings:
    return Settings(rate_window_seconds=10, **values)


def test_sliding_window_expires_and_says_when_room_frees_up() -> None:
    w = SlidingWindow(10)
    w.add(0, 4)
    w.add(5, 4)
    assert w.free_at(6, budget=10, amount=2) == 6  # fits now
    assert w.free_at(6, budget=10, amount=5) == 10  # once the first 4 expire
    assert w.free_at(6, budget=10, amount=9) == 15  # once both expire
    assert w.used(9.9) == 8 and w.used(10) == 4  # (time only moves forward) the first 4 left at t=10
    assert SlidingWindow(10).free_at(0, budget=10, amount=50) == 0  # bigger than the budget: alone, at once


def test_overrides_replace_only_known_limits() -> None:
    base = default_limits(settings())
    assert set(LIMIT_NAMES) == {"max_live_models", "max_lora_rank", "max_tokens_per_request",
                                "max_inflight_requests", "max_files", "max_file_storage_mb", "requests_per_second",
                                "tokens_per_second"}
    changed = with_overrides(base, {"max_live_models": 1, "not_a_limit": 5})
    assert changed.max_live_models == 1 and changed.max_lora_rank == base.max_lora_rank


def test_requests_per_second_and_inflight_are_refused_with_a_reason() -> None:
    q = Quotas(settings(requests_per_second=0.3, max_inflight_requests=2))  # 3 per 10 s
    q.admit("a", 0)
    q.admit("a", 1)
    with pytest.raises(Busy, match="in flight"):
        q.admit("a", 2)
    q.finished("a")
    q.admit("a", 3)
    q.finished("a")
    with pytest.raises(Busy, match="0.3 requests/s") as exc:
        q.admit("a", 4)
    assert exc.value.retry_after == pytest.approx(6)  # the request at t=0 leaves the window at 10
    q.admit("b", 4)  # another tenant is unaffected
    q.finished("a")
    q.admit("a", 10.5)


def test_live_models_rank_and_tokens_per_request() -> None:
    q = Quotas(settings(max_live_models=1, max_lora_rank=8, max_tokens_per_request=100))
    q.check_new_model("a")
    q.model_loaded("a", "m1")
    with pytest.raises(Busy, match="1 live models"):
        q.check_new_model("a")
    q.check_new_model("b")
    q.model_unloaded("a", "m1")
    q.check_new_model("a")
    with pytest.raises(InvalidRequest) as exc:
        q.check_rank("a", 16)
    assert exc.value.field == "lora_config.rank"
    with pytest.raises(InvalidRequest, match="101 tokens"):
        q.check_tokens("a", 101, "data")
    q.set_limits("a", {"max_lora_rank": 32}, now=0)
    q.check_rank("a", 16)
    q.check_rank("b", 8)


def test_tokens_per_second_throttle_waits_and_explains() -> None:
    q = Quotas(settings(tokens_per_second=10))  # 100 tokens per 10 s
    assert q.ready_at("a", 60, 0) == 0 and q.reason("a", 60, 0) == ""
    q.charge("a", 60, 0)
    assert q.ready_at("a", 60, 1) == 10  # 120 > 100: once the first 60 leave the window
    assert "10 tokens/s" in q.reason("a", 60, 1) and "9.0 s" in q.reason("a", 60, 1)
    assert q.ready_at("b", 60, 1) == 1  # per tenant


def test_a_refresh_read_before_an_admin_change_does_not_undo_it() -> None:
    q = Quotas(settings())
    q.set_limits("a", {"max_lora_rank": 4}, now=10.0)  # the admin API, at t=10
    q.set_limits("a", {}, now=9.0)  # a refresh whose database read began at t=9 lands later
    assert q.limits("a").max_lora_rank == 4
    q.set_limits("a", {}, now=16.0)  # the next refresh reads the row as it is now
    assert q.limits("a").max_lora_rank == settings().max_lora_rank
