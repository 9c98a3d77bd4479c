"""The queue in front of the engine.

Operations are queued per key (a model; a tenant's samples on one checkpoint; a session's model
creations), and every key belongs to a tenant.

Order. In an *ordered* queue (a model's) operations run in seq_id order, never reordered, and the
queue waits for a missing seq_id: the SDK sends the chunks of one forward_backward concurrently,
chunk 1 last, counting on the server to hold chunks 2..n until chunk 1 is there. A seq_id can
also be missing for good (its POST was refused before the server learnt it, or a client died),
so the wait is bounded by `gap_grace` seconds; a refusal the server does see calls `skip()`.
Unordered queues (sampling, model creation) run in arrival order and never wait.

Batching. Neighbouring operations with the same `Batch.key` run as one engine call, within the
batch's budget: in an ordered queue only contiguous seq_ids (a chunked forward_backward then
computes exactly what the unchunked call would); unordered queues with the same batch key (the
samples of several tenants on one checkpoint) are merged across tenants.

Fairness. Tenants take turns round-robin, one engine call per turn, and within a tenant its keys
take turns. Bound: once a tenant has an operation ready, it waits for at most the call running
when the operation became ready plus one call per other tenant with ready work, however many
operations or models those tenants have queued.

Throttling. A tenant over its tokens-per-second budget (see server/tenancy/quotas.py) is skipped until
its window has room for its oldest ready operation, so a stream of small operations cannot starve
a big one: that one runs within one turn of each of the tenant's queues once it fits. `state_of`
tells retrieve_future why an operation waits.
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
from typing import Any, Protocol

from pydantic import BaseModel

from server.errors import OperationFailed
from server.queue.futures import FutureHub

log = logging.getLogger(__name__)

# What an operation produces: the encoded result and its format ("json" or "proto").
OpResult = tuple[bytes, str]
OpRunner = Callable[[], Awaitable[OpResult]]
# Told after an operation's outcome is stored: (request_id, state "done"/"failed", result bytes).
Notify = Callable[[str, str, bytes | None], None]
NO_SEQ = 2**62  # sorts after every real seq_id


def json_result(model: BaseModel) -> OpResult:
    return model.model_dump_json(exclude_none=True).encode(), "json"


class Throttle(Protocol):
    def ready_at(self, tenant: str, cost: int, now: float) -> float:
        """When the tenant may start an operation of `cost` tokens (now or earlier: at once)."""
        ...

    def charge(self, tenant: str, cost: int, now: float) -> None: ...

    def reason(self, tenant: str, cost: int, now: float) -> str:
        """Why an operation of `cost` tokens cannot start now ("" if it can)."""
        ...


class _NoThrottle:
    def ready_at(self, tenant: str, cost: int, now: float) -> float:
        return now

    def charge(self, tenant: str, cost: int, now: float) -> None:
        pass

    def reason(self, tenant: str, cost: int, now: float) -> str:
        return ""


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
    cost: int = field(compare=False, default=0)  # tokens, for the tenant's tokens/s budget
    queued_at: float = field(compare=False, default_factory=time.monotonic)


@dataclass
class _Queue:
    tenant: str
    ordered: bool
    ops: list[Op] = field(default_factory=list)
    expected: int = 1  # ordered queues: the next seq_id due
    skipped: set[int] = field(default_factory=set)

    def ready_at(self, now: float, grace: float) -> float:
        """When the head may run as far as order goes: now if it is due, later if a seq_id is missing."""
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
    def __init__(self, hub: FutureHub, *, gap_grace: float = 3.0, throttle: Throttle | None = None) -> None:
        self._hub = hub
        self._gap_grace = gap_grace
        self._throttle = throttle or _NoThrottle()
        self._queues: dict[str, _Queue] = {}
        self._turns: deque[str] = deque()  # tenants with queued ops, round-robin
        self._keys: dict[str, deque[str]] = {}  # tenant -> its keys with queued ops, round-robin
        self._running: set[str] = set()  # request ids in the engine call under way
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
        tenant: str = "",
        batch: Batch | None = None,
        ordered: bool = False,
        notify: Notify | None = None,
        cost: int = 0,
    ) -> None:
        queue = self._queues.get(key)
        if queue is None:
            queue = self._queues[key] = _Queue(tenant=tenant, ordered=ordered)
        if not queue.ops:
            self._enter(queue.tenant, key)
        seq = NO_SEQ if seq_id is None else seq_id
        heapq.heappush(queue.ops, Op(seq, next(self._arrivals), request_id, kind, run, batch, notify, cost))
        self._wakeup.set()

    def skip(self, key: str, seq_id: int, tenant: str) -> None:
        """A submission with this seq_id was refused: the queue (of `tenant`) must not wait for it."""
        queue = self._queues.get(key)
        if queue is None:
            queue = self._queues[key] = _Queue(tenant=tenant, ordered=True)
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
                        self.skip(key, op.seq_id, queue.tenant)
                    self._leave_if_empty(key)
                    return op
        return None

    def depth(self, key: str) -> int:
        queue = self._queues.get(key)
        return len(queue.ops) if queue else 0

    def tenant_depth(self, tenant: str) -> int:
        return sum(len(q.ops) for q in self._queues.values() if q.tenant == tenant)

    def state_of(self, request_id: str, tenant: str, now: float | None = None) -> tuple[str, str | None]:
        """(queue_state, reason) of a pending operation, as retrieve_future reports it to the SDK."""
        queued = next((op for q in self._queues.values() if q.tenant == tenant for op in q.ops
                       if op.request_id == request_id), None)
        if queued is None:  # running, or not in this process's queues
            return "active", None
        now = time.monotonic() if now is None else now
        if reason := self._throttle.reason(tenant, queued.cost, now):
            return "paused_rate_limit", reason
        oldest = self._oldest_head(tenant, now)
        if oldest is not None and (reason := self._throttle.reason(tenant, oldest.cost, now)):
            return "paused_rate_limit", reason + " (an earlier request goes first)"
        others = sum(len(q.ops) for q in self._queues.values() if q.tenant != tenant) + len(self._running)
        if others:
            return "paused_capacity", f"waiting for the engine: {others} operations of other tenants are ahead or running"
        return "active", None

    # ----- lifecycle -------------------------------------------------------------------------
    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="scheduler")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    # ----- turns -------------------------------------------------------------------------------
    def _enter(self, tenant: str, key: str) -> None:
        keys = self._keys.get(tenant)
        if keys is None:
            keys = self._keys[tenant] = deque()
            self._turns.append(tenant)
        keys.append(key)

    def _leave_if_empty(self, key: str) -> None:
        """Take an empty queue out of its tenant's turns. An ordered queue itself stays: it
        remembers its next seq_id; an unordered one is forgotten."""
        queue = self._queues.get(key)
        if queue is None or queue.ops:
            return
        keys = self._keys.get(queue.tenant)
        if keys is not None:
            with contextlib.suppress(ValueError):
                keys.remove(key)
            if not keys:
                del self._keys[queue.tenant]
                with contextlib.suppress(ValueError):
                    self._turns.remove(queue.tenant)
        if not queue.ordered:
            del self._queues[key]

    # ----- consumer --------------------------------------------------------------------------
    async def _loop(self) -> None:
        while True:
            ops, wait = self._pick(time.monotonic())
            if not ops:
                self._wakeup.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wakeup.wait(), wait)
                continue
            self._running = {op.request_id for op in ops}
            try:
                await self._execute(ops)
            finally:
                self._running = set()

    def _pick(self, now: float) -> tuple[list[Op], float | None]:
        """The next engine call's ops, tenants and their keys taking turns; or no ops and how long
        to sleep before something becomes ready."""
        soonest: float | None = None
        for _ in range(len(self._turns)):
            tenant = self._turns.popleft()
            key, at = self._ready_key(tenant, now)
            self._turns.append(tenant)
            if key is None:
                soonest = at if soonest is None or (at is not None and at < soonest) else soonest
                continue
            queue = self._queues[key]
            ops = self._take(queue)
            self._throttle.charge(tenant, sum(op.cost for op in ops), now)
            self._leave_if_empty(key)
            if not queue.ordered:
                for other in self._merge_other_keys(ops, now):
                    self._leave_if_empty(other)
            return ops, None
        return [], None if soonest is None else max(soonest - now, 0.0)

    def _oldest_head(self, tenant: str, now: float) -> Op | None:
        """The tenant's longest-waiting operation that could run now but for its budget."""
        heads = [q.ops[0] for key in self._keys.get(tenant, ()) if (q := self._queues[key]).ops
                 and q.ready_at(now, self._gap_grace) <= now]
        return min(heads, key=lambda op: op.arrival, default=None)

    def _held_until(self, tenant: str, now: float) -> float:
        """When the tenant's tokens/s budget lets its oldest ready operation run (now if it does).
        Its other operations wait behind that one: otherwise small ones could keep the window
        full and starve a big one for ever."""
        oldest = self._oldest_head(tenant, now)
        return now if oldest is None else self._throttle.ready_at(tenant, oldest.cost, now)

    def _ready_key(self, tenant: str, now: float) -> tuple[str | None, float | None]:
        """The tenant's next key whose head may run (rotated to the back), or when one may."""
        if (held := self._held_until(tenant, now)) > now:
            return None, held
        keys = self._keys[tenant]
        soonest: float | None = None
        for _ in range(len(keys)):
            key = keys.popleft()
            keys.append(key)
            queue = self._queues[key]
            at = max(queue.ready_at(now, self._gap_grace),
                     self._throttle.ready_at(tenant, queue.ops[0].cost, now))
            if at <= now:
                return key, None
            soonest = at if soonest is None else min(soonest, at)
        return None, soonest

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
        while queue.ops and self._joins(queue.ordered, ops[-1], queue.ops[0], size):
            nxt = heapq.heappop(queue.ops)
            size += nxt.batch.size  # type: ignore[union-attr]
            if queue.ordered:
                queue.expected = nxt.seq_id + 1
            ops.append(nxt)
        return ops

    def _merge_other_keys(self, ops: list[Op], now: float) -> list[str]:
        """Unordered ops of other keys (other tenants' samples on the same checkpoint) with the same
        batch key join the call, oldest first: they would only wait for a call computing the same
        thing. Returns the keys it took from."""
        head = ops[0]
        if head.batch is None:
            return []
        size = sum(op.batch.size for op in ops if op.batch is not None)
        taken: list[str] = []
        candidates = sorted(
            ((q.ops[0].arrival, key) for key, q in self._queues.items()
             if not q.ordered and q.ops and q.ops[0].batch is not None and q.ops[0].batch.key == head.batch.key),
        )
        for _, key in candidates:
            queue = self._queues[key]
            # A tenant over its tokens/s budget waits here too, whoever else samples the checkpoint.
            while (queue.ops and self._joins(False, ops[-1], queue.ops[0], size)
                   and self._throttle.ready_at(queue.tenant, queue.ops[0].cost, now) <= now
                   and self._held_until(queue.tenant, now) <= now):
                nxt = heapq.heappop(queue.ops)
                size += nxt.batch.size  # type: ignore[union-attr]
                ops.append(nxt)
                self._throttle.charge(queue.tenant, nxt.cost, now)
            taken.append(key)
        return taken

    @staticmethod
    def _joins(ordered: bool, last: Op, nxt: Op, size: int) -> bool:
        if nxt.batch is None or last.batch is None or nxt.batch.key != last.batch.key:
            return False
        if size + nxt.batch.size > last.batch.budget:
            return False
        return not ordered or nxt.seq_id == last.seq_id + 1

    async def _execute(self, ops: list[Op]) -> None:
        started = time.perf_counter()
        outcomes = await self._run(ops)
        for op, outcome in zip(ops, outcomes):
            await self._finish(op, outcome)
        log.info(
            "op_done",
            extra={"request_id": ops[0].request_id, "kind": ops[0].kind, "batched": len(ops),
                   "ms": round((time.perf_counter() - started) * 1e3, 1)},
        )

    async def _finish(self, op: Op, outcome: OpResult | OperationFailed) -> None:
        """Store the outcome and tell whoever waits on it; if storing fails, the future fails."""
        failed = isinstance(outcome, OperationFailed)
        try:
            if isinstance(outcome, OperationFailed):
                await self._hub.fail(op.request_id, outcome.message, outcome.category)
            else:
                await self._hub.resolve(op.request_id, *outcome)
        except Exception:  # the loop must keep serving every key
            log.exception("op_unrecorded", extra={"request_id": op.request_id, "kind": op.kind})
            failed = True
            with contextlib.suppress(Exception):
                await self._hub.fail(
                    op.request_id,
                    f"internal error while recording the outcome of {op.kind} (request {op.request_id}); "
                    "the server log has details",
                    "server",
                )
        if op.notify is not None:
            op.notify(op.request_id, "failed" if failed else "done", None if failed else outcome[0])  # type: ignore[index]

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
