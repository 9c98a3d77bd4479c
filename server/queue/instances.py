"""Which server processes are alive, so that a process fails only the futures of dead ones.

A process's queue lives in its memory: a future it accepted can only finish there. Each process
registers an `instances` row and heartbeats it; its pending futures carry its id as `owner`. A
process is gone when its row is missing, its heartbeat is older than `timeout`, or it ran on this
host and its pid no longer exists (so a crash followed by a restart is noticed at once). At start
and at every heartbeat, a process fails the pending futures of gone processes, and of none other:
several servers can share one database, and one restarting never fails another's work.
"""

from __future__ import annotations

import logging
import os
import socket
from datetime import timedelta

from sqlalchemy import delete, or_, select, update
from sqlalchemy.orm import Session

from server import ids
from server.kinds import ErrorCategory, FutureState
from server.store.database import Database
from server.store.tables import Future, Instance, utcnow

log = logging.getLogger(__name__)

GONE_MESSAGE = (
    "the server process that held this request stopped before completing it; submit it again "
    "(training state since the last checkpoint may be lost)"
)


class Instances:
    """This process's row, and the sweep of gone processes' futures."""

    def __init__(self, db: Database, *, timeout: float = 30.0) -> None:
        self._db = db
        self.timeout = timeout
        self.id = ids.new_id("inst")
        self.host = socket.gethostname()[:255]

    def register(self) -> None:
        self._db.call(lambda s: s.add(Instance(id=self.id, host=self.host, pid=os.getpid())))

    def heartbeat(self) -> None:
        def write(s: Session) -> None:
            touched = s.execute(update(Instance).where(Instance.id == self.id).values(heartbeat_at=utcnow()))
            if touched.rowcount != 1:  # swept by a peer after a long pause: come back
                s.add(Instance(id=self.id, host=self.host, pid=os.getpid()))

        self._db.call(write)

    def retire(self, message: str) -> list[str]:
        """A clean stop: this process's pending futures fail with `message` (their request ids are
        returned), and its row goes."""

        def write(s: Session) -> list[str]:
            failed = _fail(s, Future.owner == self.id, message)
            s.execute(delete(Instance).where(Instance.id == self.id))
            return failed

        return self._db.call(write)

    @staticmethod
    def _alive(pid: int) -> bool:
        """Whether a process of this host is still there; our own pid in another row is a process
        that had it before us."""
        return pid != os.getpid() and _pid_exists(pid)

    def sweep(self) -> list[str]:
        """Fail the pending futures of gone processes (and of none other), remove their rows;
        the request ids failed."""
        cutoff = utcnow() - timedelta(seconds=self.timeout)

        def write(s: Session) -> list[str]:
            rows = s.scalars(select(Instance).where(Instance.id != self.id)).all()
            gone = [r.id for r in rows if r.heartbeat_at < cutoff or (r.host == self.host and not self._alive(r.pid))]
            live = [r.id for r in rows if r.id not in gone] + [self.id]
            failed = _fail(s, or_(Future.owner.is_(None), Future.owner.not_in(live)), GONE_MESSAGE)
            if gone:
                s.execute(delete(Instance).where(Instance.id.in_(gone)))
            return failed

        failed = self._db.call(write)
        if failed:
            log.warning("futures_of_gone_processes_failed", extra={"count": len(failed)})
        return failed


def _fail(s: Session, which: object, message: str) -> list[str]:
    ids_ = list(s.scalars(select(Future.request_id).where(Future.state == FutureState.PENDING, which)))
    if ids_:
        s.execute(
            update(Future)
            .where(Future.request_id.in_(ids_), Future.state == FutureState.PENDING)
            .values(state=FutureState.FAILED, error=message, error_category=ErrorCategory.SERVER, finished_at=utcnow())
        )
    return ids_


def _pid_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: it exists
        return True
    return True
