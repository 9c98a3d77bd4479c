"""Futures: durable rows in the store, plus in-process wake-ups for long-polling waiters."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import delete, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from server import ids
from server.errors import OperationFailed
from server.kinds import ErrorCategory, FutureState, OpKind, ResultFormat
from server.store.database import Database
from server.store.tables import Future, utcnow

log = logging.getLogger(__name__)

STOP_MESSAGE = (
    "the server stopped while this request was queued or running, so it was not completed; "
    "a training run's state since its last checkpoint is lost: reload that checkpoint "
    "(create_training_client_from_state_with_optimizer) and submit it again; a sample: submit it again"
)


Announce = Callable[[list[str]], Awaitable[None]]


@dataclass(frozen=True)
class Submission:
    request_id: str
    is_new: bool  # False: the same submission arrived before (a client retry)


@dataclass(frozen=True)
class FutureView:
    """A future as stored. The names are kept as read (plain strings equal to their enum members),
    so that reading a row never fails on a value this version does not know."""

    request_id: str
    kind: str  # an OpKind
    state: str  # a FutureState
    result: bytes | None
    result_format: str | None  # a ResultFormat
    error: str | None
    error_category: str | None  # an ErrorCategory


def _view(row: Future) -> FutureView:
    return FutureView(
        request_id=row.request_id,
        kind=row.kind,
        state=row.state,
        result=row.result,
        result_format=row.result_format,
        error=row.error,
        error_category=row.error_category,
    )


@dataclass(frozen=True)
class Outcome:
    """How one future ended: a result, or an error with its category."""

    request_id: str
    state: str  # a FutureState: DONE or FAILED
    result: bytes | None = None
    result_format: str | None = None  # a ResultFormat
    error: str | None = None
    error_category: str | None = None  # an ErrorCategory

    @classmethod
    def of(cls, request_id: str, outcome: tuple[bytes, str] | OperationFailed) -> Outcome:
        """From what an operation's runner returned: its (result, format), or how it failed."""
        if isinstance(outcome, OperationFailed):
            return cls(request_id, FutureState.FAILED, error=outcome.message, error_category=outcome.category)
        result, result_format = outcome
        return cls(request_id, FutureState.DONE, result=result, result_format=result_format)

    def values(self) -> dict[str, Any]:
        return {"state": self.state, "result": self.result, "result_format": self.result_format,
                "error": self.error, "error_category": self.error_category}


class FutureHub:
    def __init__(self, db: Database, owner: str | None = None, announce: Announce | None = None) -> None:
        """`owner`: the process (server/queue/instances.py) whose queue holds the futures made here.
        `announce`: tells the other processes of a deployment that futures ended (server/queue/bus.py)."""
        self._db = db
        self._owner = owner
        self._announce = announce
        self._events: dict[str, set[asyncio.Event]] = {}  # request_id -> one event per waiter
        # Futures submitted here and not ended: (tenant, kind). A poll of one waits without a read.
        self._pending: dict[str, tuple[str, str]] = {}
        # Futures ended here in the last RECENT_SECONDS: the poll that follows an end (the common
        # case: the client is already waiting) is answered from memory, not from a read.
        self._recent = RecentResults()

    async def submit(self, *, tenant_id: str, kind: OpKind, scope: str, seq_id: int, fingerprint: str) -> Submission:
        request_id = ids.new_id("req")

        def insert(s: Session) -> None:
            s.add(
                Future(
                    request_id=request_id, tenant_id=tenant_id, kind=kind, scope=scope, seq_id=seq_id,
                    fingerprint=fingerprint, owner=self._owner,
                )
            )

        def existing(s: Session) -> str | None:
            return s.scalar(
                select(Future.request_id).where(
                    Future.tenant_id == tenant_id, Future.scope == scope, Future.seq_id == seq_id,
                    Future.fingerprint == fingerprint,
                )
            )

        try:  # one write in the common case; a retry of the same submission meets the unique key
            await self._db.run(insert)
        except IntegrityError:
            if (found := await self._db.run(existing)) is None:
                raise
            return Submission(found, is_new=False)
        self._pending[request_id] = (tenant_id, kind)
        return Submission(request_id, is_new=True)

    async def resolve(self, request_id: str, result: bytes, result_format: ResultFormat) -> None:
        await self.finish_many([Outcome(request_id, FutureState.DONE, result=result, result_format=result_format)])

    async def fail(self, request_id: str, message: str, category: ErrorCategory) -> None:
        await self.finish_many([Outcome(request_id, FutureState.FAILED, error=message, error_category=category)])

    async def finish_many(self, outcomes: list[Outcome]) -> None:
        """Record several futures' ends in one transaction (an engine call's: a packed call of eight
        models wrote eight commits before), then wake their waiters."""
        def write(s: Session) -> None:
            finished_at = utcnow()
            for o in outcomes:
                changed = {key: value for key, value in o.values().items() if value is not None}
                s.execute(update(Future).where(Future.request_id == o.request_id).values(finished_at=finished_at,
                                                                                         **changed))

        await self._db.run(write)
        for o in outcomes:
            if (pending := self._pending.pop(o.request_id, None)) is not None:
                tenant_id, kind = pending
                self._recent.put(tenant_id, FutureView(request_id=o.request_id, kind=kind, **o.values()))
        await self.ended([o.request_id for o in outcomes])

    async def ended(self, request_ids: list[str]) -> None:
        """Futures ended (here, or by a sweep): wake their waiters here and in every other process."""
        self.wake(request_ids)
        if self._announce is not None:
            await self._announce(request_ids)

    def wake(self, request_ids: list[str]) -> None:
        """Waiters on futures that ended elsewhere (another process, or a sweep) read them again."""
        for request_id in request_ids:
            for event in self._events.pop(request_id, ()):
                event.set()

    async def get(self, tenant_id: str, request_id: str) -> FutureView | None:
        if (recent := self._recent.get(tenant_id, request_id)) is not None:
            return recent

        def read(s: Session) -> FutureView | None:
            row = s.get(Future, request_id)
            return _view(row) if row is not None and row.tenant_id == tenant_id else None

        return await self._db.run(read)

    def forget_results(self, request_ids: list[str]) -> None:
        """Results the store dropped (past their retention) are not answered from memory either."""
        self._recent.drop(request_ids)

    @property
    def pending(self) -> int:
        """How many futures submitted here have not ended."""
        return len(self._pending)

    def _pending_here(self, tenant_id: str, request_id: str) -> FutureView | None:
        pending = self._pending.get(request_id)
        if pending is None or pending[0] != tenant_id:
            return None
        return FutureView(request_id, pending[1], FutureState.PENDING, None, None, None, None)

    async def wait(self, tenant_id: str, request_id: str, timeout: float) -> FutureView | None:
        """The future once it has ended, or still pending after `timeout` seconds; None if it does
        not exist for this tenant."""
        # The event is registered before the row is read, so a resolve that lands in between is
        # seen either by the read or by the event. Each waiter has its own event and removes it
        # when it returns, so polls of finished, unknown or timed-out ids leave nothing behind.
        event = asyncio.Event()
        waiters = self._events.setdefault(request_id, set())
        waiters.add(event)
        try:
            view = self._pending_here(tenant_id, request_id) or await self.get(tenant_id, request_id)
            if view is None or view.state != FutureState.PENDING:
                return view
            try:
                await asyncio.wait_for(event.wait(), timeout)
            except TimeoutError:
                return view
            return await self.get(tenant_id, request_id)
        finally:
            waiters.discard(event)
            if not waiters and self._events.get(request_id) is waiters:
                del self._events[request_id]


class RecentResults:
    """Futures that ended here lately, by request id: at most RECENT_COUNT of them and RECENT_BYTES
    of results, none older than RECENT_SECONDS (the database has them all, for longer)."""

    RECENT_COUNT, RECENT_BYTES, RECENT_SECONDS = 4096, 64 << 20, 60.0

    def __init__(self) -> None:
        self._entries: OrderedDict[str, tuple[str, FutureView, float]] = OrderedDict()
        self._bytes = 0

    def put(self, tenant_id: str, view: FutureView) -> None:
        self.drop([view.request_id])
        now = time.monotonic()
        self._entries[view.request_id] = (tenant_id, view, now)
        self._bytes += len(view.result or b"")
        while self._entries and (len(self._entries) > self.RECENT_COUNT or self._bytes > self.RECENT_BYTES
                                 or next(iter(self._entries.values()))[2] < now - self.RECENT_SECONDS):
            _, (_, dropped, _) = self._entries.popitem(last=False)
            self._bytes -= len(dropped.result or b"")

    def get(self, tenant_id: str, request_id: str) -> FutureView | None:
        entry = self._entries.get(request_id)
        if entry is None or entry[0] != tenant_id or entry[2] < time.monotonic() - self.RECENT_SECONDS:
            return None
        return entry[1]

    def drop(self, request_ids: list[str]) -> None:
        for request_id in request_ids:
            if (entry := self._entries.pop(request_id, None)) is not None:
                self._bytes -= len(entry[1].result or b"")

    def __len__(self) -> int:
        return len(self._entries)


EXPIRE_BATCH = 500
EXPIRED = ("the result of this request expired: results are kept {seconds:g} s after they are ready "
           "(future_retention_seconds); the work ran once and is not run again")


def expire_results(s: Session, finished_before: datetime, retention_seconds: float) -> list[str]:
    """Up to EXPIRE_BATCH finished futures, done before `finished_before`, lose their result: each
    then answers that it expired (a user error). Their rows stay, so a retry of the same submission
    still finds them and runs nothing twice. Their request ids."""
    rows = list(s.scalars(select(Future).where(
        Future.finished_at < finished_before, Future.state == FutureState.DONE).limit(EXPIRE_BATCH)))
    for row in rows:
        row.state, row.result, row.result_format = FutureState.FAILED, None, None
        row.error, row.error_category = EXPIRED.format(seconds=retention_seconds), ErrorCategory.USER
    return [row.request_id for row in rows]


def delete_finished(s: Session, finished_before: datetime) -> int:
    """Up to EXPIRE_BATCH futures finished before `finished_before` deleted for good; retrieving
    one then answers that it is not found. How many."""
    ids_ = list(s.scalars(select(Future.request_id).where(
        Future.finished_at < finished_before, Future.state != FutureState.PENDING).limit(EXPIRE_BATCH)))
    if ids_:
        s.execute(delete(Future).where(Future.request_id.in_(ids_)))
    return len(ids_)
