"""message part number (which part of its reply an assistant's message is)

Revision ID: e4b7c2a91d36
Revises: d7a0c3e5f912
Create Date: 2026-12-02 07:40:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op


revision: str = 'e4b7c2a91d36'
down_revision: str | None = 'd7a0c3e5f912'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Stored replies are counted as first parts: a reply stored before this column was cut
    # into parts can no longer be told apart, and a first part is what it was sent as before.
    with op.batch_alter_table('message') as batch_op:
        batch_op.add_column(
            sa.Column('part', sa.SmallInteger(), server_default='1', nullable=False)
        )


def downgrade() -> None:
    with op.batch_alter_table('message') as batch_op:
        batch_op.drop_column('part')
