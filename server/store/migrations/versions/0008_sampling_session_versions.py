"""sampling sessions on in-memory adapter versions

save_weights_and_get_sampling_client no longer writes a checkpoint: its sampling session names an
in-memory adapter version (the checkpoint engine) and the model it was made from, whose owner
process holds it.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-03 08:10:00
"""

from alembic import op
import sqlalchemy as sa


revision = '0008'
down_revision = '0007'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('sampling_sessions') as batch:
        batch.add_column(sa.Column('version', sa.String(length=64), nullable=True))
        batch.add_column(sa.Column('model_id', sa.String(length=200), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('sampling_sessions') as batch:
        batch.drop_column('model_id')
        batch.drop_column('version')
