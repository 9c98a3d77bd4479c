"""indexes for the periodic scans

The reaper drops the results of futures finished longer ago than the retention (by finished_at);
the session reaper reads live sessions by their last heartbeat. Both scans were full-table reads.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-03 13:30:00
"""

from alembic import op


revision = '0010'
down_revision = '0009'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index('ix_futures_finished_at', 'futures', ['finished_at'], unique=False)
    op.create_index('ix_sessions_live_heartbeat', 'sessions', ['finished_at', 'last_heartbeat_at'], unique=False)


def downgrade() -> None:
    op.drop_index('ix_sessions_live_heartbeat', table_name='sessions')
    op.drop_index('ix_futures_finished_at', table_name='futures')
