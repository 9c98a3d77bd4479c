"""Messages between the server processes of one deployment, over Redis pub/sub.

* **A future ended.** A client may long-poll `retrieve_future` on any process, while the future is
  run by another (the one whose queue holds it). Each process publishes the request ids of the
  futures it ends and wakes its own waiters on every id it hears, so a poll on any process returns
  as soon as the work is done.
* **A key was revoked** (admin API, or `twinkle keys revoke`): every process drops it from its key
  cache at once, rather than when the cached entry expires.

The database stays the record: a message only makes a process read again, so a lost one costs at
most the rest of a long-poll or the key cache's few seconds, never a result. Redis being down is
logged and retried, never fatal, and sending never makes an operation wait.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

import redis
import redis.asyncio as aioredis
from redis.exceptions import RedisError

log = logging.getLogger(__name__)
RETRY_SECONDS = 1.0
TIMEOUTS = {"socket_connect_timeout": 2, "socket_timeout": 5}


def channels(prefix: str) -> tuple[str, str]:
    """(futures ended, keys revoked)."""
    return f"{prefix}:futures-ended", f"{prefix}:keys-revoked"


class RedisBus:
    def __init__(self, url: str, prefix: str) -> None:
        self._redis = aioredis.from_url(url, **TIMEOUTS)
        self.ended_channel, self.revoked_channel = channels(prefix)
        self._task: asyncio.Task[None] | None = None
        self._sending: set[asyncio.Task[None]] = set()

    async def start(self, on_ended: Callable[[list[str]], None], on_revoked: Callable[[str], None]) -> None:
        """Listen until stop(): `on_ended` gets the request ids others announce, `on_revoked` key ids."""
        def revoked(key_ids: list[str]) -> None:
            for key_id in key_ids:
                on_revoked(key_id)

        handlers = {self.ended_channel: on_ended, self.revoked_channel: revoked}
        self._task = asyncio.create_task(self._listen(handlers), name="redis-bus")

    async def announce(self, request_ids: list[str]) -> None:
        """These futures have ended (sent in the background: finishing never waits for Redis)."""
        self._send(self.ended_channel, request_ids)

    async def revoked(self, key_id: str) -> None:
        self._send(self.revoked_channel, [key_id])

    def _send(self, channel: str, items: list[str]) -> None:
        if items:
            task = asyncio.create_task(self._publish(channel, items))
            self._sending.add(task)
            task.add_done_callback(self._sending.discard)

    async def _publish(self, channel: str, items: list[str]) -> None:
        try:
            await self._redis.publish(channel, "\n".join(items))
        except (RedisError, OSError) as exc:
            log.warning("bus_message_not_sent", extra={"channel": channel, "count": len(items),
                                                       "error": type(exc).__name__})

    async def stop(self) -> None:
        await asyncio.gather(*self._sending, return_exceptions=True)  # the last messages still go out
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self._redis.aclose()

    async def _listen(self, handlers: dict[str, Callable[[list[str]], None]]) -> None:
        while True:
            try:
                async with self._redis.pubsub() as pubsub:
                    await pubsub.subscribe(*handlers)
                    log.info("bus_listening", extra={"channels": list(handlers)})
                    async for message in pubsub.listen():
                        if message["type"] == "message":
                            handlers[message["channel"].decode()](message["data"].decode().split("\n"))
            except (RedisError, OSError) as exc:  # Redis down or restarted: listen again when it is back
                log.warning("bus_disconnected", extra={"error": type(exc).__name__})
                await asyncio.sleep(RETRY_SECONDS)


def publish_revocation(url: str, prefix: str, key_id: str) -> bool:
    """For a process that is not a server (the CLI): tell the servers a key was revoked, at once.
    False if Redis could not be reached (the servers then notice within their cache's seconds)."""
    try:
        with redis.Redis.from_url(url, **TIMEOUTS) as client:
            client.publish(channels(prefix)[1], key_id)
    except (RedisError, OSError):
        return False
    return True
