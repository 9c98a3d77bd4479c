"""server.store: the alembic migration builds exactly tables.Base.metadata, on SQLite and on a real
PostgreSQL; UTC datetimes; tenant-scoped queries on both backends."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config as AlembicConfig
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, inspect, select, text
from sqlalchemy.exc import IntegrityError

from server import ids
from server.errors import NotFound
from server.store import queries
from server.store.database import MIGRATIONS_DIR, Database
from server.store.tables import ApiKey, Base, Checkpoint, Future, Model, SamplingSession, Tenant
from server.store.tables import Session as SessionRow
from server.tenancy import keys

# --------------------------------------------------------------------------------------------
# Databases (make_pg_database comes from tests/conftest.py)


@pytest.fixture
def fresh_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """An empty database of the backend named by the test's `backend` parameter."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'fresh.db'}"
    return request.getfixturevalue("make_pg_database")()


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def db(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Database]:
    """One migrated database per backend, shared by the query tests (each test uses its own tenants)."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path_factory.mktemp('store') / 'twinkle.db'}"
    else:
        url = request.getfixturevalue("make_pg_database")()
    database = Database(url, threads=1)
    database.migrate()
    yield database
    database.close()


def schema_differences(engine: Engine) -> list:
    with engine.connect() as conn:
        ctx = MigrationContext.configure(conn, opts={"compare_type": True, "compare_server_default": True})
        return compare_metadata(ctx, Base.metadata)


def head_revision() -> str:
    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    return ScriptDirectory.from_config(cfg).get_current_head()


def alembic_revision(engine: Engine) -> list[str]:
    with engine.connect() as conn:
        return [r[0] for r in conn.execute(text("SELECT version_num FROM alembic_version"))]


# --------------------------------------------------------------------------------------------
# Migrations


@pytest.mark.parametrize("fresh_url", ["sqlite", "postgresql"], indirect=True)
def test_migrate_creates_exactly_the_declared_schema(fresh_url: str) -> None:
    database = Database(fresh_url, threads=1)
    try:
        assert inspect(database.engine).get_table_names() == []
        database.migrate()
        tables = set(inspect(database.engine).get_table_names())
        assert tables == set(Base.metadata.tables) | {"alembic_version"}
        assert schema_differences(database.engine) == []
        assert alembic_revision(database.engine) == [head_revision()]

        # Idempotent: again on the same engine, and from a new process (a new Database) on the same URL.
        database.migrate()
        again = Database(fresh_url, threads=1)
        try:
            again.migrate()
            assert schema_differences(again.engine) == []
            assert alembic_revision(again.engine) == [head_revision()]
        finally:
            again.close()
    finally:
        database.close()


@pytest.mark.parametrize("fresh_url", ["sqlite", "postgresql"], indirect=True)
def test_schema_comparison_can_see_a_difference(fresh_url: str) -> None:
    """Guards the test above: a schema that lacks something must not compare equal."""
    database = Database(fresh_url, threads=1)
    try:
        database.migrate()
        with database.engine.begin() as conn:
            conn.execute(text("DROP INDEX ix_futures_state"))
        diffs = schema_differences(database.engine)
        assert [d[0] for d in diffs] == ["add_index"]
        assert diffs[0][1].name == "ix_futures_state"
    finally:
        database.close()


def test_sqlite_migrate_creates_missing_parent_dir(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "twinkle.db"
    database = Database(f"sqlite:///{path}", threads=1)
    try:
        database.migrate()
        assert path.exists()
        with database.engine.connect() as conn:
            assert conn.execute(text("PRAGMA foreign_keys")).scalar() == 1
            assert conn.execute(text("PRAGMA journal_mode")).scalar() == "wal"
    finally:
        database.close()


def upgrade_to(engine: Engine, revision: str) -> None:
    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, revision)


@pytest.mark.parametrize("fresh_url", ["sqlite", "postgresql"], indirect=True)
def test_migration_0004_moves_key_hashes_to_api_keys(fresh_url: str) -> None:
    """A 0003 database with open-mode tenants (one key hash each, names not unique) and rows that
    point at them: after the upgrade every old key still means its tenant, names are unique, the
    rows that point at tenants are intact (SQLite rebuilds the tenants table), and the schema is
    exactly the declared one."""
    database = Database(fresh_url, threads=1)
    try:
        upgrade_to(database.engine, "0003")
        with database.engine.begin() as conn:
            for i, (name, key) in enumerate([("tenant-a", "tml-a"), ("twin", "tml-b"), ("twin", "tml-c")]):
                conn.execute(text("INSERT INTO tenants (id, name, key_hash, created_at) VALUES (:id, :n, :h, :at)"),
                             {"id": f"t{i}", "n": name, "h": ids.hash_key(key), "at": datetime(2025, 1, 1 + i)})
            conn.execute(text("INSERT INTO sessions (id, tenant_id, tags, user_metadata, created_at, last_heartbeat_at) "
                              "VALUES ('s', 't2', '[]', '{}', '2025-01-01', '2025-01-01')"))
        database.migrate()
        assert schema_differences(database.engine) == []
        assert alembic_revision(database.engine) == [head_revision()]
        rows = database.call(lambda s: [(t.id, t.name, t.limits) for t in s.scalars(select(Tenant).order_by(Tenant.id))])
        assert rows == [("t0", "tenant-a", {}), ("t1", "twin", {}), ("t2", "twin-t2", {})]
        for i, key in enumerate(["tml-a", "tml-b", "tml-c"]):
            hit = database.call(lambda s, key=key: keys.resolve_key(s, ids.hash_key(key)))
            assert hit is not None and hit.tenant_id == f"t{i}"
        rows = database.call(lambda s: s.scalars(select(ApiKey).order_by(ApiKey.tenant_id)).all())
        assert [(k.prefix, k.revoked_at, k.created_at.day) for k in rows] == [(None, None, 1), (None, None, 2), (None, None, 3)]
        assert database.call(lambda s: s.get(SessionRow, "s").tenant_id) == "t2"
        with database.engine.connect() as conn:
            if conn.dialect.name == "sqlite":
                assert conn.execute(text("PRAGMA foreign_keys")).scalar() == 1  # back on after the migration
        with pytest.raises(IntegrityError):  # names are unique now
            database.call(lambda s: s.add(Tenant(id="t9", name="twin")))
    finally:
        database.close()


# --------------------------------------------------------------------------------------------
# Helpers for the query tests


def new_tenant(database: Database) -> tuple[str, str]:
    """A tenant with one session; returns (tenant_id, session_id)."""
    tenant_id = f"ten-{uuid.uuid4().hex[:12]}"
    session_id = f"sess-{uuid.uuid4().hex[:12]}"

    def add(s) -> None:
        s.add(Tenant(id=tenant_id, name=tenant_id))
        s.flush()
        s.add(SessionRow(id=session_id, tenant_id=tenant_id))

    database.call(add)
    return tenant_id, session_id


def add_model(database: Database, tenant_id: str, session_id: str, seq: int, created_at: datetime | None = None) -> str:
    model_id = f"{session_id}:train:{seq}"
    extra = {} if created_at is None else {"created_at": created_at}
    database.call(
        lambda s: s.add(
            Model(id=model_id, tenant_id=tenant_id, session_id=session_id, model_seq_id=seq, base_model="tiny", lora_rank=8, **extra)
        )
    )
    return model_id


def add_checkpoint(database: Database, tenant_id: str, model_id: str, kind: str, name: str) -> str:
    ckpt_id = f"ckpt-{uuid.uuid4().hex[:12]}"
    database.call(
        lambda s: s.add(
            Checkpoint(id=ckpt_id, tenant_id=tenant_id, model_id=model_id, kind=kind, name=name, storage_dir=f"x/{ckpt_id}")
        )
    )
    return ckpt_id


# --------------------------------------------------------------------------------------------
# UtcDateTime


def test_utc_datetime_round_trips_as_aware_utc(db: Database) -> None:
    tenant_id = f"ten-{uuid.uuid4().hex[:12]}"
    ist = timezone(timedelta(hours=5, minutes=30))
    written = datetime(2024, 1, 2, 3, 4, 5, 678901, tzinfo=ist)  # = 2024-01-01 21:34:05.678901 UTC
    db.call(lambda s: s.add(Tenant(id=tenant_id, name=tenant_id, created_at=written)))

    # Read with Core (no identity map handing back the object we wrote).
    with db.engine.connect() as conn:
        read = conn.execute(select(Tenant.created_at).where(Tenant.id == tenant_id)).scalar_one()
    assert read.tzinfo is not None and read.utcoffset() == timedelta(0)
    assert read.tzinfo == UTC
    assert read == written
    assert (read.year, read.month, read.day, read.hour, read.minute, read.microsecond) == (2024, 1, 1, 21, 34, 678901)

    # The column default (utcnow) comes back aware too, through the ORM in a new session.
    _, session_id = new_tenant(db)
    row = db.call(lambda s: s.get(SessionRow, session_id))
    assert row.created_at.tzinfo == UTC
    assert abs(datetime.now(UTC) - row.created_at) < timedelta(minutes=5)


def test_utc_datetime_on_postgresql_with_a_non_utc_session_timezone(make_pg_database: Callable[[], str]) -> None:
    url = make_pg_database() + "?options=-c%20TimeZone%3DAmerica%2FNew_York"
    database = Database(url, threads=1)
    try:
        database.migrate()
        with database.engine.connect() as conn:
            assert conn.execute(text("SHOW TimeZone")).scalar() == "America/New_York"
        written = datetime(2024, 7, 1, 12, 0, tzinfo=UTC)
        database.call(lambda s: s.add(Tenant(id="t1", name="t", created_at=written)))
        with database.engine.connect() as conn:
            read = conn.execute(select(Tenant.created_at)).scalar_one()
            # Stored as the right instant, not as a local wall-clock time.
            epoch = conn.execute(text("SELECT extract(epoch from created_at) FROM tenants")).scalar_one()
        assert read == written and read.tzinfo == UTC and read.hour == 12
        assert float(epoch) == written.timestamp()
    finally:
        database.close()


def test_utc_datetime_stores_utc_wall_clock_in_sqlite(tmp_path: Path) -> None:
    database = Database(f"sqlite:///{tmp_path / 't.db'}", threads=1)
    try:
        database.migrate()
        written = datetime(2024, 1, 2, 3, 4, 5, tzinfo=timezone(timedelta(hours=-8)))
        database.call(lambda s: s.add(Tenant(id="t1", name="t", created_at=written)))
        with database.engine.connect() as conn:
            raw = conn.execute(text("SELECT created_at FROM tenants")).scalar_one()
        # Naive UTC text sorts chronologically, which ORDER BY created_at relies on.
        assert raw.startswith("2024-01-02 11:04:05")
    finally:
        database.close()


# --------------------------------------------------------------------------------------------
# queries.owned


@pytest.mark.parametrize(
    ("table", "what"),
    [(Model, "model"), (SessionRow, "session"), (Checkpoint, "checkpoint"), (SamplingSession, "sampling session")],
)
def test_owned_returns_own_row_and_hides_others(db: Database, table: type, what: str) -> None:
    mine, my_session = new_tenant(db)
    theirs, their_session = new_tenant(db)

    def ids_for(tenant_id: str, session_id: str) -> str:
        if table is SessionRow:
            return session_id
        model_id = add_model(db, tenant_id, session_id, 0)
        if table is Model:
            return model_id
        ckpt = add_checkpoint(db, tenant_id, model_id, "sampler", "c1")
        if table is Checkpoint:
            return ckpt
        sampler_id = f"{session_id}:sample:0"
        db.call(lambda s: s.add(SamplingSession(id=sampler_id, tenant_id=tenant_id, session_id=session_id, base_model="tiny", checkpoint_id=ckpt)))
        return sampler_id

    my_id = ids_for(mine, my_session)
    their_id = ids_for(theirs, their_session)

    row = db.call(lambda s: queries.owned(s, table, mine, my_id))
    assert row.id == my_id and row.tenant_id == mine

    missing_id = my_id + "-missing"
    with pytest.raises(NotFound) as missing:
        db.call(lambda s: queries.owned(s, table, mine, missing_id, field="the_field"))
    with pytest.raises(NotFound) as foreign:
        db.call(lambda s: queries.owned(s, table, mine, their_id, field="the_field"))

    # Another tenant's object reads exactly like a missing one.
    assert missing.value.message == f"{what} {missing_id!r} not found"
    assert foreign.value.message == f"{what} {their_id!r} not found"
    assert missing.value.field == foreign.value.field == "the_field"
    assert missing.value.kind == foreign.value.kind == "not_found"
    # ... and the owner still sees it.
    assert db.call(lambda s: queries.owned(s, table, theirs, their_id)).tenant_id == theirs


def test_owned_field_defaults_to_none(db: Database) -> None:
    mine, _ = new_tenant(db)
    with pytest.raises(NotFound) as info:
        db.call(lambda s: queries.owned(s, Model, mine, "nope"))
    assert info.value.field is None


# --------------------------------------------------------------------------------------------
# checkpoint_by_name, list_checkpoints


def test_checkpoint_by_name(db: Database) -> None:
    mine, my_session = new_tenant(db)
    theirs, their_session = new_tenant(db)
    m0 = add_model(db, mine, my_session, 0)
    m1 = add_model(db, mine, my_session, 1)
    t0 = add_model(db, theirs, their_session, 0)
    train = add_checkpoint(db, mine, m0, "training", "step1")
    sampler = add_checkpoint(db, mine, m0, "sampler", "step1")
    other_model = add_checkpoint(db, mine, m1, "training", "step1")
    add_checkpoint(db, theirs, t0, "training", "step1")

    def lookup(tenant_id: str, model_id: str, kind: str, name: str) -> str | None:
        row = db.call(lambda s: queries.checkpoint_by_name(s, tenant_id, model_id, kind, name))
        return None if row is None else row.id

    assert lookup(mine, m0, "training", "step1") == train
    assert lookup(mine, m0, "sampler", "step1") == sampler
    assert lookup(mine, m1, "training", "step1") == other_model
    assert lookup(mine, m0, "training", "step2") is None
    assert lookup(mine, m1, "sampler", "step1") is None
    # Another tenant's model and checkpoint: invisible, whichever model id is asked for.
    assert lookup(mine, t0, "training", "step1") is None
    assert lookup(theirs, m0, "training", "step1") is None


def test_list_checkpoints_skips_ephemeral_and_other_tenants(db: Database) -> None:
    mine, my_session = new_tenant(db)
    m0 = add_model(db, mine, my_session, 0)
    first = add_checkpoint(db, mine, m0, "training", "a")
    second = add_checkpoint(db, mine, m0, "sampler", "b")
    eph = add_checkpoint(db, mine, m0, "sampler", "eph")
    db.call(lambda s: setattr(s.get(Checkpoint, eph), "ephemeral", True))
    theirs, _ = new_tenant(db)
    assert [c.id for c in db.call(lambda s: queries.list_checkpoints(s, mine, m0))] == [first, second]
    assert db.call(lambda s: queries.list_checkpoints(s, theirs, m0)) == []


# --------------------------------------------------------------------------------------------
# list_models


def test_list_models_orders_paginates_counts_and_filters(db: Database) -> None:
    mine, my_session = new_tenant(db)
    theirs, their_session = new_tenant(db)
    t = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)
    # created_at: seq 0 oldest ... seq 3 newest; seq 4 and 5 share the newest time (tie: by id).
    times = {0: t, 1: t + timedelta(seconds=1), 2: t + timedelta(minutes=1), 3: t + timedelta(hours=1)}
    times[4] = times[5] = t + timedelta(days=1)
    made = {seq: add_model(db, mine, my_session, seq, created_at) for seq, created_at in [(2, times[2]), (0, times[0]), (5, times[5]), (3, times[3]), (1, times[1]), (4, times[4])]}
    for seq in range(3):
        add_model(db, theirs, their_session, seq, t + timedelta(days=2))  # newer than all of mine

    expected = [made[4], made[5], made[3], made[2], made[1], made[0]]
    assert made[4] < made[5]

    rows, total = db.call(lambda s: queries.list_models(s, mine, 100, 0))
    assert [r.id for r in rows] == expected
    assert total == 6
    assert all(r.tenant_id == mine for r in rows)

    pages = []
    for offset in (0, 2, 4, 6):
        page, total = db.call(lambda s, offset=offset: queries.list_models(s, mine, 2, offset))
        assert total == 6  # the total ignores limit/offset
        pages.append([r.id for r in page])
    assert pages == [expected[0:2], expected[2:4], expected[4:6], []]

    page, total = db.call(lambda s: queries.list_models(s, mine, 4, 3))
    assert [r.id for r in page] == expected[3:6] and total == 6

    theirs_rows, their_total = db.call(lambda s: queries.list_models(s, theirs, 10, 0))
    assert their_total == 3 and {r.tenant_id for r in theirs_rows} == {theirs}

    nobody_rows, nobody_total = db.call(lambda s: queries.list_models(s, "ten-nobody", 10, 0))
    assert nobody_rows == [] and nobody_total == 0


# --------------------------------------------------------------------------------------------
# Database.call / run


def test_call_commits_on_return_and_rolls_back_on_error(db: Database) -> None:
    tenant_id = f"ten-{uuid.uuid4().hex[:12]}"

    def add_then_fail(s) -> None:
        s.add(Tenant(id=tenant_id, name=tenant_id))
        s.flush()
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        db.call(add_then_fail)
    assert db.call(lambda s: s.get(Tenant, tenant_id)) is None


def test_foreign_keys_are_enforced(db: Database) -> None:
    from sqlalchemy.exc import IntegrityError

    with pytest.raises(IntegrityError):
        db.call(
            lambda s: s.add(
                Future(request_id=uuid.uuid4().hex, tenant_id="ten-does-not-exist", kind="k", scope="s", seq_id=1, fingerprint="f")
            )
        )


@pytest.mark.parametrize("fresh_url", ["sqlite", "postgresql"], indirect=True)
def test_migration_0005_widens_seq_ids_and_sizes_keeping_rows(fresh_url: str) -> None:
    """A cloned SamplingClient's seq ids start at 10^9 x its clone id (up to 10^18) and sizes may
    pass 2 GiB: after 0005 both fit, on PostgreSQL too, and the rows from before are intact."""
    database = Database(fresh_url, threads=1)
    try:
        upgrade_to(database.engine, "0004")
        with database.engine.begin() as conn:
            conn.execute(text("INSERT INTO tenants (id, name, limits, created_at) VALUES ('t', 't', '{}', '2025-01-01')"))
            conn.execute(text("INSERT INTO futures (request_id, tenant_id, kind, scope, seq_id, fingerprint, state, "
                              "created_at) VALUES ('r1', 't', 'sample', 'sampler:x', 7, 'f', 'pending', '2025-01-01')"))
        database.migrate()
        assert schema_differences(database.engine) == []
        big = 999_999_999 * 1_000_000_000 + 5
        with database.engine.begin() as conn:
            conn.execute(text("INSERT INTO futures (request_id, tenant_id, kind, scope, seq_id, fingerprint, state, "
                              "created_at) VALUES ('r2', 't', 'sample', 'sampler:x', :s, 'f', 'pending', '2025-01-01')"),
                         {"s": big})
            rows = conn.execute(text("SELECT request_id, seq_id FROM futures ORDER BY request_id")).all()
        assert [tuple(r) for r in rows] == [("r1", 7), ("r2", big)]
    finally:
        database.close()
