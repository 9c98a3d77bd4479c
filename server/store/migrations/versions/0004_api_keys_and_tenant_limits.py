"""api keys and tenant limits

Registered API keys move to their own table (a tenant may hold several, each revocable); tenant
names become unique; tenants get per-tenant quota overrides. Existing tenants keep working: the
key hash each of them was created from becomes its first api_keys row.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-29 05:12:04.925323
"""

import hashlib
import secrets

from alembic import op
import sqlalchemy as sa
import server.store.tables


revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None

tenants = sa.table(
    'tenants',
    sa.column('id', sa.String),
    sa.column('name', sa.String),
    sa.column('key_hash', sa.String),
    sa.column('limits', sa.JSON),
    sa.column('created_at', server.store.tables.UtcDateTime(timezone=True)),
)
api_keys = sa.table(
    'api_keys',
    sa.column('id', sa.String),
    sa.column('tenant_id', sa.String),
    sa.column('key_hash', sa.String),
    sa.column('created_at', server.store.tables.UtcDateTime(timezone=True)),
    sa.column('revoked_at', server.store.tables.UtcDateTime(timezone=True)),
)


def upgrade() -> None:
    op.create_table('api_keys',
    sa.Column('id', sa.String(length=64), nullable=False),
    sa.Column('tenant_id', sa.String(length=64), nullable=False),
    sa.Column('key_hash', sa.String(length=64), nullable=False),
    sa.Column('prefix', sa.String(length=16), nullable=True),
    sa.Column('label', sa.String(length=200), nullable=True),
    sa.Column('created_at', server.store.tables.UtcDateTime(timezone=True), nullable=False),
    sa.Column('last_used_at', server.store.tables.UtcDateTime(timezone=True), nullable=True),
    sa.Column('revoked_at', server.store.tables.UtcDateTime(timezone=True), nullable=True),
    sa.ForeignKeyConstraint(['tenant_id'], ['tenants.id'], ),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('key_hash')
    )
    with op.batch_alter_table('api_keys', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_api_keys_tenant_id'), ['tenant_id'], unique=False)

    with op.batch_alter_table('tenants', schema=None) as batch_op:
        batch_op.add_column(sa.Column('limits', sa.JSON(), nullable=True))

    # Data: every tenant's key hash becomes an api_keys row (the key itself was never stored, so
    # there is no prefix to show); duplicate names get the tenant id appended; no limits yet.
    conn = op.get_bind()
    rows = conn.execute(sa.select(tenants.c.id, tenants.c.name, tenants.c.key_hash, tenants.c.created_at)
                        .order_by(tenants.c.created_at, tenants.c.id)).all()
    seen: set[str] = set()
    for tenant_id, name, key_hash, created_at in rows:
        conn.execute(api_keys.insert().values(
            id=f"key-{secrets.token_hex(8)}", tenant_id=tenant_id, key_hash=key_hash, created_at=created_at))
        if name in seen:
            name = f"{name[:130]}-{tenant_id}"
            conn.execute(tenants.update().where(tenants.c.id == tenant_id).values(name=name))
        seen.add(name)
    conn.execute(tenants.update().values(limits={}))

    with op.batch_alter_table('tenants', schema=None) as batch_op:
        batch_op.alter_column('limits', existing_type=sa.JSON(), nullable=False)
        batch_op.create_unique_constraint('uq_tenants_name', ['name'])
        batch_op.drop_column('key_hash')


def downgrade() -> None:
    # Each tenant keeps one key (its oldest usable one); tenants without one get a hash that no
    # key has. Limits are dropped.
    with op.batch_alter_table('tenants', schema=None) as batch_op:
        batch_op.add_column(sa.Column('key_hash', sa.VARCHAR(length=64), nullable=True))
        batch_op.drop_constraint('uq_tenants_name', type_='unique')
        batch_op.drop_column('limits')

    conn = op.get_bind()
    for (tenant_id,) in conn.execute(sa.select(tenants.c.id)).all():
        key_hash = conn.execute(
            sa.select(api_keys.c.key_hash)
            .where(api_keys.c.tenant_id == tenant_id, api_keys.c.revoked_at.is_(None))
            .order_by(api_keys.c.created_at).limit(1)
        ).scalar()
        key_hash = key_hash or hashlib.sha256(secrets.token_bytes(32)).hexdigest()
        conn.execute(tenants.update().where(tenants.c.id == tenant_id).values(key_hash=key_hash))

    with op.batch_alter_table('tenants', schema=None) as batch_op:
        batch_op.alter_column('key_hash', existing_type=sa.VARCHAR(length=64), nullable=False)
        batch_op.create_unique_constraint('tenants_key_hash_key', ['key_hash'])

    with op.batch_alter_table('api_keys', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_api_keys_tenant_id'))

    op.drop_table('api_keys')
