"""Choosing the next engine call: the queues as plain data, and `pick`, a pure function of them.

A `Board` holds what the scheduler knows: the queues (one per key, each of a tenant and of a lane),
whose turn it is in each lane, which queues have a call under way and how many calls run in each
lane. `pick(board, now, ...)` reads it and says which operations form the next engine call, or
until when nothing can start; it changes nothing. `Board.take` then takes that call's operations
out of their queues and passes the turn on, and `Board.release` frees its queues when it ends.
The async runner (server/queue/scheduler.py) does no choosing of its own.
"""

from __future__ import annotations

import bisect
import itertools
import math
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Hashable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from server.errors import OperationFailed
from server.kinds import Lane, OpKind

# What an operation produces: the encoded result and its format ("json" or "proto").
OpResult = tuple[bytes, str]
OpRunner = Callable[[], Awaitable[OpResult]]
# Told after an operation's outcome is stored: (request_id, state "done"/"failed", result bytes).
Notify = Callable[[str, str, bytes | None], None]
NO_SEQ = 2**62  # sorts after every real seq_id
# Operations that never run past a missing seq_id: an optimizer step, a save or a load must see
# every forward_backward sent before it (a chunk of a forward_backward may be given up on after
# the grace; these wait until the missing one arrives, is refused, or the session ends).
BARRIERS = frozenset({OpKind.OPTIM_STEP, OpKind.SAVE_WEIGHTS, OpKind.SAVE_WEIGHTS_FOR_SAMPLER,
                      OpKind.SAVE_WEIGHTS_EXTERNAL, OpKind.LOAD_WEIGHTS, OpKind.UNLOAD_MODEL})


def lane_of(kind: str) -> Lane:
    """Samples run in the sampling lane; everything else (model ops, creations, loads) in training."""
    return Lane.SAMPLING if kind == OpKind.SAMPLE else Lane.TRAINING


class Throttle(Protocol):
    def ready_at(self, tenant: str, cost: int, now: float) -> float:
        """When the tenant may start an operation of `cost` tokens (now or earlier: at once)."""
        ...

    def charge(self, tenant: str, cost: int, now: float) -> None: ...

    def reason(self, tenant: str, cost: int, now: float) -> str:
        """Why an operation of `cost` tokens cannot start now ("" if it can)."""
        ...


class NoThrottle:
    def ready_at(self, tenant: str, cost: int, now: float) -> float:
        return now

    def charge(self, tenant: str, cost: int, now: float) -> None:
        pass

    def reason(self, tenant: str, cost: int, now: float) -> str:
        return ""


# A packed call's runner: per queue (its Pack.item, its ops' payloads), the queue's results (one
# per payload) or the OperationFailed all its ops end in.
PackRunner = Callable[[list[tuple[Any, list[Any]]]], Awaitable[list[list[OpResult] | OperationFailed]]]


@dataclass(frozen=True)
class Pack:
    """How an op of an ordered queue can share one engine call with the ready ops of other ordered
    queues (other models on one base model: packed execution, workers/packing.py)."""

    key: Hashable  # ops with the same pack key may share a call
    budget: int  # the sizes of all the queues' ops together, at most
    max_queues: int
    item: Any  # what the runner needs of this op's queue (its model, its loss)
    run: PackRunner


@dataclass(frozen=True)
class Batch:
    """How an operation can share one engine call with its neighbours of the same key."""

    key: Hashable
    size: int  # e.g. tokens or rows; a group's sizes add up to at most `budget`
    budget: int
    payload: Any
    run: Callable[[list[Any]], Awaitable[list[OpResult]]]  # one result per payload, in order
    pack: Pack | None = None


@dataclass(order=True)
class Op:
    seq_id: int
    request_id: str = field(compare=False)
    kind: str = field(compare=False)
    run: OpRunner = field(compare=False)
    batch: Batch | None = field(compare=False, default=None)
    notify: Notify | None = field(compare=False, default=None)
    cost: int = field(compare=False, default=0)  # tokens, for the tenant's tokens/s budget
    queued_at: float = field(compare=False, default_factory=time.monotonic)
    arrival: int = 0  # set by Board.add; orders ops of one seq_id (NO_SEQ) by arrival
    span: Any = field(compare=False, default=None)  # its tracing span (server/tracing.py), None when off


@dataclass
class Queue:
    tenant: str
    ordered: bool
    # A queue runs in the lane of the op that brought it into the turns; in practice all of a
    # queue's ops share one lane (a model's are training, a tenant's samples sampling).
    lane: Lane = Lane.TRAINING
    ops: list[Op] = field(default_factory=list)  # sorted: seq_id order, then arrival
    expected: int = 1  # ordered queues: the next seq_id due, before skips
    skipped: set[int] = field(default_factory=set)

    def due(self, after: int | None = None) -> int:
        """The next seq_id due (once the ops up to `after` have run), past refused ones."""
        seq = self.expected if after is None else max(self.expected, after + 1)
        while seq in self.skipped:
            seq += 1
        return seq

    def ready_at(self, now: float, grace: float, start: int = 0) -> float:
        """When ops[start] may run as far as order goes (the ones before it taken): now if it is
        due, `grace` seconds after it was queued if a seq_id before it is missing, never for a
        barrier (it waits for every op before it, or for their refusal to be seen)."""
        head = self.ops[start]
        if not self.ordered or head.seq_id == NO_SEQ:
            return now
        if head.seq_id <= self.due(self.ops[start - 1].seq_id if start else None):
            return now
        if head.kind in BARRIERS:
            return math.inf
        return head.queued_at + grace


@dataclass(frozen=True)
class Take:
    """Operations taken from the front of one queue."""

    key: str
    tenant: str
    ops: tuple[Op, ...]


@dataclass(frozen=True)
class Call:
    """One engine call: the ops of the queue whose turn it was, then any merged from others
    (unordered queues: one batch of payloads) or packed with them (ordered queues: `packed`)."""

    lane: Lane
    takes: tuple[Take, ...]
    gap: tuple[int, int] | None = None  # (seq_id due, seq_id run): a missing one given up on
    packed: bool = False

    @property
    def ops(self) -> list[Op]:
        return [op for take in self.takes for op in take.ops]

    def costs(self) -> dict[str, int]:
        """Tokens charged to each tenant in the call."""
        spent: Counter[str] = Counter()
        for take in self.takes:
            spent[take.tenant] += sum(op.cost for op in take.ops)
        return dict(spent)


@dataclass(frozen=True)
class Wait:
    """Nothing can start now; look again at `until` (None: when something is added or ends)."""

    until: float | None


@dataclass
class Board:
    lanes: Mapping[Lane, int]  # how many calls may run at once in each lane
    max_calls: int | None = None  # how many may run at once in all lanes together (None: no more limit)
    queues: dict[str, Queue] = field(default_factory=dict)
    turns: dict[Lane, deque[str]] = field(default_factory=dict)  # tenants with queued ops, per lane
    keys: dict[tuple[Lane, str], deque[str]] = field(default_factory=dict)  # a tenant's keys with ops
    lane_turns: deque[Lane] = field(init=False)  # which lane pick tries first
    busy: set[str] = field(default_factory=set)  # keys with a call under way
    running: Counter[Lane] = field(default_factory=Counter)  # calls under way, per lane
    _arrivals: Iterator[int] = field(init=False, default_factory=itertools.count)

    def __post_init__(self) -> None:
        self.lane_turns = deque(self.lanes)

    def has_room(self, lane: Lane) -> bool:
        if self.max_calls is not None and sum(self.running.values()) >= self.max_calls:
            return False
        return self.running[lane] < self.lanes.get(lane, 0)

    # ----- queues ------------------------------------------------------------------------------
    def add(self, key: str, op: Op, *, tenant: str, ordered: bool) -> None:
        queue = self.queues.get(key)
        if queue is None:
            queue = self.queues[key] = Queue(tenant=tenant, ordered=ordered)
        if not queue.ops:
            queue.lane = lane_of(op.kind)
            self._enter(queue.lane, queue.tenant, key)
        op.arrival = next(self._arrivals)
        bisect.insort(queue.ops, op)

    def skip(self, key: str, seq_id: int, tenant: str) -> bool:
        """A seq_id the ordered queue `key` (of `tenant`) must not wait for; False if it was past."""
        queue = self.queues.get(key)
        if queue is None:
            queue = self.queues[key] = Queue(tenant=tenant, ordered=True)
        if seq_id < queue.expected:
            return False
        queue.skipped.add(seq_id)
        return True

    def remove(self, request_id: str) -> Op | None:
        """Take a queued op out (its seq_id is then skipped); None if it is not queued."""
        found = self.find(request_id)
        if found is None:
            return None
        key, queue, op = found
        queue.ops.remove(op)
        if queue.ordered and op.seq_id != NO_SEQ:
            self.skip(key, op.seq_id, queue.tenant)
        self._leave_if_empty(key)
        return op

    def forget(self, key: str) -> bool:
        """Drop an idle ordered queue (its model has ended: nothing will be queued on it again).
        False, and nothing dropped, while it holds ops or a call of it runs."""
        queue = self.queues.get(key)
        if queue is None or queue.ops or key in self.busy:
            return False
        self._leave_if_empty(key)
        del self.queues[key]
        return True

    def find(self, request_id: str) -> tuple[str, Queue, Op] | None:
        for key, queue in self.queues.items():
            for op in queue.ops:
                if op.request_id == request_id:
                    return key, queue, op
        return None

    # ----- calls -------------------------------------------------------------------------------
    def take(self, call: Call) -> None:
        """Start `call` (as pick chose it): its ops leave their queues, which are busy until it is
        released, and its tenant and queue go to the back of their turns."""
        for take in call.takes:
            queue = self.queues[take.key]
            assert queue.ops[: len(take.ops)] == list(take.ops), "the board changed since pick"
            del queue.ops[: len(take.ops)]
            if queue.ordered:
                self._advance(queue, take.ops)
            self.busy.add(take.key)
        first = call.takes[0]
        _to_back(self.turns[call.lane], first.tenant)
        _to_back(self.keys[(call.lane, first.tenant)], first.key)
        _to_back(self.lane_turns, call.lane)
        for take in call.takes:
            self._leave_if_empty(take.key)
        self.running[call.lane] += 1

    def release(self, call: Call) -> None:
        """`call` ended: its queues may run again."""
        self.busy.difference_update(take.key for take in call.takes)
        self.running[call.lane] -= 1

    @staticmethod
    def _advance(queue: Queue, ops: Iterable[Op]) -> None:
        for op in ops:
            if op.seq_id != NO_SEQ:
                queue.expected = max(queue.expected, op.seq_id + 1)
        queue.skipped = {seq for seq in queue.skipped if seq >= queue.expected}

    def _enter(self, lane: Lane, tenant: str, key: str) -> None:
        keys = self.keys.get((lane, tenant))
        if keys is None:
            keys = self.keys[(lane, tenant)] = deque()
            self.turns.setdefault(lane, deque()).append(tenant)
        keys.append(key)

    def _leave_if_empty(self, key: str) -> None:
        """Take an empty queue out of its tenant's turns. An ordered queue itself stays: it
        remembers its next seq_id; an unordered one is forgotten."""
        queue = self.queues.get(key)
        if queue is None or queue.ops:
            return
        keys = self.keys.get((queue.lane, queue.tenant))
        if keys is not None and key in keys:
            keys.remove(key)
            if not keys:
                del self.keys[(queue.lane, queue.tenant)]
                self.turns[queue.lane].remove(queue.tenant)
        if not queue.ordered:
            del self.queues[key]


def _to_back(turns: deque, item: object) -> None:
    turns.remove(item)
    turns.append(item)


def _earliest(a: float | None, b: float | None) -> float | None:
    return b if a is None else a if b is None else min(a, b)


# ----- pick: reads the board, changes nothing --------------------------------------------------
def pick(board: Board, now: float, *, throttle: Throttle, grace: float) -> Call | Wait:
    """The next engine call, or until when none can start.

    Lanes with room are tried in turn; in a lane, tenants take turns (one call per turn) and
    within a tenant its queues do. A queue with a call under way is not eligible, so one model's
    ops never overlap. A tenant over its tokens/s budget is passed over until its oldest ready op
    fits (its other ops wait behind that one)."""
    soonest: float | None = None
    for lane in board.lane_turns:
        if not board.has_room(lane):
            continue  # a call's end wakes the runner
        for tenant in board.turns.get(lane, ()):
            key, at = _ready_key(board, lane, tenant, now, throttle, grace)
            if key is not None:
                return _call(board, lane, key, now, throttle, grace)
            soonest = _earliest(soonest, at)
    return Wait(soonest)


def oldest_ready(board: Board, tenant: str, now: float, grace: float, taken: Mapping[str, int] | None = None) -> Op | None:
    """The tenant's longest-waiting op that could start now but for its budget: due in its queue,
    its queue idle, its lane with room (`taken`: ops already chosen from the front of queues)."""
    taken = taken or {}
    heads: list[Op] = []
    for lane in board.lanes:
        if not board.has_room(lane):
            continue
        for key in board.keys.get((lane, tenant), ()):
            queue, start = board.queues[key], taken.get(key, 0)
            if key not in board.busy and start < len(queue.ops) and queue.ready_at(now, grace, start) <= now:
                heads.append(queue.ops[start])
    return min(heads, key=lambda op: op.arrival, default=None)


def _held_until(board: Board, tenant: str, now: float, throttle: Throttle, grace: float,
                taken: Mapping[str, int], pending: Mapping[str, int]) -> float:
    """When the tenant's tokens/s budget lets its oldest ready op run (now if it does), on top of
    the tokens already `pending` in the call being formed. Its other ops wait behind that one:
    otherwise small ones could keep the window full and starve a big one for ever."""
    oldest = oldest_ready(board, tenant, now, grace, taken)
    return now if oldest is None else throttle.ready_at(tenant, pending.get(tenant, 0) + oldest.cost, now)


def _ready_key(board: Board, lane: Lane, tenant: str, now: float, throttle: Throttle,
               grace: float) -> tuple[str | None, float | None]:
    """The tenant's first key in the lane whose head may start now, or when one may."""
    if (held := _held_until(board, tenant, now, throttle, grace, {}, {})) > now:
        return None, held
    soonest: float | None = None
    for key in board.keys[(lane, tenant)]:
        if key in board.busy:
            continue
        queue = board.queues[key]
        at = max(queue.ready_at(now, grace), throttle.ready_at(tenant, queue.ops[0].cost, now))
        if at <= now:
            return key, None
        soonest = _earliest(soonest, at)
    return None, soonest


def _call(board: Board, lane: Lane, key: str, now: float, throttle: Throttle, grace: float) -> Call:
    queue = board.queues[key]
    ops = _neighbours(queue)
    head = ops[0]
    gap = None
    if queue.ordered and head.seq_id != NO_SEQ and head.seq_id > (due := queue.due()):
        gap = (due, head.seq_id)
    takes = [Take(key, queue.tenant, tuple(ops))]
    if head.batch is None:
        return Call(lane, tuple(takes), gap)
    if not queue.ordered:
        takes += _merged(board, lane, takes[0], now, throttle, grace)
    elif head.batch.pack is not None and gap is None:
        takes += _packed(board, lane, takes[0], now, throttle, grace)
    return Call(lane, tuple(takes), gap, packed=queue.ordered and len(takes) > 1)


def _neighbours(queue: Queue) -> list[Op]:
    """The head and the ops after it that share its engine call: same batch key, within the
    budget and, in an ordered queue, contiguous seq_ids (a chunked forward_backward then computes
    exactly what the unchunked call would)."""
    ops = [queue.ops[0]]
    if ops[0].batch is None:
        return ops
    size = ops[0].batch.size
    for nxt in queue.ops[1:]:
        if not _joins(queue.ordered, ops[-1], nxt, size):
            break
        size += nxt.batch.size  # type: ignore[union-attr]
        ops.append(nxt)
    return ops


def _merged(board: Board, lane: Lane, first: Take, now: float, throttle: Throttle, grace: float) -> list[Take]:
    """Unordered ops of other idle queues (other tenants' samples on the same checkpoint) with the
    same batch key join the call, oldest first: they would only wait for a call computing the same
    thing. A tenant over its tokens/s budget waits here too, whoever else samples the checkpoint."""
    batch_key = first.ops[0].batch.key  # type: ignore[union-attr]
    last, size = first.ops[-1], sum(op.batch.size for op in first.ops)  # type: ignore[union-attr]
    taken, pending = {first.key: len(first.ops)}, Counter({first.tenant: sum(op.cost for op in first.ops)})
    candidates = sorted(
        (q.ops[0].arrival, k) for k, q in board.queues.items()
        if k != first.key and k not in board.busy and not q.ordered and q.lane == lane and q.ops
        and q.ops[0].batch is not None and q.ops[0].batch.key == batch_key
    )
    takes: list[Take] = []
    for _, key in candidates:
        queue, joined = board.queues[key], []
        for op in queue.ops:
            if (not _joins(False, last, op, size)
                    or throttle.ready_at(queue.tenant, pending[queue.tenant] + op.cost, now) > now
                    or _held_until(board, queue.tenant, now, throttle, grace, taken, pending) > now):
                break
            joined.append(op)
            last, size = op, size + op.batch.size  # type: ignore[union-attr]
            pending[queue.tenant] += op.cost
            taken[key] = len(joined)
        if joined:
            takes.append(Take(key, queue.tenant, tuple(joined)))
    return takes


def _packed(board: Board, lane: Lane, first: Take, now: float, throttle: Throttle, grace: float) -> list[Take]:
    """Ops of other idle ordered queues (other models) whose heads are due now and carry the same
    pack key join the call, oldest head first, each with its neighbours, within the pack's budget
    and queue count: they run in the pass this call makes anyway. A head that waits for a missing
    seq_id, or whose tenant is over its tokens/s budget, waits for its own turn."""
    pack = first.ops[0].batch.pack  # type: ignore[union-attr]
    size = sum(op.batch.size for op in first.ops)  # type: ignore[union-attr]
    taken, pending = {first.key: len(first.ops)}, Counter({first.tenant: sum(op.cost for op in first.ops)})
    candidates = sorted(
        (q.ops[0].arrival, k) for k, q in board.queues.items()
        if k != first.key and k not in board.busy and q.ordered and q.lane == lane and q.ops
        and q.ops[0].batch is not None and q.ops[0].batch.pack is not None
        and q.ops[0].batch.pack.key == pack.key and (q.ops[0].seq_id == NO_SEQ or q.ops[0].seq_id <= q.due())
    )
    takes: list[Take] = []
    for _, key in candidates:
        if len(takes) + 1 >= pack.max_queues:
            break
        queue, joined = board.queues[key], []
        if _held_until(board, queue.tenant, now, throttle, grace, taken, pending) > now:
            continue
        for op in _neighbours(queue):
            if size + op.batch.size > pack.budget or (  # type: ignore[union-attr]
                    throttle.ready_at(queue.tenant, pending[queue.tenant] + op.cost, now) > now):
                break
            joined.append(op)
            size += op.batch.size  # type: ignore[union-attr]
            pending[queue.tenant] += op.cost
            taken[key] = len(joined)
        if joined:
            takes.append(Take(key, queue.tenant, tuple(joined)))
    return takes


def _joins(ordered: bool, last: Op, nxt: Op, size: int) -> bool:
    if nxt.batch is None or last.batch is None or nxt.batch.key != last.batch.key:
        return False
    if size + nxt.batch.size > last.batch.budget:
        return False
    return not ordered or nxt.seq_id == last.seq_id + 1
