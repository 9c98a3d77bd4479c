"""future owners and instances

Each pending future records the server process whose queue holds it, and each live process has a
row it heartbeats: at start-up (and every heartbeat) a process fails only the futures of processes
that are gone, never those of another live one on the same database.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-02 14:40:00
"""

from alembic import op
import sqlalchemy as sa
import server.store.tables


revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'instances',
        sa.Column('id', sa.String(length=64), nullable=False),
        sa.Column('host', sa.String(length=255), nullable=False),
        sa.Column('pid', sa.Integer(), nullable=False),
        sa.Column('started_at', server.store.tables.UtcDateTime(timezone=True), nullable=False),
        sa.Column('heartbeat_at', server.store.tables.UtcDateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint('id'),
    )
    with op.batch_alter_table('futures') as batch:
        batch.add_column(sa.Column('owner', sa.String(length=64), nullable=True))
        batch.create_index('ix_futures_owner', ['owner'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('futures') as batch:
        batch.drop_index('ix_futures_owner')
        batch.drop_column('owner')
    op.drop_table('instances')
