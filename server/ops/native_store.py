"""Where the native processor app's objects (server/ops/native_data.py) live: this process's
memory, each under its processor id with its (tenant, session), least recently used first.

Apart from native_data so that the code that ends sessions can drop a session's objects
(`drop_session`) without importing the processor app (which imports the session code: a cycle).
Bounded in all: an object unused for IDLE_SECONDS goes, and past MAX_SERVER_OBJECTS the least
recently used go first (the per-tenant bounds are native_data's)."""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from server.errors import NotFound

MAX_SERVER_OBJECTS = 4096  # every tenant's together
IDLE_SECONDS = 2 * 3600.0  # an object unused this long is dropped


@dataclass
class Entry:
    pid: str
    tenant_id: str
    session_id: str
    kind: str  # Dataset | LazyDataset | DataLoader | InputProcessor
    obj: Any
    used: float = field(default_factory=time.monotonic)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)  # one method at a time per object


class Store:
    """Every processor object of this process, least recently used first."""

    def __init__(self) -> None:
        self.entries: OrderedDict[str, Entry] = OrderedDict()

    def sweep(self) -> None:
        limit = time.monotonic() - IDLE_SECONDS
        while self.entries and next(iter(self.entries.values())).used < limit:
            self.entries.popitem(last=False)
        while len(self.entries) > MAX_SERVER_OBJECTS:
            self.entries.popitem(last=False)

    def add(self, entry: Entry) -> None:
        self.entries[entry.pid] = entry
        self.sweep()

    def find(self, tenant_id: str, session_id: str, pid: Any, field_name: str) -> Entry:
        """The caller's object; anyone else's answers exactly as a missing one."""
        entry = self.entries.get(pid) if isinstance(pid, str) else None
        if entry is None or entry.tenant_id != tenant_id or entry.session_id != session_id:
            raise NotFound(f"processor {pid!r} not found in this session", field=field_name)
        self.touch(pid)
        return entry

    def touch(self, pid: str) -> None:
        """Used now (a loader's use keeps its dataset in use too)."""
        if pid in self.entries:
            self.entries[pid].used = time.monotonic()
            self.entries.move_to_end(pid)

    def of_tenant(self, tenant_id: str) -> list[Entry]:
        return [e for e in self.entries.values() if e.tenant_id == tenant_id]

    def drop_session(self, session_id: str) -> int:
        gone = [pid for pid, e in self.entries.items() if e.session_id == session_id]
        for pid in gone:
            del self.entries[pid]
        return len(gone)


STORE = Store()


def drop_session(session_id: str) -> int:
    """Forget a session's processor objects (call it when the session ends); how many there were."""
    return STORE.drop_session(session_id)
