"""Engine, sessions and schema migrations. Store calls are synchronous SQLAlchemy; the async
server runs them on a small thread pool so that a slow query never stalls the event loop."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from alembic import command
from alembic.config import Config as AlembicConfig
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from server.errors import Unavailable

log = logging.getLogger(__name__)
T = TypeVar("T")
MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"


def sqlite_file(url: str) -> Path | None:
    """The file of a SQLite URL, or None (another database, or SQLite in memory)."""
    if not url.startswith("sqlite"):
        return None
    database = make_url(url).database
    return Path(database) if database and database != ":memory:" else None


def make_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        if (file := sqlite_file(url)) is not None:
            file.parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    return create_engine(url, pool_pre_ping=True, pool_size=8, max_overflow=8)


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    # WAL lets readers proceed during a write; NORMAL sync is durable across process crashes.
    cur = dbapi_conn.cursor()
    for pragma in ("journal_mode=WAL", "synchronous=NORMAL", "foreign_keys=ON", "busy_timeout=30000"):
        cur.execute(f"PRAGMA {pragma}")
    cur.close()


def migrate(engine: Engine, on_step: Callable[[str, str], None] | None = None) -> None:
    """Bring the schema to the newest revision (creates it on an empty database). `on_step` hears
    of each revision applied, (its id, its title), as `twinkle db upgrade` shows them.

    On SQLite, altering a table means copying it into a new one and dropping the old, which
    foreign keys to it forbid: they are off while the migration runs (SQLite only takes that
    outside a transaction) and checked before they are on again."""
    cfg = _config()
    with engine.connect() as conn:
        sqlite = conn.dialect.name == "sqlite"
        if sqlite:
            conn.exec_driver_sql("PRAGMA foreign_keys=OFF")
            conn.commit()
        try:
            with conn.begin():
                cfg.attributes["connection"] = conn
                if on_step is not None:
                    cfg.attributes["on_version_apply"] = lambda *, step, **_: on_step(
                        step.up_revision_id or "", (step.up_revision.doc or "") if step.up_revision else "")
                command.upgrade(cfg, "head")
                if sqlite and (broken := conn.exec_driver_sql("PRAGMA foreign_key_check").all()):
                    raise RuntimeError(f"migration left rows with dangling foreign keys: {broken[:5]}")
        finally:
            if sqlite:
                conn.rollback()
                conn.exec_driver_sql("PRAGMA foreign_keys=ON")
                conn.commit()


class SchemaOutOfDate(RuntimeError):
    """The database's schema is not the one this code needs, and may not be upgraded here."""


def _config() -> AlembicConfig:
    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    return cfg


def _scripts() -> ScriptDirectory:
    """The migrations this code knows."""
    return ScriptDirectory.from_config(_config())


def schema_revisions(engine: Engine) -> tuple[str | None, str]:
    """(the database's alembic revision, or None for an empty one; the newest revision)."""
    head = _scripts().get_current_head()
    with engine.connect() as conn:
        current = MigrationContext.configure(conn).get_current_revision()
    assert head is not None
    return current, head


def pending_revisions(engine: Engine) -> list[str]:
    """The revisions an upgrade would apply, oldest first ([] when up to date)."""
    current, head = schema_revisions(engine)
    return [r.revision for r in reversed(list(_scripts().iterate_revisions(head, current)))]


def known_revision(revision: str) -> bool:
    """Whether `revision` is one of this code's migrations (not one a newer Twinkle wrote)."""
    try:
        return _scripts().get_revision(revision) is not None
    except Exception:  # alembic raises several kinds for an unknown or malformed id
        return False


class Database:
    def __init__(self, url: str, *, threads: int = 4) -> None:
        self.url = url
        self.engine = make_engine(url)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="db")

    def migrate(self, on_step: Callable[[str, str], None] | None = None) -> None:
        migrate(self.engine, on_step)

    def ensure_schema(self, *, upgrade: bool) -> None:
        """Upgrade the schema to the newest revision, or (without `upgrade`) check that it is
        there: SchemaOutOfDate, saying what to run, if not."""
        if upgrade:
            self.migrate()
            return
        current, head = schema_revisions(self.engine)
        if current != head:
            raise SchemaOutOfDate(
                f"the database is at schema revision {current or 'none (it is empty)'} and this server needs "
                f"{head}: run `twinkle db upgrade` with the same --database-url / --config, or serve with "
                "--db-upgrade"
            )

    def call(self, fn: Callable[[Session], T]) -> T:
        """Run fn in one transaction (committed if fn returns, rolled back if it raises). A database
        that cannot be reached is Unavailable (a 503 the client retries); the pool checks each
        connection before use, so once the database is back (a restart), the next call reconnects."""
        try:
            with self._sessions.begin() as session:
                return fn(session)
        except OperationalError as exc:
            if self.engine.dialect.name == "sqlite":  # a file, not a server: nothing to reach
                raise
            log.warning("database_unavailable", extra={"error": str(exc.orig).partition("\n")[0][:200]})
            raise Unavailable("the database cannot be reached right now; try again shortly", retry_after=2.0) from None

    async def run(self, fn: Callable[[Session], T]) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, self.call, fn)

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        self.engine.dispose()
