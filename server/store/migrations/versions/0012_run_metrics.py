"""run metrics

The dashboard's curves: one row per recorded forward(_backward) or optim_step of a run, numbered
per run (idx); the metrics as the op answered them.

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-04 19:45:00
"""

from alembic import op
import sqlalchemy as sa
import server.store.tables


revision = '0012'
down_revision = '0011'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('run_metrics',
    sa.Column('model_id', sa.String(length=200), nullable=False),
    sa.Column('idx', sa.BigInteger(), nullable=False),
    sa.Column('tenant_id', sa.String(length=64), nullable=False),
    sa.Column('kind', sa.String(length=40), nullable=False),
    sa.Column('step', sa.BigInteger(), nullable=False),
    sa.Column('tokens', sa.BigInteger(), nullable=False),
    sa.Column('metrics', sa.JSON(), nullable=False),
    sa.Column('created_at', server.store.tables.UtcDateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['tenant_id'], ['tenants.id'], ),
    sa.PrimaryKeyConstraint('model_id', 'idx'),
    )
    op.create_index('ix_run_metrics_tenant_id', 'run_metrics', ['tenant_id'], unique=False)


def downgrade() -> None:
    op.drop_index('ix_run_metrics_tenant_id', table_name='run_metrics')
    op.drop_table('run_metrics')
