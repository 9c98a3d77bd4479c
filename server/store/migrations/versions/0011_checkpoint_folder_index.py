"""an index for the orphan sweep

The hourly sweep of checkpoint folders (server/ops/orphans.py) asks which folders rows point at,
500 at a time, by checkpoints.storage_dir: without an index, a full-table read per batch.

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-03 18:45:00
"""

from alembic import op


revision = '0011'
down_revision = '0010'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index('ix_checkpoints_storage_dir', 'checkpoints', ['storage_dir'], unique=False)


def downgrade() -> None:
    op.drop_index('ix_checkpoints_storage_dir', table_name='checkpoints')
