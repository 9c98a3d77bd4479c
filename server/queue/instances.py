"""Which server processes are alive, so that a process fails only the futures of dead ones.

A process's queue lives in its memory: a future it accepted can only finish there. Each process
registers an `instances` row and heartbeats it; its pending futures carry its id as `owner`. A
process is gone when its row is missing, its heartbeat is older than `timeout`, or it ran on this
host and its pid no longer exists (so a crash followed by a restart is noticed at once). At start
and at every heartbeat, a process fails the pending futures of gone processes, and of none other:
several servers can share one database, and one restarting never fails another's work.

A model's work runs in one process, its *owner* (`models.owner`): that process's queue keeps the
model's seq_id order, which requests spread over several processes (a load balancer, a client with
two base URLs) would otherwise lose. `claim` says where a model's request must go: here (this
process owns it, or has just adopted it because it had no owner or its owner is gone), or the
owner's URL, where the gateway forwards it (gateway/forwarding.py).
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
from server.store.tables import Future, Instance, Model, utcnow

log = logging.getLogger(__name__)

GONE_MESSAGE = (
    "the server process that held this request stopped before completing it; "
    "a training run's state since its last checkpoint is lost: reload that checkpoint "
    "(create_training_client_from_state_with_optimizer) and submit it again; a sample: submit it again"
)


class Instances:
    """This process's row, and the sweep of gone processes' futures."""

    def __init__(self, db: Database, *, timeout: float = 30.0, url: str | None = None) -> None:
        """`url`: where the other processes reach this one (None: they cannot forward to it)."""
        self._db = db
        self.timeout = timeout
        self.url = url
        self.id = ids.new_id("inst")
        self.host = socket.gethostname()[:255]

    def _row(self) -> Instance:
        return Instance(id=self.id, host=self.host, pid=os.getpid(), url=self.url)

    def register(self) -> None:
        self._db.call(lambda s: s.add(self._row()))

    def heartbeat(self) -> bool:
        """Whether this process's row was still there (False: a peer swept it after a long pause,
        and it has come back)."""
        def write(s: Session) -> bool:
            touched = s.execute(update(Instance).where(Instance.id == self.id).values(heartbeat_at=utcnow()))
            if touched.rowcount != 1:  # swept by a peer after a long pause: come back
                s.add(self._row())
                return False
            return True

        return self._db.call(write)

    def retire(self, message: str) -> list[str]:
        """A clean stop: this process's pending futures fail with `message` (their request ids are
        returned), and its row goes."""

        def write(s: Session) -> list[str]:
            failed = _fail(s, Future.owner == self.id, message)
            s.execute(delete(Instance).where(Instance.id == self.id))
            return failed

        return self._db.call(write)

    def claim(self, s: Session, model: Model) -> str | None:
        """Where `model`'s work runs: None for here (owned by this process, or adopted now), or
        the URL of the live process that owns it. In the caller's transaction."""
        if model.owner == self.id:
            return None
        if model.owner is not None:
            owner = s.get(Instance, model.owner)
            if owner is not None and owner.url and not self._is_gone(owner):
                return owner.url
        # No owner, or a gone one: adopt the model. A peer adopting it at the same moment wins or
        # loses on the conditional update; the loser forwards to the winner.
        held_by = Model.owner.is_(None) if model.owner is None else Model.owner == model.owner
        adopted = s.execute(update(Model).where(Model.id == model.id, held_by).values(owner=self.id))
        if adopted.rowcount == 1:
            log.info("model_adopted", extra={"model_id": model.id, "previous_owner": model.owner})
            model.owner = self.id
            return None
        s.refresh(model)  # a peer adopted it first: its URL, or here if that peer is already gone
        return self.claim(s, model)

    def _is_gone(self, row: Instance) -> bool:
        cutoff = utcnow() - timedelta(seconds=self.timeout)
        return row.heartbeat_at < cutoff or (row.host == self.host and not self._alive(row.pid))

    @staticmethod
    def _alive(pid: int) -> bool:
        """Whether a process of this host is still there; our own pid in another row is a process
        that had it before us."""
        return pid != os.getpid() and _pid_exists(pid)

    def sweep(self) -> list[str]:
        """Fail the pending futures of gone processes (and of none other), remove their rows;
        the request ids failed."""
        def write(s: Session) -> list[str]:
            rows = s.scalars(select(Instance).where(Instance.id != self.id)).all()
            gone = [r.id for r in rows if self._is_gone(r)]
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
