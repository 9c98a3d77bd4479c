"""64-bit seq ids and sizes

A cloned SDK SamplingClient numbers its requests from 1_000_000_000 x its clone id (up to 10^18),
and checkpoint sizes may pass 2 GiB: 32-bit columns refuse both on PostgreSQL (SQLite's INTEGER
was 64-bit all along, which hid it).

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-02 14:40:00
"""

from alembic import op
import sqlalchemy as sa


revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None

COLUMNS = (
    ('futures', 'seq_id'),
    ('checkpoints', 'size_bytes'),
    ('models', 'model_seq_id'),
    ('custom_losses', 'seq'),
)


def upgrade() -> None:
    for table, column in COLUMNS:
        with op.batch_alter_table(table) as batch:
            batch.alter_column(column, existing_type=sa.Integer(), type_=sa.BigInteger(), existing_nullable=False)


def downgrade() -> None:
    for table, column in COLUMNS:
        with op.batch_alter_table(table) as batch:
            batch.alter_column(column, existing_type=sa.BigInteger(), type_=sa.Integer(), existing_nullable=False)
