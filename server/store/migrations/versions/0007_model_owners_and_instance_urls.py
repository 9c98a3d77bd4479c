"""model owners and instance urls

A model's work runs in one server process, its owner, whose queue keeps the model's seq_id order;
another process that receives a request for it forwards the request to the owner's URL. A process
adopts a model whose owner is gone.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-02 16:20:00
"""

from alembic import op
import sqlalchemy as sa


revision = '0007'
down_revision = '0006'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('models') as batch:
        batch.add_column(sa.Column('owner', sa.String(length=64), nullable=True))
    with op.batch_alter_table('instances') as batch:
        batch.add_column(sa.Column('url', sa.String(length=500), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('instances') as batch:
        batch.drop_column('url')
    with op.batch_alter_table('models') as batch:
        batch.drop_column('owner')
