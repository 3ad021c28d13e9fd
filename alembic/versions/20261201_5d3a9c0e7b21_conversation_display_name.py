"""conversation display name (WhatsApp ProfileName)

Revision ID: 5d3a9c0e7b21
Revises: 42e79fd066e4
Create Date: 2026-12-01 12:20:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op


revision: str = '5d3a9c0e7b21'
down_revision: str | None = '42e79fd066e4'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table('conversation') as batch_op:
        batch_op.add_column(sa.Column('display_name', sa.String(length=255), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('conversation') as batch_op:
        batch_op.drop_column('display_name')
