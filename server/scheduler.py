"""The queue in front of the engine.

Operations are queued per key: a model, a sampler's adapter, a session's model creations.

Order. In an *ordered* queue (a model's) operations run in seq_id order, never reordered, and the
queue waits for a missing seq_id: the SDK sends the chunks of one forward_backward concurrently,
chunk 1 last, counting on the server to hold chunks 2..n until chunk 1 is there. A seq_id can
also be missing for good (its POST was refused before the server learnt it, or a client died),
so the wait is bounded by `gap_grace` seconds; a refusal the server does see calls `skip()`.
Unordered queues (sampling, model creation) run in arrival order and never wait.

Batching. Consecutive queued operations with the same `Batch.key` (for a model: forward_backward
chunks with the same loss, in contiguous seq order) run as one engine call, within a size budget:
a chunked call then computes exactly what the unchunked call would.

Fairness. Keys take turns round-robin, one engine call per turn, so a key with a long queue
delays another key's next call by at most one call per other busy key (plus the call running
when it arrived).
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel

from server.errors import OperationFailed
from server.futures import FutureHub

log = logging.getLogger(__name__)

# What an operation produces: the encoded result and its format ("json" or "proto").
OpResult = tuple[bytes, str]
OpRunner = Callable[[], Awaitable[OpResult]]
# Told after an operation's outcome is stored: (request_id, state "done"/"failed", result bytes).
Notify = Callable[[str, str, bytes | None], None]
NO_SEQ = 2**62  # sorts after every real seq_id


def json_result(model: BaseModel) -> OpResult:
    return model.model_dump_json(exclude_none=True).encode(), "json"


@dataclass(frozen=True)
class Batch:
    """How an operation can share one engine call with its neighbours of the same key."""

    key: Hashable
    size: int  # e.g. tokens or rows; a group's sizes add up to at most `budget`
    budget: int
    payload: Any
    run: Callable[[list[Any]], Awaitable[list[OpResult]]]  # one result per payload, in order


@dataclass(order=True)
class Op:
    seq_id: int
    arrival: int
    request_id: str = field(compare=False)
    kind: str = field(compare=False)
    run: OpRunner = field(compare=False)
    batch: Batch | None = field(compare=False, default=None)
    notify: Notify | None = field(compare=False, default=None)
    queued_at: float = field(compare=False, default_factory=time.monotonic)


@dataclass
class _Queue:
    ordered: bool
    ops: list[Op] = field(default_factory=list)
    expected: int = 1  # ordered queues: the next seq_id due
    skipped: set[int] = field(default_factory=set)

    def ready_at(self, now: float, grace: float) -> float:
        """When the head may run: now (or earlier) if it is due, later if it waits for a gap."""
        head = self.ops[0]
        if not self.ordered or head.seq_id == NO_SEQ:
            return now
        while self.expected in self.skipped:
            self.skipped.discard(self.expected)
            self.expected += 1
        if head.seq_id <= self.expected:
            return now
        return head.queued_at + grace


class Scheduler:
    def __init__(self, hub: FutureHub, *, gap_grace: float = 3.0) -> None:
        self._hub = hub
        self._gap_grace = gap_grace
        self._queues: dict[str, _Queue] = {}
        self._turns: deque[str] = deque()  # keys with queued ops, in round-robin order
        self._wakeup = asyncio.Event()
        self._arrivals = itertools.count()
        self._task: asyncio.Task[None] | None = None

    # ----- producers -------------------------------------------------------------------------
    def submit(
        self,
        key: str,
        *,
        seq_id: int | None,
        request_id: str,
        kind: str,
        run: OpRunner,
        batch: Batch | None = None,
        ordered: bool = False,
        notify: Notify | None = None,
    ) -> None:
        queue = self._queues.get(key)
        if queue is None:
            queue = self._queues[key] = _Queue(ordered=ordered)
        if not queue.ops:
            self._turns.append(key)
        seq = NO_SEQ if seq_id is None else seq_id
        heapq.heappush(queue.ops, Op(seq, next(self._arrivals), request_id, kind, run, batch, notify))
        self._wakeup.set()

    def skip(self, key: str, seq_id: int) -> None:
        """A submission with this seq_id was refused: the queue must not wait for it."""
        queue = self._queues.setdefault(key, _Queue(ordered=True))
        if seq_id >= queue.expected:
            queue.skipped.add(seq_id)
            self._wakeup.set()

    def cancel(self, request_id: str) -> Op | None:
        """Take a queued (not yet running) operation out of its queue; None if it is not queued."""
        for key, queue in self._queues.items():
            for i, op in enumerate(queue.ops):
                if op.request_id == request_id:
                    queue.ops.pop(i)
                    heapq.heapify(queue.ops)
                    if queue.ordered and op.seq_id != NO_SEQ:
                        self.skip(key, op.seq_id)
                    self._drop_if_empty(key)
                    return op
        return None

    def depth(self, key: str) -> int:
        queue = self._queues.get(key)
        return len(queue.ops) if queue else 0

    # ----- lifecycle -------------------------------------------------------------------------
    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="scheduler")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    # ----- consumer --------------------------------------------------------------------------
    async def _loop(self) -> None:
        while True:
            ops, wait = self._pick(time.monotonic())
            if not ops:
                self._wakeup.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wakeup.wait(), wait)
                continue
            try:
                await self._execute(ops)
            except Exception:  # storing the outcome failed; the loop must keep serving every key
                log.exception("op_unrecorded", extra={"request_id": ops[0].request_id, "kind": ops[0].kind})
                for op in ops:
                    with contextlib.suppress(Exception):
                        await self._hub.fail(
                            op.request_id,
                            f"internal error while recording the outcome of {op.kind} (request {op.request_id}); "
                            "the server log has details",
                            "server",
                        )

    def _pick(self, now: float) -> tuple[list[Op], float | None]:
        """The next engine call's ops, taking keys in turn; or no ops and how long to sleep."""
        soonest: float | None = None
        for _ in range(len(self._turns)):
            key = self._turns.popleft()
            queue = self._queues[key]
            at = queue.ready_at(now, self._gap_grace)
            if at > now:
                self._turns.append(key)
                soonest = at - now if soonest is None else min(soonest, at - now)
                continue
            ops = self._take(queue)
            if queue.ops:
                self._turns.append(key)
            else:
                self._drop_if_empty(key)
            return ops, None
        return [], soonest

    def _take(self, queue: _Queue) -> list[Op]:
        head = heapq.heappop(queue.ops)
        if queue.ordered and head.seq_id != NO_SEQ:
            if head.seq_id > queue.expected:
                log.warning("seq_gap_skipped", extra={"request_id": head.request_id, "expected": queue.expected,
                                                      "seq_id": head.seq_id})
            queue.expected = max(queue.expected, head.seq_id + 1)
        ops = [head]
        if head.batch is None:
            return ops
        size = head.batch.size
        while queue.ops and self._joins(queue, ops[-1], queue.ops[0], size):
            nxt = heapq.heappop(queue.ops)
            size += nxt.batch.size  # type: ignore[union-attr]
            if queue.ordered:
                queue.expected = nxt.seq_id + 1
            ops.append(nxt)
        return ops

    def _joins(self, queue: _Queue, last: Op, nxt: Op, size: int) -> bool:
        if nxt.batch is None or last.batch is None or nxt.batch.key != last.batch.key:
            return False
        if size + nxt.batch.size > last.batch.budget:
            return False
        return not queue.ordered or nxt.seq_id == last.seq_id + 1

    def _drop_if_empty(self, key: str) -> None:
        """Forget an empty unordered queue. An ordered queue stays: it remembers its next seq_id."""
        queue = self._queues.get(key)
        if queue is None or queue.ops:
            return
        with contextlib.suppress(ValueError):
            self._turns.remove(key)
        if not queue.ordered:
            del self._queues[key]

    async def _execute(self, ops: list[Op]) -> None:
        started = time.perf_counter()
        outcomes = await self._run(ops)
        for op, outcome in zip(ops, outcomes):
            if isinstance(outcome, OperationFailed):
                await self._hub.fail(op.request_id, outcome.message, outcome.category)
            else:
                await self._hub.resolve(op.request_id, *outcome)
            if op.notify is not None:
                failed = isinstance(outcome, OperationFailed)
                op.notify(op.request_id, "failed" if failed else "done", None if failed else outcome[0])
        log.info(
            "op_done",
            extra={"request_id": ops[0].request_id, "kind": ops[0].kind, "batched": len(ops),
                   "ms": round((time.perf_counter() - started) * 1e3, 1)},
        )

    async def _run(self, ops: list[Op]) -> list[OpResult | OperationFailed]:
        try:
            if len(ops) == 1:
                return [await ops[0].run()]
            results = await ops[0].batch.run([op.batch.payload for op in ops])  # type: ignore[union-attr]
            assert len(results) == len(ops)
            return list(results)
        except OperationFailed as exc:
            log.info("op_failed", extra={"request_id": ops[0].request_id, "kind": ops[0].kind, "reason": exc.message})
            return [exc] * len(ops)
        except Exception:
            log.exception("op_crashed", extra={"request_id": ops[0].request_id, "kind": ops[0].kind})
            return [
                OperationFailed(
                    f"internal error while running {op.kind} (request {op.request_id}); the server log has details",
                    "server",
                )
                for op in ops
            ]
