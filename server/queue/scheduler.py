"""The queue in front of the engine.

Operations are queued per key (a model; a tenant's samples on one checkpoint; a session's model
creations), and every key belongs to a tenant and runs in a lane (server.kinds.Lane: samples in
the sampling lane, everything else in the training lane). Choosing the next engine call is the
pure function server/queue/pick.py `pick`; this module is the async runner around it: it keeps the
queues (submit, skip, cancel), starts the calls pick chooses, stores their outcomes and says why an
operation waits (state_of).

Lanes. The engine says how many calls it can run at once in each lane (`Engine.lanes`) and in
all lanes together (`Engine.max_calls`); the runner starts calls until the lanes are full or
nothing is ready, so on an engine that can run both a sample need not wait for a long training
step. On one that cannot (the local engine: one compute thread, max_calls 1) the lanes take turns
for the engine, so a sample waits for the call under way but not for every training tenant's turn. A queue with a call under way is not eligible until that call ends: one
model's operations never overlap and never run out of order, whatever the lanes allow.

Order. In an *ordered* queue (a model's) operations run in seq_id order, never reordered, and the
queue waits for a missing seq_id: the SDK sends the chunks of one forward_backward concurrently,
chunk 1 last, counting on the server to hold chunks 2..n until chunk 1 is there. A seq_id can
also be missing for good (its POST was refused before the server learnt it, or a client died),
so the wait is bounded by `gap_grace` seconds; a refusal the server does see calls `skip()`. A
barrier (an optimizer step, a save, a load: pick.BARRIERS) never runs past a missing seq_id.
Unordered queues (sampling, model creation) run in arrival order and never wait.

Batching. Neighbouring operations with the same `Batch.key` run as one engine call, within the
batch's budget: in an ordered queue only contiguous seq_ids (a chunked forward_backward then
computes exactly what the unchunked call would); idle unordered queues with the same batch key
(the samples of several tenants on one checkpoint) are merged across tenants.

Packing. An ordered queue's head with a `Batch.pack` takes along the due heads (and their
neighbours) of other idle ordered queues with the same pack key, within the pack's budget: the
forward(_backward) calls of several models on one base model become one engine call, which the
trainer may run as one pass (workers/packing.py); so do the due optimizer steps of several models. Each queue's order is kept (only its due ops go,
and never past a missing seq_id or a barrier), and a queue whose part fails fails alone.

Fairness. Per lane, tenants take turns round-robin, one engine call per turn, and within a tenant
its keys take turns. Bound: per lane, once a tenant has an operation ready, it waits for at most
the calls running in that lane plus one call per other tenant with ready work in that lane,
however many operations or models those tenants have queued.

Throttling. A tenant over its tokens-per-second budget (see server/tenancy/quotas.py) is skipped until
its window has room for its oldest ready operation, so a stream of small operations cannot starve
a big one: that one runs within one turn of each of the tenant's queues once it fits. `state_of`
tells retrieve_future why an operation waits.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import Counter
from collections.abc import Mapping

from pydantic import BaseModel

from server.errors import OperationFailed
from server.kinds import ErrorCategory, FutureState, Lane, ResultFormat
from server.metrics import LaneLoad, Metrics
from server.queue.futures import FutureHub, Outcome
from server.queue.pick import (
    NO_SEQ,
    Batch,
    Board,
    Call,
    NoThrottle,
    Notify,
    Op,
    OpResult,
    OpRunner,
    Pack,
    Throttle,
    oldest_ready,
    pick,
)
from server.tracing import Tracing

__all__ = ["Batch", "Notify", "Op", "OpResult", "OpRunner", "Pack", "Scheduler", "Throttle", "json_result"]

log = logging.getLogger(__name__)

# One call at a time in each lane: what an engine with one compute device can always take.
ONE_PER_LANE: Mapping[Lane, int] = {Lane.TRAINING: 1, Lane.SAMPLING: 1}


def json_result(model: BaseModel) -> OpResult:
    return model.model_dump_json(exclude_none=True).encode(), ResultFormat.JSON


class Scheduler:
    def __init__(
        self,
        hub: FutureHub,
        *,
        lanes: Mapping[Lane, int] = ONE_PER_LANE,
        max_calls: int | None = None,
        gap_grace: float = 3.0,
        throttle: Throttle | None = None,
        metrics: Metrics | None = None,
        tracing: Tracing | None = None,
    ) -> None:
        if missing := [lane for lane in Lane if lanes.get(lane, 0) < 1]:
            raise ValueError(f"the engine must run at least one call in every lane; none in {missing}")
        self._hub = hub
        self._gap_grace = gap_grace
        self._throttle = throttle or NoThrottle()
        self._metrics = metrics or Metrics(process=False)
        self._tracing = tracing or Tracing()
        self._board = Board(lanes=dict(lanes), max_calls=max_calls)
        self._running: dict[str, Lane] = {}  # request id -> lane, of the calls under way
        self._calls: set[asyncio.Task[None]] = set()
        self._wakeup = asyncio.Event()
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
        """Queue an operation under `key`; its lane follows from its kind (pick.lane_of)."""
        seq = NO_SEQ if seq_id is None else seq_id
        op = Op(seq, request_id, kind, run, batch, notify, cost, queued_at=time.monotonic(),
                span=self._tracing.op_submitted(kind, request_id, tenant))
        self._board.add(key, op, tenant=tenant, ordered=ordered)
        self._metrics.submitted(tenant, kind)
        self._wakeup.set()

    def skip(self, key: str, seq_id: int, tenant: str) -> None:
        """A submission with this seq_id was refused: the queue (of `tenant`) must not wait for it."""
        if self._board.skip(key, seq_id, tenant):
            self._wakeup.set()

    def cancel(self, request_id: str) -> Op | None:
        """Take a queued (not yet running) operation out of its queue; None if it is not queued."""
        op = self._board.remove(request_id)
        if op is not None:
            self._tracing.op_ended(op.span, False, "cancelled")
            self._wakeup.set()  # its seq_id no longer holds up the ops behind it
        return op

    def forget(self, key: str) -> bool:
        """Drop the idle queue of a model that has ended (its next seq_id is no longer worth
        remembering); False while it still holds or runs work."""
        return self._board.forget(key)

    def depth(self, key: str) -> int:
        queue = self._board.queues.get(key)
        return len(queue.ops) if queue else 0

    def tenant_depth(self, tenant: str) -> int:
        return self.queued_by_tenant().get(tenant, 0)

    def queued_by_tenant(self) -> dict[str, int]:
        depths: Counter[str] = Counter()
        for queue in self._board.queues.values():
            if queue.ops:
                depths[queue.tenant] += len(queue.ops)
        return depths

    def load(self) -> dict[str, LaneLoad]:
        """Each lane's queued operations, running calls and capacity, now (read at scrape time)."""
        board, queued = self._board, dict.fromkeys(self._board.lanes, 0)
        for queue in board.queues.values():
            queued[queue.lane] += len(queue.ops)
        return {lane: LaneLoad(queued[lane], board.running[lane], board.lanes[lane]) for lane in queued}

    @property
    def max_calls(self) -> int | None:
        return self._board.max_calls

    def state_of(self, request_id: str, tenant: str, now: float | None = None) -> tuple[str, str | None]:
        """(queue_state, reason) of a pending operation, as retrieve_future reports it to the SDK."""
        found = self._board.find(request_id)
        if found is None or found[1].tenant != tenant:  # running, or not in this process's queues
            return "active", None
        _, queue, queued = found
        now = time.monotonic() if now is None else now
        if reason := self._throttle.reason(tenant, queued.cost, now):
            return "paused_rate_limit", reason
        oldest = oldest_ready(self._board, tenant, now, self._gap_grace)
        if oldest is not None and (reason := self._throttle.reason(tenant, oldest.cost, now)):
            return "paused_rate_limit", reason + " (an earlier request goes first)"
        # What shares its lane: other tenants' queued operations, and every running one.
        queued = sum(len(q.ops) for q in self._board.queues.values() if q.tenant != tenant and q.lane == queue.lane)
        running = sum(1 for lane in self._running.values() if lane == queue.lane)
        if queued or running:
            return "paused_capacity", (f"waiting for the engine ({queue.lane} lane): {queued} operations of other "
                                       f"tenants queued, {running} running")
        return "active", None

    # ----- lifecycle -------------------------------------------------------------------------
    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="scheduler")

    async def stop(self) -> None:
        """Stop choosing, and cancel the calls under way (their futures stay pending: the next
        start fails them)."""
        tasks = [t for t in (self._task, *self._calls) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # ----- consumer --------------------------------------------------------------------------
    async def _loop(self) -> None:
        """Start every call pick chooses until the lanes are full or nothing is ready; then sleep
        until something is submitted, a call ends, or a waiting op becomes ready."""
        while True:
            now = time.monotonic()
            step = pick(self._board, now, throttle=self._throttle, grace=self._gap_grace)
            if isinstance(step, Call):
                self._start(step, now)
                continue
            self._wakeup.clear()
            timeout = None if step.until is None or math.isinf(step.until) else max(step.until - now, 0.0)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), timeout)

    def _start(self, call: Call, now: float) -> None:
        self._board.take(call)
        for tenant, cost in call.costs().items():
            self._throttle.charge(tenant, cost, now)
        if call.gap is not None:
            log.warning("seq_gap_skipped", extra={"request_id": call.ops[0].request_id, "expected": call.gap[0],
                                                  "seq_id": call.gap[1]})
        ops = call.ops
        self._running.update((op.request_id, call.lane) for op in ops)
        self._metrics.call_started(call.lane, [(op.kind, now - op.queued_at) for op in ops])
        span = self._tracing.call_started(call.lane, ops, now)
        task = asyncio.create_task(self._execute(call, span), name=f"call-{call.lane}")
        self._calls.add(task)
        task.add_done_callback(self._calls.discard)

    async def _execute(self, call: Call, span: object = None) -> None:
        started = time.perf_counter()
        ops = call.ops
        try:
            outcomes = await self._run(call)
            self._metrics.call_ended(call.lane, ops[0].kind, time.perf_counter() - started)
            self._tracing.call_ended(span, not any(isinstance(o, OperationFailed) for o in outcomes))
            await self._finish_all(call, outcomes)
        finally:
            # Before anything else runs on the loop: whoever the results woke finds the queue free.
            self._board.release(call)
            for op in ops:
                self._running.pop(op.request_id, None)
            self._wakeup.set()
        log.info(
            "op_done",
            extra={"request_id": ops[0].request_id, "kind": ops[0].kind, "lane": call.lane, "batched": len(ops),
                   "packed": len(call.takes) if call.packed else 1, "ms": round((time.perf_counter() - started) * 1e3, 1)},
        )

    async def _finish_all(self, call: Call, outcomes: list[OpResult | OperationFailed]) -> None:
        """Store a call's outcomes in one transaction and tell whoever waits on them; if that
        fails, each is stored on its own (a future whose outcome cannot be stored fails)."""
        owned = [(take.tenant, op) for take in call.takes for op in take.ops]
        try:
            await self._hub.finish_many([Outcome.of(op.request_id, o) for (_, op), o in zip(owned, outcomes)])
        except Exception:
            log.exception("call_outcomes_unrecorded", extra={"request_id": owned[0][1].request_id, "ops": len(owned)})
            for (tenant, op), outcome in zip(owned, outcomes):
                await self._finish(op, tenant, outcome)
            return
        for (tenant, op), outcome in zip(owned, outcomes):
            self._ended(op, tenant, outcome, failed=isinstance(outcome, OperationFailed))

    async def _finish(self, op: Op, tenant: str, outcome: OpResult | OperationFailed) -> None:
        """Store the outcome and tell whoever waits on it; if storing fails, the future fails."""
        failed = isinstance(outcome, OperationFailed)
        try:
            await self._hub.finish_many([Outcome.of(op.request_id, outcome)])
        except Exception:  # the scheduler must keep serving every key
            log.exception("op_unrecorded", extra={"request_id": op.request_id, "kind": op.kind})
            failed = True
            with contextlib.suppress(Exception):
                await self._hub.fail(
                    op.request_id,
                    f"internal error while recording the outcome of {op.kind} (request {op.request_id}); "
                    "the server log has details",
                    ErrorCategory.SERVER,
                )
        self._ended(op, tenant, outcome, failed=failed)

    def _ended(self, op: Op, tenant: str, outcome: OpResult | OperationFailed, *, failed: bool) -> None:
        """The op's outcome is stored (or its failure is): count it, end its span, notify."""
        self._metrics.op_ended(tenant, op.kind, not failed, time.monotonic() - op.queued_at, op.cost)
        self._tracing.op_ended(op.span, not failed, outcome.category if isinstance(outcome, OperationFailed) else None)
        if op.notify is not None:
            try:
                op.notify(op.request_id, FutureState.FAILED if failed else FutureState.DONE,
                          None if failed else outcome[0])  # type: ignore[index]
            except Exception:  # a listener's bug must not stop the call's other ops being recorded
                log.exception("op_notify_failed", extra={"request_id": op.request_id, "kind": op.kind})

    async def _run(self, call: Call) -> list[OpResult | OperationFailed]:
        ops = call.ops
        try:
            if len(ops) == 1:
                return [await ops[0].run()]
            if call.packed:
                return await _run_packed(call)
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
                    ErrorCategory.SERVER,
                )
                for op in ops
            ]


async def _run_packed(call: Call) -> list[OpResult | OperationFailed]:
    """A packed call: one runner for all its queues (each take's ops, one model's); a queue whose
    part failed fails alone."""
    pack = call.takes[0].ops[0].batch.pack  # type: ignore[union-attr]
    parts = [(take.ops[0].batch.pack.item, [op.batch.payload for op in take.ops])  # type: ignore[union-attr]
             for take in call.takes]
    outcomes = await pack.run(parts)
    assert len(outcomes) == len(call.takes)
    flat: list[OpResult | OperationFailed] = []
    for take, outcome in zip(call.takes, outcomes):
        if isinstance(outcome, OperationFailed):
            log.info("op_failed", extra={"request_id": take.ops[0].request_id, "kind": take.ops[0].kind,
                                         "reason": outcome.message})
            flat += [outcome] * len(take.ops)
        else:
            assert len(outcome) == len(take.ops)
            flat += outcome
    return flat

