"""Wake-ups between server processes: a future's end, announced over Redis pub/sub.

A client may long-poll `retrieve_future` on any server process of a deployment, while the future
is run by another (the one whose queue holds it). Each process publishes the request ids of the
futures it ends on one channel and wakes its own waiters on every id it hears, so a poll on any
process returns as soon as the work is done. The database stays the record: a wake-up only makes
a waiter read its future again, so a lost message costs at most the rest of a long-poll (the SDK
then polls again), never a result. Redis being down is logged and retried, never fatal.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

import redis.asyncio as aioredis
from redis.exceptions import RedisError

log = logging.getLogger(__name__)
RETRY_SECONDS = 1.0


class RedisWakeups:
    def __init__(self, url: str, prefix: str) -> None:
        self._redis = aioredis.from_url(url, socket_connect_timeout=2, socket_timeout=5)
        self.channel = f"{prefix}:futures-ended"
        self._task: asyncio.Task[None] | None = None
        self._sending: set[asyncio.Task[None]] = set()

    async def start(self, wake: Callable[[list[str]], None]) -> None:
        """Listen, calling `wake` with the request ids others announce, until stop()."""
        self._task = asyncio.create_task(self._listen(wake), name="redis-wakeups")

    async def announce(self, request_ids: list[str]) -> None:
        """Tell every process that these futures have ended (best effort: see the module doc). Sent
        in the background: finishing an operation never waits for Redis."""
        if request_ids:
            task = asyncio.create_task(self._publish(request_ids))
            self._sending.add(task)
            task.add_done_callback(self._sending.discard)

    async def _publish(self, request_ids: list[str]) -> None:
        try:
            await self._redis.publish(self.channel, "\n".join(request_ids))
        except (RedisError, OSError) as exc:
            log.warning("wakeup_not_published", extra={"count": len(request_ids), "error": type(exc).__name__})

    async def stop(self) -> None:
        await asyncio.gather(*self._sending, return_exceptions=True)  # the last ends still go out
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self._redis.aclose()

    async def _listen(self, wake: Callable[[list[str]], None]) -> None:
        while True:
            try:
                async with self._redis.pubsub() as pubsub:
                    await pubsub.subscribe(self.channel)
                    log.info("wakeups_listening", extra={"channel": self.channel})
                    async for message in pubsub.listen():
                        if message["type"] == "message":
                            wake(message["data"].decode().split("\n"))
            except (RedisError, OSError) as exc:  # Redis down or restarted: listen again when it is back
                log.warning("wakeups_disconnected", extra={"error": type(exc).__name__})
                await asyncio.sleep(RETRY_SECONDS)
