"""uploaded files

Files a tenant uploads (POST /v1/files) for the native API's datasets: one row each, the bytes
in the data dir; expires_at is the reaper's scan.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-03 12:10:00
"""

from alembic import op
import sqlalchemy as sa
import server.store.tables


revision = '0009'
down_revision = '0008'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('files',
    sa.Column('id', sa.String(length=64), nullable=False),
    sa.Column('tenant_id', sa.String(length=64), nullable=False),
    sa.Column('filename', sa.String(length=255), nullable=False),
    sa.Column('purpose', sa.String(length=32), nullable=False),
    sa.Column('size_bytes', sa.BigInteger(), nullable=False),
    sa.Column('sha256', sa.String(length=64), nullable=False),
    sa.Column('rows', sa.BigInteger(), nullable=False),
    sa.Column('storage_path', sa.String(length=500), nullable=False),
    sa.Column('expires_at', server.store.tables.UtcDateTime(timezone=True), nullable=True),
    sa.Column('created_at', server.store.tables.UtcDateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['tenant_id'], ['tenants.id'], ),
    sa.PrimaryKeyConstraint('id'),
    )
    op.create_index('ix_files_tenant_id', 'files', ['tenant_id'], unique=False)
    op.create_index('ix_files_expires_at', 'files', ['expires_at'], unique=False)


def downgrade() -> None:
    op.drop_index('ix_files_expires_at', table_name='files')
    op.drop_index('ix_files_tenant_id', table_name='files')
    op.drop_table('files')
