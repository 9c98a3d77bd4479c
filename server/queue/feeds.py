"""Completion feeds: the session-level stream `retrieve_futures` long-polls
(docs/tinker-protocol-notes.md, "Completion feed of retrieve_futures").

One feed per (tenant, sampling session, cloned sampler). An event is published once a sample's
outcome is stored, so the payload can be fetched the moment the client hears of it. Cursors are
microseconds since the epoch, strictly increasing within a feed: after a restart new events still
sort after every cursor a client holds from before, so none is taken as already acknowledged.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

MAX_EVENTS = 10_000  # per feed; events a client never acknowledges are dropped oldest first
IDLE_SECONDS = 3600.0  # a feed nobody published to or polled for this long is dropped (its client is gone)
SWEEP_SECONDS = 60.0

FeedKey = tuple[str, str, int]


@dataclass
class _Feed:
    events: deque[tuple[int, dict[str, Any]]] = field(default_factory=deque)
    last_cursor: int = 0
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    used_at: float = field(default_factory=time.monotonic)


class CompletionFeeds:
    def __init__(self) -> None:
        self._feeds: dict[FeedKey, _Feed] = {}
        self._swept_at = time.monotonic()

    def _feed(self, key: FeedKey) -> _Feed:
        """The key's feed, marked used; feeds idle for IDLE_SECONDS are dropped (once a minute)."""
        now = time.monotonic()
        if now - self._swept_at > SWEEP_SECONDS:
            self._swept_at = now
            self._feeds = {k: f for k, f in self._feeds.items() if now - f.used_at < IDLE_SECONDS}
        feed = self._feeds.setdefault(key, _Feed())
        feed.used_at = now
        return feed

    def __len__(self) -> int:
        return len(self._feeds)

    def publish(self, key: FeedKey, completion: dict[str, Any]) -> None:
        feed = self._feed(key)
        feed.last_cursor = max(feed.last_cursor + 1, time.time_ns() // 1000)
        feed.events.append((feed.last_cursor, completion))
        while len(feed.events) > MAX_EVENTS:
            feed.events.popleft()
        feed.changed.set()
        feed.changed = asyncio.Event()

    async def poll(self, key: FeedKey, prev_cursor: int, timeout: float) -> tuple[list[dict[str, Any]], int]:
        """Events after `prev_cursor` (those at or before it are acknowledged and dropped); waits up
        to `timeout` seconds for one if there is none yet. Returns (events, newest cursor)."""
        feed = self._feed(key)
        while feed.events and feed.events[0][0] <= prev_cursor:
            feed.events.popleft()
        if not feed.events and timeout > 0:
            try:
                await asyncio.wait_for(feed.changed.wait(), timeout)
            except TimeoutError:
                pass
        events = [event for cursor, event in feed.events if cursor > prev_cursor]
        cursor = max(prev_cursor, feed.events[-1][0]) if feed.events else prev_cursor
        return events, cursor
