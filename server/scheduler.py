"""The queue in front of the engine.

Operations are queued per key (a model, a sampling session, a session's model creations). Within a
key they run in seq_id order, never reordered; across keys the scheduler goes round-robin, one
operation per key per turn, so a tenant with a long queue delays another tenant's next operation by
at most one operation per other busy key.

A key does not wait for a missing seq_id: the SDK submits one client's requests one after another
(strictly ordered while client/config says parallel_fwdbwd_chunks=false), so the lowest queued
seq_id is the next one, and a seq_id whose POST was rejected must not stall the model forever.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from pydantic import BaseModel

from server.errors import OperationFailed
from server.futures import FutureHub

log = logging.getLogger(__name__)

# What an operation produces: the encoded result and its format ("json" or "proto").
OpResult = tuple[bytes, str]
OpRunner = Callable[[], Awaitable[OpResult]]


def json_result(model: BaseModel) -> OpResult:
    return model.model_dump_json(exclude_none=True).encode(), "json"


@dataclass(order=True)
class Op:
    seq_id: int
    arrival: int
    request_id: str = field(compare=False)
    kind: str = field(compare=False)
    run: OpRunner = field(compare=False)


class Scheduler:
    def __init__(self, hub: FutureHub) -> None:
        self._hub = hub
        self._queues: dict[str, list[Op]] = {}
        self._turns: deque[str] = deque()  # keys with queued ops, in round-robin order
        self._wakeup = asyncio.Event()
        self._arrivals = itertools.count()
        self._task: asyncio.Task[None] | None = None

    def submit(self, key: str, *, seq_id: int, request_id: str, kind: str, run: OpRunner) -> None:
        queue = self._queues.setdefault(key, [])
        if not queue:
            self._turns.append(key)
        heapq.heappush(queue, Op(seq_id, next(self._arrivals), request_id, kind, run))
        self._wakeup.set()

    def depth(self, key: str) -> int:
        return len(self._queues.get(key, ()))

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="scheduler")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass

    def _next(self) -> Op | None:
        if not self._turns:
            return None
        key = self._turns.popleft()
        queue = self._queues[key]
        op = heapq.heappop(queue)
        if queue:
            self._turns.append(key)
        else:
            del self._queues[key]
        return op

    async def _loop(self) -> None:
        while True:
            op = self._next()
            if op is None:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            try:
                await self._execute(op)
            except Exception:  # storing the outcome failed; the loop must keep serving every key
                log.exception("op_unrecorded", extra={"request_id": op.request_id, "kind": op.kind})
                with contextlib.suppress(Exception):
                    await self._hub.fail(
                        op.request_id,
                        f"internal error while recording the outcome of {op.kind} (request {op.request_id}); "
                        "the server log has details",
                        "server",
                    )

    async def _execute(self, op: Op) -> None:
        started = time.perf_counter()
        try:
            result, result_format = await op.run()
        except OperationFailed as exc:
            log.info("op_failed", extra={"request_id": op.request_id, "kind": op.kind, "reason": exc.message})
            await self._hub.fail(op.request_id, exc.message, exc.category)
            return
        except Exception:
            log.exception("op_crashed", extra={"request_id": op.request_id, "kind": op.kind})
            await self._hub.fail(
                op.request_id,
                f"internal error while running {op.kind} (request {op.request_id}); the server log has details",
                "server",
            )
            return
        await self._hub.resolve(op.request_id, result, result_format)
        log.info(
            "op_done",
            extra={"request_id": op.request_id, "kind": op.kind, "ms": round((time.perf_counter() - started) * 1e3, 1)},
        )
