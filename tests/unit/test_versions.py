"""The release rules of in-memory adapter versions (server/engine/versions.py)."""

from __future__ import annotations

from server.engine.versions import Version, Versions


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def version(key: str, at: float, model: str = "m1", session: str = "s1") -> Version:
    return Version(key, "tenant", model, session, "tiny", step=0, nbytes=10, created=at, last_used=at)


def keys(versions: list[Version]) -> list[str]:
    return [v.key for v in versions]


def test_the_newest_version_of_a_model_is_never_released() -> None:
    clock = Clock()
    table = Versions(per_model=1, idle_seconds=0, clock=clock)
    assert table.add(version("v1", 0)) == []
    clock.now = 1000
    assert table.take_due() == []
    assert keys(table.held()) == ["v1"]


def test_a_superseded_idle_version_goes_after_the_idle_window() -> None:
    clock = Clock()
    table = Versions(per_model=4, idle_seconds=60, clock=clock)
    table.add(version("v1", 0))
    clock.now = 10
    assert table.add(version("v2", 10)) == []  # v1 was used 10 s ago: kept for now
    clock.now = 59
    assert table.take_due() == []
    clock.now = 60
    assert keys(table.take_due()) == ["v1"]
    assert keys(table.held()) == ["v2"]
    assert table.get("v1") is None


def test_a_version_in_flight_is_kept_even_over_the_cap() -> None:
    clock = Clock()
    table = Versions(per_model=1, idle_seconds=0, clock=clock)
    table.add(version("v1", 0))
    assert table.begin("v1") is not None
    assert table.add(version("v2", 1)) == []  # v1 is being sampled
    assert keys(table.end("v1")) == ["v1"]  # released as its last sample ends


def test_the_cap_releases_the_oldest_idle_versions_first() -> None:
    clock = Clock()
    table = Versions(per_model=2, idle_seconds=3600, clock=clock)
    table.add(version("v1", 0))
    table.add(version("v2", 1))
    assert keys(table.add(version("v3", 2))) == ["v1"]
    assert keys(table.add(version("v4", 3))) == ["v2"]
    assert keys(table.held()) == ["v3", "v4"]


def test_sampling_an_old_version_keeps_it_alive() -> None:
    clock = Clock()
    table = Versions(per_model=4, idle_seconds=60, clock=clock)
    table.add(version("v1", 0))
    table.add(version("v2", 0))
    clock.now = 50
    table.begin("v1")
    table.end("v1")
    clock.now = 100  # 50 s since v1's last sample
    assert table.take_due() == []
    clock.now = 110
    assert keys(table.take_due()) == ["v1"]


def test_models_are_counted_apart_and_a_session_takes_its_own_versions() -> None:
    clock = Clock()
    table = Versions(per_model=1, idle_seconds=3600, clock=clock)
    table.add(version("a1", 0, model="a", session="s1"))
    table.add(version("b1", 0, model="b", session="s2"))
    assert keys(table.held()) == ["a1", "b1"]
    assert keys(table.take_session("s1")) == ["a1"]
    assert keys(table.held()) == ["b1"]
    assert table.begin("a1") is None  # released: a sample on it is refused


def test_unknown_keys_are_harmless() -> None:
    table = Versions(per_model=1, idle_seconds=0)
    assert table.begin("nope") is None
    assert table.end("nope") == []
    assert table.take_session("nope") == []
